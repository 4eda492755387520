"""The per-epoch K-means service: one Ray actor that clusters for all training ranks.

Two of the modes of `clustering/labelers.py` use it: "gather" (below) and "sample", where each rank
sends only a bounded sample (`fit_sample`) and gets back the preprocessor and centroids; the actor
then holds nothing that grows with the number of chunks.

Gather-to-one:

Each training rank sends its chunk embeddings, keyed by global chunk key
(utterance key * num_chunks + chunk index, `data/batches.py`); once all `world_size` ranks have sent
theirs the actor runs `fit_clusters` on the union and any rank can read the pseudo-label of any key
(`LabelTable`, `clustering/labelers.py`).

    service = get_or_create_service("kmeans", config, world_size)                 # on the driver
    table = ray.get(service.gather.remote(epoch, rank, keys, embeddings, incarnation, group))  # each rank

Its interface: `gather` and `fit_sample` (one call a rank and epoch, returning once the clustering
ran), `incarnation` (see Restarts), `progress` (where the current round is) and `describe`. The actor
is async: ranks waiting for the others hold no actor thread, and the clustering itself runs in a
worker thread so calls keep being served.

Rounds: the actor holds one round (one epoch) at a time. A submission for a later epoch drops the
previous round; one for an earlier epoch is refused. Resubmitting (epoch, rank) before the round is
clustered replaces that rank's data; a submission for an epoch that is already clustered (a worker
group restarted from a checkpoint) opens a new round for the same epoch, clustered again once every
rank has resubmitted, with a new `version`. The ranks in a round wait for the missing ones at most
`clustering.round_timeout_s` after the latest arrival, then fail naming them. Duplicate keys (a
sampler padding its last batch) count once. Points are clustered in ascending key order, so the
labels do not depend on how the keys were split among the ranks.

Restarts: created with `max_restarts`, a killed actor comes back empty with a new `incarnation`.
Every call takes the incarnation the caller started its attempt with and fails at once with
`IncarnationChanged` on a newer one, so no rank waits in a round the others will never join;
`clustering/labelers.py` then retries the whole clustering on every rank.

Worker groups: a round belongs to one worker group, named by the `group` token its rank 0 draws once
per start of the group (`clustering/labelers.py`) and every rank's submission carries. A token the
actor has not seen before is a new group (Ray Train restarted the workers): it takes over, and the
round of the group before it, if not yet clustering, ends with `SupersededGroup` for the ranks
still waiting in it, its data dropped. A submission of a group that was taken over is refused with
`SupersededGroup`. So a rank of a killed group can never complete, with its sample, the round of the
group that replaced it. Tokens are unordered: a group is new when first seen, so a call of a dead
group still in flight after its successor's first submission is refused only if the actor saw that
group before (a restarted actor refuses it by its incarnation instead).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import ray

from cluster_train.clustering.kmeans import ClusteringConfig, KMeansResult, Preprocessor, fit_clusters
from cluster_train.seeding import derive


class IncarnationChanged(RuntimeError):
    """The actor restarted since the caller's attempt began: what it held is gone; start again."""


class SupersededGroup(RuntimeError):
    """A newer worker group submitted: the caller's group (killed, restarted by Ray Train) is over."""


@dataclass
class _Round:
    epoch: int
    kind: str = "gather"  # "gather": all points, labels kept; "sample": a sample, centroids only
    group: str | None = None  # the worker group whose ranks submit to it
    parts: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    arrived: float = field(default_factory=time.monotonic)  # the latest submission's time
    all_in: asyncio.Event = field(default_factory=asyncio.Event)  # every rank submitted, or the round ended
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None  # the clustering, once every rank submitted
    submissions: int = 0  # calls that joined this round, resubmissions included
    answer: dict | None = None  # `answer_round`'s, once clustered
    error: BaseException | None = None

    @property
    def started(self) -> bool:  # clustering has begun: later submissions open a new round
        return self.task is not None


