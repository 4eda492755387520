"""One epoch's pseudo-labels, whatever the K-means mode: the one interface the trainer calls.

    labeler = build_labeler(config.clustering, service, collective, device, seed)  # once per rank
    result = labeler.label(epoch, keys, features, num_chunks)  # every rank, collectively
    result.table.lookup(batch_keys)  # the label of any row, read on any rank

Modes (`ClusteringConfig.mode`):
  gather     every rank sends all its (keys, features) to the KMeansService actor, which clusters
             the union: the reference, right for small data (N x d floats travel and sit in it).
  sample     every rank sends a random sample of at most `sample_size / world_size` rows; the actor
             fits PCA-whitening + faiss K-means on the union and sends back the preprocessor and the
             K centroids; each rank assigns its own chunks. The actor's memory does not grow with N.
  allreduce  no actor: PCA moments of the same sample (d x d) are all-reduced, then Lloyd
             iterations among the ranks (SwAV's DeepCluster-v2): each rank assigns its chunks, the
             K x d sums and K counts are all-reduced. Each rank preprocesses its features in place.
In "sample" and "allreduce" only the labels are shared: each rank all-gathers (utterance key,
C labels of one byte (K <= 256)), about 1.7 bytes per chunk at C = 11, into a `LabelTable`.

Empty clusters: "gather" as `kmeans.run_kmeans` (faiss splits during training, then the farthest
half of the largest cluster); "allreduce" splits the largest centroid after any Lloyd step that
leaves a cluster empty (faiss's rule, `split_empty_centroids`); both distributed modes finish with
`_split_by_key`: a cluster still empty after the final assignment takes the members of the largest
cluster whose hashed key has a set bit (the highest bit that splits it): half of it, on average,
chosen the same way on every rank without moving any vector.

Collectives go through torch.distributed when it is initialised with more than one rank (Ray
Train initialises it: gloo on CPU, NCCL on GPU), else they are the identity.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import ray
import torch

from cluster_train.clustering.kmeans import (
    ClusteringConfig,
    assign,
    fit_preprocessor,
    label_dtype,
    lloyd_step,
    moments,
    preprocess_inplace,
    preprocessor_from_moments,
    resident,
    split_empty_centroids,
)
from cluster_train.clustering.service import IncarnationChanged, answer_round
from cluster_train.data.batches import join_chunk_keys, split_chunk_keys
from cluster_train.distributed import Collective
from cluster_train.model.losses import UNKNOWN_LABEL
from cluster_train.seeding import derive

log = logging.getLogger(__name__)

_HASH = np.uint64(0x9E3779B97F4A7C15)  # odd: key -> key * _HASH mod 2**64 is a bijection


# --- the label table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelTable:
    """Pseudo-labels by chunk key, stored per group of `num_chunks` consecutive keys.

    Chunk key = utterance key * C + chunk index (`data/batches.py`'s `chunk_keys`), so with
    `num_chunks = C` a row holds an utterance's C labels (8 bytes of key + C label bytes);
    `num_chunks = 1` is one key a row.
    """

    group_keys: np.ndarray  # (G,) int64, sorted, unique
    labels: np.ndarray  # (G, num_chunks) uint8 / uint16
    num_chunks: int

    @property
    def num_points(self) -> int:
        return self.labels.size

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """int64 labels of chunk `keys`; UNKNOWN_LABEL where the table has none."""
        keys = np.asarray(keys, dtype=np.int64).ravel()
        group, chunk = split_chunk_keys(keys, self.num_chunks)
        if len(self.group_keys) == 0:
            return np.full(len(keys), UNKNOWN_LABEL, dtype=np.int64)
        index = np.searchsorted(self.group_keys, group).clip(max=len(self.group_keys) - 1)
        found = self.group_keys[index] == group
        return np.where(found, self.labels[index, chunk].astype(np.int64), UNKNOWN_LABEL)

    def shuffled(self, generator: np.random.Generator) -> "LabelTable":
        """The same keys and cluster sizes, the labels permuted over all entries (every rank holds
        the same table, so the same generator gives every rank the same labels)."""
        labels = self.labels.ravel()[generator.permutation(self.labels.size)].reshape(self.labels.shape)
        return dataclasses.replace(self, labels=labels)

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted chunk keys, int64 labels) of every entry."""
        return join_chunk_keys(self.group_keys, self.num_chunks), self.labels.ravel().astype(np.int64)

    @staticmethod
    def build(keys: np.ndarray, labels: np.ndarray, num_chunks: int, num_clusters: int) -> "LabelTable":
        """From chunk keys and their labels (any order, duplicates keep the first); grouped by
        `num_chunks` when every group is complete, else one key a row."""
        keys = np.asarray(keys, dtype=np.int64).ravel()
        keys, first = np.unique(keys, return_index=True)
        labels = np.asarray(labels).ravel()[first].astype(label_dtype(num_clusters))
        c = int(num_chunks)
        if c > 1 and len(keys) % c == 0:
            group, chunk = split_chunk_keys(keys.reshape(-1, c), c)
            if (chunk == np.arange(c)).all() and (group == group[:, :1]).all():
                return LabelTable(group[:, 0].copy(), labels.reshape(-1, c), c)
        return LabelTable(keys, labels[:, None], 1)

    @staticmethod
    def merge(parts: list["LabelTable"]) -> "LabelTable":
        """The union of the ranks' tables (a key on several ranks keeps the first rank's label)."""
        parts = [p for p in parts if len(p.group_keys)] or parts[:1]
        widths = {p.num_chunks for p in parts}
        if len(widths) == 1:
            group_keys = np.concatenate([p.group_keys for p in parts])
            group_keys, first = np.unique(group_keys, return_index=True)
            labels = np.concatenate([p.labels for p in parts])[first]
            return LabelTable(group_keys, labels, widths.pop())
        flats = [p.flat() for p in parts]
        keys, first = np.unique(np.concatenate([k for k, _ in flats]), return_index=True)
        labels = np.concatenate([v for _, v in flats])[first]
        return LabelTable(keys, labels.astype(parts[0].labels.dtype)[:, None], 1)


@dataclass
class PseudoLabels:
    """What one epoch's clustering gives every rank."""

    table: LabelTable  # every clustered chunk, all ranks
    summary: dict  # global: num_points, objective, cluster_sizes, reseeded, iterations, seconds, mode
    timings: dict[str, float] = field(default_factory=dict)  # this rank's seconds by step


# --- the modes ------------------------------------------------------------------------------------


class PseudoLabeler(Protocol):
    def label(self, epoch: int, keys: np.ndarray, features: np.ndarray, num_chunks: int) -> PseudoLabels:
        """Cluster this epoch's chunks (every rank calls it with its own) and share the labels.
        `features` may be overwritten ("allreduce" preprocesses it in place)."""


def build_labeler(
    config: ClusteringConfig, service=None, collective: Collective | None = None,
    device: str | torch.device = "cpu", seed: int = 0,
) -> PseudoLabeler:  # fmt: skip
    """The labeler of `config.mode`; "gather" and "sample" need the KMeansService handle (made
    with the same `seed`, the training run's: every random draw of the clustering derives from it),
    except in one process alone, where `service=None` computes the actor's answer directly."""
    collective = collective or Collective()
    if config.mode == "allreduce":
        return AllReduceLabeler(config, collective, device, seed)
    if service is None and collective.world_size > 1:
        raise ValueError(f"clustering.mode={config.mode!r} needs the K-means service actor with several ranks")
    kind = GatherLabeler if config.mode == "gather" else SampleLabeler
    return kind(config, service, collective, device, seed)


_ACTOR_ERRORS = tuple(
    getattr(ray.exceptions, name)
    for name in ("RayActorError", "ActorDiedError", "ActorUnavailableError")
    if hasattr(ray.exceptions, name)
) + (IncarnationChanged,)


class _ActorLabeler:
    """The actor modes: each attempt runs under the incarnation rank 0 read; if any rank saw the
    actor die (or restart), every rank retries the whole clustering, up to `actor_restarts` times.
    Every submission carries this worker group's token, drawn by rank 0 once per labeler (the loop
    builds one per start of the worker group): the actor lets no round mix two groups' data.

    An attempt has two parts: the actor calls (`_ask_actor`), which may fail on some ranks only, and
    what is shared among the ranks (the callable it returns), run only once every rank's calls
    succeeded: a rank that failed must never meet, in a collective, a rank that succeeded."""

    def __init__(self, config: ClusteringConfig, service, collective: Collective, device, seed: int = 0) -> None:
        self.config, self.service, self.collective, self.device = config, service, collective, device
        self.seed = seed
        self.group = uuid.uuid4().hex  # every rank takes rank 0's, broadcast with the incarnation

    def label(self, epoch: int, keys: np.ndarray, features: np.ndarray, num_chunks: int) -> PseudoLabels:
        retries = self.config.actor_restarts if self.config.actor_restarts >= 0 else math.inf
        attempt = 0
        while True:
            incarnation, self.group = self.collective.broadcast(
                (self._incarnation() if self.collective.rank == 0 and self.service is not None else None, self.group))
            error: BaseException | None = None
            try:
                share = self._ask_actor(epoch, keys, features, num_chunks, incarnation)
            except _ACTOR_ERRORS as caught:
                error, share = caught, None
            if self.collective.all_true(error is None):
                result = share()
                result.summary["actor_attempts"] = attempt + 1
                return result
            attempt += 1
            log.warning("epoch %d: the K-means actor failed (%s); clustering again (attempt %d)",
                        epoch, error or "on another rank", attempt + 1)
            if attempt > retries:
                raise RuntimeError(f"epoch {epoch}: the K-means actor failed {attempt} times") from error

    def _incarnation(self, timeout_s: float = 300.0) -> str:
        """The actor's incarnation, waiting while it restarts."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get(self.service.incarnation.remote(), timeout=60)
            except _ACTOR_ERRORS + (ray.exceptions.GetTimeoutError,):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _ask_actor(self, epoch, keys, features, num_chunks, incarnation) -> Callable[[], PseudoLabels]:
        raise NotImplementedError

    def _ask(self, method: str, epoch: int, keys: np.ndarray | None, data: np.ndarray, incarnation: str | None) -> dict:
        """The actor's `gather` / `fit_sample` answer for this rank; with no actor (one process,
        `scaling.num_workers=0`) its computation called here, so the labels equal a one-worker run's."""
        rank = self.collective.rank
        if self.service is None:
            kind = "gather" if method == "gather" else "sample"
            return answer_round(kind, [(keys, data)], self.config, self.seed, epoch, version=epoch + 1)
        args = (keys, data) if method == "gather" else (data,)
        return ray.get(getattr(self.service, method).remote(epoch, rank, *args, incarnation, group=self.group))


