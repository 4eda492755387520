"""The K-means actor killed in the middle of a real training run: it comes back, the epoch's
clustering is redone, training finishes; the per-epoch cluster diagnostics reach MLflow.

Real prepared audio (24 sample utterances, with their emotion category), real Ray Train, real faiss,
a real MLflow store; mode "sample" (the actor fits centroids on samples, the worker assigns).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from cluster_train.config import load_train_config
from cluster_train.launch import run_training
from conftest import prepare_train_sample

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("recovery")
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")  # Ray starts slowly on a busy machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    prepare_train_sample(folder)
    yield folder
    ray.shutdown()


def _kill_actor_in_epoch(name: str, epoch: int, seen: dict) -> None:
    """Once the actor holds a round for `epoch` (a sample arrived: the worker waits on it), kill it;
    Ray restarts it and the worker clusters that epoch again."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            actor = ray.get_actor(name)
            seen.setdefault("incarnation", ray.get(actor.incarnation.remote()))
            progress = ray.get(actor.progress.remote())
        except (ValueError, ray.exceptions.RayActorError):
            time.sleep(0.1)
            continue
        if progress["epoch"] is not None and progress["epoch"] >= epoch:
            seen["progress"] = progress
            ray.kill(actor, no_restart=False)
            break
        time.sleep(0.02)
    while time.monotonic() < deadline and "progress" in seen:  # calls fail while Ray restarts it
        try:
            seen["new_incarnation"] = ray.get(actor.incarnation.remote(), timeout=60)
            return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.2)


def test_killed_kmeans_actor_comes_back_and_training_finishes(prepared, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_train_config(REPO / "configs/train/ravdess_sample.yaml", [
        f"data.dataset={prepared / 'prepared'}", "data.batch_size=4", "epochs=2", "patience=2",
        f"storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri={store}", "name=actor-killed",
        "model.num_clusters=4", "clustering.num_clusters=4", "clustering.mode=sample",
        "clustering.sample_size=64"])
    seen: dict = {}
    watcher = threading.Thread(target=_kill_actor_in_epoch, args=("kmeans-actor-killed", 0, seen))
    watcher.start()
    result = run_training(config)
    watcher.join()

    assert "progress" in seen, "the actor was never killed"
    assert seen["new_incarnation"] != seen["incarnation"]  # it died and came back empty
    assert result.epochs_run == 2

    client = MlflowClient(store)
    run_id = result.mlflow_run_id

    def steps(metric: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, metric))

    for metric in ("kmeans_objective", "stage1_loss", "cluster_nmi_category", "cluster_purity_category",
                   "cluster_arousal_mean_high", "kmeans_actor_attempts"):
        assert steps(metric) == [0, 1], metric
    assert steps("cluster_nmi_previous") == [1]  # the change of labels since the epoch before
    metrics = client.get_run(run_id).data.metrics
    assert sum(metrics[f"cluster_size_{k}"] for k in range(4)) == 8 * 11  # every train chunk labelled
    assert 0 <= metrics["cluster_nmi_category"] <= 1 and 0 < metrics["cluster_purity_category"] <= 1
    assert metrics["cluster_arousal_mean_high"] >= metrics["cluster_arousal_mean_low"]
    figures = [f.path for f in client.list_artifacts(run_id, "clusters")]
    assert figures == [f"clusters/arousal_epoch_{e:03d}.png" for e in range(2)]
