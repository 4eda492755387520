"""A sweep: one training run per grid point and seed, then the paper's comparison table.

    config = load_sweep_config("configs/sweep/paper_ravdess.yaml", overrides)
    result = run_sweep(config)   # trains what is not trained yet, scores, writes <output>/<name>/table.json

Every trial is the ordinary training job (`launch.run_training`) with the grid point's and the seed's
overrides; its MLflow run goes to the experiment named after the sweep, so the UI shows them side
by side. All trials' configs are checked before anything trains. A trial whose best model already
exists is not trained again: a killed sweep, run again, goes on where it stopped. Up to
`max_concurrent` trials train at once, each its own Ray Train run (on a cluster the autoscaler adds
the GPUs they ask for).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import MISSING

from cluster_train.train.config import TrainConfig, load_train_config
from cluster_train.train.launch import pin_local_paths, warn_if_reads_starve
from data_prep.config import ConfigError, load_config, require, to_flat_dict
from data_prep.storage import OutputFolder


@dataclass(kw_only=True)
class SweepConfig:
    name: str = MISSING  # the MLflow experiment and the folder of the results
    train_config: str = MISSING  # a training config file (configs/train/...)
    overrides: list[str] = field(default_factory=list)  # key=value for every trial
    grid: dict[str, list[Any]] = field(default_factory=dict)  # training key -> values; every combination
    seeds: list[int] = field(default_factory=lambda: [0])  # trials per grid point (the paper: 5)
    reference: str | None = None  # the grid point the others are tested against; None: the first
    split: str = "test"
    subsets: int = 4  # random equal parts of the split per trial (the paper: 4)
    max_concurrent: int = 1
    output: str = "outputs/sweeps"

    def __post_init__(self) -> None:
        require(len(self.seeds) > 0, "seeds", "name at least one seed")
        require(self.subsets >= 1, "subsets", "must be >= 1")
        require(self.max_concurrent >= 1, "max_concurrent", "must be >= 1")
        require(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) is not None, "name", "letters, digits, _ . - only")
        for key, values in self.grid.items():
            require(len(values) > 0, f"grid.{key}", "give at least one value")
            require(key != "seed", f"grid.{key}", "seeds go in `seeds`, not in the grid")


@dataclass(frozen=True)
class Trial:
    point: str  # the grid point, e.g. "model_kind=cnn_ae"; "base" for an empty grid
    seed: int
    config: TrainConfig


@dataclass
class SweepResult:
    table: dict  # evaluation.compare_models output
    runs: list[dict]  # per trial: point, seed, run name, best model, MLflow run id, seconds
    table_file: str


def load_sweep_config(path: str | Path | None, overrides: Sequence[str] = ()) -> SweepConfig:
    return load_config(SweepConfig, path, overrides)


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def point_label(point: dict[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in point.items()) or "base"


def plan_trials(config: SweepConfig) -> list[Trial]:
    """Every trial's training config, validated: a wrong key or value fails here, before Ray starts."""
    trials = []
    for point in grid_points(config.grid):
        label = point_label(point)
        for seed in config.seeds:
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
            overrides = [*(f"{k}={v}" for k, v in point.items()), f"seed={seed}",
                         f"name={config.name}-{slug}-seed{seed}", f"tracking.experiment={config.name}"]
            try:  # the file and the sweep's overrides serve every kind: a trial keeps what its kind reads
                train = load_train_config(config.train_config, overrides, shared_overrides=config.overrides)
            except ConfigError as error:
                raise ConfigError(f"sweep {config.name}, trial {label} seed {seed}: {error}") from error
            trials.append(Trial(label, seed, train))
    labels = [point_label(p) for p in grid_points(config.grid)]
    if config.reference is not None and config.reference not in labels:
        raise ConfigError(f"config key 'reference': {config.reference!r} is none of the grid points {labels}")
    return trials


RUN_FILE = "run.json"  # beside a trial's best_model/: what its training reported


def _config_record(config: TrainConfig) -> dict:
    return json.loads(json.dumps(to_flat_dict(config), default=str))


