"""A sweep's trial records: one JSON file per finished trial (its config, scores, MLflow run id,
development curves and test predictions) in `SweepConfig.records`, a folder in git or a bucket.
A trial with its record is done on any machine that has the folder, with or without its model;
`report.py` makes its tables from them."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from cluster_train.serve.evaluate import SplitPredictions
from cluster_train.train.config import TrainConfig
from data_prep.config import ConfigError, to_flat_dict
from data_prep.manifest import ATTRIBUTES
from data_prep.storage import OutputFolder

if TYPE_CHECKING:
    from cluster_train.experiments.sweep import SweepConfig, Trial


RUN_FILE = "run.json"  # beside a trial's best_model/: what its training reported
RECORD_ONLY = ("config", "predictions")  # in a trial's record, not in the run it describes
# From MLflow, per epoch (`precision/bf16` per sitting: a trial resumed on another machine may change it)
CURVES = (*(f"dev/ccc_{attribute}" for attribute in ATTRIBUTES), "time/epoch", "precision/bf16")


def records_folder(config: SweepConfig) -> OutputFolder:
    """Where the sweep keeps its trials' records (`SweepConfig.records`), a local one made absolute:
    trials write theirs from Ray tasks, which run in other folders."""
    location = config.records or f"{config.output.rstrip('/')}/{config.name}/trials"
    return OutputFolder(location if "://" in location else str(Path(location).resolve()))


def _record_file(name: str) -> str:
    return f"{name}.json"


def _config_record(config: TrainConfig) -> dict:
    return json.loads(json.dumps(to_flat_dict(config), default=str))


def trained_run(config: TrainConfig, records: OutputFolder) -> dict | None:
    """The run of a trial trained before, else None: its run.json beside its best model here, or its
    record in `records` (trained on another machine: no model here). A run found here and not yet
    recorded is recorded now.

    A trial trained with another config is an error naming the keys that differ: reusing it would
    mix configs in one table, retraining would overwrite a model someone may need. (Runs written
    before run.json kept the config cannot be checked and are reused.)"""
    folder, file = OutputFolder(config.run_dir), _record_file(config.name)
    here = folder.read_json(RUN_FILE) if folder.exists("best_model/model.pt") and folder.exists(RUN_FILE) else None
    record = _read_record(records, file) if records.exists(file) else None
    if here is None and record is None:
        return None
    found, where = (here, folder.location) if here is not None else (record, records.uri(file))
    before, now = found.get("config"), _config_record(config)
    # Keys the record lacks were added to the code later; their defaults keep the old behaviour.
    keys = sorted(k for k in (before or {}) if before[k] != now.get(k) and not _changes_no_result(k))
    if keys:
        raise ConfigError(f"trial {config.name} was trained in {where} with another config "
                          f"(differs in {', '.join(keys)}): move that folder away or name the sweep anew")
    # (Records written before they kept the dataset's hash are reused wherever the data lies, and any
    # record where the data is not prepared: a report made from the records alone.)
    data_here = _dataset_hash(config)
    if found.get("dataset_hash") and data_here and found["dataset_hash"] != data_here:
        raise ConfigError(f"trial {config.name} was trained in {where} on dataset {found['dataset_hash'][:12]}, "
                          f"not on {config.data.dataset} ({data_here[:12]}): move that folder "
                          f"away or name the sweep anew")
    if here is not None and (record is None or record.get("mlflow_run_id") != here.get("mlflow_run_id")):
        # trained here since its record was written, or before records existed
        return _keep_record(here, config, records) | {"reused": True}
    return {key: value for key, value in record.items() if key not in RECORD_ONLY} | {"reused": True}


def _read_record(records: OutputFolder, file: str) -> dict:
    try:
        return records.read_json(file)
    except ValueError as error:
        raise ConfigError(f"trial record {error}. A git merge conflict or a copy cut short? Fix it from git, or "
                          f"delete it: the trial then trains again (or is recorded from its run here)") from error


# Where a trial's data and checkpoints lie, not what it trains on: a record written in another
# checkout or on another machine names other paths. The data is compared by its hash instead.
LOCATION_KEYS = ("data.dataset", "storage_path")


def _changes_no_result(key: str) -> bool:
    """Where a run is tracked (a parent run, a store moved), where its data and checkpoints lie, and
    how many CPU threads it trains on change no result beyond float rounding: a trial cut short may
    go on with more threads once it trains alone."""
    return key.startswith("tracking.") or key in LOCATION_KEYS or key == "scaling.cpus_per_worker"


def _dataset_hash(config: TrainConfig) -> str | None:
    """The hash of the trial's prepared dataset, None where it is not prepared on this machine."""
    dataset = prepared_dataset(config)
    return dataset.dataset_hash if dataset is not None else None


def prepared_dataset(config: TrainConfig):
    """The trial's prepared dataset, None where it is not prepared on this machine (the records hold
    what a report needs; only predicting a trial again, or drawing from its model, needs the data)."""
    from data_prep.dataset import PreparedDataset

    return PreparedDataset(config.data.dataset) if OutputFolder(config.data.dataset).exists("dataset.json") else None


def _keep_record(run: dict, config: TrainConfig, records: OutputFolder) -> dict:
    """Write the trial's record (its run, config and per-epoch curves; predictions are added when
    scored) into `records`; the run it describes, curves included."""
    kept = {key: value for key, value in run.items() if key not in ("config", "reused")} | {
        "curves": _curves(config, run.get("mlflow_run_id"))}
    records.make()
    records.write_json(_record_file(config.name), kept | {"config": _config_record(config)})
    return kept


