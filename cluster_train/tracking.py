"""Experiment tracking: the one place training talks to MLflow (torchtitan's components/metrics.py).

    tracker = RunTracker(config.tracking, active=world_rank == 0)  # other ranks: all no-ops
    run_id = tracker.start(params, tags={"git_commit": git_commit() or "unknown"}, run_id=saved_id)
    tracker.log_metrics({"train/loss": 0.42}, step=epoch)
    tracker.log_model(model, "model", extra={"norm_stats": stats}); tracker.end()

Runs are addressed by id through `MlflowClient`, so a resumed training re-opens the run whose id it
saved in its checkpoint, and several trackers can live in one process. Failure policy: the first
MLflow error (server unreachable, store broken, a rejected value) gives ONE warning naming the URI
and the error, then the tracker disables itself; nothing raises into training. For http(s) stores
MLflow's own retries ride out a brief outage or a locked sqlite store, and are cut short (unless the
user set them): a dead server costs seconds, not minutes.

Provenance on a cluster, where the code has no .git: `git_commit` falls back to $DEEPEMOCLUSTER_GIT_COMMIT,
and every run records the image it ran in ($DEEPEMOCLUSTER_IMAGE, both set by infra/docker/Dockerfile).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import mlflow
import mlflow.pytorch
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

logger = logging.getLogger(__name__)
T = TypeVar("T")

# MLflow's defaults (7 retries with exponential backoff, 120 s per request) stall a training for
# minutes on a dead server; none at all would turn tracking off at the first 503 a sqlite server
# answers for "database is locked". 3 retries, MLflow's backoff 0 + 2 + 4 s; the timeout outlasts the
# 20 s a sqlite server waits on a lock before it answers 503. Only where the user has not set them.
HTTP_RETRY_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
# A local sqlite store that several processes write (a sweep's trials in parallel): a write that
# finds it locked is tried again after these pauses before tracking turns off.
SQLITE_LOCK_WAITS_S = (1.0, 2.0, 4.0, 8.0)
COMMIT_ENV = "DEEPEMOCLUSTER_GIT_COMMIT"
IMAGE_ENV = "DEEPEMOCLUSTER_IMAGE"
SOURCE_ENV = "DEEPEMOCLUSTER_SOURCE_NAME"  # the driver's script, for runs started on Ray workers


# Opens a new experiment in the MLflow UI's model-training view (the default here was the GenAI view).
EXPERIMENT_KIND_TAG = {"mlflow.experimentKind": "custom_model_development"}
ARTIFACTS_BESIDE_STORE = "mlartifacts"  # a local sqlite store's artifact folder, as `mlflow server`'s
RAY_SESSION_FOLDER = re.compile(r"/session_\d{4}-\d{2}-\d{2}_")  # e.g. /tmp/ray/session_2026-11-29_03-39-22_...


@dataclass(kw_only=True)
class TrackingConfig:
    enabled: bool = True  # false: nothing goes to MLflow
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "deepemocluster"  # the MLflow experiment runs are grouped in
    run_name: str | None = None  # None: the training run's name
    # Where a new experiment keeps its artifacts. None: <store folder>/mlartifacts for a local sqlite
    # store, the server's own artifact root for an http(s) store. (Left to MLflow, an experiment
    # created from a Ray worker took the worker's folder inside Ray's session folder: lost with it.)
    artifact_location: str | None = None
    # The run this one is a child of (a sweep's parent run): the UI nests it there.
    parent_run_id: str | None = None
    # The registered model that training adds its best model to as a new version (None: none).
    registered_model: str | None = "deepemocluster"
    # Also log the network alone (`best_network`, MLflow's pytorch flavour, a torch.export program).
    log_network: bool = True
    # CPU, memory, disk, network (and GPU with pynvml) as `system/...` metrics every interval.
    system_metrics: bool = False
    system_metrics_interval_s: float = 10.0  # seconds between them

    def resolved_uri(self) -> str:
        """The store to use; resolve it on the driver when workers may run in another directory."""
        default = f"sqlite:///{Path.cwd() / 'mlflow.db'}"  # MLflow 3's file store is deprecated
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default

    def resolved_artifact_location(self) -> str | None:
        """The artifact location a new experiment gets (None: the server decides)."""
        if self.artifact_location is not None:
            return self.artifact_location
        uri = self.resolved_uri()
        if uri.startswith("sqlite:///"):
            database = Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
            return (database.parent / ARTIFACTS_BESIDE_STORE).as_uri()
        return None


class RunTracker:
    """One MLflow run, written by world rank 0; a no-op when inactive, disabled, ended or failed."""

    def __init__(self, config: TrackingConfig, active: bool = True) -> None:
        self.config, self.uri = config, config.resolved_uri()
        self._client: MlflowClient | None = None
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._system_metrics = None
        if config.enabled and active:
            if self.uri.startswith(("http://", "https://")):
                for name, value in HTTP_RETRY_ENV.items():
                    os.environ.setdefault(name, value)
            try:
                self._client = MlflowClient(self.uri)
            except Exception as err:  # noqa: BLE001 - e.g. a URI scheme MLflow does not know
                self._fail("connect", err)

    @property
    def enabled(self) -> bool:  # False on ranks != 0, when disabled in the config, ended or failed
        return self._client is not None

    @property
    def run_id(self) -> str | None:  # kept after end(), for the checkpoint
        return self._run_id

    def start(
        self, params: dict[str, object], tags: dict[str, str], run_id: str | None = None,
        key_tag: str | None = None,
    ) -> str | None:
        """Start a run (or re-open `run_id`), log params and tags (MLflow's standard source tags, and
        the image, when in one); the run id, None if disabled. `key_tag`: a tag in `tags` that names
        the training; without a `run_id`, the experiment's latest unfinished run with the same value
        is re-opened rather than a new one started (a worker group restarted before any checkpoint
        kept the run's id)."""
        tags = {**standard_tags(tags.get("git_commit")), **image_tags(), **tags}
        if self.config.parent_run_id:
            tags["mlflow.parentRunId"] = self.config.parent_run_id

        def start(client: MlflowClient) -> str:
            run = self._reopen(client, run_id) if run_id else None
            if run is None and run_id is None and key_tag is not None:
                run = self._reopen_unfinished(client, key_tag, str(tags[key_tag]))
            if run is None:
                run = client.create_run(self._experiment(client), run_name=self.config.run_name)
            self._run_id, self._experiment_id = run.info.run_id, run.info.experiment_id
            values = {key: str(value)[:MAX_PARAM_VAL_LENGTH] for key, value in params.items()}
            changed = sorted(k for k, v in run.data.params.items() if values.get(k, v) != v)
            if changed:  # MLflow params are immutable: keep the first values, say which differ
                logger.warning("Resumed MLflow run %s keeps its old values of %s", self._run_id, changed)
            new = [Param(k, v) for k, v in values.items() if k not in run.data.params]
            client.log_batch(self._run_id, params=new)
            for key, value in tags.items():
                client.set_tag(self._run_id, key, str(value))
            return self._run_id

        run_id = self._call("start the run", start, needs_run=False)
        if run_id and self.config.system_metrics:
            self._start_system_metrics()
        return run_id

    def _start_system_metrics(self) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            self._system_metrics = SystemMetricsMonitor(
                self._run_id, sampling_interval=self.config.system_metrics_interval_s, resume_logging=True,
                tracking_uri=self.uri)
            self._system_metrics.start()
        except Exception as err:  # noqa: BLE001 - no psutil, ...: the run goes on without them
            logger.warning("MLflow system metrics are off for run %s: %s", self._run_id, err)
            self._system_metrics = None

    def _experiment(self, client: MlflowClient) -> str:
        """The id of the configured experiment, created with its artifact location and the
        model-training view when new."""
        experiment = client.get_experiment_by_name(self.config.experiment)
        if experiment is None:
            return client.create_experiment(self.config.experiment, self.config.resolved_artifact_location(),
                                            tags=EXPERIMENT_KIND_TAG)
        if RAY_SESSION_FOLDER.search(experiment.artifact_location or ""):
            logger.warning("MLflow experiment %r keeps its artifacts in %s, inside a Ray session folder that "
                           "Ray deletes: log to a new experiment (tracking.experiment=...) to keep them",
                           self.config.experiment, experiment.artifact_location)
        return experiment.experiment_id

    def _reopen_unfinished(self, client: MlflowClient, key: str, value: str) -> mlflow.entities.Run | None:
        """The experiment's latest run not FINISHED whose tag `key` is `value`, re-opened; else None."""
        quote = '"' if "'" in value else "'"
        found = client.search_runs([self._experiment(client)], f"tags.`{key}` = {quote}{value}{quote} AND "
                                   "attributes.status != 'FINISHED'", order_by=["attributes.start_time DESC"],
                                   max_results=1)
        if not found:
            return None
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0]

    def _reopen(self, client: MlflowClient, run_id: str) -> mlflow.entities.Run | None:
        try:
            run = client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            logger.warning("MLflow run %s is not in %s; starting a new run", run_id, self.uri)
            return None
        client.update_run(run_id, status="RUNNING")
        return run

    def logged_metrics(self) -> dict[str, float]:
        """The run's latest value of each metric logged so far ({} when tracking is off)."""
        return self._call("read the run", lambda client: dict(client.get_run(self._run_id).data.metrics)) or {}

    def log_metrics(self, metrics: dict[str, float | None], step: int) -> None:
        """Log `metrics` at `step`, skipping None and NaN (no metric is better than a NaN one)."""

        def log(client: MlflowClient) -> None:
            now = int(time.time() * 1000)
            values = {k: float(v) for k, v in metrics.items() if v is not None}
            batch = [Metric(k, v, now, step) for k, v in values.items() if not math.isnan(v)]
            client.log_batch(self._run_id, metrics=batch)

        self._call("log metrics", log)

    def log_dataset(self, name: str, digest: str, source: str, context: str = "training") -> None:
        """Record a dataset as an input of the run (the UI's runs table shows it)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type="local" if "://" not in source else
                          source.split("://", 1)[0], source=json.dumps({"uri": source}))
        inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])]
        self._call("log the dataset", lambda c: c.log_inputs(self._run_id, datasets=inputs))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log a text", lambda c: c.log_text(self._run_id, text, artifact_file))

    def log_dict(self, value: dict, artifact_file: str) -> None:
        self._call("log a dict", lambda c: c.log_dict(self._run_id, value, artifact_file))

    def log_figure(self, figure, artifact_file: str) -> None:
        """A matplotlib figure as an image artifact (e.g. "clusters/arousal_epoch_003.png")."""
        self._call("log a figure", lambda c: c.log_figure(self._run_id, figure, artifact_file))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._call(
            "log an artifact", lambda c: c.log_artifact(self._run_id, local_path, artifact_path)
        )

    def log_model(
        self,
        model: torch.nn.Module,
        name: str,
        extra: dict[str, dict] | None = None,
        registered_model_name: str | None = None,
    ) -> str | None:
        """Log `model` (pickled: its class must be importable where it is loaded) with each `extra`
        dict saved in the model as `extra_files/<key>.json`; returns the model URI, None if
        disabled. MLflow's global tracking URI and experiment are left as they were.
        """
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module

        def log(client: MlflowClient) -> str:
            # mlflow.pytorch.log_model is fluent: it reads the global tracking URI and puts the
            # logged model in the active experiment, so point both at this run's, then put back
            # what the process had (later runs and the user's own MLflow calls must not inherit it).
            with mlflow_globals(self.uri):
                mlflow.set_experiment(experiment_id=self._experiment_id)
                return self._log_model(model, name, extra, registered_model_name)

        return self._call("log the model", log)

    def _log_model(self, model, name: str, extra: dict | None, registered_model_name: str | None) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            for key, value in (extra or {}).items():
                (Path(tmp) / f"{key}.json").write_text(json.dumps(value, indent=2))
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                run_id=self._run_id,
                extra_files=[str(f) for f in sorted(Path(tmp).iterdir())] or None,
                registered_model_name=registered_model_name,
                serialization_format="pickle",  # "pt2" needs an input example to trace
                # skips a subprocess that loads the model to infer them (seconds)
                pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
            )
        return info.model_uri

    def fail(self, error: BaseException) -> None:
        """End the run as FAILED, with the error and its causes as its `error` tag."""
        causes = []
        while error is not None and len(causes) < 5:
            causes.append(f"{type(error).__name__}: {error}")
            error = error.__cause__ or error.__context__
        message = "\ncaused by ".join(causes)[:MAX_TAG_VAL_LENGTH]
        self._call("tag the error", lambda c: c.set_tag(self._run_id, "error", message))
        self.end("FAILED")

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with `status` ("FINISHED", "FAILED", "KILLED"); the tracker goes inert."""
        if self._system_metrics is not None:
            self._system_metrics.finish()  # its last samples, before the run closes
            self._system_metrics = None
        self._call("end the run", lambda c: c.set_terminated(self._run_id, status))
        self._client = None

    def _call(
        self, what: str, fn: Callable[[MlflowClient], T], *, needs_run: bool = True
    ) -> T | None:
        if self._client is None or (needs_run and self._run_id is None):
            return None
        for wait in (*SQLITE_LOCK_WAITS_S, None):
            try:
                return fn(self._client)
            except Exception as err:  # noqa: BLE001 - the failure policy: tracking never stops training
                if wait is None or "database is locked" not in str(err):
                    self._fail(what, err)
                    return None
                time.sleep(wait)  # another process (a sweep's parallel trial) writes the same sqlite store
        return None

    def _fail(self, what: str, err: Exception) -> None:
        message = (
            f"MLflow tracking at {self.uri} failed to {what} ({type(err).__name__}: {err}); "
            "tracking is off from now on, training and checkpoints go on."
        )
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        self._client = None