class GatherLabeler(_ActorLabeler):
    """Mode "gather": all vectors to the actor, the label table back."""

    def _ask_actor(self, epoch, keys, features, num_chunks, incarnation) -> Callable[[], PseudoLabels]:
        started = time.perf_counter()
        answer = self._ask("gather", epoch, keys, features, incarnation)
        table = LabelTable.build(answer.pop("keys"), answer.pop("labels"), num_chunks, self.config.num_clusters)
        result = PseudoLabels(table, answer | {"mode": "gather"}, {"clustering": time.perf_counter() - started})
        return lambda: result  # every rank holds the whole table already


def _local_sample(
    features: np.ndarray, config: ClusteringConfig, seed: int, epoch: int, rank: int, world_size: int,
) -> np.ndarray:  # fmt: skip
    """At most sample_size / world_size rows, uniformly without replacement, seeded by epoch and rank."""
    size = min(len(features), math.ceil(config.sample_size / world_size))
    rng = np.random.default_rng(derive(seed, "kmeans_sample", epoch, rank))
    return np.ascontiguousarray(features[np.sort(rng.choice(len(features), size, replace=False))], dtype=np.float32)


class SampleLabeler(_ActorLabeler):
    """Mode "sample": a bounded sample to the actor, centroids back, local assignment."""

    def _ask_actor(self, epoch, keys, features, num_chunks, incarnation) -> Callable[[], PseudoLabels]:
        timings, started = {}, time.perf_counter()
        rank, world = self.collective.rank, self.collective.world_size
        sample = _local_sample(features, self.config, self.seed, epoch, rank, world)
        fit = self._ask("fit_sample", epoch, None, sample, incarnation)
        timings["fit"] = time.perf_counter() - started
        started = time.perf_counter()
        labels, distances = assign(features, fit["centroids"], fit["preprocessor"], self.device)
        timings["assign"] = time.perf_counter() - started
        summary = {"mode": "sample", "epoch": epoch, "iterations": fit["iterations"],
                   "sample_points": fit["num_points"], "sample_objective": fit["objective"]}
        return lambda: _finish(self.collective, self.config, keys, labels, distances, num_chunks, summary, timings)


