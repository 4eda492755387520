"""The driver of a training run: check everything, start the K-means service, run the
TorchTrainer, then score the best checkpoint and finish the MLflow run.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cluster_train.console import quiet_process, ray_env, ray_train_log_level
from cluster_train.data.labels import LabelScaler
from cluster_train.tracking import standard_tags
from cluster_train.train.checkpointer import BEST_DIR
from cluster_train.train.config import ScalingConfig, TrainConfig
from cluster_train.train.preflight import check_run_against_dataset
from data_prep.config import to_flat_dict
from data_prep.dataset import PreparedDataset
from data_prep.guards import refuse_node_local_paths, refuse_outputs_lost_after_job
from data_prep.manifest import ATTRIBUTES
from data_prep.shards import ChunkRecipe
from data_prep.storage import copy_folder


@dataclass
class TrainResult:
    name: str
    best_bundle: str  # folder holding the best model bundle (model.pt)
    mlflow_run_id: str | None
    scores: dict[str, dict[str, float]]  # split -> attribute -> CCC (raw label scale)
    epochs_run: int
    seconds: float
    metrics: dict  # what the last epoch reported: losses, development CCC, seconds per step


def pin_local_paths(config: TrainConfig) -> TrainConfig:
    """Local dataset and storage paths made absolute and the MLflow store resolved, here: Ray
    workers (and a sweep's trials, run as Ray tasks) work in other folders."""
    def resolve(path: str) -> str:
        return path if "://" in path else str(Path(path).resolve())

    uri = config.tracking.resolved_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    config.tracking.tracking_uri = uri
    return dataclasses.replace(config, storage_path=resolve(config.storage_path),
                               data=dataclasses.replace(config.data, dataset=resolve(config.data.dataset)))


def warn_if_reads_starve(scaling: ScalingConfig, runs: int = 1) -> None:
    """Warn when `runs` concurrent CPU trainings with `scaling` leave Ray Data's reads less than one
    free CPU on the running cluster.

    Seen here (Ray 2.60, 2 CPUs): with 1.5 CPUs held by training workers the dataset reads never
    start and the run waits forever; with 1.0 held they run. A warning, not an error: an
    autoscaling cluster adds the CPUs once the workers ask for them.
    """
    import ray

    if scaling.use_gpu:
        return
    cpus_taken = runs * scaling.num_workers * scaling.cpus_per_worker
    what = f"{scaling.num_workers} training worker(s)" + (f" x {runs} concurrent runs" if runs > 1 else "")
    total = float(ray.cluster_resources().get("CPU", 0.0))
    if total - cpus_taken < 1.0:
        warnings.warn(
            f"{what} take {cpus_taken:g} of this Ray cluster's {total:g} CPUs: Ray Data's reads need one "
            f"free CPU and the run will wait until one appears (an autoscaling cluster adds it; else "
            f"lower scaling.num_workers x scaling.cpus_per_worker)", RuntimeWarning, stacklevel=3)


def fit_label_scaler(dataset: PreparedDataset, config: TrainConfig) -> LabelScaler:
    """Label statistics of the labels the run keeps (`data.label_fraction`): hidden labels stay hidden."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from cluster_train.data.batches import kept_label_ids

    table = dataset.read_table(config.data.labeled_splits, ["id", *ATTRIBUTES])
    kept = pa.array(kept_label_ids(dataset, config.data, config.seed), table["id"].type)
    return LabelScaler.fit(table.filter(pc.is_in(table["id"], value_set=kept)), config.model.attributes, split=None)


def with_dataset_shape(config: TrainConfig, dataset: PreparedDataset) -> TrainConfig:
    """The model's input shape from its one source each: the run's chunking and the dataset's mel bands."""
    recipe = ChunkRecipe.for_dataset(dataset.settings, config.data.chunks)
    model = dataclasses.replace(config.model, chunk_frames=recipe.chunks.chunk_frames, n_mels=recipe.features.n_mels)
    return dataclasses.replace(config, model=model)


def refuse_lost_outputs(config: TrainConfig) -> None:
    """Under `ray job submit`, refuse a relative `storage_path` or local MLflow store (the default one
    included: `mlflow.db` in the current folder), before anything starts."""
    tracking_uri = config.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    refuse_outputs_lost_after_job({"storage_path": config.storage_path,
                                   "tracking.tracking_uri": tracking_uri if config.tracking.enabled else None})


def run_training(config: TrainConfig, verbose: bool = False) -> TrainResult:
    """Train `config` on Ray Train (a local Ray is started when none is running), or in this process
    without Ray when `scaling.num_workers` is 0; score the best model on the development and test
    splits, finish its MLflow run. `verbose`: keep Ray Train's and MLflow's own console output."""
    refuse_lost_outputs(config)
    started = time.perf_counter()
    name = config.name or f"{config.model_kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = pin_local_paths(dataclasses.replace(
        config, name=name, tracking=dataclasses.replace(config.tracking, run_name=config.tracking.run_name or name)))
    dataset = PreparedDataset(config.data.dataset)  # a missing or unfinished dataset fails here
    dataset.normalizer()  # fails here, not on a worker, when the dataset has no statistics
    check_run_against_dataset(config, dataset)  # its splits and clustering memory: before Ray starts
    config = with_dataset_shape(config, dataset)
    scaler = fit_label_scaler(dataset, config)
    tags = {**standard_tags(_git_commit()), "git_commit": _git_commit(), "dataset_hash": dataset.dataset_hash,
            "model_kind": config.model_kind, "recipe": config.recipe}
    run = _train_in_process if config.scaling.num_workers == 0 else _train_on_ray
    metrics, checkpoint = run(config, dataset, scaler, tags, verbose)

    output = f"{config.run_dir}/best_model"  # beside the run's checkpoints
    run_id = metrics.get("mlflow_run_id") or None
    if config.tracking.enabled and run_id is None:
        warnings.warn(f"run {name} is not tracked: MLflow at {config.tracking.tracking_uri} failed on the "
                      f"training worker (its log has the error); the best model is in {output}", RuntimeWarning)
    with checkpoint() as folder:
        copy_folder(str(Path(folder) / BEST_DIR), output)
        scores = finish_run(config, str(Path(folder) / BEST_DIR), dataset, run_id)
    return TrainResult(name, output, run_id, scores, int(metrics["epoch"]) + 1, time.perf_counter() - started,
                       dict(metrics))


