"""The three clustering modes behind one interface, on a real local Ray cluster with 2 ranks joined
by a real gloo process group (as Ray Train's workers are), real faiss and real actor restarts."""

from __future__ import annotations

import dataclasses
import time
import uuid

import numpy as np
import pytest
import ray
import torch
from conftest import gloo_pair, local_ray

from cluster_train.clustering.kmeans import (
    ClusteringConfig,
    assign,
    fit_clusters,
    fit_preprocessor,
    moments,
    nmi,
    preprocess_inplace,
    preprocessor_from_moments,
    split_empty_centroids,
)
from cluster_train.clustering.labelers import LabelTable, _split_by_key, uniform_over_clusters
from cluster_train.clustering.service import get_or_create_service
from cluster_train.distributed import Collective
from cluster_train.model.losses import UNKNOWN_LABEL
from cluster_train.seeding import derive
from data_prep.config import ConfigError

C = 11  # chunks per utterance


def blobs(n: int, k: int = 4, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, n)
    return (rng.normal(scale=3.0, size=(k, d))[truth] + rng.normal(size=(n, d))).astype(np.float32), truth


# --- pure parts -----------------------------------------------------------------------------------


def test_label_table_groups_utterances_and_looks_up_any_key() -> None:
    keys = np.arange(5 * C, dtype=np.int64) + 7 * C  # utterances 7..11, all chunks
    labels = np.arange(len(keys)) % 3
    order = np.random.default_rng(0).permutation(len(keys))
    table = LabelTable.build(keys[order], labels[order], C, num_clusters=3)
    assert table.num_chunks == C and table.labels.dtype == np.uint8 and table.labels.shape == (5, C)
    assert table.group_keys.tolist() == [7, 8, 9, 10, 11]
    assert table.group_keys.nbytes + table.labels.nbytes == 5 * 8 + 5 * C  # ~1.7 bytes per chunk
    np.testing.assert_array_equal(table.lookup(keys), labels)
    assert table.lookup(np.array([0, 12 * C, 7 * C + 3])).tolist() == [UNKNOWN_LABEL, UNKNOWN_LABEL, labels[3]]
    flat_keys, flat_labels = table.flat()
    np.testing.assert_array_equal(flat_keys, keys)
    np.testing.assert_array_equal(flat_labels, labels)


def test_label_table_partial_utterances_and_merge() -> None:
    keys = np.array([3 * C, 3 * C + 1, 5 * C + 2], dtype=np.int64)  # incomplete utterances: one key a row
    part = LabelTable.build(keys, np.array([1, 2, 0]), C, num_clusters=4)
    assert part.num_chunks == 1
    full = LabelTable.build(np.arange(C) + 9 * C, np.full(C, 3), C, num_clusters=4)
    merged = LabelTable.merge([full, part])
    assert merged.lookup(np.array([3 * C + 1, 9 * C + 4, 5 * C + 2, 4 * C])).tolist() == [2, 3, 0, UNKNOWN_LABEL]
    grouped = LabelTable.merge([full, LabelTable.build(np.arange(C) + 2 * C, np.zeros(C), C, 4)])
    assert grouped.num_chunks == C and grouped.group_keys.tolist() == [2, 9]
    assert LabelTable.build(np.arange(3), np.array([0, 299, 5]), 1, 300).labels.dtype == np.uint16


def test_moments_give_the_same_whitening_as_the_data() -> None:
    x, _ = blobs(3000, d=12, seed=1)
    config = ClusteringConfig(pca_dim=8)
    direct = fit_preprocessor(x, config).apply(x)
    summed = moments(x[:1000]) + moments(x[1000:])  # two ranks' moments, all-reduced
    from_moments = preprocessor_from_moments(summed, config).apply(x)
    # eigenvector signs may differ: compare what K-means sees, the pairwise products
    np.testing.assert_allclose(direct[:200] @ direct[:200].T, from_moments[:200] @ from_moments[:200].T, atol=2e-4)


def test_blockwise_assignment_and_in_place_preprocessing_match_numpy() -> None:
    x, _ = blobs(40_000, d=16, seed=2)  # > 2 blocks
    preprocessor = fit_preprocessor(x, ClusteringConfig(pca_dim=8))
    centroids = preprocessor.apply(x[:5])
    y = preprocessor.apply(x)
    distances = ((y[:, None, :] - centroids[None]) ** 2).sum(axis=2)
    labels, squared = assign(x, centroids, preprocessor)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, distances.argmin(axis=1))
    np.testing.assert_allclose(squared, distances.min(axis=1), atol=1e-4)
    consumed = x.copy()
    out = preprocess_inplace(consumed, preprocessor)
    assert out.shape == (len(x), 8) and np.shares_memory(out, consumed)
    np.testing.assert_allclose(out, y, atol=1e-5)


