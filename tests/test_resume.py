"""Runs started again: after an early stop, after they finished, after a kill between their last
checkpoint and their sweep record, with a checkpoint cut mid-write, before their first checkpoint.
Each must go on (or hand back) what an uninterrupted run gives. Real prepared audio, real MLflow
sqlite stores, Ray Train where the test is about it (the `prepared` fixture starts a local Ray:
run this file under the Ray tests' lock)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from mlflow import MlflowClient
from test_train import REPO, TINY_MODEL, _small_run, prepared  # noqa: F401 - `prepared` is a fixture

from cluster_train.tracking import git_commit
from cluster_train.train.config import TrainConfig, load_train_config
from cluster_train.train.launch import TrainResult, run_training
from cluster_train.train.loop import Trainer
from data_prep.dataset import PreparedDataset

# The CNN-regressor with learning rates too small to move a float32 weight: every epoch validates the
# same weights, so the second epoch is no better than the first and patience=1 stops the run after it.
FROZEN = ("model_kind=cnn_regressor", "optim.encoder.lr=1e-30", "optim.regressor.lr=1e-30")
QUICK = ("scaling.num_workers=0", *TINY_MODEL, "precise_bn.utterances=8")


def _frozen_run(prepared: Path, runs: Path, name: str, *overrides: str) -> TrainConfig:
    """The `FROZEN` regressor on the sample, in this process (`_small_run` is DeepEmoCluster's)."""
    return load_train_config(REPO / "configs/train/ravdess_sample.yaml", [
        f"data.dataset={prepared / 'prepared'}", "data.batch_size=4", f"storage_path={runs}", f"name={name}",
        *QUICK, *FROZEN, *overrides])


def _store(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def _trainer(config: TrainConfig) -> Trainer:
    """The trainer `run_training` builds in this process for `config` (`scaling.num_workers=0`): for a
    run stopped where a test chooses (a worker group that dies, a process killed before it scores)."""
    from cluster_train.data.batches import build_tables
    from cluster_train.train.launch import fit_label_scaler, pin_local_paths, with_dataset_shape
    from cluster_train.train.runtime import LocalRuntime
    from data_prep.config import to_flat_dict

    config = pin_local_paths(dataclasses.replace(
        config, tracking=dataclasses.replace(config.tracking, run_name=config.tracking.run_name or config.name)))
    dataset = PreparedDataset(config.data.dataset)
    config = with_dataset_shape(config, dataset)
    scaler = fit_label_scaler(dataset, config)
    tables = build_tables(dataset, config.data, config.seed, config.precise_bn.utterances)
    return Trainer(config, LocalRuntime(tables, config.run_dir), scaler.to_dict(), params=to_flat_dict(config),
                   tags={"model_kind": config.model_kind})


def _same_result(again: TrainResult, first: TrainResult) -> None:
    assert (again.name, again.best_bundle, again.mlflow_run_id) == (first.name, first.best_bundle, first.mlflow_run_id)
    assert (again.epochs_run, again.metrics, again.scores) == (first.epochs_run, first.metrics, first.scores)


def _steps(store: str, run_id: str, metric: str) -> list[int]:
    return [m.step for m in MlflowClient(store).get_metric_history(run_id, metric)]


def _sweep(prepared: Path, folder: Path):
    """A one-trial sweep of the `FROZEN` regressor with everything of its own under `folder`."""
    from cluster_train.experiments.sweep import load_sweep_config

    tiny = ", ".join(f"'{setting}'" for setting in (*QUICK, *FROZEN))
    file = folder / "sweep.yaml"
    folder.mkdir()
    file.write_text(f"""
name: resumed
train_config: {REPO / 'configs/train/ravdess_sample.yaml'}
overrides: [data.dataset={prepared / 'prepared'}, data.batch_size=4, epochs=3, patience=1, {tiny},
            storage_path={folder / 'runs'}, tracking.tracking_uri={_store(folder)}]
points:
  - {{name: regressor, model_kind: cnn_regressor}}
subsets: 2
output: {folder / 'sweeps'}
records: {folder / 'records'}
""")
    return load_sweep_config(file)


def test_an_early_stopped_run_started_again_trains_no_more_epochs(prepared, tmp_path):
    """Stopped early after epoch 1 of 3 (patience 1), then run again under its name: it trains
    nothing more, writes no checkpoint, logs no epoch, and hands back the first result."""
    store = _store(tmp_path)
    config = _frozen_run(prepared, tmp_path / "runs", "stopped", "epochs=3", "patience=1",
                         f"tracking.tracking_uri={store}")
    first = run_training(config)
    assert first.epochs_run == 2 and first.metrics["dev/best_epoch"] == 0  # stopped early: epoch 1 was no better
    from cluster_train.experiments.estimate import StepCost, format_estimate
    from cluster_train.experiments.sweep import Trial

    printed = format_estimate([Trial("stopped", 0, config)], {"cnn_regressor": StepCost(train=5.0, forward=1.0)}, 1,
                              PreparedDataset(str(prepared / "prepared")))
    assert "1 trial(s) resume from a checkpoint" in printed and "stopped: 1 trial(s) x 0 min" in printed, printed
    again = run_training(config)
    _same_result(again, first)
    assert sorted(p.name for p in (tmp_path / "runs" / "stopped").glob("checkpoint_*")) == [
        "checkpoint_000000", "checkpoint_000001"]
    assert _steps(store, first.mlflow_run_id, "dev/loss") == [0, 1]
    assert _steps(store, first.mlflow_run_id, "precision/bf16") == [0]  # the second sitting trained nothing
    assert MlflowClient(store).get_run(first.mlflow_run_id).info.status == "FINISHED"


def test_a_finished_run_started_again_in_process_hands_back_its_result(prepared, tmp_path):
    """A run that trained all its epochs, run again under its name and storage path (no Ray): no
    "ended without a checkpoint", the same result from its last checkpoint, one MLflow run."""
    store = _store(tmp_path)
    config = _small_run(prepared, tmp_path / "runs", "finished", *QUICK, "epochs=1", f"tracking.tracking_uri={store}")
    first = run_training(config)
    again = run_training(config)
    _same_result(again, first)
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("deepemocluster").experiment_id])
    assert run.info.run_id == first.mlflow_run_id and run.info.status == "FINISHED"
    assert _steps(store, first.mlflow_run_id, "precision/bf16") == [0]
    assert len(_steps(store, first.mlflow_run_id, "test/ccc_arousal")) == 1  # scored once, and one model logged
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert sorted(model.name for model in models) == ["best_model", "best_network"]


