"""KMeansService on a real local Ray cluster. Only the CPU path runs: this machine has no GPU."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid

import numpy as np
import pytest
import ray

from cluster_train.clustering.kmeans import ClusteringConfig, fit_clusters, nmi
from cluster_train.clustering.labelers import LabelTable
from cluster_train.clustering.service import get_or_create_service
from cluster_train.model.losses import UNKNOWN_LABEL
from cluster_train.seeding import derive

CONFIG = ClusteringConfig(num_clusters=4, pca_dim=8, threads=1, round_timeout_s=60.0)
C = 11  # chunks per utterance in `rank_data`'s keys


@pytest.fixture(scope="module")
def ray_cluster():
    with pytest.MonkeyPatch.context() as environment:
        if "RAY_ENABLE_UV_RUN_RUNTIME_ENV" not in os.environ:
            environment.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture
def service(ray_cluster):
    handle = get_or_create_service(f"kmeans-{uuid.uuid4().hex[:8]}", CONFIG, world_size=2)
    yield handle
    ray.kill(handle)


def rank_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """400 chunks in 4 blobs, keys = utterance * 11 + chunk, shuffled."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(4), 100)
    x = (rng.normal(scale=8.0, size=(4, 16))[truth] + rng.normal(size=(400, 16))).astype(np.float32)
    keys = (np.arange(400) // C) * C + np.arange(400) % C + 1000
    order = rng.permutation(400)
    return keys[order].astype(np.int64), x[order], truth[order]


@ray.remote(num_cpus=0)
def worker(service, epoch: int, rank: int, keys: np.ndarray, x: np.ndarray) -> dict:
    return ray.get(service.gather.remote(epoch, rank, keys, x))


def labels_of(answer: dict, keys: np.ndarray) -> np.ndarray:
    """The labels of `keys` in a gather answer, looked up as the training ranks do (`GatherLabeler`)."""
    return LabelTable.build(answer["keys"], answer["labels"], C, CONFIG.num_clusters).lookup(keys)


def test_two_ranks_get_one_global_clustering(service) -> None:
    keys, x, truth = rank_data()
    halves = [slice(0, 230), slice(200, 400)]  # unequal shards, 30 keys on both (sampler padding)
    answers = ray.get([worker.remote(service, 0, r, keys[s], x[s]) for r, s in enumerate(halves)])
    got = [labels_of(a, keys[s]) for a, s in zip(answers, halves)]
    # the reference: one clustering of the union in ascending key order
    order = np.argsort(keys)
    _, expected = fit_clusters(x[order], CONFIG, seed=derive(0, "kmeans", 0))  # the service's seed 0, epoch 0
    by_key = dict(zip(keys[order].tolist(), expected.assignments.tolist()))
    for rank, s in enumerate(halves):
        assert got[rank].dtype == np.int64
        assert got[rank].tolist() == [by_key[k] for k in keys[s].tolist()]
    both = np.concatenate(got)
    assert nmi(both, np.concatenate([truth[s] for s in halves])) > 0.95
    summary = answers[0]
    assert summary["version"] == 1 and summary["num_points"] == 400 and summary["reseeded"] == 0
    assert summary["cluster_sizes"].sum() == 400
    # every rank holds the whole table: any key of any rank; unknown keys are UNKNOWN_LABEL
    np.testing.assert_array_equal(answers[0]["keys"], answers[1]["keys"])
    labels = labels_of(answers[1], np.array([keys[0], keys[399], 5, 10**9]))
    assert labels.tolist() == [by_key[keys[0]], by_key[keys[399]], UNKNOWN_LABEL, UNKNOWN_LABEL]
    assert UNKNOWN_LABEL == -100


def _wait_for_submissions(service, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while ray.get(service.progress.remote())["submissions"] < count:
        assert time.monotonic() < deadline, f"fewer than {count} submissions after {timeout_s} s"
        time.sleep(0.05)


def test_resubmission_replaces_the_rank(service) -> None:
    keys, x, _ = rank_data(seed=1)
    # An async actor may start calls out of order: each waits until the one before has joined.
    replaced = service.gather.remote(1, 0, keys[:200], x[:200] * 0 + 99.0)  # garbage, replaced next
    _wait_for_submissions(service, 1)
    replacing = service.gather.remote(1, 0, keys[:200], x[:200])
    _wait_for_submissions(service, 2)
    answers = ray.get([replaced, replacing, service.gather.remote(1, 1, keys[200:], x[200:])])
    assert [a["num_points"] for a in answers] == [400, 400, 400]  # one round: the replaced call waits in it too
    order = np.argsort(keys)
    _, expected = fit_clusters(x[order], CONFIG, seed=derive(0, "kmeans", 1))
    labels = labels_of(answers[1], keys[order])
    np.testing.assert_array_equal(labels, expected.assignments)
    # after clustering, a full resubmission (worker group restarted) re-clusters: a new version
    shards = [slice(0, 200), slice(200, 400)]
    again = ray.get([service.gather.remote(1, r, keys[s], x[s]) for r, s in enumerate(shards)])
    assert again[0]["version"] == 2
    np.testing.assert_array_equal(labels_of(again[0], keys[order]), labels)


def test_a_worker_group_restarted_at_an_earlier_epoch_clusters_again_there(service) -> None:
    """Epochs move forward; an older epoch comes only from a worker group restarted from an earlier
    checkpoint (or from none, when the kill beat the checkpoint's report): the service goes back to
    it, and the round the dead group left waiting ends with an error instead of its timeout."""
    keys, x, _ = rank_data(seed=2)
    shards = [slice(0, 200), slice(200, 400)]
    first = ray.get([service.gather.remote(3, rank, keys[s], x[s]) for rank, s in enumerate(shards)])
    left_waiting = service.gather.remote(4, 0, keys[:200], x[:200])  # epoch 4 drops epoch 3
    while ray.get(service.progress.remote())["epoch"] != 4:
        time.sleep(0.05)
    again = ray.get([service.gather.remote(3, rank, keys[s], x[s]) for rank, s in enumerate(shards)])
    with pytest.raises(ray.exceptions.RayTaskError, match="superseded: the worker group restarted at epoch 3"):
        ray.get(left_waiting)
    assert [a["version"] for a in again] == [2, 2] and again[0]["epoch"] == 3
    np.testing.assert_array_equal(again[0]["labels"], first[0]["labels"])  # epoch 3's clustering, again


@pytest.mark.slow
def test_a_round_missing_a_rank_fails_after_the_configured_timeout_naming_it(ray_cluster) -> None:
    """`clustering.round_timeout_s` bounds how long the ranks that arrived wait for the others,
    counted from the latest arrival; the error names the epoch, the ranks in and out, and the key."""
    config = dataclasses.replace(CONFIG, round_timeout_s=2.0)
    service = get_or_create_service(f"kmeans-{uuid.uuid4().hex[:8]}", config, world_size=3)
    keys, x, _ = rank_data(seed=3)
    started = time.monotonic()
    first = service.gather.remote(7, 0, keys[:100], x[:100])
    _wait_for_submissions(service, 1)
    time.sleep(1.5)  # a later arrival restarts the count: rank 0 waits 2 s after rank 2, not after itself
    second = service.gather.remote(7, 2, keys[100:200], x[100:200])
    for waiting in (first, second):
        with pytest.raises(TimeoutError, match=r"epoch 7: rank\(s\) \[1\] of 3 sent nothing .* ranks \[0, 2\] "
                                               r"arrived.*clustering\.round_timeout_s = 2\.0"):
            ray.get(waiting, timeout=30)
    assert 3.5 - 0.2 < time.monotonic() - started < 15
    ray.kill(service)


def test_named_service_is_shared_and_checked(ray_cluster) -> None:
    name = f"kmeans-{uuid.uuid4().hex[:8]}"
    first = get_or_create_service(name, CONFIG, world_size=2)
    assert get_or_create_service(name, CONFIG, world_size=2)._actor_id == first._actor_id
    assert ray.get_actor(name)._actor_id == first._actor_id
    with pytest.raises(ValueError, match="exists with"):
        get_or_create_service(name, CONFIG, world_size=3)
    ray.kill(first)