@contextlib.contextmanager
def mlflow_globals(uri: str | None):
    """Point MLflow's process-wide tracking and registry URIs at `uri` for a fluent call (models:/
    URIs resolve through the registry URI), then restore them and the environment variables."""
    if uri is None:
        yield
        return
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")}
    # What was *set* (None = follow the defaults), not what get_*_uri() resolves to now.
    tracking, registry = tracking_state._tracking_uri, registry_state._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(tracking)
        mlflow.set_registry_uri(registry)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def standard_tags(commit: str | None = None) -> dict[str, str]:
    """MLflow's own provenance tags, which a run made through MlflowClient does not get by itself
    (the UI shows user "unknown", source UNKNOWN): user, source script and type, git commit.

    On a Ray worker the process's script is Ray's: the driver's comes from $DEEPEMOCLUSTER_SOURCE_NAME
    when the driver sets it (or passes these tags itself), else the source is "ray-worker"."""
    import getpass
    import sys

    source = os.environ.get(SOURCE_ENV) or (sys.argv[0] if sys.argv and sys.argv[0] else "")
    if "ray/_private/workers" in source or not source:
        source = "ray-worker"
    tags = {"mlflow.source.name": source, "mlflow.source.type": "JOB"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        pass
    commit = commit or git_commit()
    if commit and commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    return tags


def image_tags() -> dict[str, str]:
    """{"image": <the image reference>} inside the project's cluster image, else {}."""
    image = os.environ.get(IMAGE_ENV)
    return {"image": image} if image else {}


def git_commit(path: str = ".") -> str | None:
    """HEAD's hash, with "-dirty" when tracked files changed; outside a git checkout (a cluster's copy
    of the code) $DEEPEMOCLUSTER_GIT_COMMIT, else None."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", path, *args], capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get(COMMIT_ENV) or None
    return commit + ("-dirty" if dirty else "")