def test_split_empty_centroids_and_split_by_key() -> None:
    centroids = np.array([[1.0, 1.0], [5.0, 5.0], [9.0, 9.0]], dtype=np.float32)
    counts = np.array([10.0, 0.0, 4.0])
    assert split_empty_centroids(centroids, counts) == 1
    assert np.allclose(centroids[1], centroids[0], rtol=1e-2) and not np.array_equal(centroids[1], centroids[0])
    # final repair: cluster 2 empty; cluster 0 (largest) gives the keys whose hash has the first splitting bit
    keys = np.arange(100, 140, dtype=np.int64)
    labels = np.where(np.arange(40) < 30, 0, 1).astype(np.uint8)
    counts = np.bincount(labels, minlength=3).astype(np.float64)
    assert _split_by_key(Collective(), keys, labels, counts) == 1
    assert (np.bincount(labels, minlength=3) > 0).all() and counts.tolist() == np.bincount(labels, minlength=3).tolist()
    assert set(labels[30:]) == {1}  # only the donor's members moved
    # the keys that move depend on the keys alone, not on their order (every rank sees its own order)
    reordered_keys = keys[::-1].copy()
    again = np.where(np.arange(40) < 30, 0, 1).astype(np.uint8)[::-1].copy()
    assert _split_by_key(Collective(), reordered_keys, again, np.bincount(again, minlength=3).astype(float)) == 1
    assert sorted(reordered_keys[again == 2]) == sorted(keys[labels == 2]) and (labels == 2).sum() > 0
    # two identical points (duplicates) still split: distinct keys always differ in some hash bit
    labels2, counts2 = np.zeros(2, np.uint8), np.array([2.0, 0.0])
    assert _split_by_key(Collective(), np.array([5, 6]), labels2, counts2) == 1 and sorted(labels2) == [0, 1]


def test_uniform_over_clusters_balances_a_skewed_batch() -> None:
    labels = np.array([0] * 900 + [1] * 100 + [UNKNOWN_LABEL] * 50)
    generator = torch.Generator().manual_seed(0)
    drawn = labels[uniform_over_clusters(labels, np.array([90_000, 10_000]), generator).numpy()]
    assert len(drawn) == len(labels) and UNKNOWN_LABEL not in drawn
    assert 0.45 < (drawn == 1).mean() < 0.55  # 10% of the batch, half of the draws


def test_config_checks_mode_and_sampler() -> None:
    with pytest.raises(ConfigError, match="clustering.mode"):
        ClusteringConfig(mode="scatter")
    with pytest.raises(ConfigError, match="clustering.stage1_sampler"):
        ClusteringConfig(stage1_sampler="weighted")


# --- 2 ranks on Ray ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks():
    with local_ray():
        yield gloo_pair(Rank)


@ray.remote(num_cpus=0)
class Rank:
    """A training rank: a gloo process group member that calls the labeler."""

    def setup(self, rank: int, world_size: int, port: int) -> None:
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)

    def label(self, config, service, epoch, keys, x, stall_s: float = 0.0, lose_first_answer: bool = False):
        from cluster_train.clustering.labelers import SampleLabeler, build_labeler
        from cluster_train.clustering.service import IncarnationChanged
        from cluster_train.distributed import Collective

        collective = Collective()
        if lose_first_answer:  # the actor's answer is lost on this rank only, on its first attempt
            class Unlucky(SampleLabeler):
                lost = False

                def _ask_actor(self, *args):
                    share = super()._ask_actor(*args)
                    if not Unlucky.lost:
                        Unlucky.lost = True
                        raise IncarnationChanged("the actor restarted after answering the other rank")
                    return share

            labeler = Unlucky(config, service, collective, "cpu")
        elif stall_s:  # this rank reaches the actor late, on its first attempt only: once the test has
            # killed the actor and Ray restarted it (at most stall_s later), with the old incarnation
            class Late(SampleLabeler):
                stalled = False

                def _ask_actor(self, epoch, keys, features, num_chunks, incarnation):
                    deadline = time.monotonic() + stall_s
                    while not Late.stalled and time.monotonic() < deadline:
                        try:
                            Late.stalled = ray.get(self.service.incarnation.remote(), timeout=10) != incarnation
                        except ray.exceptions.RayError:  # restarting
                            pass
                        time.sleep(0.1)
                    Late.stalled = True
                    return super()._ask_actor(epoch, keys, features, num_chunks, incarnation)

            labeler = Late(config, service, collective, "cpu")
        else:
            labeler = build_labeler(config, service, collective)
        result = labeler.label(epoch, keys, x.copy(), C)
        return result.table.flat(), result.table.lookup(keys), result.summary