@ray.remote(num_cpus=0)
class KMeansService:
    def __init__(self, config: ClusteringConfig, world_size: int, seed: int = 0) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self._config, self._world_size, self._seed = config, world_size, seed  # seed: the run's
        self._round: _Round | None = None
        self._groups: list[str | None] = []  # worker-group tokens in the order seen; the last is current
        self._version = 0  # clusterings completed by this actor
        self._incarnation = uuid.uuid4().hex  # new on every (re)start: what a restart lost

    def describe(self) -> dict:
        return {"config": dataclasses.asdict(self._config), "world_size": self._world_size, "seed": self._seed}

    def incarnation(self) -> str:
        return self._incarnation

    def progress(self) -> dict:
        """Where the current round is: {"epoch", "kind", "submitted" (ranks), "submissions" (calls,
        resubmissions included), "started", "done"}."""
        round_ = self._round
        if round_ is None:
            return {"epoch": None, "kind": None, "submitted": [], "submissions": 0, "started": False, "done": False}
        return {"epoch": round_.epoch, "kind": round_.kind, "submitted": sorted(round_.parts),
                "submissions": round_.submissions,
                "started": round_.started, "done": round_.done.is_set()}

    async def gather(
        self, epoch: int, rank: int, keys: np.ndarray, embeddings: np.ndarray, incarnation: str | None = None,
        group: str | None = None,
    ) -> dict:  # fmt: skip
        """Mode "gather": this rank's (keys, embeddings) for `epoch`; once every rank has sent its
        own, the union is clustered and every caller gets the summary with the whole label table,
        `keys` (sorted) and their `labels`: any rank can then look up any row it reads. `group`:
        the caller's worker-group token (see Worker groups)."""
        self._check(incarnation)
        return (await self._wait(await self._join(epoch, rank, keys, embeddings, group=group))).answer

    async def fit_sample(
        self, epoch: int, rank: int, sample: np.ndarray, incarnation: str | None = None, group: str | None = None,
    ) -> dict:  # fmt: skip
        """Mode "sample": this rank's sample for `epoch`; once every rank has sent its own, K-means
        is fitted on their union and every caller gets the summary with the fitted `preprocessor`
        and `centroids`, with which each rank assigns its own chunks."""
        self._check(incarnation)
        round_ = await self._join(epoch, rank, np.empty(0, np.int64), sample, kind="sample", group=group)
        return (await self._wait(round_)).answer

    def _check(self, incarnation: str | None) -> None:
        if incarnation is not None and incarnation != self._incarnation:
            raise IncarnationChanged(
                f"the K-means actor restarted (incarnation {self._incarnation}, caller began with "
                f"{incarnation}): its round is lost, cluster again"
            )

    def _admit(self, group: str | None, epoch: int, rank: int) -> None:
        """Let in a submission of worker group `group`: the current group's, or a new group's, which
        takes over (the unfinished round of the group before it ends); a superseded group's fails."""
        if self._groups and group == self._groups[-1]:
            return
        if group in self._groups:
            raise SupersededGroup(
                f"epoch {epoch}, rank {rank}: worker group {group} was superseded by group {self._groups[-1]} "
                f"(Ray Train restarted the workers): its submissions are refused")
        self._groups.append(group)
        round_ = self._round
        if round_ is not None and not round_.started:
            self._end(round_, SupersededGroup(
                f"superseded: worker group {group} took over at epoch {epoch}; the round of group "
                f"{round_.group} (ranks {sorted(round_.parts)} in it) was dropped"))
            self._round = None

    @staticmethod
    def _end(round_: _Round, error: BaseException) -> None:
        """End a round that is not clustering: every rank waiting in it gets `error`."""
        round_.parts = {}
        round_.error = error
        round_.all_in.set()
        round_.done.set()

    async def _join(
        self, epoch: int, rank: int, keys: np.ndarray, embeddings: np.ndarray, kind: str = "gather",
        group: str | None = None,
    ) -> _Round:  # fmt: skip
        if not 0 <= rank < self._world_size:
            raise ValueError(f"rank {rank} outside world_size {self._world_size}")
        keys = np.asarray(keys, dtype=np.int64).ravel()
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or (kind == "gather" and len(embeddings) != len(keys)):
            raise ValueError(f"{len(keys)} keys but embeddings of shape {embeddings.shape}")
        self._admit(group, epoch, rank)
        round_ = self._round
        if round_ is not None and round_.epoch == epoch and round_.started:
            await round_.done.wait()  # resubmission after clustering: a new round, once this ends
            self._admit(group, epoch, rank)  # another group may have taken over meanwhile
        round_ = self._round
        if round_ is not None and epoch < round_.epoch:
            # Ranks move in lockstep (a round needs every rank), so only a worker group restarted from
            # an earlier checkpoint, or from none, sends an older epoch: clustering starts again there.
            if not round_.started:
                self._end(round_, RuntimeError(f"superseded: the worker group restarted at epoch {epoch}"))
            round_ = None
        if round_ is not None and round_.epoch == epoch and round_.kind != kind and not round_.started:
            raise ValueError(f"epoch {epoch}: a {kind!r} submission in a {round_.kind!r} round")
        if round_ is None or epoch > round_.epoch or round_.started:
            round_ = self._round = _Round(epoch, kind, group)  # drops the previous epoch: one in memory
        round_.parts[rank] = (keys, embeddings)
        round_.submissions += 1
        round_.arrived = time.monotonic()
        if len(round_.parts) == self._world_size:
            round_.task = asyncio.get_running_loop().create_task(self._run(round_))
            round_.all_in.set()
        return round_

    async def _run(self, round_: _Round) -> None:
        try:
            parts = [round_.parts[rank] for rank in range(self._world_size)]
            round_.parts = {}
            round_.answer = await asyncio.to_thread(answer_round, round_.kind, parts, self._config, self._seed,
                                                    round_.epoch, self._version + 1)
            self._version += 1
        except Exception as error:  # noqa: BLE001 - handed to every waiting rank
            round_.error = error
        finally:
            round_.done.set()

    async def _wait(self, round_: _Round) -> _Round:
        """Until the round is clustered; TimeoutError once no rank has joined for `round_timeout_s`
        while some are still missing."""
        limit = self._config.round_timeout_s
        while not round_.all_in.is_set():
            left = round_.arrived + limit - time.monotonic()
            if left <= 0:
                arrived = sorted(round_.parts)
                missing = sorted(set(range(self._world_size)) - set(arrived))
                raise TimeoutError(
                    f"epoch {round_.epoch}: rank(s) {missing} of {self._world_size} sent nothing in the "
                    f"{limit:g} s after the latest arrival; ranks {arrived} arrived and gave up waiting "
                    f"(clustering.round_timeout_s = {limit}): a rank is stuck or gone, or its embedding pass "
                    f"lags the others' by more than that (then raise clustering.round_timeout_s)")
            try:
                await asyncio.wait_for(round_.all_in.wait(), left)
            except TimeoutError:
                pass  # a rank may have arrived meanwhile and moved the deadline: look again
        await round_.done.wait()
        if isinstance(round_.error, SupersededGroup):
            raise round_.error
        if round_.error is not None:
            raise RuntimeError(f"epoch {round_.epoch}: clustering failed: {round_.error}") from round_.error
        return round_