def _train_in_process(config: TrainConfig, dataset: PreparedDataset, scaler: LabelScaler, tags: dict,
                      verbose: bool):
    """The loop in this process (`train/runtime.py`): the same rows, in memory, and no Ray."""
    import torch

    from cluster_train.data.batches import build_tables
    from cluster_train.train.loop import train
    from cluster_train.train.runtime import LocalRuntime

    quiet_process(verbose)
    tables = build_tables(dataset, config.data, config.seed, config.precise_bn.utterances)
    device = torch.device("cuda") if config.scaling.use_gpu else torch.device("cpu")
    runtime = LocalRuntime(tables, config.run_dir, device, on_report=tune_epoch_reporter())
    train(config, runtime, scaler.to_dict(), None, to_flat_dict(config), tags)
    metrics = runtime.last_metrics()  # this sitting's last epoch, or a finished run's, started again
    if metrics is None:
        raise RuntimeError(f"training run {config.name} ended without a checkpoint")
    return metrics, runtime.resume_folder


def _train_on_ray(config: TrainConfig, dataset: PreparedDataset, scaler: LabelScaler, tags: dict, verbose: bool):
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # report() waits on it
    quiet_process(verbose)
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from cluster_train.clustering.service import get_or_create_service
    from cluster_train.data.batches import SPLIT_DATASETS, build_datasets, cache_shards, plan_streams
    from cluster_train.train.ray_worker import train_func

    if not ray.is_initialized():
        ray.init(logging_level="WARNING", runtime_env={"env_vars": ray_env(verbose)})
    refuse_node_local_paths({"storage_path": config.storage_path,
                             "tracking.tracking_uri": config.tracking.tracking_uri if config.tracking.enabled else None,
                             "data.dataset": config.data.dataset}, mlflow_key="tracking.tracking_uri")
    context = ray.data.DataContext.get_current()
    # Small data only (streamed data orders its passes itself): Ray Train's split of the driver's
    # tables gives each rank the same rows every run, which each rank then permutes per pass.
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # one bar per worker and epoch would bury the log
    context.print_on_execution_start = verbose  # an execution plan per dataset and epoch, likewise
    warn_if_reads_starve(config.scaling)
    in_memory = cache_shards(dataset, config.data)
    datasets = build_datasets(dataset, config.data, config.seed, in_memory=in_memory,
                              precise_bn_utterances=config.precise_bn.utterances)
    # streamed: each worker reads its share of every pass (data/streaming.py); the plans go to the
    # object store once, not into every worker's arguments
    streams = None if in_memory else ray.put(plan_streams(dataset, config.data, config.seed))
    service = None
    if config.clusters and config.clustering.mode != "allreduce":  # "allreduce" clusters inside the workers
        # restarted up to clustering.actor_restarts times if it dies; the workers then cluster again
        service = get_or_create_service(f"kmeans-{config.name}", config.clustering, config.scaling.num_workers,
                                        seed=config.seed, training_uses_gpu=config.scaling.use_gpu)
    try:
        trainer = TorchTrainer(
            train_func,
            train_loop_config={"config": config, "label_scaler": scaler.to_dict(), "service": service,
                               "params": to_flat_dict(config), "tags": tags, "streams": streams,
                               "verbose": verbose},
            scaling_config=ray.train.ScalingConfig(
                num_workers=config.scaling.num_workers,
                use_gpu=config.scaling.use_gpu,
                resources_per_worker={"CPU": config.scaling.cpus_per_worker},
            ),
            run_config=ray.train.RunConfig(
                name=config.name,
                storage_path=config.storage_path,
                failure_config=ray.train.FailureConfig(max_failures=config.scaling.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                logging_config=ray.train.LoggingConfig(log_level=ray_train_log_level(verbose)),
                callbacks=tune_train_callbacks(),
            ),
            datasets=datasets,
            dataset_config=ray.train.DataConfig(datasets_to_split=SPLIT_DATASETS if in_memory else []),
        )
        result = trainer.fit()
    finally:
        if service is not None:
            ray.kill(service)
    if result.checkpoint is None:
        raise RuntimeError(f"training run {config.name} ended without a checkpoint: {result.error}")
    return result.metrics, result.checkpoint.as_directory


def in_tune_trial() -> bool:
    """Whether this process runs a Ray Tune trial (`experiments/tuning.py`)."""
    try:
        from ray.tune.trainable.trainable_fn_utils import _in_tune_session
    except ImportError:
        return False
    return _in_tune_session()


def tune_epoch_reporter() -> Callable[[dict], None] | None:
    """In a Tune trial, what hands each epoch's metrics to Tune, whose scheduler may end the trial
    on them; None elsewhere."""
    if not in_tune_trial():
        return None
    from ray import tune

    def report(metrics: dict) -> None:
        tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float)) or k == "mlflow_run_id"})

    return report


