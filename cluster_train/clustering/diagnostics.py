"""Per-epoch diagnostics of the pseudo-labels, computed on world rank 0 from the shared label table.

    diagnostics = ClusterDiagnostics.from_dataset(dataset, splits, num_chunks)
    metrics, figure = diagnostics.epoch(table, cluster_sizes)

Metrics: the change of labels since the previous epoch (NMI of epoch t vs t - 1 over the chunks in
both), NMI and purity of the clusters against the emotion category where the data has one, and the
mean arousal of the clusters with the highest and lowest mean. The figure is the paper's Fig. 3:
arousal histograms of those two clusters (labels on the raw 1-7 scale, one count per chunk).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cluster_train.clustering.kmeans import nmi, purity
from cluster_train.clustering.labelers import LabelTable
from cluster_train.data.batches import as_float, split_chunk_keys, utterance_keys

MIN_CHUNKS_FOR_MEAN = 1  # a cluster needs this many labelled chunks to rank by mean arousal


@dataclass
class ClusterDiagnostics:
    utterance_keys: np.ndarray  # (U,) int64 sorted
    categories: np.ndarray  # (U,) object: category string or None
    arousal: np.ndarray  # (U,) float32, NaN where unlabelled
    num_chunks: int
    previous: LabelTable | None = field(default=None, repr=False)

    @staticmethod
    def from_dataset(dataset, splits: list[str], num_chunks: int) -> "ClusterDiagnostics":
        """Category and arousal of every utterance in `splits` of a `PreparedDataset` (small:
        one row per utterance, no chunks). A dataset without a `category` column gives None."""
        try:
            table = dataset.read_table(splits, ["id", "arousal", "category"])
            categories = table["category"].to_pylist()
        except (KeyError, ValueError):  # a dataset prepared before the column existed
            table = dataset.read_table(splits, ["id", "arousal"])
            categories = [None] * table.num_rows
        keys = utterance_keys(table["id"].to_pylist(), num_chunks)
        order = np.argsort(keys)
        arousal = as_float(table["arousal"].to_numpy(zero_copy_only=False))
        return ClusterDiagnostics(keys[order], np.asarray(categories, dtype=object)[order], arousal[order], num_chunks)

    def epoch(self, table: LabelTable, cluster_sizes: np.ndarray | None = None):
        """(metrics, figure or None) for this epoch's `table`; remembers it for the next epoch."""
        keys, labels = table.flat()
        metrics: dict[str, float] = {}
        if cluster_sizes is not None:
            sizes = np.asarray(cluster_sizes, dtype=np.float64)
            share = sizes / max(sizes.sum(), 1)
            metrics["cluster/size_entropy"] = float(-(share[share > 0] * np.log(share[share > 0])).sum())
        if self.previous is not None:
            before = self.previous.lookup(keys)
            both = before >= 0
            if both.any():
                metrics["cluster/nmi_previous"] = nmi(before[both], labels[both])
        self.previous = table
        row = self._rows(split_chunk_keys(keys, self.num_chunks)[0])
        known = row >= 0
        category = np.full(len(keys), None, dtype=object)
        category[known] = self.categories[row[known]]
        has_category = np.array([c is not None for c in category], dtype=bool)
        if has_category.any():
            metrics["cluster/nmi_category"] = nmi(labels[has_category], category[has_category].astype(str))
            metrics["cluster/purity_category"] = purity(labels[has_category], category[has_category].astype(str))
        arousal = np.full(len(keys), np.nan, dtype=np.float32)
        arousal[known] = self.arousal[row[known]]
        figure = None
        labelled = np.isfinite(arousal)
        if labelled.any():
            high, low, means = extreme_clusters(labels[labelled], arousal[labelled])
            if high is not None:
                metrics["cluster/arousal_mean_high"], metrics["cluster/arousal_mean_low"] = means[high], means[low]
                figure = arousal_figure(labels[labelled], arousal[labelled], high, low)
        return metrics, figure

    def _rows(self, utterance_keys: np.ndarray) -> np.ndarray:
        """Index of each utterance key in this table, -1 where absent."""
        if len(self.utterance_keys) == 0:
            return np.full(len(utterance_keys), -1)
        index = np.searchsorted(self.utterance_keys, utterance_keys).clip(max=len(self.utterance_keys) - 1)
        return np.where(self.utterance_keys[index] == utterance_keys, index, -1)


def extreme_clusters(labels: np.ndarray, arousal: np.ndarray):
    """(cluster with the highest mean arousal, with the lowest, {cluster: mean})."""
    clusters = np.unique(labels)
    means = {int(c): float(arousal[labels == c].mean()) for c in clusters
             if (labels == c).sum() >= MIN_CHUNKS_FOR_MEAN}
    if len(means) < 2:
        return None, None, means
    ranked = sorted(means, key=lambda c: (means[c], c))
    return ranked[-1], ranked[0], means


def arousal_figure(labels: np.ndarray, arousal: np.ndarray, high: int, low: int):
    """The paper's Fig. 3: arousal histograms of the highest- and lowest-arousal clusters."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in any worker

    figure = Figure(figsize=(6, 3.5), dpi=100)
    axes = figure.subplots()
    draw_arousal_histograms(axes, labels, arousal, high, low)
    axes.set_ylabel("density of chunks")
    figure.tight_layout()
    return figure


def draw_arousal_histograms(axes, labels: np.ndarray, arousal: np.ndarray, high: int, low: int) -> None:
    """On matplotlib `axes`: arousal histograms of clusters `high` (red) and `low` (blue), one count per chunk."""
    bins = np.linspace(1, 7, 25)
    for cluster, colour, name in ((high, "tab:red", "highest"), (low, "tab:blue", "lowest")):
        values = arousal[labels == cluster]
        axes.hist(values, bins=bins, alpha=0.6, color=colour, density=True,
                  label=f"cluster {cluster} ({name} mean {values.mean():.2f}, n={len(values)})")
    axes.set_xlabel("arousal (1-7)")
    axes.legend(fontsize=8)