def _trained(config: TrainConfig) -> dict | None:
    """The record of a trial trained before (its best model and run.json exist), else None.

    A trial trained with another config is an error naming the keys that differ: reusing it would
    mix configs in one table, retraining would overwrite a model someone may need. (Records written
    before run.json kept the config cannot be checked and are reused.)"""
    folder = OutputFolder(f"{config.storage_path.rstrip('/')}/{config.name}")
    if not folder.exists("best_model/model.pt") or not folder.exists(RUN_FILE):
        return None
    run = folder.read_json(RUN_FILE)
    before, now = run.pop("config", None), _config_record(config)
    # Keys the record lacks were added to the code later; their defaults keep the old behaviour.
    keys = sorted(k for k in (before or {}) if before[k] != now.get(k))
    if keys:
        raise ConfigError(f"trial {config.name} was trained in {folder.location} with another config "
                          f"(differs in {', '.join(keys)}): move that folder away or name the sweep anew")
    return run | {"reused": True}


def _train(config: TrainConfig) -> dict:
    from cluster_train.train.launch import run_training

    result = run_training(config)
    run = {"best_model": result.best_bundle, "mlflow_run_id": result.mlflow_run_id,
           "seconds": round(result.seconds, 1), "epochs_run": result.epochs_run, "scores": result.scores,
           "last_epoch": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}
    record = run | {"config": _config_record(config)}  # read back by `_trained`, not part of the table
    folder = OutputFolder(f"{config.storage_path.rstrip('/')}/{config.name}")
    folder.make()
    folder.write_json(RUN_FILE, record)
    return run


def run_sweep(config: SweepConfig) -> SweepResult:
    import ray

    from cluster_train.serve.bundle import load_bundle
    from cluster_train.serve.evaluate import compare_models, predict_split
    from data_prep.dataset import PreparedDataset

    trials = [dataclasses.replace(t, config=pin_local_paths(t.config)) for t in plan_trials(config)]
    dataset = PreparedDataset(trials[0].config.data.dataset)  # a missing dataset fails before training
    runs: list[dict | None] = [None] * len(trials)
    pending = []
    for index, trial in enumerate(trials):
        runs[index] = _trained(trial.config)
        if runs[index] is None:
            pending.append(index)
    if pending and not ray.is_initialized():
        ray.init(logging_level="WARNING")
    if pending and config.max_concurrent > 1:
        warn_if_reads_starve(trials[0].config.scaling, runs=min(config.max_concurrent, len(pending)))
        if trials[0].config.tracking.enabled:
            from cluster_train.tracking import RunTracker

            RunTracker(trials[0].config.tracking).prepare_experiment()
    if config.max_concurrent == 1:
        for index in pending:
            runs[index] = _train(trials[index].config)
    else:
        train_task = ray.remote(num_cpus=0, max_retries=0)(_train)
        waiting: dict = {}
        queue = list(pending)
        while queue or waiting:
            while queue and len(waiting) < config.max_concurrent:
                index = queue.pop(0)
                waiting[train_task.remote(trials[index].config)] = index
            ready, _ = ray.wait(list(waiting), num_returns=1)
            index = waiting.pop(ready[0])
            runs[index] = ray.get(ready[0])

    predictions: dict[str, list] = {}
    for trial, run in zip(trials, runs):
        assert run is not None
        run |= {"point": trial.point, "seed": trial.seed, "name": trial.config.name}
        bundle = load_bundle(run["best_model"])
        predictions.setdefault(trial.point, []).append(predict_split(bundle, dataset, config.split))
    table = compare_models(predictions, config.reference or trials[0].point, k=config.subsets)
    table |= {"sweep": config.name, "split": config.split, "dataset": dataset.location, "runs": runs}
    folder = OutputFolder(f"{config.output.rstrip('/')}/{config.name}")
    folder.make()
    folder.write_json("table.json", table)
    return SweepResult(table, [r for r in runs if r is not None], folder.uri("table.json"))
