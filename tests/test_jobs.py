"""The jobs as users run them: `ray job submit` to a real local cluster (`ray start --head` on
127.0.0.1 with its job server), tracking to a real `mlflow server` on 127.0.0.1, everything kept in
a bucket (moto's S3 server on 127.0.0.1, whose AWS_* variables the head and so every job has, as a
cluster's nodes have their cloud credentials).

prep, predict and the sweep are submitted with `--working-dir .` (the repository, as a user submits
it); training is infra/README.md's command as written there (`--runtime-env infra/runtime_env.yaml`,
`env ...`). Data, checkpoints and the MLflow store live outside the repository, as on a cluster.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import train_sample_manifest
from mlflow import MlflowClient
from mlflow_server import free_port, mlflow_server
from s3_server import bucket_keys, read_parquet, s3_server

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
BUCKET = "deepemo"
pytestmark = pytest.mark.slow  # a cluster of its own (`ray start`) and jobs submitted to it


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """The S3 server and its empty bucket; yields the AWS_* variables that point clients at it."""
    with s3_server(tmp_path_factory.mktemp("s3"), BUCKET) as aws:
        yield aws


@pytest.fixture(scope="module")
def cluster(bucket, tmp_path_factory):
    """A head node on 127.0.0.1 with the bucket's variables, its dashboard (job server) on a free
    port; stopped with its process group."""
    dashboard, gcs_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | bucket
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # `python` in a job: this venv's, as activated
    env["RAY_AUTH_MODE"] = "token"  # Ray 2.60 local clusters require the token (~/.ray/auth_token); the CLI must send it
    log = tmp_path_factory.mktemp("ray") / "head.log"
    with open(log, "wb") as out:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
             "--num-cpus=2", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={free_port()}"],  # not 52365: another Ray here may hold it
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


def _ok(job: subprocess.CompletedProcess) -> bool:
    return job.returncode == 0 and "succeeded" in job.stdout


@pytest.mark.timeout(900)  # prep, two trainings, predictions and a sweep as jobs on a 2-core machine
def test_jobs_submitted_to_a_cluster_keep_everything_in_a_bucket_and_track_to_an_mlflow_server(cluster, bucket, tmp_path):
    """Every job as a user submits it, every output on s3://: prep's dataset, then infra/README.md's
    training command as written (sized for this machine by overrides), its checkpoints and best
    model, the MLflow server's artifacts (`--artifacts-destination s3://...`), the same command run
    again for one more epoch going on from the bucket's checkpoint, batch predictions, and a sweep
    with its table. Only the audio and the sqlite store stay local."""
    address, env = cluster
    manifest = train_sample_manifest(tmp_path)
    prep = submit(cluster, "python", "jobs/prep.py", "--config", "configs/prep/ravdess_sample.yaml",
                  f"sources=[{{kind: csv, path: {manifest}}}]", f"output=s3://{BUCKET}/prepared/ravdess_full",
                  "progress=false")  # where the README's training reads it
    assert _ok(prep), prep.stdout[-3000:] + prep.stderr[-3000:]
    assert {"prepared/ravdess_full/dataset.json", "prepared/ravdess_full/settings.json"} <= set(
        bucket_keys(bucket, BUCKET, "prepared/"))

    commit = "0123456789abcdef0123456789abcdef01234567"
    command = readme_training_submit(BUCKET, commit)
    assert command[:3] == ["ray", "job", "submit"] and "--runtime-env" in command, command
    assert ["env", f"DEEPEMOCLUSTER_GIT_COMMIT={commit}"] == command[command.index("--") + 1:][:2], command
    server_env = {**bucket, "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow"}
    with mlflow_server(tmp_path / "mlflow", env=server_env) as uri:
        small = [f"tracking.tracking_uri={uri}", "name=submitted", "scaling.num_workers=1", "scaling.use_gpu=false",
                 "scaling.cpus_per_worker=0.5", "data.batch_size=4", "clustering.num_clusters=4",
                 "model.channels=[8,16]", "model.strides=[2,2]", "model.feature_dim=16"]  # small: the jobs are tested

        def train(epochs: int) -> subprocess.CompletedProcess:
            return subprocess.run([RAY, *command[1:], *small, f"epochs={epochs}"], cwd=REPO,
                                  env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=600)

        first = train(1)
        assert _ok(first) and "MLflow run" in first.stdout, first.stdout[-3000:] + first.stderr[-3000:]
        resumed = train(2)  # the same name and storage: it goes on from epoch 1's checkpoint
        assert _ok(resumed), resumed.stdout[-3000:] + resumed.stderr[-3000:]

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("deepemocluster")
        [run] = client.search_runs([experiment.experiment_id])  # the resumed training re-opened its run
        assert run.info.status == "FINISHED" and run.data.params["name"] == "submitted"
        assert run.data.tags["git_commit"] == commit
        assert [m.step for m in client.get_metric_history(run.info.run_id, "dev/loss")] == [0, 1]
        assert {"train/stage1_loss", "cluster/kmeans_objective", "test/ccc_arousal"} <= set(run.data.metrics)
        logged = sorted(m.name for m in client.search_logged_models([experiment.experiment_id]))
        assert logged == ["best_model", "best_model", "best_network", "best_network"]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the server, kept in the bucket
        artifacts = bucket_keys(bucket, BUCKET, "mlflow/")
        assert any(key.endswith("/config.yaml") for key in artifacts), artifacts[:20]
        assert any(key.endswith("/model.pt") for key in artifacts), artifacts[:20]

        runs = bucket_keys(bucket, BUCKET, "runs/submitted/")
        assert "runs/submitted/best_model/model.pt" in runs
        checkpoints = {key.split("/")[2] for key in runs if re.match(r"checkpoint_\d{4}-", key.split("/")[2])}
        assert len(checkpoints) == 2, runs  # one an epoch, the first written by the first job

        predict = submit(cluster, "python", "jobs/predict.py", "--model", f"s3://{BUCKET}/runs/submitted/best_model",
                         "--input", str(manifest), "--output", f"s3://{BUCKET}/predictions/sample.parquet")
        assert _ok(predict), predict.stdout[-3000:] + predict.stderr[-3000:]
        table = read_parquet(bucket, f"{BUCKET}/predictions/sample.parquet")
        assert table.num_rows == 24 and {"arousal", "dominance", "valence"} <= set(table.column_names)

        sweep_file = tmp_path / "sweep.yaml"
        sweep_file.write_text(f"""