def _curves(config: TrainConfig, run_id: str | None) -> dict[str, list[float]]:
    """`CURVES` of an MLflow run, one value per epoch (the last logged where a resumed epoch logged
    twice); none, with a warning, where the store cannot be read: as for training, tracking that
    fails loses the curves, not the trial."""
    if not run_id or not config.tracking.enabled:
        return {}
    from mlflow import MlflowClient

    client = MlflowClient(config.tracking.resolved_uri())
    curves = {}
    try:
        for key in CURVES:
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
            by_epoch = {m.step: m.value for m in history}
            curves[key] = [by_epoch[step] for step in sorted(by_epoch)]
    except Exception as error:  # noqa: BLE001 - any store failure: the record goes without curves
        warnings.warn(f"trial {config.name}: no curves in its record, MLflow run {run_id} unreadable at "
                      f"{config.tracking.resolved_uri()}: {error}", RuntimeWarning, stacklevel=2)
        return {}
    return curves


def train_trial(config: TrainConfig, records: str) -> dict:
    from cluster_train.tracking import git_commit
    from cluster_train.train.launch import run_training

    result = run_training(config)
    run = {"best_model": result.best_bundle, "mlflow_run_id": result.mlflow_run_id,
           "commit": git_commit(str(Path(__file__).resolve().parent)),  # the code that finished the trial
           "seconds": round(result.seconds, 1), "epochs_run": result.epochs_run, "scores": result.scores,
           "last_epoch": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
           "dataset_hash": _dataset_hash(config)}
    folder = OutputFolder(config.run_dir)
    folder.make()
    folder.write_json(RUN_FILE, run | {"config": _config_record(config)})  # read back by `trained_run`
    return _keep_record(run, config, OutputFolder(records))


def trial_predictions(config: SweepConfig, name: str, dataset) -> SplitPredictions:
    """The predictions of trial `name`'s best model on the sweep's split: computed once into the
    trial's record (the sweep's table and the report share them), then read from it. A trial trained
    again has a new record, so it is predicted again."""
    from cluster_train.serve.bundle import load_bundle
    from cluster_train.serve.evaluate import predict_split

    records, file = records_folder(config), _record_file(name)
    record = _read_record(records, file)
    saved = record.get("predictions", {}).get(config.split)
    if saved is not None:
        return SplitPredictions(saved["ids"], np.array(saved["prediction"]), np.array(saved["labels"], dtype=float),
                                tuple(saved["attributes"]))
    if dataset is None:
        raise ValueError(f"trial {name}: its record ({records.uri(file)}) holds no {config.split} predictions, and "
                         f"predicting them needs its dataset, which is not prepared here: run the prep job first")
    result = predict_split(load_bundle(record["best_model"]), dataset, config.split)
    record.setdefault("predictions", {})[config.split] = {
        "ids": result.ids, "prediction": result.prediction.tolist(),
        "labels": np.where(np.isnan(result.labels), None, result.labels).tolist(), "attributes": list(result.attributes)}
    records.write_json(file, record)
    return result


def scored_predictions(config: SweepConfig, trained: Iterable[tuple[Trial, dict]], dataset
                       ) -> tuple[dict[str, list[SplitPredictions]], dict[str, list[int]]]:
    """Point -> its trials' predictions, and point -> their seeds: what `compare_models` takes. A
    point whose kind learns no regressor (stage 1 only, Fig. 3's model) has nothing to score."""
    predictions: dict[str, list[SplitPredictions]] = {}
    seeds: dict[str, list[int]] = {}
    for trial, run in trained:
        if trial.config.kind.trains_regressor:
            predictions.setdefault(trial.point, []).append(trial_predictions(config, trial.config.name, dataset))
            seeds.setdefault(trial.point, []).append(trial.seed)
    return predictions, seeds


def trained_in_bf16(run: dict) -> bool:
    """Whether a trial's run (or record) had an epoch in bf16 (`precision/bf16` in its curves)."""
    return any(run.get("curves", {}).get("precision/bf16", []))


def development_ranking(trained: Iterable[tuple[Trial, dict]]) -> list[dict]:
    """The points ranked by their best models' development CCC, mean over seeds and then over the
    attributes: what to choose settings by (test is for reporting the chosen ones)."""
    by_point: dict[str, list[list[float]]] = {}
    for trial, run in trained:
        development = run.get("scores", {}).get(trial.config.data.development_split)
        if development and trial.config.kind.trains_regressor:
            by_point.setdefault(trial.point, []).append([development[a] for a in ATTRIBUTES])
    rows = []
    for point, runs in by_point.items():
        means = np.mean(runs, axis=0)
        rows.append({"point": point, "runs": len(runs), **dict(zip(ATTRIBUTES, map(float, means))),
                     "mean": float(means.mean())})
    return sorted(rows, key=lambda row: -row["mean"])


def development_markdown(ranking: list[dict]) -> str:
    lines = ["| point | runs | " + " | ".join(ATTRIBUTES) + " | mean |", "|" + "---|" * (len(ATTRIBUTES) + 3)]
    lines += [f"| {row['point']} | {row['runs']} | " + " | ".join(f"{row[a]:.3f}" for a in ATTRIBUTES)
              + f" | {row['mean']:.3f} |" for row in ranking]
    return "\n".join(lines)
