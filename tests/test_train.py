"""Training end to end: real prepared audio, real Ray Train, real faiss, a real MLflow store.

One prepared sample (24 utterances) and one Ray session serve every test; a killed training
worker and a killed K-means actor happen in one 2-worker run; resuming to the same result is
checked in one process (tests of the loop's restore) and from a bucket (tests/test_jobs.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import torch
from conftest import local_ray, prepare_train_sample
from mlflow import MlflowClient

from cluster_train.clustering.service import KMeansService, actor_options
from cluster_train.experiments.estimate import StepCost, format_estimate
from cluster_train.experiments.sweep import Trial
from cluster_train.serve.bundle import load_bundle, resolve_bundle
from cluster_train.serve.evaluate import evaluate_split, predict_split, score
from cluster_train.train.checkpointer import TrainState
from cluster_train.train.config import load_train_config
from cluster_train.train.launch import run_training
from data_prep.config import ChunkConfig, ConfigError
from data_prep.dataset import PreparedDataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train")
    with local_ray():
        prepare_train_sample(folder)
        yield folder


# A model a tenth the paper's width and depth: for tests of what surrounds the computation (recovery,
# sweeps, controls), where the paper's model would only add minutes.
TINY_MODEL = ("model.channels=[8,16]", "model.strides=[2,2]", "model.feature_dim=16")


def _small_run(prepared: Path, runs: Path, name: str, *overrides: str):
    """The small DeepEmoCluster run of these tests: 24 utterances, batch 4, K = 4, 2 epochs unless overridden."""
    return load_train_config(REPO / "configs/train/ravdess_sample.yaml", [
        f"data.dataset={prepared / 'prepared'}", "data.batch_size=4", "epochs=2", "patience=2",
        f"storage_path={runs}", f"name={name}", "clustering.num_clusters=4",
        "scaling.max_failures=1", *overrides])


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tracked_run(prepared, tmp_path_factory):
    """One uninterrupted run tracked to a sqlite store: the e2e test reads it, the resume test
    compares a killed-and-resumed run of the same config with it."""
    folder = tmp_path_factory.mktemp("tracked")
    store = f"sqlite:///{folder / 'mlflow.db'}"
    return run_training(_small_run(prepared, folder / "runs", "smoke", f"tracking.tracking_uri={store}")), store


@pytest.mark.slow
def test_deepemocluster_trains_tracks_and_scores(prepared, tracked_run):
    result, store = tracked_run

    assert result.epochs_run == 2
    assert set(result.scores) == {"development", "test"}
    bundle = load_bundle(result.best_bundle)
    dataset = PreparedDataset(str(prepared / "prepared"))
    # The scores are the saved model's: scored on Ray's actor pool, recomputed here in one process
    # (other batches, so float32 rounding differs in the last digits).
    for split, scores in result.scores.items():
        assert evaluate_split(bundle, dataset, split)["ccc"] == pytest.approx(scores, abs=1e-5), split
    assert bundle.model_kind == "deepemocluster" and bundle.label_scaler.attributes == ("arousal", "dominance", "valence")

    client = MlflowClient(store)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "smoke"  # the project's run name
    assert run.data.params["model_kind"] == "deepemocluster" and run.data.params["data.batch_size"] == "4"
    assert {"git_commit", "dataset_hash"} <= set(run.data.tags)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's training view
    config_file = client.download_artifacts(run.info.run_id, "config.yaml")
    assert "batch_size: 4" in Path(config_file).read_text()  # the merged config, overrides included
    [logged] = run.inputs.dataset_inputs
    assert logged.dataset.digest == run.data.tags["dataset_hash"][:36] and logged.dataset.name == f"{prepared.name}/prepared"
    for metric in ("dev/loss", "train/stage1_loss", "train/stage2_loss", "cluster/kmeans_objective", "cluster_size/0"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [0, 1], metric
    sizes = [run.data.metrics[f"cluster_size/{k}"] for k in range(4)]
    assert sum(sizes) == 8 * 11  # every train chunk (8 utterances x 11 chunks) got a pseudo-label
    assert run.data.metrics["test/ccc_arousal"] == pytest.approx(result.scores["test"]["arousal"])
    mlflow.set_tracking_uri(store)  # how a user points model URIs at a store
    try:
        logged = resolve_bundle(f"runs:/{result.mlflow_run_id}/best_model")
    finally:
        mlflow.set_tracking_uri(None)
    assert logged.model_kind == "deepemocluster"


@pytest.mark.slow
def test_saved_model_has_batchnorm_statistics_of_its_weights(prepared, tracked_run):
    """The saved model in eval mode predicts what its weights predict with BatchNorm statistics
    recomputed independently (torch's update_bn, one batch of every train utterance). With
    BatchNorm's running averages alone (precise_bn.utterances=0) this run's saved model predicted a
    near constant on development (sd 6e-5 against 0.06 recomputed; mean difference 0.14)."""
    from torch.optim.swa_utils import update_bn


    result, _ = tracked_run
    dataset = PreparedDataset(str(prepared / "prepared"))
    bundle = load_bundle(result.best_bundle)
    saved = predict_split(bundle, dataset, "development")
    train = dataset.frame_format.chunks_of(dataset.read_table(["train"], ["frames"])["frames"], bundle.chunks)
    update_bn([bundle.normalizer.torch(torch.tensor(train).float()).flatten(0, 1)], bundle.model)
    bundle.model.eval()
    recomputed = predict_split(bundle, dataset, "development")
    spread = recomputed.prediction.std(axis=0)
    assert (spread > 1e-3).all()  # the model's predictions vary: there is something to compare
    np.testing.assert_allclose(saved.prediction, recomputed.prediction, rtol=0, atol=0.05 * spread.min())
    ours, theirs = score(saved.prediction, saved.labels), score(recomputed.prediction, recomputed.labels)
    for attribute, value in ours.items():
        assert value == pytest.approx(theirs[attribute], abs=0.02), attribute
    assert ours == pytest.approx(result.scores["development"], abs=1e-6)  # what training reported


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience_bad_epochs() -> None:
    state, kept, stopped_after = TrainState(), [], None
    for epoch, dev_loss in enumerate([2.9, 2.1, 2.3, 2.0, 2.2, 2.05, 1.5]):
        if state.finish_epoch(epoch, dev_loss):
            kept.append(epoch)
        if state.should_stop(patience=2):
            stopped_after = epoch
            break
    assert kept == [0, 1, 3] and stopped_after == 5  # 2.2 and 2.05 are not below 2.0: two bad epochs
    assert (state.best_epoch, state.best_dev_loss, state.epoch) == (3, 2.0, 6)  # a resumed run starts at 6
    # a run without a labelled stage: its development loss judges nothing, the last epoch is kept
    unjudged = TrainState()
    assert all(unjudged.finish_epoch(epoch, loss, latest_is_best=True) for epoch, loss in enumerate([2.9, 3.5, 4.0]))
    assert (unjudged.best_epoch, unjudged.best_dev_loss, unjudged.should_stop(patience=1)) == (2, 4.0, False)


def test_config_mistake_fails_before_ray_starts(tmp_path):
    with pytest.raises(ConfigError, match="data.batch_sise"):
        load_train_config(REPO / "configs/train/ravdess_sample.yaml", ["data.batch_sise=4"])
    result = subprocess.run([sys.executable, "jobs/train.py", "--config", "configs/train/ravdess_sample.yaml",
                             "model.num_clusters=20"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "model.num_clusters" in result.stderr and "Ray" not in result.stderr


@pytest.mark.slow
def test_a_run_that_fails_ends_failed_in_mlflow_with_its_error(prepared, tmp_path):
    """K = 100 clusters for 88 training chunks: K-means fails in epoch 0; the run is marked FAILED
    (not left RUNNING) with the error, and the caller gets it. In one process (`loop.train` marks it,
    under Ray Train as here): the failure costs no Ray Train start-up."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = _small_run(prepared, tmp_path / "runs", "failing", f"tracking.tracking_uri={store}",
                        "clustering.num_clusters=100", "scaling.num_workers=0")
    with pytest.raises(Exception, match="K-means needs an"):
        run_training(config)
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("deepemocluster").experiment_id])
    assert run.info.status == "FAILED" and run.info.run_name == "failing"
    assert "K-means needs an (N, d) array with N >= K = 100" in run.data.tags["error"]