class AllReduceLabeler:
    """Mode "allreduce": Lloyd iterations among the ranks; only moments, sums and counts travel."""

    def __init__(self, config: ClusteringConfig, collective: Collective, device, seed: int = 0) -> None:
        self.config, self.collective, self.device, self.seed = config, collective, device, seed

    def label(self, epoch: int, keys: np.ndarray, features: np.ndarray, num_chunks: int) -> PseudoLabels:
        config, collective = self.config, self.collective
        timings, started = {}, time.perf_counter()
        features = np.ascontiguousarray(features, dtype=np.float32)
        sample = _local_sample(features, config, self.seed, epoch, collective.rank, collective.world_size)
        if config.pca_dim is None and not config.whiten:
            preprocessor = fit_preprocessor(sample, config)
        else:
            summed = collective.sum(moments(sample) if len(sample) else _empty_moments(features.shape[1]))
            preprocessor = collective.broadcast(preprocessor_from_moments(summed, config) if collective.rank == 0 else None)
        y = preprocess_inplace(features, preprocessor, self.device)
        on_device = resident(y, self.device)
        timings["preprocess"] = time.perf_counter() - started
        started = time.perf_counter()
        centroids = self._initial_centroids(y, epoch)
        splits, iterations = 0, 0
        while iterations < config.iterations:
            iterations += 1
            previous = centroids.copy()
            sums, counts = lloyd_step(on_device, centroids, self.device)
            reduced = collective.sum(np.concatenate([sums.ravel(), counts]))
            sums, counts = reduced[: sums.size].reshape(sums.shape), reduced[sums.size :]
            filled = counts > 0
            centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
            split = split_empty_centroids(centroids, counts)
            splits += split
            # Converged: the same assignment again gives bit-identical centroids (the same on every
            # rank, they all hold the reduced sums), so the remaining iterations would change nothing.
            if not split and np.array_equal(previous, centroids):
                break
        timings["lloyd"] = time.perf_counter() - started
        started = time.perf_counter()
        labels, distances = assign(on_device, centroids, None, self.device)
        del on_device
        timings["assign"] = time.perf_counter() - started
        summary = {"mode": "allreduce", "epoch": epoch, "iterations": iterations, "lloyd_splits": splits}
        return _finish(collective, config, keys, labels, distances, num_chunks, summary, timings)

    def _initial_centroids(self, y: np.ndarray, epoch: int) -> np.ndarray:
        """K distinct rows of the union of up to K random rows per rank, the same on every rank."""
        k = self.config.num_clusters
        rng = np.random.default_rng(derive(self.seed, "kmeans_init", epoch, self.collective.rank))
        local = y[np.sort(rng.choice(len(y), min(k, len(y)), replace=False))] if len(y) else y[:0]
        pool = np.concatenate(self.collective.gather_all(np.asarray(local)))
        if len(pool) < k:
            raise ValueError(f"K-means needs at least K = {k} points over all ranks, got {len(pool)}")
        pick = np.random.default_rng(derive(self.seed, "kmeans", epoch)).choice(len(pool), k, replace=False)
        return np.ascontiguousarray(pool[pick], dtype=np.float32)


