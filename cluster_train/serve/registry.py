"""The model registry as teams use it: training logs and registers its best model with the figures
that describe it; a person (or CI) moves the `@champion` alias after comparing with the current one.

    publish_best_model(...)                     # training's finish: log the pyfunc, link its scores,
                                                # register a version of tracking.registered_model
    promote("emotion", "7")                     # @champion -> version 7 if its dev CCC beats the champion's
    python jobs/register.py promote --name emotion --version 7

Version tags: `dataset_hash`, `git_commit`, `best_epoch`, `run_id`, and the CCC of each split and
attribute (`dev_ccc_arousal`, ..., `dev_ccc_mean`, `<test split>_ccc_*`); the comparison reads them, so
a version registered by hand (`register_run`) gets them from its run. Versions trained on different
datasets are not compared (a dev CCC of one dataset says nothing about another) unless forced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cluster_train.tracking import mlflow_globals

BEST_MODEL = "best_model"  # the run's logged model (predict.REGISTERED_ARTIFACT)
BEST_NETWORK = "best_network"  # the network alone, pytorch flavour
DEFAULT_ALIAS = "champion"
DEFAULT_METRIC = "dev_ccc_mean"


class RegistryError(ValueError):
    """A registry request that cannot be done; the message names the model, version and why."""


def split_key(split: str, development_split: str) -> str:
    return "dev" if split == development_split else split


def version_tags(scores: Mapping[str, Mapping[str, float]], development_split: str, *, dataset_hash: str,
                 git_commit: str, best_epoch: int | None, run_id: str | None) -> dict[str, str]:
    """The tags a registered version carries: provenance and each split's CCC (and their mean)."""
    tags = {"dataset_hash": dataset_hash, "git_commit": git_commit}
    if best_epoch is not None:
        tags["best_epoch"] = str(best_epoch)
    if run_id:
        tags["run_id"] = run_id
    for split, values in scores.items():
        key = split_key(split, development_split)
        numbers = {a: float(v) for a, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        tags |= {f"{key}_ccc_{a}": f"{v:.6f}" for a, v in numbers.items()}
        if numbers:
            tags[f"{key}_ccc_mean"] = f"{sum(numbers.values()) / len(numbers):.6f}"
    return tags


def publish_best_model(bundle_dir: str, *, run_id: str, tracking_uri: str, scores: Mapping[str, Mapping[str, float]],
                       development_split: str, metrics: Mapping[str, float], dataset_hash: str, dataset_location: str,
                       git_commit: str, registered_model: str | None, network: bool = True) -> str:
    """Log the bundle as the run's audio pyfunc `best_model` at its epoch (and, with `network`, the
    network alone as `best_network`, MLflow's pytorch flavour), log `metrics` linked to the model and
    the dataset, register a version of `registered_model` (None: not registered) with `version_tags`;
    the model's URI (models:/<name>/<version> when registered)."""
    from cluster_train.serve.bundle import load_bundle
    from cluster_train.serve.pyfunc import log_audio_model, log_network

    epoch = load_bundle(bundle_dir).extra.get("epoch")
    step = int(epoch) if isinstance(epoch, (int, float)) else 0
    tags = version_tags(scores, development_split, dataset_hash=dataset_hash, git_commit=git_commit,
                        best_epoch=step, run_id=run_id)
    info = log_audio_model(bundle_dir, BEST_MODEL, run_id=run_id, tracking_uri=tracking_uri, step=step, tags=tags)
    if network:
        log_network(bundle_dir, BEST_NETWORK, run_id=run_id, tracking_uri=tracking_uri, step=step)
    client = MlflowClient(tracking_uri)
    name = "/".join(dataset_location.rstrip("/").split("/")[-2:])  # as the training loop logs the dataset
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value), step=step, model_id=info.model_id, dataset_name=name,
                          dataset_digest=dataset_hash[:36])
    if registered_model is None:
        return info.model_uri
    with mlflow_globals(tracking_uri):
        version = mlflow.register_model(info.model_uri, registered_model, tags=tags)
    return f"models:/{registered_model}/{version.version}"