def _training_worker_pids() -> list[int]:
    """The live Ray Train workers of this test's own Ray job (GCS's actor table, no dashboard needed)."""
    job = ray.get_runtime_context().get_job_id()
    return [actor["Pid"] for actor in ray._private.state.actors().values()
            if actor["ActorClassName"] == "RayTrainWorker" and actor["State"] == "ALIVE" and actor["JobID"] == job]


@ray.remote(num_cpus=0)  # (as a Ray actor class at module level, Ray pickles it by value: workers cannot import tests/)
class _HeldKMeansService(KMeansService.__ray_metadata__.modified_class.__ray_actor_class__):
    """The project's K-means actor (the same class, its rounds untouched) with one gate for the test
    below. The first incarnation holds rank 1's "sample" submission of epoch 0 before it joins the
    round, so the round waits with rank 0 alone in it for as long as the test needs. The restarted
    one holds both ranks' first submissions of epoch 1 outside any round, so that a worker group
    killed there leaves nothing of itself in a round (see the test). The training run finds this
    actor by its name (`get_or_create_service` takes an existing one whose config, world size and
    seed match)."""

    HOLD_S = 300.0  # then a held call fails (the test never acted): the run goes on, it does not hang

    def __init__(self, *args) -> None:
        super().__init__(*args)
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self._hold = (1, [0, 1]) if restarted else (0, [1])  # the epoch and the ranks held, once each
        self._held: list[list[int]] = []  # [epoch, rank] of the calls held so far

    def held(self) -> list[list[int]]:
        return sorted(self._held)

    async def fit_sample(self, epoch, rank, *args, **kwargs):
        hold_epoch, hold_ranks = self._hold
        if epoch == hold_epoch and rank in hold_ranks and [epoch, rank] not in self._held:
            self._held.append([epoch, rank])
            await asyncio.sleep(self.HOLD_S)  # ends with the actor (killed) or its caller's worker group
            raise TimeoutError(f"epoch {epoch}: rank {rank} held {self.HOLD_S} s: the test never killed anything")
        return await super().fit_sample(epoch, rank, *args, **kwargs)


