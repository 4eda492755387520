"""A run's config checked against its prepared dataset before any cluster resource is taken: what
would otherwise fail after days of training (a test split the dataset lacks, scored at the end) or
every epoch (a gather-mode clustering too big for one actor)."""

from __future__ import annotations

from cluster_train.data.config import DataConfig
from cluster_train.train.config import TrainConfig
from data_prep.config import require
from data_prep.dataset import PreparedDataset

# Copies of the gathered float32 embeddings the K-means actor holds at its peak: the ranks' parts,
# their concatenation, and the deduplicated, preprocessed points faiss clusters.
GATHER_COPIES = 3


def gather_bytes(chunks: int, feature_dim: int) -> int:
    """Peak memory of the K-means actor clustering `chunks` embeddings of `feature_dim` in "gather" mode."""
    return chunks * feature_dim * 4 * GATHER_COPIES


def check_run_against_dataset(config: TrainConfig, dataset: PreparedDataset) -> None:
    """ConfigError, naming the key, when `config` names a split `dataset` lacks or its "gather"
    clustering would need more than `clustering.gather_max_gb` on one actor."""
    _check_splits(config.data, dataset)
    if config.clusters and config.clustering.mode == "gather":
        _check_gather_memory(config, dataset)


def _check_splits(data: DataConfig, dataset: PreparedDataset) -> None:
    have = sorted(dataset.info["counts"]["utterances"])
    named = {"data.labeled_splits": data.labeled_splits, "data.development_split": [data.development_split],
             "data.test_splits": data.test_splits}
    # The default `unlabeled` (MSP-Podcast's audio outside its label CSV, prepared only with
    # include_unlabeled; RAVDESS has none) may be absent: the run then has no unlabeled audio.
    if data.unlabeled_splits != DataConfig().unlabeled_splits:
        named["data.unlabeled_splits"] = data.unlabeled_splits
    for key, splits in named.items():
        missing = [split for split in splits if split not in have]
        require(not missing, key, f"split(s) {', '.join(map(repr, missing))} not in the prepared dataset "
                                  f"{dataset.location}, whose splits are {have}")


def _check_gather_memory(config: TrainConfig, dataset: PreparedDataset) -> None:
    from cluster_train.data.batches import _cluster_splits, row_counts

    limit_gb, width = config.clustering.gather_max_gb, config.model.feature_dim
    num_chunks = config.data.chunks.num_chunks
    utterances = dataset.info["counts"]["utterances"]
    chunks = sum(utterances.get(split, 0) for split in _cluster_splits(config.data)) * num_chunks
    if gather_bytes(chunks, width) <= limit_gb * 1e9:  # an upper bound from dataset.json: nothing read
        return
    chunks = row_counts(dataset, config.data, config.seed)["cluster"] * num_chunks  # the fractions applied
    need_gb = gather_bytes(chunks, width) / 1e9
    require(need_gb <= limit_gb, "clustering.mode",
            f"'gather' sends all {chunks:,} chunks ({width} float32 each) to one K-means actor every epoch, "
            f"about {need_gb:.3g} GB at its peak, over clustering.gather_max_gb = {limit_gb:g}: use "
            f"clustering.mode 'sample' (the actor fits on clustering.sample_size points) or 'allreduce' "
            f"(no actor), or raise clustering.gather_max_gb if the actor's node has the memory")