@pytest.mark.slow
def test_a_sweep_trial_killed_after_its_last_checkpoint_records_what_it_would_have(prepared, tmp_path):
    """A trial killed after its last checkpoint (here: it stopped early), before it scored and wrote
    its record: the sweep run again records the scores, epochs and curves of the same trial never
    killed (another folder, another store)."""
    from cluster_train.experiments.sweep import plan_trials, run_sweep
    from cluster_train.train.launch import pin_local_paths

    never_killed = _sweep(prepared, tmp_path / "never_killed")
    run_sweep(never_killed)
    killed = _sweep(prepared, tmp_path / "killed")
    [trial] = plan_trials(killed)
    _trainer(pin_local_paths(trial.config)).fit()  # then the process dies: no scores, no record
    assert not (tmp_path / "killed" / "records").exists()
    run_sweep(killed)

    def record(config) -> dict:
        return json.loads(Path(config.records, f"{trial.config.name}.json").read_text())

    expected, found = record(never_killed), record(killed)
    assert found["epochs_run"] == expected["epochs_run"] == 2
    assert found["scores"] == expected["scores"]
    untimed = {k: v for k, v in expected["last_epoch"].items() if not k.startswith("time/")}
    assert {k: v for k, v in found["last_epoch"].items() if not k.startswith("time/")} == untimed
    for key in ("dev/ccc_arousal", "precision/bf16"):
        assert found["curves"][key] == expected["curves"][key], key
    assert len(found["curves"]["time/epoch"]) == len(expected["curves"]["time/epoch"]) == 2
    assert found["predictions"] == expected["predictions"]


@pytest.mark.slow
def test_a_sweeps_records_carry_to_another_checkout_and_name_their_dataset(prepared, tmp_path):
    """Records copied to another checkout (other data, storage and output paths, no model, no store)
    are the trials done there, on the same prepared data; on data with another hash they are a
    ConfigError naming the dataset, before anything trains."""
    from cluster_train.experiments.sweep import plan_trials, run_sweep
    from data_prep.config import ConfigError

    first = _sweep(prepared, tmp_path / "first")
    run_sweep(first)
    [trial] = plan_trials(first)
    record_file = Path(first.records, f"{trial.config.name}.json")
    record = json.loads(record_file.read_text())
    assert record["dataset_hash"] == PreparedDataset(str(prepared / "prepared")).dataset_hash
    assert record["commit"] == git_commit(str(REPO))  # the provenance RESULTS leaves to the records

    shutil.copytree(prepared / "prepared", tmp_path / "elsewhere" / "prepared")
    moved = _sweep(tmp_path / "elsewhere", tmp_path / "moved")
    shutil.copytree(first.records, moved.records)
    result = run_sweep(moved)
    assert [run["reused"] for run in result.runs] == [True]
    assert not (tmp_path / "moved" / "runs").exists()  # nothing trained
    assert result.runs[0]["scores"] == record["scores"]

    moved_record = Path(moved.records, f"{trial.config.name}.json")
    moved_record.write_text(json.dumps(record | {"dataset_hash": "f" * 64}))
    with pytest.raises(ConfigError, match=f"trial {trial.config.name} was trained .* on dataset ffffffffffff"):
        run_sweep(moved)