def _wait_for(what: str, probe, stop: threading.Event, timeout_s: float = 450.0):
    """`probe()`'s first true answer, asked every 0.05 s (an actor call failing while Ray restarts
    the actor counts as false); an error once `stop` is set (the run ended) or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        try:
            answer = probe()
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ValueError):
            answer = None
        if answer:
            return answer
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not {'before the run ended' if stop.is_set() else f'after {timeout_s} s'}")


def _kill_actor_then_worker(actor, run_folder: Path, seen: dict, stop: threading.Event) -> None:
    """The test's two kills, each at a point it holds open (so none is left to timing):
    1. epoch 0: rank 0's sample is in the actor's round and rank 1's is held outside it (the round
       cannot be clustered): the actor is killed with rank 0 waiting in it; Ray restarts it empty.
    2. epoch 1 (the restarted actor, epoch 0's checkpoint registered by Ray Train): both ranks'
       samples are held outside the round: one training worker is SIGKILLed; the group restarts from
       the epoch-0 checkpoint and clusters epoch 1 afresh (the held calls end with their callers).
       (Killed with rank 0's sample inside the round instead, the new group's rank 1 could complete
       that round with the dead rank 0's sample and then wait in a collective while the new rank 0
       waits for a new round, until clustering.round_timeout_s: a known gap of the service.)"""
    try:
        def round_with_rank_0_alone(epoch: int):
            held = ray.get(actor.held.remote(), timeout=60)
            progress = ray.get(actor.progress.remote(), timeout=60)
            alone = (held == [[epoch, 1]] and progress["epoch"] == epoch and progress["submitted"] == [0]
                     and not progress["started"])
            return progress if alone else None

        def both_held_before_the_round(epoch: int):
            held = ray.get(actor.held.remote(), timeout=60)
            progress = ray.get(actor.progress.remote(), timeout=60)
            return progress if held == [[epoch, 0], [epoch, 1]] and progress["epoch"] == epoch - 1 else None

        seen["incarnation"] = ray.get(actor.incarnation.remote(), timeout=60)
        seen["progress"] = _wait_for("epoch 0: rank 0 alone in the round", lambda: round_with_rank_0_alone(0), stop)
        ray.kill(actor, no_restart=False)
        seen["progress_1"] = _wait_for("epoch 1: both ranks held by the restarted actor",
                                       lambda: both_held_before_the_round(1), stop)
        seen["new_incarnation"] = ray.get(actor.incarnation.remote(), timeout=60)
        # The worker group restarts from the latest checkpoint Ray Train registered: wait for epoch 0's.
        snapshot = run_folder / "checkpoint_manager_snapshot.json"
        _wait_for("epoch 0's checkpoint registered", lambda: snapshot.exists() and any(run_folder.glob("checkpoint*/")), stop)
        pids = _training_worker_pids()
        seen["workers"] = len(pids)
        os.kill(pids[0], signal.SIGKILL)
        seen["killed"] = pids[0]
    except BaseException as error:  # noqa: BLE001 - the test reports it
        seen["error"] = error


@pytest.mark.timeout(600)  # with the module's Ray start when run alone: 126 s on a busy 2-core machine
@pytest.mark.slow
def test_killed_kmeans_actor_and_killed_ddp_worker_both_recover(prepared, tmp_path):
    """Two DDP workers (gloo) in mode "sample" (the actor fits centroids on both ranks' samples,
    each rank assigns its own chunks), reading their shards streamed from the Parquet files every
    pass (`data.cache_max_mb=0`, as at MSP-Podcast scale). The K-means actor is killed in epoch 0
    while rank 0 waits in its round (it comes back; both ranks cluster again), then one training
    worker in epoch 1 while both ranks wait on the actor again (the group resumes from epoch 0's
    checkpoint with both ranks' weights equal); the per-epoch cluster diagnostics reach MLflow.
    Each kill happens at a point the test holds open (`_HeldKMeansService`), so the run's history
    is the same every time; tests/test_pseudo_labels.py covers a rank reaching a restarted actor late."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = _small_run(prepared, tmp_path / "runs", "actor-killed", f"tracking.tracking_uri={store}",
                         "clustering.mode=sample", "clustering.sample_size=64",
                         "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "data.cache_max_mb=0",
                         "precise_bn.utterances=0", *TINY_MODEL)
    # The actor run_training would create (`get_or_create_service`'s options and arguments), with the gate.
    options = actor_options(config.clustering, config.scaling.use_gpu)
    actor = _HeldKMeansService.options(
        name=f"kmeans-{config.name}", max_restarts=config.clustering.actor_restarts, **options,
    ).remote(dataclasses.replace(config.clustering, use_gpu=options["num_gpus"] > 0),
             config.scaling.num_workers, config.seed)
    assert config.clustering.actor_restarts >= 1
    seen: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_actor_then_worker,
                               args=(actor, tmp_path / "runs" / "actor-killed", seen, stop))
    # Another training's worker on this machine, not of this test's run: it must survive the kill.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "RayTrainWorker"])
    try:
        watcher.start()
        result = run_training(config)  # kills the actor at its end
        assert bystander.poll() is None, "the test killed a process that was not its own"
    finally:
        stop.set()
        watcher.join()
        bystander.kill()
        ray.kill(actor)  # run_training's own end killed it, unless it failed before finding it

    assert "error" not in seen, seen
    assert seen["progress"] == {"epoch": 0, "kind": "sample", "submitted": [0], "submissions": 1,
                                "started": False, "done": False}  # the killed round: rank 0 waited in it
    assert seen["new_incarnation"] != seen["incarnation"]  # it came back, a new, empty incarnation
    # the restarted actor at the worker kill: epoch 0 clustered again by both ranks, epoch 1 not begun
    assert {k: seen["progress_1"][k] for k in ("epoch", "done")} == {"epoch": 0, "done": True}
    assert seen["workers"] == 2 and "killed" in seen, "no training worker was found to kill"
    assert result.epochs_run == 2
    assert load_bundle(result.best_bundle).model_kind == "deepemocluster"
    assert result.metrics["train/stage2_chunks"] == 4 * 11  # each rank trained on half of the 8 train utterances

    client = MlflowClient(store)
    run_id = result.mlflow_run_id

    def steps(metric: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, metric))

    def values(metric: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, metric)}

    for metric in ("cluster/kmeans_objective", "train/stage1_loss", "cluster/nmi_category", "cluster/purity_category",
                   "cluster/arousal_mean_high", "cluster/actor_attempts", "train/rank_weight_spread"):
        assert steps(metric) == [0, 1], metric  # each epoch logged once: epoch 1's only after the resume
    assert values("train/rank_weight_spread") == {0: 0.0, 1: 0.0}  # equal weights, before and after the resume
    # epoch 0: both ranks clustered again after the actor's kill; epoch 1: the resumed group's first attempt
    assert values("cluster/actor_attempts") == {0: 2.0, 1: 1.0}
    metrics = client.get_run(run_id).data.metrics
    assert sum(metrics[f"cluster_size/{k}"] for k in range(4)) == 8 * 11  # both ranks' chunks, every one labelled
    assert 0 <= metrics["cluster/nmi_category"] <= 1 and 0 < metrics["cluster/purity_category"] <= 1
    assert metrics["cluster/arousal_mean_high"] >= metrics["cluster/arousal_mean_low"]
    figures = [f.path for f in client.list_artifacts(run_id, "clusters")]
    assert figures == [f"clusters/arousal_epoch_{e:03d}.png" for e in range(2)]