def _cluster_union(
    parts: list[tuple[np.ndarray, np.ndarray]], config: ClusteringConfig, seed: int
) -> tuple[np.ndarray, np.ndarray, Preprocessor, KMeansResult]:
    """Cluster the union of the ranks' parts, one point per key, in ascending key order."""
    dims = {emb.shape[1] for _, emb in parts}
    if len(dims) != 1:
        raise ValueError(f"ranks sent embeddings of different widths: {sorted(dims)}")
    all_keys = np.concatenate([keys for keys, _ in parts])
    keys, first = np.unique(all_keys, return_index=True)  # sorted; first occurrence in rank order
    embeddings = np.concatenate([emb for _, emb in parts])[first]
    preprocessor, result = fit_clusters(embeddings, config, seed)
    return keys, result.assignments, preprocessor, result


def _fit_on_samples(
    parts: list[tuple[np.ndarray, np.ndarray]], config: ClusteringConfig, seed: int
) -> tuple[None, None, Preprocessor, KMeansResult]:
    """"sample" mode: fit the preprocessor and K-means on the ranks' samples, in rank order."""
    dims = {sample.shape[1] for _, sample in parts}
    if len(dims) != 1:
        raise ValueError(f"ranks sent samples of different widths: {sorted(dims)}")
    sample = np.concatenate([sample for _, sample in parts])
    preprocessor, result = fit_clusters(sample, config, seed)
    return None, None, preprocessor, result


