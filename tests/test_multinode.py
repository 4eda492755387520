"""Training on several nodes: Ray's own local multi-node cluster (`ray.cluster_utils.Cluster`: a head
and worker nodes as separate raylets, each with its own object store, on 127.0.0.1), the dataset and
the checkpoints in a bucket (moto's S3 server on 127.0.0.1: the multi-node guards refuse local
paths), MLflow on a real `mlflow server`.

The nodes: a head with no CPU (the driver, Ray Train's controller, Ray Data's split coordinator),
two trainer nodes with the one CPU a worker asks for (`scaling.cpus_per_worker=1`), so the two
workers can only land one a node, and a node with no CPU and the custom resource `kmeans`, where
the test places the K-means actor (`run_training` finds it by name). Placement is read back from
Ray's own actor table (GCS), not from the config.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sys
import threading
import time
from dataclasses import dataclass

import pytest
import ray
from conftest import REPO_ROOT, train_sample_manifest
from mlflow import MlflowClient
from mlflow_server import mlflow_server
from s3_server import bucket_keys, s3_server

from cluster_train.clustering.service import KMeansService, actor_options
from cluster_train.train.config import TrainConfig, load_train_config
from cluster_train.train.launch import TrainResult, run_training
from data_prep.config import PrepConfig, load_config
from data_prep.pipeline import run_prep

pytestmark = pytest.mark.slow  # a cluster of four raylets and two 2-worker trainings

BUCKET = "deepemo"
KMEANS = "kmeans"  # the custom resource of the K-means actor's node


@dataclass
class Nodes:
    cluster: object  # ray.cluster_utils.Cluster
    trainers: list  # the trainer nodes (ray._private.node.Node)
    kmeans: object
    aws: dict[str, str]
    mlflow_uri: str


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """The sample prepared into the bucket (on a one-node Ray first: the audio is local, and prep
    refuses local paths on several nodes), then the MLflow server and the four-node cluster, with
    the bucket's AWS_* variables in this process and so in every raylet and worker it starts."""
    from ray.cluster_utils import Cluster

    folder = tmp_path_factory.mktemp("multinode")
    with s3_server(folder / "s3", BUCKET) as aws, pytest.MonkeyPatch.context() as environment:
        for key, value in aws.items():
            environment.setenv(key, value)
        environment.setenv("RAY_agent_register_timeout_ms", "120000")  # Ray starts slowly on a busy machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
        try:
            run_prep(load_config(PrepConfig, None, [f"sources=[{{kind: csv, path: {train_sample_manifest(folder)}}}]",
                                                    f"output=s3://{BUCKET}/prepared", "progress=false"]))
        finally:
            ray.shutdown()
        server_env = {**aws, "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow"}
        with mlflow_server(folder / "mlflow", env=server_env) as uri:
            # shutdown_at_exit=False: a node started with exit hooks sets a SIGTERM handler, which only
            # the main thread may do, and the node-loss test adds one from its watcher thread.
            cluster = Cluster(initialize_head=True, connect=True, shutdown_at_exit=False,
                              head_node_args={"num_cpus": 0, "include_dashboard": False})
            try:
                trainers = [cluster.add_node(num_cpus=1) for _ in range(2)]
                kmeans = cluster.add_node(num_cpus=0, resources={KMEANS: 1})
                cluster.wait_for_nodes()
                yield Nodes(cluster, trainers, kmeans, aws, uri)
            finally:
                ray.shutdown()
                cluster.shutdown()


def _config(nodes: Nodes, name: str) -> TrainConfig:
    """DeepEmoCluster on the 24-utterance sample, two workers of one CPU, a tenth of the paper's
    model, two epochs, one restart allowed; everything it writes in the bucket or the server."""
    return load_train_config(REPO_ROOT / "configs/train/ravdess_sample.yaml", [
        f"data.dataset=s3://{BUCKET}/prepared", f"storage_path=s3://{BUCKET}/runs", f"name={name}",
        f"tracking.tracking_uri={nodes.mlflow_uri}", "data.batch_size=4", "epochs=2", "patience=2",
        "clustering.num_clusters=4", "scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.max_failures=1",
        "model.channels=[8,16]", "model.strides=[2,2]", "model.feature_dim=16"])


def _place_kmeans_actor(config: TrainConfig, actor_class=KMeansService):
    """The actor `run_training` would create (`get_or_create_service`'s options and arguments, which
    it then finds by name), asking for the K-means node's custom resource."""
    options = actor_options(config.clustering, config.scaling.use_gpu)
    return actor_class.options(
        name=f"kmeans-{config.name}", max_restarts=config.clustering.actor_restarts, resources={KMEANS: 1}, **options,
    ).remote(dataclasses.replace(config.clustering, use_gpu=options["num_gpus"] > 0), config.scaling.num_workers,
             config.seed)