@pytest.mark.slow
def test_a_cached_shard_gives_the_same_batches_whether_read_now_or_before(prepared):
    """The in-memory shard cache: every row once, id order, a seed's permutation, drop_last; and
    small data handed to Ray Data from the driver (`build_datasets(in_memory=True)`)."""
    from cluster_train.data.batches import ROW_COLUMNS, InMemoryRows, ShardCache, build_datasets, kept_label_ids
    from cluster_train.data.config import DataConfig

    dataset = PreparedDataset(str(prepared / "prepared"))
    rows = InMemoryRows.read(dataset.ray_dataset(["train"], ROW_COLUMNS).iterator())
    ids = rows.table["id"].to_pylist()
    assert rows.num_rows == 8 and ids == sorted(ids)
    assert dataset.frame_format.chunks_of(rows.table["frames"], ChunkConfig()).shape == (8, 11, 62, 128)
    again = InMemoryRows.from_arrow(dataset.read_table(["train"], ROW_COLUMNS))  # another reader, same rows
    first = [b["id"].to_pylist() for b in rows.iter_batches(3, drop_last=True, local_shuffle_seed=5)]
    assert first == [b["id"].to_pylist() for b in again.iter_batches(3, drop_last=True, local_shuffle_seed=5)]
    assert len(first) == 2 and len({i for ids in first for i in ids}) == 6
    assert first != [b["id"].to_pylist() for b in rows.iter_batches(3, drop_last=True, local_shuffle_seed=6)]
    cache = ShardCache()
    held = cache("train", dataset.ray_dataset(["train"], ROW_COLUMNS).iterator())
    assert cache("train", None) is held  # read once, then kept

    # Such small data reaches Ray Data as tables the driver read: the same rows as from the shards.
    config = DataConfig(dataset=str(prepared / "prepared"), label_fraction=0.5, labeled_as_unlabeled=False)
    held = {name: InMemoryRows.read(rows_of.iterator())
            for name, rows_of in build_datasets(dataset, config, seed=0, in_memory=True).items()}
    assert held["cluster"].table["id"].to_pylist() == ids  # no "unlabeled" split here
    assert held["cluster"].table["frames"].equals(rows.table["frames"])
    kept = kept_label_ids(dataset, config, seed=0)
    assert len(kept) == 4 and held["labeled"].table["id"].to_pylist() == kept
    assert sorted(held["unlabeled"].table["id"].to_pylist()) == sorted(set(ids) - set(kept))
    assert held["development"].num_rows == 8


@pytest.mark.slow
def test_label_statistics_use_only_the_labels_the_run_keeps(prepared):
    """With `data.label_fraction` < 1 the z-scoring of labels sees the kept labels only."""
    from cluster_train.data.batches import kept_label_ids
    from cluster_train.data.labels import LabelScaler, label_matrix
    from cluster_train.train.launch import fit_label_scaler

    dataset = PreparedDataset(str(prepared / "prepared"))
    config = _small_run(prepared, prepared / "runs", "labels", "data.label_fraction=0.5")
    kept = set(kept_label_ids(dataset, config.data, config.seed))
    table = dataset.read_table(["train"], ["id", "arousal", "dominance", "valence"])
    rows = np.array([i in kept for i in table["id"].to_pylist()])
    assert rows.sum() == 4
    scaler = fit_label_scaler(dataset, config)
    expected = LabelScaler.fit(label_matrix(table)[rows])
    np.testing.assert_allclose(scaler.mean, expected.mean)
    np.testing.assert_allclose(scaler.std, expected.std)
    assert not np.allclose(scaler.mean, LabelScaler.fit(label_matrix(table)).mean)  # all 8 labels differ


