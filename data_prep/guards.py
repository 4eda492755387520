"""Checks on a job's storage before it takes any resource: outputs that `ray job submit` or a
cluster of several nodes would lose or scatter.

Under `ray job submit` the driver runs in Ray's temporary copy of the working directory, deleted
after the job: a relative output path would be written there. On several nodes a local path is a
different folder on each node.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from data_prep.config import ConfigError

# Ray 2.60's job supervisor gives the job's driver its runtime env and metadata in this variable
# (ray/dashboard/modules/job/job_supervisor.py); ray.init merges the runtime env from it.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def submitted_job_runtime_env() -> dict | None:
    """The runtime env of the `ray job submit` this process is the driver of; None outside a job."""
    if JOB_CONFIG_ENV not in os.environ:
        return None
    return json.loads(os.environ[JOB_CONFIG_ENV]).get("runtime_env") or {}


def is_local(location: str) -> bool:
    """A path on this node's disk: no URI scheme, or a `file:` URI."""
    return "://" not in location or location.startswith("file://")


def local_mlflow_store(uri: str) -> str | None:
    """The file path of a local MLflow store (`sqlite:///...`, `file:...`, a plain path); None for a server."""
    if uri.startswith("sqlite:///"):
        return uri.removeprefix("sqlite:///")
    if uri.startswith("file:"):
        return uri.removeprefix("file://").removeprefix("file:")
    if "://" in uri or uri.startswith("databricks"):  # `databricks` alone names a remote workspace
        return None
    return uri


def refuse_outputs_lost_after_job(outputs: Mapping[str, str | None]) -> None:
    """Under `ray job submit`, a relative local output path (`outputs`: config key -> location; None
    skipped) is a ConfigError naming the key: it would be written into the job's temporary folder."""
    if submitted_job_runtime_env() is None:
        return
    for key, location in outputs.items():
        if location is None:
            continue
        path = local_mlflow_store(location) if key.startswith("tracking.") else location
        if path is not None and is_local(path) and not Path(path.removeprefix("file://")).is_absolute():
            raise ConfigError(
                f"config key '{key}': {location} is relative, and a job submitted with `ray job submit` "
                f"runs in a temporary folder deleted after the job; use an absolute path or a bucket URI (s3://...)")


def refuse_node_local_paths(paths: Mapping[str, str | None], mlflow_key: str | None = None) -> None:
    """On a connected Ray cluster of more than one machine, a local path in `paths` (config key ->
    location; None skipped) is a ConfigError naming the key. `mlflow_key`: the key among them that
    is an MLflow tracking URI, refused when it is a local store rather than a server.

    More than one machine: more than one alive node, or a single node without CPUs for tasks (the
    head of an autoscaling cluster at 0 workers: the job's tasks run on nodes not launched yet)."""
    import ray

    alive = [node for node in ray.nodes() if node["Alive"]]
    if len(alive) < 2 and any(node["Resources"].get("CPU", 0) > 0 for node in alive):
        return
    cluster = (f"this Ray cluster has {len(alive)} nodes" if len(alive) > 1 else
               "this Ray cluster's head runs no tasks (no CPUs): they run on worker nodes it launches")
    for key, location in paths.items():
        if location is None:
            continue
        if key == mlflow_key:
            if local_mlflow_store(location) is not None:
                raise ConfigError(
                    f"config key '{key}': {location} is a local MLflow store, and {cluster}: the training "
                    f"worker may run on another node; use an MLflow server (http://...)")
        elif is_local(location):
            raise ConfigError(
                f"config key '{key}': {location} is a local path, and {cluster}, each with its own disk; "
                f"use a bucket URI (s3://..., gs://...)")
