"""The jobs as users run them: `ray job submit` to a real local cluster (`ray start --head` on
127.0.0.1 with its job server), tracking to a real `mlflow server` on 127.0.0.1.

prep and then train are submitted with `--working-dir .` (the repository, as a user submits it);
data, checkpoints and the MLflow store live outside it, as they must on a cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import train_sample_manifest
from mlflow import MlflowClient
from mlflow_server import free_port, mlflow_server

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node on 127.0.0.1, its dashboard (job server) on a free port; stopped with its process group."""
    dashboard, gcs_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # `python` in a job: this venv's, as activated
    env["RAY_AUTH_MODE"] = "token"  # Ray 2.60 local clusters require the token (~/.ray/auth_token); the CLI must send it
    log = tmp_path_factory.mktemp("ray") / "head.log"
    with open(log, "wb") as out:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
             "--num-cpus=2", "--disable-usage-stats"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 180
    # Ready when a trivial job runs: the job server answers before its agent takes submissions.
    probe = [RAY, "job", "submit", "--address", address, "--", "python", "-c", "print('ready')"]
    while subprocess.run(probe, capture_output=True, env=env, timeout=120).returncode:
        if head.poll() is not None or time.monotonic() > deadline:
            os.killpg(head.pid, signal.SIGKILL)
            pytest.fail(f"ray head did not start:\n{log.read_text()[-3000:]}")
        time.sleep(2)
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the node's processes on SIGTERM
    try:
        head.wait(timeout=3)  # it took 34 s to stop itself: its process group is killed below instead
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    # Unlike `ray stop`, a stopped `--block` head leaves itself as the machine's "current cluster":
    # a later bare ray.init() (the jobs' own, run by other tests) would try to join the dead node.
    current = Path("/tmp/ray/ray_current_cluster")
    if current.is_file() and current.read_text().strip().endswith(f":{gcs_port}"):
        current.unlink()


def submit(cluster, *command: str) -> subprocess.CompletedProcess:
    address, env = cluster
    return subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", *command],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_prep_then_train_submitted_to_a_cluster_track_to_an_mlflow_server(cluster, tmp_path):
    manifest = train_sample_manifest(tmp_path)
    prepared = tmp_path / "prepared"

    prep = submit(cluster, "python", "jobs/prep.py", "--config", "configs/prep/ravdess_sample.yaml",
                  f"sources=[{{kind: csv, path: {manifest}}}]", f"output={prepared}", "progress=false")
    assert prep.returncode == 0, prep.stdout[-3000:] + prep.stderr[-3000:]
    assert "succeeded" in prep.stdout and (prepared / "dataset.json").is_file()

    with mlflow_server(tmp_path / "mlflow") as uri:
        train = submit(cluster, "python", "jobs/train.py", "--config", "configs/train/ravdess_sample.yaml",
                       f"data.dataset={prepared}", "data.batch_size=4", "epochs=1",
                       "clustering.num_clusters=4", "scaling.cpus_per_worker=0.5", f"storage_path={tmp_path / 'runs'}",
                       f"tracking.tracking_uri={uri}", "name=submitted")
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        assert "succeeded" in train.stdout and "MLflow run" in train.stdout

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("deepemocluster")
        [run] = client.search_runs([experiment.experiment_id])
        assert run.info.status == "FINISHED" and run.data.params["name"] == "submitted"
        assert {"dev/loss", "train/stage1_loss", "cluster/kmeans_objective", "test/ccc_arousal"} <= set(run.data.metrics)
        assert [m.name for m in client.search_logged_models([experiment.experiment_id])] == ["best_model"]
    assert (tmp_path / "runs" / "submitted" / "best_model" / "model.pt").is_file()
    assert not (REPO / "runs").exists()  # outputs went where the config said, not into the working dir


def test_a_failing_job_gives_its_error_and_status_to_the_submitter(cluster, tmp_path):
    missing = tmp_path / "no-such-dataset"
    failed = submit(cluster, "python", "jobs/train.py", "--config", "configs/train/ravdess_sample.yaml",
                    f"data.dataset={missing}")
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0, output[-3000:]  # the job's failure reaches the submitter's exit status
    assert f"error: {missing}: no dataset.json" in output and "failed" in output, output[-3000:]  # the job's own error line