def _empty_moments(d: int) -> np.ndarray:
    return np.zeros(1 + d + d * d)


def _finish(
    collective: Collective, config: ClusteringConfig, keys: np.ndarray, labels: np.ndarray,
    distances: np.ndarray, num_chunks: int, summary: dict, timings: dict,
) -> PseudoLabels:  # fmt: skip
    """Global sizes and objective, empty clusters repaired, labels shared: the distributed modes' end."""
    k = config.num_clusters
    keys = np.asarray(keys, dtype=np.int64).ravel()
    reduced = collective.sum(np.concatenate([np.bincount(labels, minlength=k), [distances.sum(dtype=np.float64)]]))
    counts, objective = reduced[:k], float(reduced[k])
    reseeded = _split_by_key(collective, keys, labels, counts)
    started = time.perf_counter()
    parts = collective.gather_all(LabelTable.build(keys, labels, num_chunks, k))
    table = LabelTable.merge(parts)
    timings["share_labels"] = time.perf_counter() - started
    summary |= {"num_points": int(counts.sum()), "objective": objective,
                "cluster_sizes": counts.astype(np.int64), "reseeded": reseeded,
                "seconds": sum(timings.values())}
    return PseudoLabels(table, summary, timings)


def _split_by_key(collective: Collective, keys: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> int:
    """Give each globally empty cluster part of the largest one, chosen by a hash of the keys (see
    the module docstring). In place on `labels` and `counts`; the number of clusters re-seeded."""
    empty = np.flatnonzero(counts == 0)
    hashed = keys.astype(np.uint64) * _HASH
    for cluster in empty:
        donor = int(np.argmax(counts))
        members = labels == donor
        for bit in range(63, -1, -1):
            move = members & ((hashed >> np.uint64(bit)) & np.uint64(1)).astype(bool)
            moved = int(collective.sum(np.array([move.sum()]))[0])
            if 0 < moved < counts[donor]:
                labels[move] = cluster
                counts[cluster], counts[donor] = moved, counts[donor] - moved
                break
    return len(empty)


# --- stage-1 sampling -----------------------------------------------------------------------------


def uniform_over_clusters(labels: np.ndarray, cluster_sizes: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """Indices of a resampled batch (same size, with replacement) in which each chunk is drawn with
    probability proportional to 1 / (global size of its cluster): uniform over clusters in
    expectation (DeepCluster's sampler, applied to the chunks a stage-1 batch holds). Chunks with no
    label are never drawn; a batch with none is kept as it is."""
    labels = np.asarray(labels)
    sizes = np.asarray(cluster_sizes, dtype=np.float64)
    known = (labels >= 0) & (labels < len(sizes))
    weights = np.zeros(len(labels))
    weights[known] = 1.0 / np.maximum(sizes[labels[known]], 1.0)
    if not known.any():
        return torch.arange(len(labels))
    return torch.multinomial(torch.from_numpy(weights), len(labels), replacement=True, generator=generator)
