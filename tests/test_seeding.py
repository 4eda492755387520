"""One seed drives every random stream, and no two (seed, epoch) pairs share a stream's draw."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest

from cluster_train.clustering.kmeans import ClusteringConfig, run_kmeans
from cluster_train.data.batches import InMemoryRows
from cluster_train.seeding import STREAMS, derive

SEEDS, EPOCHS = range(5), range(12)


def test_every_stream_seed_epoch_and_rank_gets_its_own_seed() -> None:
    drawn = [derive(seed, stream, epoch, rank)
             for seed, stream, epoch, rank in itertools.product(SEEDS, STREAMS, EPOCHS, range(3))]
    assert len(set(drawn)) == len(drawn)
    assert all(0 <= value < 2**31 for value in drawn)
    assert derive(3, "kmeans", 7) == derive(3, "kmeans", 7)  # a resumed run derives the same
    # `seed + epoch`, the old rule, gave seed 1's epoch 0 the draw of seed 0's epoch 1
    assert derive(1, "shuffle_stage1", 0) != derive(0, "shuffle_stage1", 1)
    with pytest.raises(ValueError, match="unknown random stream 'shuffle'"):
        derive(0, "shuffle")
    with pytest.raises(ValueError, match="must be >= 0"):
        derive(-1, "kmeans")


def test_two_seeds_share_no_shuffle_order() -> None:
    """The batch orders the trainer draws (stage s of epoch e shuffles with
    derive(seed, "shuffle_stage<s>", e)): all distinct over 5 seeds x 12 epochs x 2 stages."""
    rows = InMemoryRows(pa.table({"id": [f"u{i:02d}" for i in range(40)]}))
    orders = {}
    for seed, epoch, stage in itertools.product(SEEDS, EPOCHS, (1, 2)):
        shuffle = derive(seed, f"shuffle_stage{stage}", epoch)
        batches = rows.iter_batches(batch_size=8, drop_last=True, local_shuffle_seed=shuffle)
        orders[seed, epoch, stage] = tuple(i for batch in batches for i in batch["id"].to_pylist())
    assert len(set(orders.values())) == len(orders)


def test_two_seeds_give_different_kmeans_initialisations() -> None:
    """The K-means of epoch e clusters with derive(seed, "kmeans", e): one iteration from the
    initial centroids shows the initialisation."""
    x = np.random.default_rng(0).uniform(size=(3000, 4)).astype(np.float32)  # no true clusters
    config = ClusteringConfig(num_clusters=6, iterations=1, l2_normalize=False, threads=1)
    first = {seed: run_kmeans(x, config, derive(seed, "kmeans", 0)).centroids for seed in SEEDS}
    for a, b in itertools.combinations(SEEDS, 2):
        assert not np.allclose(first[a], first[b]), (a, b)
    np.testing.assert_array_equal(first[0], run_kmeans(x, config, derive(0, "kmeans", 0)).centroids)
