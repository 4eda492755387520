"""Storage checks before a job takes any resource (data_prep/guards.py): relative outputs under
`ray job submit`, local paths on a Ray cluster of several nodes (Ray's own `cluster_utils.Cluster`:
a head and a worker node, real raylets on 127.0.0.1)."""

from __future__ import annotations

import json

import pytest
import ray
import yaml
from conftest import REPO_ROOT, prepare_train_sample, train_sample_manifest

from cluster_train.console import RAY_DATA_QUIET, ray_env
from cluster_train.train.config import load_train_config
from cluster_train.train.launch import run_training
from data_prep.config import ConfigError, PrepConfig, load_config
from data_prep.guards import JOB_CONFIG_ENV
from data_prep.pipeline import run_prep

SAMPLE_CONFIG = REPO_ROOT / "configs" / "train" / "ravdess_sample.yaml"
TINY = ["epochs=1", "data.batch_size=4", "clustering.num_clusters=4", "model.channels=[8,16]", "model.strides=[2,2]",
        "model.feature_dim=16", "scaling.cpus_per_worker=0.5"]


def as_submitted_job(monkeypatch, env_vars: dict[str, str]) -> None:
    """This process as the driver of a `ray job submit` whose runtime env sets `env_vars`: Ray 2.60's
    job supervisor passes the job's runtime env in this variable (job_supervisor.py)."""
    runtime_env = {"working_dir": "gcs://_ray_pkg_0.zip", "env_vars": env_vars}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": runtime_env, "metadata": {}}))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def in_a_submitted_job(monkeypatch):
    """The driver of `ray job submit --runtime-env infra/runtime_env.yaml`, with that file's env_vars."""
    as_submitted_job(monkeypatch, yaml.safe_load((REPO_ROOT / "infra" / "runtime_env.yaml").read_text())["env_vars"])


def test_ray_env_under_the_shipped_runtime_env_sets_both_with_an_absolute_path(in_a_submitted_job):
    assert ray_env(verbose=False) == {"RAY_DATA_LOGGING_CONFIG": str(RAY_DATA_QUIET),
                                      "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    assert RAY_DATA_QUIET.is_absolute() and RAY_DATA_QUIET.is_file()


def test_ray_env_leaves_the_keys_a_submitted_job_sets_to_the_job(monkeypatch):
    as_submitted_job(monkeypatch, {"RAY_DATA_LOGGING_CONFIG": "/etc/my_ray_data_logging.yaml"})
    assert ray_env(verbose=False) == {"PYTHONWARNINGS": "ignore::DeprecationWarning"}


def test_ray_env_outside_a_job_sets_both(monkeypatch):
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    assert ray_env(verbose=False) == {"RAY_DATA_LOGGING_CONFIG": str(RAY_DATA_QUIET),
                                      "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def test_a_submitted_training_with_a_relative_storage_path_is_refused(in_a_submitted_job, tmp_path):
    config = load_train_config(SAMPLE_CONFIG, [f"data.dataset={tmp_path}", "storage_path=runs"])
    with pytest.raises(ConfigError, match=r"'storage_path': runs is relative.*absolute path or a bucket URI"):
        run_training(config)


def test_a_submitted_training_with_the_default_mlflow_store_is_refused(in_a_submitted_job, tmp_path):
    """The default store, mlflow.db in the current folder, would be the job's temporary folder."""
    config = load_train_config(SAMPLE_CONFIG,
                               [f"data.dataset={tmp_path}", f"storage_path={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match=r"'tracking.tracking_uri': sqlite:///mlflow.db is relative"):
        run_training(config)


def test_a_submitted_prep_with_a_relative_output_is_refused(in_a_submitted_job, tmp_path):
    config = load_config(PrepConfig, None, [f"sources=[{{kind: csv, path: {tmp_path / 'manifest.csv'}}}]",
                                            "output=outputs/prepared"])
    with pytest.raises(ConfigError, match=r"'output': outputs/prepared is relative"):
        run_prep(config)


@pytest.mark.slow
def test_a_head_without_task_cpus_counts_as_several_machines(tmp_path):
    """An autoscaling cluster at 0 workers has one node, its head, with no CPUs for tasks: the job's
    tasks run on nodes it launches later, each with its own disk (seen: prep accepted local sources
    there, tests/test_autoscaling.py). A one-node Ray with CPUs is one machine. (Before the
    two-node fixture below: a module fixture holds its cluster until the module ends.)"""
    from ray.cluster_utils import Cluster

    from data_prep.guards import refuse_node_local_paths

    cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 0})
    try:
        with pytest.raises(ConfigError, match=r"'output': .* is a local path, and this Ray cluster's head runs no tasks"):
            refuse_node_local_paths({"output": str(tmp_path / "prepared"), "sources[0].path": "s3://b/m.csv"})
        refuse_node_local_paths({"output": "s3://b/prepared"})  # a bucket is fine
    finally:
        ray.shutdown()
        cluster.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        refuse_node_local_paths({"output": str(tmp_path / "prepared")})  # one machine: nothing refused
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """The prepared sample (prepared on a one-node Ray first: prep refuses local paths on two nodes),
    then a head and a worker node, this process connected to them."""
    from ray.cluster_utils import Cluster

    folder = tmp_path_factory.mktemp("sample")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        prepared = prepare_train_sample(folder)
    finally:
        ray.shutdown()
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield folder, prepared
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_training_on_two_nodes_refuses_local_storage_and_a_local_mlflow_store(two_nodes):
    folder, prepared = two_nodes
    assert sum(node["Alive"] for node in ray.nodes()) == 2
    local = load_train_config(SAMPLE_CONFIG,
                              [f"data.dataset={prepared}", f"storage_path={folder / 'runs'}", *TINY])
    two_disks = r"'storage_path': .* is a local path, and this Ray cluster has 2 nodes.*bucket URI"
    with pytest.raises(ConfigError, match=two_disks):
        run_training(local)
    sqlite = load_train_config(SAMPLE_CONFIG,
                               [f"data.dataset={prepared}", "storage_path=s3://deepemo/runs",
                                f"tracking.tracking_uri=sqlite:///{folder / 'mlflow.db'}", *TINY])
    with pytest.raises(ConfigError, match=r"'tracking.tracking_uri': .* is a local MLflow store.*MLflow server"):
        run_training(sqlite)
    dataset = load_train_config(SAMPLE_CONFIG,
                                [f"data.dataset={prepared}", "storage_path=s3://deepemo/runs",
                                 "tracking.enabled=false", *TINY])
    with pytest.raises(ConfigError, match=r"'data.dataset': .* is a local path"):
        run_training(dataset)
    assert not (folder / "runs").exists() and not (folder / "mlflow.db").exists()


@pytest.mark.slow
def test_prep_on_two_nodes_refuses_a_local_output_and_local_sources(two_nodes):
    folder, _ = two_nodes
    manifest = train_sample_manifest(folder)
    output = load_config(PrepConfig, None, [f"sources=[{{kind: csv, path: {manifest}}}]", f"output={folder / 'again'}"])
    with pytest.raises(ConfigError, match=r"'output': .* is a local path, and this Ray cluster has 2 nodes"):
        run_prep(output)
    sources = load_config(PrepConfig, None,
                          [f"sources=[{{kind: csv, path: {manifest}}}]", "output=s3://deepemo/prepared"])
    with pytest.raises(ConfigError, match=r"'sources\[0\].path': .* is a local path"):
        run_prep(sources)
    assert not (folder / "again").exists()