name: bucket
train_config: configs/train/ravdess_sample.yaml
overrides: [data.dataset=s3://{BUCKET}/prepared/ravdess_full, data.batch_size=4, epochs=1, clustering.num_clusters=4,
            "model.channels=[8,16]", "model.strides=[2,2]", model.feature_dim=16, precise_bn.utterances=8,
            scaling.num_workers=0, storage_path=s3://{BUCKET}/sweep-runs, tracking.tracking_uri={uri}]
grid:
  model_kind: [cnn_regressor]
seeds: [0]
subsets: 2
output: s3://{BUCKET}/sweeps
""")
        sweep = submit(cluster, "python", "jobs/sweep.py", "--config", str(sweep_file))
        assert _ok(sweep), sweep.stdout[-3000:] + sweep.stderr[-3000:]
        assert "model_kind=cnn_regressor" in sweep.stdout and "trial 1 of 1 done" in sweep.stdout
        assert {"sweeps/bucket/table.json", "sweeps/bucket/parent_run.json",  # and the trial's record
                "sweeps/bucket/trials/bucket-model_kind_cnn_regressor-seed0.json"} <= set(bucket_keys(bucket, BUCKET, "sweeps/"))
        trials = {key.split("/")[1] for key in bucket_keys(bucket, BUCKET, "sweep-runs/") if key.endswith("run.json")}
        assert trials == {"bucket-model_kind_cnn_regressor-seed0"}
    assert not (REPO / "runs").exists() and not (REPO / "outputs" / "sweeps" / "bucket").exists()


def test_a_failing_job_gives_its_error_and_status_to_the_submitter(cluster, tmp_path):
    missing = tmp_path / "no-such-dataset"
    failed = submit(cluster, "python", "jobs/train.py", "--config", "configs/train/ravdess_sample.yaml",
                    f"data.dataset={missing}", f"storage_path={tmp_path / 'runs'}", "tracking.enabled=false")
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0, output[-3000:]  # the job's failure reaches the submitter's exit status
    assert f"error: {missing}: no dataset.json" in output and "failed" in output, output[-3000:]  # the job's own error line


def readme_training_submit(bucket: str, commit: str) -> list[str]:
    """infra/README.md's `ray job submit ... python jobs/train.py ...` command, $BUCKET and $GIT_COMMIT
    filled in, as the shell splits it: this test follows the README as it is written."""
    from test_infra import README, code_blocks, shell_lines

    env = {"BUCKET": bucket, "GIT_COMMIT": commit}
    line = next(line for block in code_blocks(README.read_text()) for line in shell_lines(block)
                if line.lstrip().startswith("ray job submit") and "jobs/train.py" in line)  # the first: AWS's
    return shlex.split(re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], line), comments=True)


def test_a_job_with_a_relative_output_path_is_refused_before_it_starts(cluster, tmp_path):
    """A relative storage_path would be written into the job's temporary copy of the code, deleted after it."""
    failed = submit(cluster, "python", "jobs/train.py", "--config", "configs/train/ravdess_sample.yaml",
                    f"data.dataset={tmp_path}", "storage_path=outputs/runs", "tracking.enabled=false")
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0, output[-3000:]
    assert "config key 'storage_path': outputs/runs is relative" in output, output[-3000:]
    assert "absolute path or a bucket URI" in output, output[-3000:]
    assert "no dataset.json" not in output  # refused before the dataset is even opened