def _actors(class_name: str) -> dict[str, dict]:
    """This driver's actors of `class_name`, alive or dead, by actor id, from the GCS actor table."""
    job = ray.get_runtime_context().get_job_id()
    return {actor_id: actor for actor_id, actor in ray._private.state.actors().items()
            if actor["ActorClassName"] == class_name and actor["JobID"] == job}


def _node_of(actor: dict) -> str:
    return actor["Address"]["NodeID"]


def _comparable(result: TrainResult) -> dict:
    """What a run computes: its scores and its last epoch's losses and development CCC (not timings)."""
    timing = ("seconds", "_s", "per_s", "time", "mlflow_run_id")
    return {"scores": result.scores, "epochs_run": result.epochs_run,
            "metrics": {k: v for k, v in result.metrics.items() if not any(t in k for t in timing)}}


@pytest.fixture(scope="module")
def uninterrupted(nodes):
    """One uninterrupted 2-node run: its result and the nodes its workers and K-means actor ran on."""
    config = _config(nodes, "two-nodes")
    before = set(_actors("RayTrainWorker"))
    actor = _place_kmeans_actor(config)
    try:
        started = time.monotonic()
        result = run_training(config)  # kills the actor at its end
        seconds = time.monotonic() - started
    finally:
        ray.kill(actor)
    workers = {k: v for k, v in _actors("RayTrainWorker").items() if k not in before}
    kmeans = [a for a in _actors("KMeansService").values() if a["Name"] == f"kmeans-{config.name}"]
    return result, workers, kmeans, seconds