def shards(n_utterances: int = 400, seed: int = 0):
    x, truth = blobs(n_utterances * C, seed=seed)
    keys = np.arange(len(x), dtype=np.int64) + 1000 * C
    cut = (n_utterances // 2 + 17) * C  # unequal shards on an utterance boundary
    return x, truth, keys, [slice(0, cut), slice(cut, len(x))]


@pytest.mark.parametrize("mode", ["gather", "sample", "allreduce"])
def test_every_mode_gives_every_rank_the_same_table_close_to_the_reference(ranks, mode) -> None:
    x, truth, keys, parts = shards()
    # PCA-whitening on: covers the moments all-reduce and the projection inside the workers
    config = ClusteringConfig(num_clusters=4, threads=1, mode=mode, sample_size=2000, pca_dim=8, whiten=True)
    service = get_or_create_service(f"km-{uuid.uuid4().hex[:8]}", config, 2) if mode != "allreduce" else None
    outs = ray.get([r.label.remote(config, service, 0, keys[s], x[s]) for r, s in zip(ranks, parts)])
    (keys0, labels0), own0, summary = outs[0]
    (keys1, labels1), own1, _ = outs[1]
    np.testing.assert_array_equal(keys0, keys)  # every chunk of both ranks, on both ranks
    np.testing.assert_array_equal(labels0, labels1)
    np.testing.assert_array_equal(np.concatenate([own0, own1]), labels0)
    _, reference = fit_clusters(x, config, seed=derive(0, "kmeans", 0))  # the labelers' seed 0, epoch 0
    if mode == "gather":  # the same computation as the reference
        np.testing.assert_array_equal(labels0, reference.assignments)
    assert nmi(labels0, reference.assignments) > 0.95 and nmi(labels0, truth) > 0.95
    assert summary["num_points"] == len(x) and summary["cluster_sizes"].sum() == len(x)
    assert (np.bincount(labels0, minlength=4) == summary["cluster_sizes"]).all()
    assert summary["objective"] == pytest.approx(reference.objective, rel=0.05)
    if mode == "allreduce":  # well-separated blobs converge early; a 1-iteration cap still gives a table
        assert summary["iterations"] < config.iterations
        capped = dataclasses.replace(config, iterations=1)
        outs = ray.get([r.label.remote(capped, None, 0, keys[s], x[s]) for r, s in zip(ranks, parts)])
        assert outs[0][2]["iterations"] == 1
    if service is not None:
        if mode == "sample":
            assert summary["sample_points"] == 2000  # 1,000 a rank reached the actor, not 4,400
        ray.kill(service)


def _assert_both_ranks_clustered_again(outs: list, truth: np.ndarray) -> None:
    """Both ranks took a second attempt and ended with the same, right labels."""
    (_, labels0), _, summary0 = outs[0]
    (_, labels1), _, summary1 = outs[1]
    assert summary0["actor_attempts"] == summary1["actor_attempts"] == 2
    np.testing.assert_array_equal(labels0, labels1)
    assert nmi(labels0, truth) > 0.95


def test_a_rank_whose_actor_call_failed_never_meets_one_that_succeeded_in_a_collective(ranks) -> None:
    """Rank 0 got its centroids, rank 1 lost the actor's answer: both must cluster again (rank 0
    going on to share labels while rank 1 retried left them in mismatched collectives, forever)."""
    x, truth, keys, parts = shards(seed=5)
    config = ClusteringConfig(num_clusters=4, threads=1, mode="sample", sample_size=2000)
    service = get_or_create_service(f"km-{uuid.uuid4().hex[:8]}", config, 2)
    outs = ray.get([ranks[0].label.remote(config, service, 0, keys[parts[0]], x[parts[0]]),
                    ranks[1].label.remote(config, service, 0, keys[parts[1]], x[parts[1]], lose_first_answer=True)],
                   timeout=120)
    _assert_both_ranks_clustered_again(outs, truth)
    ray.kill(service)


@pytest.mark.slow
def test_killed_actor_comes_back_and_both_ranks_cluster_again(ranks) -> None:
    x, truth, keys, parts = shards(seed=3)
    config = ClusteringConfig(num_clusters=4, threads=1, mode="sample", sample_size=2000, pca_dim=8, whiten=True)
    service = get_or_create_service(f"km-{uuid.uuid4().hex[:8]}", config, 2)
    before = ray.get(service.incarnation.remote())
    late = [ranks[0].label.remote(config, service, 0, keys[parts[0]], x[parts[0]]),
            ranks[1].label.remote(config, service, 0, keys[parts[1]], x[parts[1]], stall_s=120.0)]
    deadline = time.monotonic() + 60
    while ray.get(service.progress.remote())["submitted"] != [0]:  # rank 0 waits inside the actor
        assert time.monotonic() < deadline, "rank 0 never reached the actor"
        time.sleep(0.05)
    ray.kill(service, no_restart=False)  # dies with rank 0's sample; Ray restarts it empty
    outs = ray.get(late, timeout=120)
    assert ray.get(service.incarnation.remote()) != before
    _assert_both_ranks_clustered_again(outs, truth)
    ray.kill(service)