def register_run(run_id: str, name: str, tracking_uri: str | None = None, artifact: str = BEST_MODEL) -> str:
    """Register the run's logged model `artifact` as a version of `name`, tagged with the run's
    provenance and final scores; its models:/ URI."""
    from cluster_train.tracking import TrackingConfig

    uri = tracking_uri or TrackingConfig().resolved_uri()
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise RegistryError(f"run {run_id}: not in {uri} ({error.message})") from error
    logged = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    models = [m for m in logged if m.name == artifact]
    if not models:
        found = sorted({m.name for m in logged}) or "none"
        raise RegistryError(f"run {run_id}: no logged model {artifact!r} (it has {found})")
    model = max(models, key=lambda m: m.creation_timestamp)
    tags = {k: v for k, v in model.tags.items() if not k.startswith("mlflow.")}
    if not tags:  # a model logged without version tags: what the run knows
        tags = {k: run.data.tags[k] for k in ("dataset_hash", "git_commit") if k in run.data.tags}
        tags |= {_metric_tag(k): f"{v:.6f}" for k, v in run.data.metrics.items() if _metric_tag(k)}
    tags["run_id"] = run_id
    with mlflow_globals(uri):
        version = mlflow.register_model(f"models:/{model.model_id}", name, tags=tags)
    return f"models:/{name}/{version.version}"


def _metric_tag(key: str) -> str | None:
    """`dev/final_ccc_arousal` -> `dev_ccc_arousal`, `test/ccc_valence` -> `test_ccc_valence`; else None."""
    if key.startswith("dev/final_ccc_"):
        return "dev_ccc_" + key.removeprefix("dev/final_ccc_")
    split, _, rest = key.partition("/ccc_")
    return f"{split}_ccc_{rest}" if rest and "/" not in split and split != "dev" else None


@dataclass
class Promotion:
    name: str
    alias: str
    version: str
    previous: str | None  # the version the alias pointed at before, None if it was unset
    moved: bool
    reason: str

    def text(self) -> str:
        where = f"-> version {self.version}" if self.moved else "unchanged"
        return f"{self.name}@{self.alias}: {where} ({self.reason})"


def _metric(version, metric: str) -> float:
    value = version.tags.get(metric)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RegistryError(f"{version.name} version {version.version} has no number in tag {metric!r} "
                            f"(tags: {sorted(version.tags)})") from None
    if not math.isfinite(number):
        raise RegistryError(f"{version.name} version {version.version}: tag {metric} is {value}")
    return number


def promote(name: str, version: str, alias: str = DEFAULT_ALIAS, metric: str = DEFAULT_METRIC,
            force: bool = False, min_gain: float = 0.0, tracking_uri: str | None = None) -> Promotion:
    """Point `name@alias` at `version` when its `metric` tag beats the current holder's by more than
    `min_gain` (higher is better: a CCC), or when the alias is unset, or `force`; else leave it."""
    from cluster_train.tracking import TrackingConfig

    client = MlflowClient(tracking_uri or TrackingConfig().resolved_uri())
    try:
        candidate = client.get_model_version(name, str(version))
    except MlflowException as error:
        raise RegistryError(f"{name} version {version}: not in the registry ({error.message})") from error
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        current = None
    version = str(candidate.version)  # the sqlite store gives ints, a server strings
    previous = str(current.version) if current is not None else None
    if previous == version:
        return Promotion(name, alias, version, previous, False, f"version {previous} already is @{alias}")
    if force:
        reason = "forced"
    elif current is None:
        _metric(candidate, metric)  # a version without its figures is never made champion unforced
        reason = f"no @{alias} yet"
    else:
        mine, theirs = candidate.tags.get("dataset_hash"), current.tags.get("dataset_hash")
        if mine != theirs:
            raise RegistryError(f"{name}: version {version} was trained on dataset {mine}, @{alias} "
                                f"(version {previous}) on {theirs}: their {metric} do not compare "
                                "(force it if you mean it)")
        new, old = _metric(candidate, metric), _metric(current, metric)
        if not new > old + min_gain:
            return Promotion(name, alias, version, previous, False,
                             f"{metric} {new:.4f} does not beat version {previous}'s {old:.4f}"
                             + (f" by more than {min_gain:g}" if min_gain else ""))
        reason = f"{metric} {new:.4f} > version {previous}'s {old:.4f}"
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, f"{alias}_since", reason)
    return Promotion(name, alias, version, previous, True, reason)
