"""DeepEmoCluster (paper Table 1): the encoder, a cluster head trained on K-means pseudo-labels and a
regressor trained on the labels, jointly.

`param_groups()` gives each parameter to exactly one named group, so each group has its own
optimizer (the original code gave SGD and Adam the same parameters).
"""

from __future__ import annotations

import torch
from torch import nn

from cluster_train.model.blocks import ClusterHead, Encoder, ModelConfig, Regressor


class DeepEmoCluster(nn.Module):
    """Encoder + cluster head (pseudo-labels) + regressor (attributes), trained jointly."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.cluster_head = ClusterHead(config.feature_dim, config.num_clusters)
        self.regressor = Regressor(config.feature_dim, len(config.attributes))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """features: pre-ReLU embedding (B, feature_dim); cluster_logits (B, K); prediction (B, A)."""
        features = self.encoder.embed(x)
        hidden = self.encoder.activate(features)
        return {
            "features": features,
            "cluster_logits": self.cluster_head(hidden),
            "prediction": self.regressor(hidden),
        }

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The feature K-means clusters; call in eval mode (BatchNorm running statistics)."""
        return self.encoder.embed(x)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """encoder (with the cluster head's body), cluster_top (re-created every clustering), regressor."""
        return {
            "encoder": [
                *self.encoder.parameters(),
                *self.cluster_head.body.parameters(),
            ],
            "cluster_top": list(self.cluster_head.top.parameters()),
            "regressor": list(self.regressor.parameters()),
        }