def answer_round(kind: str, parts: list[tuple[np.ndarray, np.ndarray]], config: ClusteringConfig, seed: int,
                 epoch: int, version: int) -> dict:
    """What every rank of a round gets back: the clustering's summary, with the whole label table
    (`keys`, `labels`) for "gather", the `preprocessor` and `centroids` for "sample". The actor's
    computation; one process without an actor calls it directly (`clustering/labelers.py`)."""
    run = _cluster_union if kind == "gather" else _fit_on_samples
    keys, labels, preprocessor, result = run(parts, config, derive(seed, "kmeans", epoch))
    if kind == "gather":
        return _summary(result, epoch, version, kind) | {"keys": keys, "labels": labels}
    return _summary(result, epoch, version, kind) | {"preprocessor": preprocessor, "centroids": result.centroids}


def _summary(result: KMeansResult, epoch: int, version: int, kind: str) -> dict:
    """What every rank learns of a clustering besides the labels."""
    return {
        "epoch": epoch,
        "version": version,
        "num_points": len(result.assignments),
        "objective": result.objective,
        "cluster_sizes": result.cluster_sizes,
        "reseeded": result.reseeded,
        "iterations": result.iterations,
        "seconds": result.seconds,
        "kind": kind,
    }


def actor_options(config: ClusteringConfig, training_uses_gpu: bool = False) -> dict:
    """The Ray options of the K-means actor, from the config alone: one GPU of its own exactly when
    `clustering.use_gpu` is true; "auto" and false ask for none, whatever the training uses
    (`training_uses_gpu`, the run's `scaling.use_gpu`, decides nothing): the actor is placed before the
    trainer, and a training GPU it took would leave a worker waiting forever. Never from what the
    cluster has now: on an autoscaling cluster the GPU nodes may be scaled to 0, and the actor's own
    GPU request is what makes the autoscaler launch one. No CPU either way (as the class declares):
    the clustering's threads come from `clustering.threads`."""
    return {"num_cpus": 0, "num_gpus": 1 if config.use_gpu is True else 0}


def get_or_create_service(
    name: str, config: ClusteringConfig, world_size: int, seed: int = 0, namespace: str | None = None,
    *, detached: bool = False, training_uses_gpu: bool = False, max_restarts: int | None = None,
) -> ray.actor.ActorHandle:  # fmt: skip
    """The named KMeansService, created if missing; workers find it with `ray.get_actor(name)`.

    Call it on the driver: a non-detached actor lives as long as the job that created it (a
    detached one outlives it and must be killed by hand). Its GPU: `actor_options(config)`; the actor
    gets `config` with `use_gpu` set to that decision, so faiss runs on the GPU Ray gave it and on no
    other (Ray leaves CUDA_VISIBLE_DEVICES alone for an actor without GPUs: "auto" inside it would
    take a training GPU). An actor not placed within `clustering.placement_timeout_s` is killed and
    TimeoutError names what it asked for and what the cluster has (`training_uses_gpu`: the message
    says the training needs GPUs too). An existing actor of that name must have the same (decided)
    config, world size and seed, else ValueError (a stale actor from another run). `seed`: the
    training run's; epoch e clusters with `seeding.derive(seed, "kmeans", e)`. `max_restarts`: None
    takes `config.actor_restarts`.
    """
    options = actor_options(config, training_uses_gpu)
    config = dataclasses.replace(config, use_gpu=options["num_gpus"] > 0)
    service = KMeansService.options(
        name=name, namespace=namespace, get_if_exists=True, **options,
        lifetime="detached" if detached else None,
        max_restarts=config.actor_restarts if max_restarts is None else max_restarts,
    ).remote(config, world_size, seed)  # fmt: skip
    try:
        found = ray.get(service.describe.remote(), timeout=config.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.kill(service)
        asked = {"CPU": options["num_cpus"], "GPU": options["num_gpus"]}
        training = " beyond the training workers' own GPUs (scaling.use_gpu)" if training_uses_gpu else ""
        raise TimeoutError(
            f"the K-means actor {name!r} was not placed within clustering.placement_timeout_s = "
            f"{config.placement_timeout_s:g} s: it asked for {asked}{training}; the cluster has "
            f"{ray.cluster_resources()}, of which {ray.available_resources()} are free. Set "
            f"clustering.use_gpu to auto/false (CPU faiss), add the resources, or raise the timeout "
            f"where an autoscaler is still launching a node") from None
    wanted = {"config": dataclasses.asdict(config), "world_size": world_size, "seed": seed}
    if found != wanted:
        raise ValueError(f"actor {name!r} exists with {found}, not {wanted}")
    return service
