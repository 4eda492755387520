"""KMeansService on a real local Ray cluster. Only the CPU path runs: this machine has no GPU."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid

import numpy as np
import pytest
import ray
from conftest import gloo_pair

from cluster_train.clustering.kmeans import ClusteringConfig, assign, fit_clusters, nmi
from cluster_train.clustering.labelers import LabelTable, _local_sample
from cluster_train.clustering.service import SupersededGroup, get_or_create_service
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


def test_a_new_worker_group_takes_over_the_round_a_killed_group_left_half_filled(service) -> None:
    """A worker group killed while its rank 0's sample sat in a round leaves it half-filled; the group
    Ray Train starts next must not complete that round with the dead rank's sample. Here the new
    group's rank 1 arrives first (the case that hung until clustering.round_timeout_s): the old round
    ends for the dead group, the new ranks cluster promptly on their own samples only, and a late
    submission of the old group is refused."""
    rng = np.random.default_rng(4)
    dead = rng.normal(loc=50.0, size=(30, 16)).astype(np.float32)  # 30 rows: unlike any new group's part
    new = [rng.normal(size=(100, 16)).astype(np.float32), rng.normal(size=(120, 16)).astype(np.float32)]
    left = service.fit_sample.remote(2, 0, dead, None, group="old")  # its caller then dies with its group
    _wait_for_submissions(service, 1)
    assert ray.get(service.progress.remote())["submitted"] == [0]
    started = time.monotonic()
    first = service.fit_sample.remote(2, 1, new[1], None, group="new")
    _wait_for_submissions(service, 1)  # counts the new round's submissions: rank 1 alone in it
    assert ray.get(service.progress.remote())["submitted"] == [1]
    answers = ray.get([service.fit_sample.remote(2, 0, new[0], None, group="new"), first], timeout=30)
    assert time.monotonic() - started < 20  # not clustering.round_timeout_s (60 s) of waiting
    _, expected = fit_clusters(np.concatenate(new), CONFIG, seed=derive(0, "kmeans", 2))
    for answer in answers:
        assert answer["num_points"] == 220  # the new ranks' 100 + 120 rows, none of the dead rank's 30
        np.testing.assert_array_equal(answer["centroids"], expected.centroids)
    with pytest.raises(SupersededGroup, match="worker group new took over at epoch 2; the round of group old"):
        ray.get(left, timeout=30)
    with pytest.raises(SupersededGroup, match="epoch 2, rank 1: worker group old was superseded by group new"):
        ray.get(service.fit_sample.remote(2, 1, dead, None, group="old"), timeout=30)
    # the new group goes on to its next epoch as before
    more = ray.get([service.fit_sample.remote(3, r, new[r], None, group="new") for r in (0, 1)], timeout=30)
    assert [a["epoch"] for a in more] == [3, 3] and more[0]["version"] == answers[0]["version"] + 1


@ray.remote(num_cpus=0)
class TrainingRank:
    """A training rank as Ray Train runs it: a gloo process-group member that labels with the
    project's labeler; `wait_for_rank_1` holds rank 0 back until rank 1 has reached the actor."""

    def setup(self, rank: int, world_size: int, port: int) -> None:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)

    def label(self, config, service, epoch: int, keys: np.ndarray, x: np.ndarray, wait_for_rank_1: bool = False):
        from cluster_train.clustering.labelers import SampleLabeler
        from cluster_train.distributed import Collective

        class Ordered(SampleLabeler):
            def _ask(self, method, *args):
                if wait_for_rank_1 and self.collective.rank == 0:
                    deadline = time.monotonic() + 60
                    while 1 not in ray.get(self.service.progress.remote())["submitted"]:
                        assert time.monotonic() < deadline, "rank 1 never reached the actor"
                        time.sleep(0.05)
                return super()._ask(method, *args)

        labeler = Ordered(config, service, Collective(), "cpu")
        result = labeler.label(epoch, keys, x.copy(), C)
        return result.table.flat(), result.summary, labeler.group


@ray.remote(num_cpus=0)
class DeadRank:
    """Rank 0 of a worker group that gets killed while its sample waits in the actor's round."""

    def submit(self, service, epoch: int, sample: np.ndarray, group: str) -> None:
        ray.get(service.fit_sample.remote(epoch, 0, sample, None, group=group))


@pytest.mark.slow
def test_a_restarted_worker_group_clusters_on_its_own_samples_with_the_real_labeler(ray_cluster) -> None:
    """End to end with the project's labeler in two gloo ranks: the previous group's rank 0 was
    killed (a real process) with its sample in the round; the new group's rank 1 reaches the actor
    first; both new ranks get one clustering of their own samples, tagged with one group token
    that rank 0 drew and broadcast."""
    config = dataclasses.replace(CONFIG, mode="sample", sample_size=200)
    service = get_or_create_service(f"kmeans-{uuid.uuid4().hex[:8]}", config, world_size=2)
    keys, x, _ = rank_data(seed=5)
    dead = DeadRank.remote()
    dead.submit.remote(service, 0, np.full((40, 16), 99.0, np.float32), "a-killed-group")
    _wait_for_submissions(service, 1)
    ray.kill(dead)
    ranks = gloo_pair(TrainingRank)
    try:
        started = time.monotonic()
        halves = [slice(0, 198), slice(198, 400)]  # on utterance boundaries (198 = 18 * 11)
        outs = ray.get([r.label.remote(config, service, 0, keys[s], x[s], wait_for_rank_1=(i == 0))
                        for i, (r, s) in enumerate(zip(ranks, halves))], timeout=60)
        assert time.monotonic() - started < 45  # clustering.round_timeout_s is 60 s
    finally:
        for handle in ranks:
            ray.kill(handle)
        ray.kill(service)
    (keys0, labels0), summary0, group0 = outs[0]
    (_, labels1), summary1, group1 = outs[1]
    assert group0 == group1 and group0 != "a-killed-group"  # rank 0's token, on both ranks
    assert summary0["sample_points"] == summary1["sample_points"] == 200  # 100 a rank, none of the 40
    assert summary0["actor_attempts"] == summary1["actor_attempts"] == 1
    np.testing.assert_array_equal(labels0, labels1)
    np.testing.assert_array_equal(keys0, np.sort(keys))
    # the labels of centroids fitted on the new ranks' samples alone (`SampleLabeler`'s own draw)
    samples = [_local_sample(x[s], config, 0, 0, rank, 2) for rank, s in enumerate(halves)]
    preprocessor, fitted = fit_clusters(np.concatenate(samples), config, seed=derive(0, "kmeans", 0))
    expected, _ = assign(x[np.argsort(keys)], fitted.centroids, preprocessor, "cpu")
    np.testing.assert_array_equal(labels0, expected)


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