@pytest.mark.timeout(300)
def test_two_workers_train_on_two_nodes_with_the_kmeans_actor_on_a_third(nodes, uninterrupted):
    result, workers, kmeans, seconds = uninterrupted
    trainer_ids = {node.node_id for node in nodes.trainers}
    assert {_node_of(w) for w in workers.values()} == trainer_ids  # one worker a trainer node
    assert len(workers) == 2  # and no restart
    [actor] = kmeans
    assert _node_of(actor) == nodes.kmeans.node_id
    head = nodes.cluster.head_node.node_id
    assert head not in trainer_ids | {nodes.kmeans.node_id}

    assert result.epochs_run == 2 and seconds < 240
    for split in ("development", "test"):
        for attribute in ("arousal", "dominance", "valence"):
            assert math.isfinite(result.scores[split][attribute]) and -1 <= result.scores[split][attribute] <= 1
    client = MlflowClient(nodes.mlflow_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["scaling.num_workers"] == "2"
    assert run.data.metrics["test/ccc_arousal"] == pytest.approx(result.scores["test"]["arousal"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "dev/loss")] == [0, 1]
    assert "cluster/kmeans_objective" in run.data.metrics
    keys = bucket_keys(nodes.aws, BUCKET, "runs/two-nodes/")
    assert "runs/two-nodes/best_model/model.pt" in keys
    assert any(key.endswith("/config.yaml") for key in bucket_keys(nodes.aws, BUCKET, "mlflow/"))


@ray.remote(num_cpus=0)  # (as a Ray actor class at module level, Ray pickles it by value: workers cannot import tests/)
class _HeldKMeansService(KMeansService.__ray_metadata__.modified_class.__ray_actor_class__):
    """The project's K-means actor with one gate: the first "gather" submission of rank 1 for
    epoch 1 is held before it joins the round, so the round waits with rank 0's embeddings in it for
    as long as the test needs to take a node away."""

    HOLD_S = 300.0  # then the held call fails (the test never acted): the run goes on, it does not hang

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._held = False

    def held(self) -> bool:
        return self._held

    async def gather(self, epoch, rank, *args, **kwargs):
        if (epoch, rank) == (1, 1) and not self._held:
            self._held = True
            await asyncio.sleep(self.HOLD_S)  # its caller's worker group dies meanwhile
            raise TimeoutError(f"epoch {epoch}: rank {rank} held {self.HOLD_S} s: the test never removed a node")
        return await super().gather(epoch, rank, *args, **kwargs)


def _wait_for(what: str, probe, stop: threading.Event, timeout_s: float = 200.0):
    """`probe()`'s first true answer, asked every 0.1 s; an error once `stop` is set (the run
    ended) or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        answer = probe()
        if answer:
            return answer
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not {'before the run ended' if stop.is_set() else f'after {timeout_s} s'}")


def _take_a_node_away(nodes: Nodes, actor, name: str, seen: dict, stop: threading.Event) -> None:
    """In epoch 1, once epoch 0's checkpoint is registered and rank 0's embeddings wait in the actor's
    round: remove a trainer node (its raylet and worker processes killed), then add a fresh one, as
    an autoscaler would replace it."""
    try:
        def rank_0_in_epoch_1s_round():
            progress = ray.get(actor.progress.remote(), timeout=60)
            alone = ray.get(actor.held.remote(), timeout=60) and progress["epoch"] == 1 and progress["submitted"] == [0]
            return progress if alone else None

        seen["progress"] = _wait_for("epoch 1: rank 0 in the round, rank 1 held", rank_0_in_epoch_1s_round, stop)
        _wait_for("epoch 0's checkpoint registered", lambda: any(
            key.endswith("checkpoint_manager_snapshot.json") for key in bucket_keys(nodes.aws, BUCKET, f"runs/{name}/")),
            stop)
        seen["first_group"] = {k for k, v in _actors("RayTrainWorker").items() if v["State"] == "ALIVE"}
        removed = nodes.trainers.pop(0)
        seen["removed"] = removed.node_id
        try:
            nodes.cluster.remove_node(removed, allow_graceful=False)
        finally:  # whatever the removal raised, the run needs a node to go on
            fresh = nodes.cluster.add_node(num_cpus=1)
            nodes.trainers.append(fresh)
            seen["added"] = fresh.node_id
    except BaseException as error:  # noqa: BLE001 - the test reports it
        seen["error"] = error
        print(f"the node's removal failed: {error!r}", file=sys.stderr)  # shown if the run then hangs


@pytest.mark.timeout(300)
def test_a_run_that_loses_a_node_mid_epoch_resumes_on_a_fresh_one_to_the_uninterrupted_result(nodes, uninterrupted):
    """A trainer node is removed in epoch 1 while rank 0's embeddings wait in the K-means actor's round;
    a fresh node joins; Ray Train restarts the worker group (`scaling.max_failures=1`) from epoch 0's
    checkpoint in the bucket, the new group's K-means round drops the dead group's embeddings, and the
    run ends with the uninterrupted run's scores and last-epoch metrics.

    Tolerance: none beyond float formatting (1e-9). A resumed run recomputes exactly (the checkpoint
    holds weights, optimisers and the run's state; every random draw derives from the seed and epoch,
    tests/test_resume.py), both runs use the same CPU kernels with one thread a worker, and the two
    gloo ranks sum in the same order whichever node each sits on."""
    reference, *_ = uninterrupted
    config = _config(nodes, "node-lost")
    before = set(_actors("RayTrainWorker"))
    actor = _place_kmeans_actor(config, _HeldKMeansService)
    seen: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_take_a_node_away, args=(nodes, actor, config.name, seen, stop))
    try:
        watcher.start()
        started = time.monotonic()
        result = run_training(config)
        seconds = time.monotonic() - started
    finally:
        stop.set()
        watcher.join()
        ray.kill(actor)
    assert "error" not in seen, seen
    assert seen["progress"]["started"] is False and seen["progress"]["kind"] == "gather"

    workers = {k: v for k, v in _actors("RayTrainWorker").items() if k not in before}
    first = {_node_of(v) for k, v in workers.items() if k in seen["first_group"]}
    second = {_node_of(v) for k, v in workers.items() if k not in seen["first_group"]}
    assert len(workers) == 4 and len(seen["first_group"]) == 2, workers  # two groups of two: one restart
    assert seen["removed"] in first and len(first) == 2
    assert second == {seen["added"], *(first - {seen["removed"]})}  # the survivor and the fresh node
    assert _node_of(_actors("_HeldKMeansService")[actor._actor_id.hex()]) == nodes.kmeans.node_id

    assert seconds < 240
    got, want = _comparable(result), _comparable(reference)
    assert got["epochs_run"] == want["epochs_run"] == 2
    # The one metric a resumed run cannot give: the NMI of this epoch's clusters with the previous
    # epoch's, whose labels live in rank 0's memory only (not in the checkpoint).
    assert set(want["metrics"]) - set(got["metrics"]) <= {"cluster/nmi_previous"}
    assert set(got["metrics"]) <= set(want["metrics"])
    differ = {key: (got["metrics"][key], value) for key, value in want["metrics"].items()
              if key in got["metrics"] and got["metrics"][key] != pytest.approx(value, rel=1e-9, abs=1e-9)}
    differ |= {split: (got["scores"][split], scores) for split, scores in want["scores"].items()
               if got["scores"][split] != pytest.approx(scores, rel=1e-9, abs=1e-9)}
    assert not differ, differ  # (resumed, uninterrupted)
    client = MlflowClient(nodes.mlflow_uri)
    assert [m.step for m in client.get_metric_history(result.mlflow_run_id, "dev/loss")] == [0, 1]