def tune_train_callbacks() -> list:
    """In a Tune trial, Ray Train's callback that hands each epoch's report to Tune."""
    if not in_tune_trial():
        return []
    from ray.tune.integration.ray_train import TuneReportCallback

    return [TuneReportCallback()]


def finish_run(config: TrainConfig, bundle_dir: str, dataset: PreparedDataset,
               run_id: str | None) -> dict[str, dict[str, float]]:
    """Score the best model on development and test (`serve/evaluate.py`, on a Ray Data actor pool
    when the run trained on Ray: a second path beside the training loop's validation); log the
    scores (`dev/final_ccc_*`, `<test split>/ccc_*`), the model and its registered version to the run."""
    from cluster_train.serve.bundle import load_bundle
    from cluster_train.serve.evaluate import ActorPool, score_splits
    from cluster_train.serve.registry import publish_best_model
    from cluster_train.tracking import RunTracker

    bundle = load_bundle(bundle_dir)
    splits = [config.data.development_split, *config.data.test_splits]
    # on Ray: an actor pool the size of the training's workers (the head has no CPUs for it)
    pool = ActorPool(device="gpu" if config.scaling.use_gpu else "cpu", min_actors=1,
                     max_actors=max(1, config.scaling.num_workers), cpus_per_actor=config.scaling.cpus_per_worker)
    results = score_splits(bundle, dataset, splits, on_ray=config.scaling.num_workers > 0, pool=pool)
    scores = {split: result["ccc"] for split, result in results.items()}
    final = {}
    for split, values in scores.items():
        key = "dev/final_ccc" if split == config.data.development_split else f"{split}/ccc"
        final |= {f"{key}_{k}": v for k, v in values.items() if isinstance(v, float)}
    tracker = RunTracker(config.tracking, active=run_id is not None)
    if run_id is not None and tracker.start({}, {}, run_id=run_id):
        logged = tracker.logged_metrics()
        if any(logged.get(key) != value for key, value in final.items()):  # else a finished run started again
            try:  # the scores go last, linked to the model: they mark this model as logged
                publish_best_model(bundle_dir, run_id=run_id, tracking_uri=tracker.uri, scores=scores,
                                   development_split=config.data.development_split, metrics=final,
                                   dataset_hash=dataset.dataset_hash, dataset_location=dataset.location,
                                   git_commit=_git_commit(), registered_model=config.tracking.registered_model,
                                   network=config.tracking.log_network)
            except Exception as error:  # noqa: BLE001 - tracking never fails a finished training
                warnings.warn(f"MLflow run {run_id}: the best model in {bundle_dir} was not logged to "
                              f"{tracker.uri}: {type(error).__name__}: {error}", RuntimeWarning, stacklevel=2)
        tracker.end()
    return scores


def _git_commit() -> str:
    from cluster_train.tracking import git_commit

    return git_commit(str(Path(__file__).resolve().parents[1])) or "unknown"
