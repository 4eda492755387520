"""DeepEmoCluster training on Ray Train: model, losses, K-means pseudo-labels, the epoch loop."""