@pytest.mark.slow
def test_training_that_leaves_no_cpu_for_reads_is_warned_about(prepared):
    """2 workers x 0.75 CPU on 2 CPUs: Ray Data's reads never started and the run hung (seen with
    bench/train_bench.py); x 0.5 runs (the K-means-actor kill test above)."""
    from cluster_train.train.config import ScalingConfig
    from cluster_train.train.launch import warn_if_reads_starve

    with pytest.warns(RuntimeWarning, match="2 training worker.* take 1.5 of this Ray cluster's 2 CPUs"):
        warn_if_reads_starve(ScalingConfig(num_workers=2, cpus_per_worker=0.75))
    with pytest.warns(RuntimeWarning, match="1 training worker.* x 3 concurrent runs take 1.5 of this Ray cluster's 2 CPUs"):
        warn_if_reads_starve(ScalingConfig(num_workers=1, cpus_per_worker=0.5), runs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_reads_starve(ScalingConfig(num_workers=2, cpus_per_worker=0.5))


@pytest.mark.slow
def test_sweep_of_the_baselines_trains_them_concurrently_compares_them_and_resumes(prepared, tmp_path, capsys):
    """The paper's baselines in the same loop, as a sweep: 2 Ray Tune trials at once (each trains in
    its trial's process: `scaling.num_workers=0`), each an MLflow run under the sweep's parent run, the
    table, the time estimate printed first. The CNN-regressor has no stage 1; the CNN-VAE's stage 1
    is the CNN-AE's reconstruction plus the KL. Dataset, checkpoints, best models and the table are
    all addressed by file:// URIs, as buckets are. On another machine, with only the trials' records
    (no models, no MLflow store), the sweep trains nothing and the report still has its tables."""
    from cluster_train.experiments.sweep import load_sweep_config, plan_trials, run_sweep

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_file = tmp_path / "sweep.yaml"
    tiny = ", ".join(f"'{setting}'" for setting in TINY_MODEL)
    sweep_file.write_text(f"""
name: baselines
train_config: {REPO / 'configs/train/ravdess_sample.yaml'}
overrides: [data.dataset={(prepared / 'prepared').as_uri()}, data.batch_size=4, epochs=1, {tiny},
            clustering.num_clusters=4, scaling.num_workers=0, storage_path={(tmp_path / 'runs').as_uri()},
            tracking.tracking_uri={store}]
points:
  - {{name: regressor, model_kind: cnn_regressor}}
  - {{model_kind: cnn_vae}}
  - {{name: dec_unsupervised_only, model_kind: deepemocluster, stages: [1]}}
reference: regressor
subsets: 2
max_concurrent: 2
output: {(tmp_path / 'sweeps').as_uri()}
records: {tmp_path / 'records'}
""")
    config = load_sweep_config(sweep_file)
    result = run_sweep(config)
    printed = capsys.readouterr().out
    assert "3 of 3 trials to train, 2 at a time" in printed
    assert re.search(r"trial 3 of 3 done: baselines-\S+-seed0  dev CCC A ", printed), printed  # Tune's trials, each named
    assert not any(run.get("reused") for run in result.runs)
    assert re.search(r"regressor: 1 trial\(s\) x \d+ min\n  model_kind=cnn_vae: 1 trial", printed), printed
    need = re.search(r"memory: about (\d+\.\d) GiB for 2 trial\(s\) at once", printed)  # timed in 2 processes
    assert need and 0.1 < float(need.group(1)) < 8, printed

    points = ["regressor", "model_kind=cnn_vae"]
    assert list(result.table["models"]) == points  # the stage-1-only model learned no regressor: not scored
    assert result.table["models"][points[1]]["ccc"]["arousal"]["n"] == 2  # 2 subsets x 1 seed
    assert result.table_file == (tmp_path / "sweeps" / "baselines" / "table.json").as_uri()
    assert json.loads((tmp_path / "sweeps" / "baselines" / "table.json").read_text())["models"] == result.table["models"]
    assert [run["point"] for run in result.runs] == [*points, "dec_unsupervised_only"]
    for run in result.runs[:2]:
        kind = "cnn_regressor" if run["point"] == "regressor" else run["point"].split("=")[1]
        assert run["best_model"] == (tmp_path / "runs" / run["name"] / "best_model").as_uri()
        assert load_bundle(run["best_model"]).model_kind == kind and run["mlflow_run_id"]
        metrics = run["last_epoch"]
        assert metrics["train/stage2_chunks"] == 8 * 11  # 8 labelled train utterances, batch 4, nothing dropped
        assert "cluster/kmeans_objective" not in metrics  # no clustering for the baselines
        if kind == "cnn_regressor":
            assert "train/stage1_loss" not in metrics
        else:  # stage 1 trains on reconstruction (+ KL) of the unlabeled chunks: a positive loss
            assert metrics["train/stage1_chunks"] == 8 * 11 and metrics["train/stage1_loss"] > 0
    experiment = MlflowClient(store).get_experiment_by_name("baselines")
    logged = MlflowClient(store).search_runs([experiment.experiment_id])
    parent = result.table["parent_run_id"]
    children = [r for r in logged if r.info.run_id != parent]
    assert sorted(r.data.params["model_kind"] for r in children) == ["cnn_regressor", "cnn_vae", "deepemocluster"]
    assert {r.data.tags.get("mlflow.parentRunId") for r in children} == {parent}
    assert MlflowClient(store).get_run(parent).info.status == "FINISHED"
    assert [f.path for f in MlflowClient(store).list_artifacts(parent)] == ["table.json"]

    again = run_sweep(config)  # everything trained already: nothing trains, the same table
    assert all(run.get("reused") for run in again.runs)
    assert [r["mlflow_run_id"] for r in again.runs] == [r["mlflow_run_id"] for r in result.runs]
    assert again.table["models"] == result.table["models"] and again.table["parent_run_id"] == parent

    more_threads = tmp_path / "more_threads.yaml"  # threads change no result: the trials are reused
    more_threads.write_text(sweep_file.read_text().replace("scaling.num_workers=0", "scaling.num_workers=0, "
                                                           "scaling.cpus_per_worker=2"))
    assert all(run.get("reused") for run in run_sweep(load_sweep_config(more_threads)).runs)

    changed = tmp_path / "changed.yaml"  # the same trials with another batch size: not silently reused
    changed.write_text(sweep_file.read_text().replace("data.batch_size=4", "data.batch_size=2"))
    with pytest.raises(ConfigError, match=r"trial baselines-regressor-seed0 .*differs in data\.batch_size"):
        run_sweep(load_sweep_config(changed))

    from cluster_train.experiments.report import write_report

    report = write_report(config, tmp_path / "report")  # tables, curves, logged to the parent run
    assert (report.trained, report.planned) == (3, 3) and list(report.tables) == ["regressor"]
    assert "Not in the table: dec_unsupervised_only (no stage learns from labels" in report.markdown
    assert "| dec_unsupervised_only |" not in report.markdown and (tmp_path / "report" / "clusters_arousal.png").exists()
    assert "| regressor | 1 |" in report.markdown and "| model_kind=cnn_vae | 1 |" in report.markdown
    vae = report.tables["regressor"]["models"]["model_kind=cnn_vae"]["ccc"]["arousal"]
    assert vae["mean"] == pytest.approx(result.table["models"]["model_kind=cnn_vae"]["ccc"]["arousal"]["mean"])
    assert (tmp_path / "report" / "learning_curves.png").stat().st_size > 10_000
    logged = {f.path for f in MlflowClient(store).list_artifacts(parent, "report")}
    assert {"report/report.md", "report/tables.json", "report/learning_curves.png"} <= logged
    assert MlflowClient(store).get_run(parent).info.status == "FINISHED"

    record = json.loads((tmp_path / "records" / "baselines-regressor-seed0.json").read_text())
    assert record["mlflow_run_id"] == result.runs[0]["mlflow_run_id"] and record["config"]["data.batch_size"] == 4
    assert len(record["curves"]["dev/ccc_arousal"]) == 1 and record["curves"]["time/epoch"][0] > 0
    bf16 = record["curves"]["precision/bf16"] == [1.0]  # on a CPU with AMX (train/precision.py)
    assert ("fp32 in all 3 trials" in report.markdown) != bf16, report.markdown
    test = record["predictions"]["test"]
    assert len(test["ids"]) == len(test["prediction"]) == len(test["labels"]) > 0

    # Another machine: the records alone (no models, no checkpoints, no sweep folder, a new MLflow store)
    shutil.rmtree(tmp_path / "runs")
    moved = tmp_path / "moved.yaml"
    moved.write_text(sweep_file.read_text().replace(store, f"sqlite:///{tmp_path / 'other.db'}")
                     .replace((tmp_path / "sweeps").as_uri(), (tmp_path / "other_sweeps").as_uri()))
    elsewhere = run_sweep(load_sweep_config(moved))
    assert all(run.get("reused") for run in elsewhere.runs) and elsewhere.table["models"] == result.table["models"]
    assert "to train" not in capsys.readouterr().out
    kept = write_report(load_sweep_config(moved), tmp_path / "report")  # Fig. 3 drawn there from these trials: kept
    assert kept.tables == report.tables and "![clusters_arousal](clusters_arousal.png)" in kept.markdown
    assert re.search(r"unsupervised only \(no regressor\) \(baselines-dec_unsupervised_only-seed0\): highest", kept.markdown)
    fresh = write_report(load_sweep_config(moved), tmp_path / "fresh_report")
    assert "Not drawn, not on this machine: the best model of baselines-dec_unsupervised_only-seed0" in fresh.markdown
    assert not (tmp_path / "fresh_report" / "clusters_arousal.png").exists()
    assert (tmp_path / "fresh_report" / "learning_curves.png").stat().st_size > 10_000

    # A record from a machine of the other precision (with or without AMX) beside this machine's: the table says so
    record_file = tmp_path / "records" / "baselines-regressor-seed0.json"
    as_recorded = record_file.read_text()
    other = json.loads(as_recorded)
    other["curves"]["precision/bf16"] = [0.0 if bf16 else 1.0]
    record_file.write_text(json.dumps(other))
    with pytest.warns(RuntimeWarning, match="trained in bf16 and fp32: bf16 in baselines-"):
        mixed = run_sweep(load_sweep_config(moved))
    names = [run["name"] for run in result.runs]
    assert mixed.table["bf16_trials"] == (names[1:] if bf16 else names[:1])
    assert elsewhere.table["bf16_trials"] == (names if bf16 else [])
    record_file.write_text("<<<<<<< HEAD\n" + as_recorded)  # a git merge conflict left in the file
    with pytest.raises(ConfigError, match=r"baselines-regressor-seed0\.json is not valid JSON: .*merge conflict"):
        run_sweep(load_sweep_config(moved))
    record_file.write_text(as_recorded)

    typo = tmp_path / "typo.yaml"
    typo.write_text(sweep_file.read_text().replace("epochs=1,", "epochs=1, optim.regressor.lrr=1,"))
    with pytest.raises(ConfigError, match="trial regressor seed 0: config key 'optim.regressor.lrr'"):
        plan_trials(load_sweep_config(typo))  # before any trial trains


@pytest.mark.slow
def test_a_finished_ray_train_run_started_again_hands_back_its_result(prepared, tracked_run):
    """The tracked run started again under its name and storage path: Ray Train restores it from
    `<storage_path>/<name>`, it trains nothing, writes no checkpoint, logs no epoch and hands back
    the same result; the epochs its checkpoints hold are read from the folders Ray Train names after
    the time, not the epoch. (tests/test_resume.py starts runs again in one process.)"""
    from cluster_train.train.runtime import latest_state

    first, store = tracked_run
    runs = Path(store.removeprefix("sqlite:///")).parent / "runs"
    names = sorted(p.name for p in (runs / "smoke").glob("checkpoint_*") if p.is_dir())
    ray_train_name = r"checkpoint_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}\.\d{6}"  # Ray Train V2's names
    assert len(names) == 2 and all(re.fullmatch(ray_train_name, name) for name in names), names
    assert latest_state(str(runs / "smoke")).epoch == 2
    again = run_training(_small_run(prepared, runs, "smoke", f"tracking.tracking_uri={store}"))
    assert (again.name, again.best_bundle, again.mlflow_run_id) == (first.name, first.best_bundle, first.mlflow_run_id)
    assert (again.epochs_run, again.metrics, again.scores) == (first.epochs_run, first.metrics, first.scores)
    assert sorted(p.name for p in (runs / "smoke").glob("checkpoint_*") if p.is_dir()) == names
    client = MlflowClient(store)
    assert [m.step for m in client.get_metric_history(first.mlflow_run_id, "precision/bf16")] == [0]
    assert client.get_run(first.mlflow_run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_logged_model_outlives_the_ray_session(prepared, tracked_run):
    """Artifacts go beside the local store (`mlartifacts/`), never into Ray's session folder: with
    that folder deleted, `jobs/evaluate.py` still loads the run's model. Last in this module: it ends
    the module's Ray session."""
    result, store = tracked_run
    experiment = MlflowClient(store).get_experiment_by_name("deepemocluster")
    assert experiment.artifact_location == (Path(store.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    ray.shutdown()
    shutil.rmtree(session)
    scored = subprocess.run([sys.executable, "jobs/evaluate.py", "--model", f"runs:/{result.mlflow_run_id}/best_model",
                             "--data", str(prepared / "prepared"), "--split", "development"],
                            cwd=REPO, env=os.environ | {"MLFLOW_TRACKING_URI": store}, capture_output=True, text=True,
                            timeout=300)
    assert scored.returncode == 0, scored.stderr[-3000:]
    row = next(line.split() for line in scored.stdout.splitlines() if line.startswith("development"))
    expected = result.scores["development"]
    assert [float(v) for v in row[2:]] == pytest.approx([expected[a] for a in ("arousal", "dominance", "valence")],
                                                        abs=1e-4)


@pytest.mark.slow
def test_the_same_loop_runs_in_one_process_without_ray_and_resumes_there(prepared, tracked_run, tmp_path):
    """`scaling.num_workers=0`: the Ray run's loop in this process, rows in memory, the K-means
    actor's computation called directly. Stopped after epoch 1 and started again, it resumes from its
    own checkpoint and ends where the uninterrupted one-worker Ray run ended."""
    uninterrupted, _ = tracked_run
    runs = tmp_path / "runs"
    local = ["scaling.num_workers=0", "tracking.enabled=false"]
    dead_server = f"http://127.0.0.1:{_closed_port()}"  # tracking fails: a warning, nothing else changes
    with pytest.warns(RuntimeWarning, match=f"not tracked: MLflow at {dead_server}"):
        first = run_training(_small_run(prepared, runs, "local", "scaling.num_workers=0", "epochs=1",
                                        f"tracking.tracking_uri={dead_server}"))
    assert first.mlflow_run_id is None
    assert first.epochs_run == 1
    assert [p.name for p in (runs / "local").glob("checkpoint_*")] == ["checkpoint_000000"]
    # A sweep run again says how long its killed trial has left: 1 epoch of 2, half a fresh trial's time.
    trials = [Trial("resumed", 0, _small_run(prepared, runs, "local", *local)),
              Trial("fresh", 0, _small_run(prepared, runs, "never-run", *local))]
    printed = format_estimate(trials, {"deepemocluster": StepCost(train=5.0, forward=1.0)}, 1,
                              PreparedDataset(str(prepared / "prepared")))
    left = {point: int(hours or 0) * 60 + int(minutes)
            for point, hours, minutes in re.findall(r"(\w+): 1 trial\(s\) x (?:(\d+) h )?(\d+) min", printed)}
    assert "1 trial(s) resume from a checkpoint" in printed and set(left) == {"resumed", "fresh"}, printed
    assert left["resumed"] == pytest.approx(left["fresh"] / 2, abs=1), printed
    together = format_estimate([dataclasses.replace(trial, point="both") for trial in trials],
                               {"deepemocluster": StepCost(train=5.0, forward=1.0)}, 1,
                               PreparedDataset(str(prepared / "prepared")))  # one point: each trial's own time
    assert re.search(r"both: 2 trial\(s\) of (\d+ h )?\d+ min to (\d+ h )?\d+ min each\n", together), together
    resumed = run_training(_small_run(prepared, runs, "local", *local))
    assert resumed.epochs_run == 2
    assert sorted(p.name for p in (runs / "local").glob("checkpoint_*")) == ["checkpoint_000000", "checkpoint_000001"]
    for split, scores in uninterrupted.scores.items():
        for attribute, value in scores.items():
            assert resumed.scores[split][attribute] == pytest.approx(value, abs=1e-5), (split, attribute)


@pytest.mark.slow
def test_bf16_autocast_trains_as_fp32_does_within_seed_variation(prepared, tmp_path):
    """`precision=bf16` (auto picks it on CUDA and CPUs with AMX): the loss falls and development CCC
    differs from fp32's by no more than another seed's fp32 run does (a small model, in one process)."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    small = ["model_kind=cnn_regressor", "model.channels=[8,16,16]", "model.strides=[2,2,2]", "model.feature_dim=32",
             "scaling.num_workers=0", "data.batch_size=2", "epochs=4", "patience=4", f"tracking.tracking_uri={store}"]
    config = load_train_config(REPO / "configs/train/ravdess_sample.yaml", [
        f"data.dataset={prepared / 'prepared'}", f"storage_path={tmp_path / 'runs'}", *small])
    runs = {(precision, seed): run_training(dataclasses.replace(config, precision=precision, seed=seed,
                                                                name=f"{precision}-{seed}"))
            for precision, seed in (("fp32", 0), ("fp32", 1), ("bf16", 0))}
    client = MlflowClient(store)
    for (precision, _), result in runs.items():
        run = client.get_run(result.mlflow_run_id)
        assert run.data.metrics["precision/bf16"] == float(precision == "bf16")
    losses = [m.value for m in client.get_metric_history(runs["bf16", 0].mlflow_run_id, "train/stage2_loss")]
    assert losses[-1] < losses[0], losses
    dev = {key: np.array(list(result.scores["development"].values())) for key, result in runs.items()}
    assert not np.array_equal(dev["bf16", 0], dev["fp32", 0])  # autocast did change the arithmetic
    seed_spread = np.abs(dev["fp32", 1] - dev["fp32", 0]).max()
    assert np.abs(dev["bf16", 0] - dev["fp32", 0]).max() <= max(2 * seed_spread, 0.05), dev


@pytest.mark.slow
def test_controls_train_what_they_say_in_one_process(prepared, tmp_path):
    """The experiment's controls (docs/RESULTS.md): DeepEmoCluster with stage 1 off (`stages=[2]`)
    and shuffled pseudo-labels, with the labelled stage repeated (`labeled_passes`); and the rows a
    run uses with `data.unlabeled_fraction` (nested, the kept labelled rows always in), precise
    BatchNorm's among them."""
    from cluster_train.clustering.labelers import LabelTable
    from cluster_train.data.batches import build_tables, kept_label_ids, row_counts

    table = LabelTable.build(np.arange(40), np.arange(40) % 4, num_chunks=4, num_clusters=4)
    shuffled = table.shuffled(np.random.default_rng(0))
    assert not np.array_equal(shuffled.labels, table.labels)
    np.testing.assert_array_equal(np.bincount(shuffled.labels.ravel()), np.bincount(table.labels.ravel()))
    np.testing.assert_array_equal(shuffled.labels, table.shuffled(np.random.default_rng(0)).labels)

    common = ["scaling.num_workers=0", "tracking.enabled=false", "epochs=1", *TINY_MODEL, "precise_bn.utterances=0"]
    once = run_training(_small_run(prepared, tmp_path, "dec-once", *common))
    control = run_training(_small_run(prepared, tmp_path, "dec-control", *common, "stages=[2]", "labeled_passes=3",
                                      "clustering.pseudo_labels=shuffled"))
    assert once.metrics["train/stage1_steps"] == 2 and once.metrics["train/stage2_steps"] == 2  # 8 rows, batch 4
    assert "train/stage1_steps" not in control.metrics and control.metrics["train/stage2_steps"] == 3 * 2
    assert control.metrics["cluster/size_min"] >= 0 and "cluster/kmeans_objective" in control.metrics
    # the paper's "unsupervised" (stage 1 only, Fig. 3): no regressor learns, so the development
    # loss cannot choose an epoch or stop the run early; the last epoch is the model kept
    unsupervised = run_training(_small_run(prepared, tmp_path, "dec-unsupervised", *common, "stages=[1]",
                                           "epochs=3", "patience=1"))
    assert unsupervised.epochs_run == 3 and unsupervised.metrics["dev/best_epoch"] == 2
    assert "train/stage2_steps" not in unsupervised.metrics and unsupervised.metrics["train/stage1_steps"] == 2
    with pytest.raises(ConfigError, match=r"'stages': model_kind cnn_regressor has stages \[2\], not \[1\]"):
        _small_run(prepared, tmp_path, "x", "stages=[1]", "model_kind=cnn_regressor")
    with pytest.raises(ConfigError, match="'stages': name at least one of"):
        _small_run(prepared, tmp_path, "x", "stages=[]")

    dataset = PreparedDataset(str(prepared / "prepared"))
    config = _small_run(prepared, tmp_path, "rows", "data.label_fraction=0.25").data
    kept = kept_label_ids(dataset, config, seed=0)
    counts = {f: row_counts(dataset, dataclasses.replace(config, unlabeled_fraction=f), seed=0) for f in (0, 0.5, 1)}
    assert len(kept) == 2  # of 8 train utterances; the other 6 are audio-only
    assert [counts[f]["unlabeled"] for f in (0, 0.5, 1)] == [2, 2 + 3, 8]
    assert [counts[f]["cluster"] for f in (0, 0.5, 1)] == [2, 2 + 3, 8]
    assert [counts[f]["labeled"] for f in (0, 0.5, 1)] == [2] * 3
    # precise BatchNorm draws from the audio the run uses: with no audio-only rows, the kept labels'
    bn = {f: build_tables(dataset, dataclasses.replace(config, unlabeled_fraction=f), seed=0,
                          precise_bn_utterances=64)["precise_bn"]["id"].to_pylist() for f in (0, 0.5, 1)}
    used = build_tables(dataset, dataclasses.replace(config, unlabeled_fraction=0.5), seed=0)["cluster"]["id"].to_pylist()
    assert bn[0] == kept and bn[0.5] == sorted(used) and len(bn[0.5]) == 5 and len(bn[1]) == 8


@pytest.mark.slow
def test_the_chunking_is_a_training_option_that_the_bundle_keeps_for_prediction(prepared, tmp_path):
    """C and w_c (`data.chunks`) are cut from the stored frames when rows are read: another chunking
    needs no new prep, the model takes chunks of that length, and prediction on raw audio cuts the
    same chunks from the bundle's settings as evaluation cuts from the dataset's frames."""
    from cluster_train.serve.evaluate import predict_table
    from cluster_train.serve.predict import predict_file

    result = run_training(_small_run(prepared, tmp_path, "chunks-4x31", "scaling.num_workers=0", "tracking.enabled=false",
                                     "epochs=1", *TINY_MODEL, "precise_bn.utterances=0", "stages=[2]",
                                     "data.chunks.num_chunks=4", "data.chunks.chunk_frames=31"))
    assert result.metrics["train/stage2_chunks"] == 8 * 4  # 8 labelled train utterances x 4 chunks
    bundle = load_bundle(result.best_bundle)
    assert bundle.chunks == ChunkConfig(num_chunks=4, chunk_frames=31) and bundle.model_config.chunk_frames == 31
    dataset = PreparedDataset(str(prepared / "prepared"))
    row = dataset.read_table(["test"]).slice(0, 1)
    manifest = pq.read_table(prepared / "prepared" / "manifest.parquet")
    audio = manifest.filter(pc.equal(manifest["id"], row["id"][0]))["audio"][0].as_py()
    from_frames = predict_table(bundle, row)[0]
    from_audio = predict_file(bundle, audio, raw=True)
    assert [from_audio[a] for a in bundle.label_scaler.attributes] == pytest.approx(from_frames.tolist(), abs=1e-5)


@pytest.mark.slow
def test_report_figures_cluster_and_project_a_trained_model(prepared, tracked_run, tmp_path):
    """The report's Fig. 3 (arousal of the highest- and lowest-arousal K-means clusters of the train
    chunks' embeddings) and its 2-D projection, from the tracked DeepEmoCluster run's best model."""
    from cluster_train.experiments.report import TrainedTrial, cluster_figure, projection_figure
    from cluster_train.experiments.sweep import Trial

    result, _ = tracked_run
    item = TrainedTrial(Trial("deepemocluster", 0, _small_run(prepared, tmp_path, "smoke")), {"best_model": result.best_bundle})
    dataset = PreparedDataset(str(prepared / "prepared"))
    found = cluster_figure({"DeepEmoCluster": item}, dataset, tmp_path / "clusters.png")["DeepEmoCluster"]
    assert found["chunks"] == 8 * 11 and 1 <= found["mean_low"] < found["mean_high"] <= 7
    projection_figure(item, dataset, "test", tmp_path / "projection.png")
    assert (tmp_path / "clusters.png").stat().st_size > 10_000 and (tmp_path / "projection.png").stat().st_size > 10_000
