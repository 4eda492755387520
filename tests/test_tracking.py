"""RunTracker against a real local MLflow store (sqlite in tmp_path) and a closed port."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import subprocess
import warnings
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from cluster_train.tracking import (
    HTTP_RETRY_ENV,
    RunTracker,
    TrackingConfig,
    git_commit,
    mlflow_globals,
)


@pytest.fixture(autouse=True)
def isolated_mlflow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Run in tmp_path (a sqlite store's artifacts go to ./mlruns) and undo MLflow's globals."""
    monkeypatch.chdir(tmp_path)
    saved = dict(os.environ)
    yield
    mlflow.set_tracking_uri(None)  # log_model points the global URI (and its env var) at the store
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated sqlite store: creating one takes seconds, copying it does not."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def uri(tmp_path: Path, empty_store: Path) -> str:
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def tracker(uri: str, **config: object) -> RunTracker:
    return RunTracker(TrackingConfig(tracking_uri=uri, experiment="test", **config))


def test_resolved_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert TrackingConfig().resolved_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert TrackingConfig().resolved_uri() == "http://mlflow:5000"
    assert TrackingConfig(tracking_uri="sqlite:////x.db").resolved_uri() == "sqlite:////x.db"


def test_artifacts_go_beside_a_local_store_whatever_the_working_folder(
    uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ray worker runs in a folder inside Ray's session folder; the experiment it creates keeps
    its artifacts beside the store, and opens in the UI's model-training view."""
    worker_folder = tmp_path / "session_2026-11-29_03-39-22_167798_3055" / "worker"
    worker_folder.mkdir(parents=True)
    monkeypatch.chdir(worker_folder)
    run = tracker(uri)
    run_id = run.start({}, {})
    run.log_text("x", "note.txt")
    run.end()
    client = MlflowClient(uri)
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert (tmp_path / "mlartifacts" / run_id / "artifacts" / "note.txt").read_text() == "x"
    assert not list(worker_folder.iterdir())
    assert TrackingConfig(tracking_uri="http://127.0.0.1:5000").resolved_artifact_location() is None  # the server's
    assert TrackingConfig(artifact_location="s3://b/a").resolved_artifact_location() == "s3://b/a"


def test_a_failed_run_ends_failed_with_its_error(uri: str) -> None:
    run = tracker(uri)
    run_id = run.start({}, {})
    run.fail(RuntimeError("epoch 3: the K-means actor failed 4 times"))
    info = MlflowClient(uri).get_run(run_id)
    assert info.info.status == "FAILED"
    assert info.data.tags["error"] == "RuntimeError: epoch 3: the K-means actor failed 4 times"
    assert not run.enabled


def test_more_metrics_than_one_mlflow_batch_holds(uri: str) -> None:
    """An epoch of K >= ~1,000 clusters logs one `cluster_size/<k>` each: more than MLflow's
    MAX_METRICS_PER_BATCH (1,000) in one call must all arrive, and tracking must stay on."""
    run = tracker(uri)
    run_id = run.start({}, {})
    metrics = {f"cluster_size/{k}": float(k) for k in range(2_500)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed batch warns and turns tracking off
        run.log_metrics(metrics, step=3)
    assert run.enabled
    run.end()
    logged = MlflowClient(uri).get_run(run_id).data.metrics
    assert logged == metrics


def test_params_tags_metrics_and_artifacts_read_back(uri: str, tmp_path: Path) -> None:
    run = tracker(uri, run_name="smoke")
    params = {"lr": 1e-3, "channels": [32, 64], "note": None, "long": "x" * 10_000}
    run_id = run.start(params, tags={"git_commit": "abc123"})
    assert run_id is not None and run.run_id == run_id and run.enabled
    for step in range(3):
        run.log_metrics({"loss": 1.0 / (step + 1), "ccc": math.nan, "skipped": None}, step=step)
    run.log_text("hello", "notes/hello.txt")
    run.log_dict({"a": 1}, "config.json")
    (tmp_path / "file.txt").write_text("data")
    run.log_artifact(str(tmp_path / "file.txt"), "extra")
    run.end()
    assert not run.enabled and run.run_id == run_id

    client = MlflowClient(uri)
    data = client.get_run(run_id).data
    assert data.params["lr"] == "0.001" and data.params["channels"] == "[32, 64]"
    assert data.params["note"] == "None"
    assert data.params["long"] == "x" * MAX_PARAM_VAL_LENGTH
    assert data.tags["git_commit"] == "abc123" and data.tags["mlflow.runName"] == "smoke"
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
    assert set(data.metrics) == {"loss"}  # NaN and None were skipped
    info = client.get_run(run_id).info
    assert info.status == "FINISHED" and info.run_name == "smoke"
    assert client.get_experiment(info.experiment_id).name == "test"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert artifacts == {"notes", "config.json", "extra"}
    config_file = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/config.json", tracking_uri=uri)
    assert json.loads(Path(config_file).read_text()) == {"a": 1}


def test_log_model_loads_back_with_its_extra_files(uri: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    extra = {"norm_stats": {"mean": [0.5, 1.5], "std": [2.0, 3.0]}, "label_scaling": {"lo": 1}}
    run = tracker(uri)
    run_id = run.start({}, tags={})
    model_uri = run.log_model(model, "model", extra=extra, registered_model_name="dec")
    run.end()
    assert model_uri is not None

    x = torch.randn(5, 4)
    with mlflow_globals(uri):
        local = Path(mlflow.artifacts.download_artifacts(model_uri))
    loaded = mlflow.pytorch.load_model(str(local))
    loaded_extra = {p.stem: json.loads(p.read_text()) for p in (local / "extra_files").glob("*.json")}
    torch.testing.assert_close(loaded(x), model(x))
    assert loaded_extra == extra
    mlflow.set_tracking_uri(uri)
    registered = mlflow.pytorch.load_model("models:/dec/1")
    torch.testing.assert_close(registered(x), model(x))
    logged = MlflowClient(uri).get_logged_model(model_uri.removeprefix("models:/"))
    assert logged.source_run_id == run_id and logged.name == "model"
    assert logged.experiment_id == MlflowClient(uri).get_run(run_id).info.experiment_id


def test_start_with_run_id_reopens_the_run(uri: str, caplog: pytest.LogCaptureFixture) -> None:
    first = tracker(uri)
    run_id = first.start({"epochs": 10, "lr": 0.1}, tags={"attempt": "1"})
    first.log_metrics({"loss": 2.0}, step=0)
    first.end("KILLED")  # the worker group died

    resumed = tracker(uri)
    with caplog.at_level(logging.WARNING, logger="cluster_train.tracking"):
        reopened = resumed.start({"epochs": 20, "lr": 0.1, "new": 1}, {"attempt": "2"}, run_id)
    assert reopened == run_id
    assert "['epochs']" in caplog.text  # MLflow params are immutable: the old value stays
    resumed.log_metrics({"loss": 1.0}, step=1)
    resumed.end()

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"epochs": "10", "lr": "0.1", "new": "1"}
    assert run.data.tags["attempt"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1]
    assert len(client.search_runs([run.info.experiment_id])) == 1

    unknown = tracker(uri)  # an id from another store: a fresh run, not a dead tracker
    new_id = unknown.start({}, {}, run_id="0" * 32)
    assert new_id not in (None, run_id) and unknown.enabled


@pytest.mark.parametrize(("enabled", "active"), [(True, False), (False, True)])
def test_inactive_or_disabled_tracker_logs_nothing(
    enabled: bool, active: bool, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = RunTracker(TrackingConfig(tracking_uri=uri, enabled=enabled), active=active)
    assert not run.enabled
    assert run.start({"a": 1}, {"b": "c"}) is None
    run.log_metrics({"loss": 1.0}, step=0)
    run.log_dict({"a": 1}, "a.json")
    assert run.log_model(torch.nn.Linear(1, 1), "model") is None
    run.end()
    assert run.run_id is None
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with socket.socket() as sock:  # nothing listens there now
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    return port


@pytest.mark.slow
def test_unreachable_server_warns_once_and_goes_quiet(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in HTTP_RETRY_ENV:
        monkeypatch.delenv(name, raising=False)
    uri = f"http://127.0.0.1:{closed_port()}"
    with caplog.at_level(logging.WARNING, logger="cluster_train.tracking"):
        with pytest.warns(RuntimeWarning, match="training and checkpoints go on") as warned:
            run = tracker(uri)
            assert run.start({"a": 1}, {}) is None
            run.log_metrics({"loss": 1.0}, step=0)
            run.log_text("x", "x.txt")
            assert run.log_model(torch.nn.Linear(1, 1), "model") is None
            run.end()
    assert len(warned) == 1 and uri in str(warned[0].message)
    assert len([r for r in caplog.records if r.name == "cluster_train.tracking"]) == 1
    assert not run.enabled and run.run_id is None
    # what keeps a dead server from stalling training for minutes: few retries, a bounded timeout
    assert int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 3
    assert int(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 30


def test_a_failing_call_mid_run_disables_the_tracker(uri: str, tmp_path: Path) -> None:
    run = tracker(uri)
    run_id = run.start({}, {})
    with pytest.warns(RuntimeWarning, match="failed to log an artifact") as warned:
        run.log_artifact(str(tmp_path / "missing.txt"))
        run.log_metrics({"loss": 1.0}, step=0)
        run.end()
    assert len(warned) == 1 and not run.enabled
    run_info = MlflowClient(uri).get_run(run_id)
    assert run_info.data.metrics == {} and run_info.info.status == "RUNNING"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    git("init", "-q")
    (repo / "a.txt").write_text("1")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    head = git("rev-parse", "HEAD")
    assert git_commit(str(repo)) == head
    (repo / "untracked.txt").write_text("new")
    assert git_commit(str(repo)) == head  # like `git describe --dirty`: untracked files don't count
    (repo / "a.txt").write_text("2")
    assert git_commit(str(repo)) == f"{head}-dirty"
    outside = tmp_path / "plain"
    outside.mkdir()
    assert git_commit(str(outside)) is None
    assert git_commit(str(tmp_path / "missing")) is None


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_falls_back_to_the_environment_outside_a_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cluster runs a copy of the code without .git: the commit comes from the image or the job."""
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.setenv("DEEPEMOCLUSTER_GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    assert git_commit(str(plain)) == "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("DEEPEMOCLUSTER_GIT_COMMIT", "")  # infra/runtime_env.yaml: not the image's commit
    assert git_commit(str(plain)) is None
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "-C", str(repo), "init", "-q"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "init"], check=True)
    monkeypatch.setenv("DEEPEMOCLUSTER_GIT_COMMIT", "0" * 40)
    assert git_commit(str(repo)) not in (None, "0" * 40)  # a checkout's own commit wins


def test_a_run_records_the_image_it_ran_in(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    image = "123456789012.dkr.ecr.us-west-2.amazonaws.com/deepemocluster:" + "a" * 40
    monkeypatch.setenv("DEEPEMOCLUSTER_IMAGE", image)
    run = tracker(uri)
    run_id = run.start({}, tags={"git_commit": "abc"})
    run.end()
    assert MlflowClient(uri).get_run(run_id).data.tags["image"] == image
    monkeypatch.delenv("DEEPEMOCLUSTER_IMAGE")
    run = tracker(uri)
    run_id = run.start({}, tags={})
    run.end()
    assert "image" not in MlflowClient(uri).get_run(run_id).data.tags  # a laptop run names no image


def test_runs_carry_mlflows_standard_tags(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import getpass

    monkeypatch.setenv("DEEPEMOCLUSTER_SOURCE_NAME", "jobs/train.py")
    run = tracker(uri)
    run_id = run.start({}, tags={"git_commit": "f" * 40 + "-dirty"})
    run.end()
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert tags["mlflow.source.git.commit"] == "f" * 40 and tags["git_commit"] == "f" * 40 + "-dirty"
    assert tags["mlflow.user"] == getpass.getuser() and tags["mlflow.source.name"] == "jobs/train.py"
    assert tags["mlflow.source.type"] == "JOB"
    run = tracker(uri)
    mine = run.start({}, tags={"mlflow.user": "ci-bot"})  # the caller's own values win
    run.end()
    assert MlflowClient(uri).get_run(mine).data.tags["mlflow.user"] == "ci-bot"


def test_system_metrics_when_enabled(uri: str) -> None:
    run = tracker(uri, system_metrics=True, system_metrics_interval_s=0.2)
    run_id = run.start({}, tags={})
    import time

    time.sleep(1.5)
    run.end()
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    quiet = tracker(uri)
    quiet_id = quiet.start({}, tags={})
    quiet.end()
    assert not any(k.startswith("system/") for k in MlflowClient(uri).get_run(quiet_id).data.metrics)