def test_a_checkpoint_cut_mid_write_is_not_resumed_from(prepared, tmp_path):
    """A process killed while copying epoch 1's checkpoint leaves a folder without its training
    state: the run started again resumes from epoch 0's checkpoint and trains epoch 1 again."""
    runs = tmp_path / "runs"
    config = _small_run(prepared, runs, "cut", *QUICK, "stages=[2]", "tracking.enabled=false")
    first = run_training(dataclasses.replace(config, epochs=1))
    run_dir = runs / "cut"
    shutil.copytree(run_dir / "checkpoint_000000", run_dir / "checkpoint_000001")
    (run_dir / "checkpoint_000001" / "trainer_state.pt").unlink()  # cut before the copy reached it
    for marker in (run_dir / "checkpoint_000001").glob(".*"):  # and before anything marks it complete
        marker.unlink()
    resumed = run_training(config)
    assert first.epochs_run == 1 and resumed.epochs_run == 2
    assert (run_dir / "checkpoint_000001" / "trainer_state.pt").exists()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_only_checkpoints_written_to_the_end_count(tmp_path, where):
    """`LocalRuntime` writes a checkpoint under a temporary name and moves it into place (a local
    folder), or marks it complete last (a bucket, where a move is a copy): a folder cut short is not
    a checkpoint, and the one before it is resumed from."""
    from cluster_train.train.runtime import LocalRuntime, latest_state

    def written(epoch: int) -> str:
        folder = tmp_path / f"written_{epoch}"
        folder.mkdir()
        (folder / "trainer_state.pt").write_text(f"epoch {epoch}")
        (folder / "report.json").write_text(json.dumps({"metrics": {"epoch": epoch}, "state": {"epoch": epoch + 1}}))
        return str(folder)

    def check(run_dir: str, filesystem: pafs.FileSystem, root: str) -> None:
        runtime = LocalRuntime({}, run_dir)
        runtime.report({"epoch": 0}, written(0))
        filesystem.create_dir(f"{root}/checkpoint_000001")  # a copy cut short: files, no marker
        with filesystem.open_output_stream(f"{root}/checkpoint_000001/trainer_state.pt") as handle:
            handle.write(b"epoch 1")
        assert runtime.checkpoints() == ["checkpoint_000000"]
        assert runtime.last_metrics() == {"epoch": 0} and latest_state(run_dir).epoch == 1
        with runtime.resume_folder() as folder:
            assert Path(folder, "trainer_state.pt").read_text() == "epoch 0"
        filesystem.create_dir(f"{root}/checkpoint_legacy")
        with filesystem.open_output_stream(f"{root}/checkpoint_legacy/trainer_state.pt") as handle:
            handle.write(b"an older version's, unmarked: not resumed from, and not deleted either")
        runtime.report({"epoch": 1}, written(1))  # written again, in full
        runtime.report({"epoch": 2}, written(2))
        assert LocalRuntime({}, run_dir).checkpoints() == ["checkpoint_000001", "checkpoint_000002"]
        assert sorted(i.base_name for i in filesystem.get_file_info(pafs.FileSelector(root))) == [
            "checkpoint_000001", "checkpoint_000002", "checkpoint_legacy"]  # no temporary left behind
        assert latest_state(run_dir).epoch == 3

    if where == "local":
        check(str(tmp_path / "run"), pafs.LocalFileSystem(), str(tmp_path / "run"))
        return
    from s3_server import s3_server

    with s3_server(tmp_path / "s3", "runs") as aws, pytest.MonkeyPatch.context() as environment:
        for key, value in aws.items():
            environment.setenv(key, value)
        filesystem, root = pafs.FileSystem.from_uri("s3://runs/cut")
        check("s3://runs/cut", filesystem, root)


@pytest.mark.slow
def test_a_worker_group_restarted_before_its_first_checkpoint_reopens_its_mlflow_run(prepared, tmp_path):
    """Rank 0 starts the MLflow run, then its worker group dies (or fails) before the first
    checkpoint holds the run's id: the restarted group re-opens that run (found by the run's
    folder), so one training is one MLflow run and none is left RUNNING."""
    store = _store(tmp_path)
    config = _small_run(prepared, tmp_path / "runs", "restarted", *QUICK, "epochs=1", f"tracking.tracking_uri={store}")
    died = _trainer(config)  # started the run, then died before its first checkpoint
    assert died.state.run_id is not None
    failed = _trainer(config)  # restarted, then failed before its first checkpoint (`loop.train` marks it)
    failed.tracker.fail(RuntimeError("K-means actor died"))
    assert failed.state.run_id == died.state.run_id
    result = run_training(config)  # restarted again
    assert result.mlflow_run_id == died.state.run_id
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("deepemocluster").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "restarted"
    assert len(run.inputs.dataset_inputs) == 1
    another = run_training(dataclasses.replace(config, name="another"))  # another training: its own run
    assert another.mlflow_run_id != result.mlflow_run_id
