"""Sweeps on Ray Tune (`cluster_train/experiments/tuning.py`): real prepared audio, a real local Ray,
real Tune trials, a real MLflow store.

A search's config fails before Ray starts; a trial trained through Tune equals the same run trained
directly; a sweep whose driver is killed (SIGKILL) is restored by Tune, its cut trial goes on from
its checkpoint and a Ray Train trial reports every epoch to Tune; a search finds the setting that
learns, ends trials early, scores no test split, and its chosen setting is retrained and compared
on test, from a config whose paths are all relative; a search whose every trial fails says why."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from conftest import local_ray, prepare_train_sample
from mlflow import MlflowClient

from cluster_train.experiments.sweep import SearchConfig, check_search, load_sweep_config, plan_trials, run_sweep
from data_prep.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = ("model.channels=[8,16]", "model.strides=[2,2]", "model.feature_dim=16", "precise_bn.utterances=8")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    with local_ray():
        yield prepare_train_sample(tmp_path_factory.mktemp("tune"))


def _sweep_file(folder: Path, prepared: Path, body: str, overrides: tuple[str, ...] = (), relative: bool = False) -> Path:
    """A sweep of the tiny model on the sample, everything of its own under `folder`. `relative`: as a
    user writes one, to run from `folder`: every path relative to it, the training config a file
    there, the MLflow store the default (./mlflow.db)."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = ", ".join(f"'{s}'" for s in (*TINY, *overrides))
    if relative:
        shutil.copy(REPO / "configs/train/ravdess_sample.yaml", folder / "train.yaml")
        (folder / "prepared").symlink_to(prepared, target_is_directory=True)
        train_config, under, paths = "train.yaml", Path("."), "data.dataset=prepared, storage_path=runs"
    else:
        train_config, under = REPO / "configs/train/ravdess_sample.yaml", folder
        paths = f"data.dataset={prepared}, storage_path={folder / 'runs'}, tracking.tracking_uri=sqlite:///{folder / 'mlflow.db'}"
    file = folder / "sweep.yaml"
    file.write_text(f"""
train_config: {train_config}
overrides: [{paths}, data.batch_size=4, clustering.num_clusters=4, scaling.num_workers=0, {settings}]
subsets: 2
output: {under / 'sweeps'}
records: {under / 'records'}
{body}""")
    return file


def test_a_search_space_is_checked_before_ray_starts(tmp_path):
    """A kind of range Tune has no domain for, a range upside down, and a key training does not have
    (or a value it refuses, at an end of a range) each fail with the key named; nothing starts."""
    with pytest.raises(ConfigError, match=r"search\.space\.cluster_weight.*one of \{choice"):
        SearchConfig(space={"cluster_weight": {"normal": [0, 1]}})
    with pytest.raises(ConfigError, match=r"search\.space\.cluster_weight.*low < high"):
        SearchConfig(space={"cluster_weight": {"uniform": [2.0, 1.0]}})
    with pytest.raises(ConfigError, match=r"search\.space\.optim\.encoder\.lr.*low must be > 0"):
        SearchConfig(space={"optim.encoder.lr": {"loguniform": [0, 1e-3]}})
    assert SearchConfig(space={"clustering.num_clusters": {"randint": [2, 9]}}).corners() == [
        {"clustering.num_clusters": 2}, {"clustering.num_clusters": 8}]  # randint's high is excluded

    def sweep(space: str):
        return load_sweep_config(_sweep_file(tmp_path, tmp_path / "nowhere", f"name: checked\nsearch:\n  space: {space}\n"))

    with pytest.raises(ConfigError, match=r"search\.space \{'clustering\.num_klusters': 2\}.*num_klusters"):
        check_search(sweep("{clustering.num_klusters: {choice: [2, 4]}}"))
    with pytest.raises(ConfigError, match=r"search\.space \{'epochs': 0\}.*epochs.*must be >= 1"):
        check_search(sweep("{epochs: {randint: [0, 3]}}"))
    with pytest.raises(ConfigError, match=r"search\.grace_epochs.*3 must be fewer than the trials' epochs \(3, at \{'epochs': 3\}\)"):
        check_search(sweep("{epochs: {choice: [4, 3]}}\n  grace_epochs: 3"))  # its rung would be the last epoch
    check_search(sweep("{epochs: {choice: [4, 3]}}\n  grace_epochs: 2"))
    check_search(sweep("{clustering.num_clusters: {choice: [2, 4]}, cluster_weight: {loguniform: [0.1, 3.0]}}\n  grace_epochs: 1"))
    assert not ray.is_initialized()


def test_the_estimate_counts_trials_that_wait_for_a_free_slot():
    """The sweep's wall-time estimate schedules its trials as Tune does, `max_concurrent` at a time,
    each starting when one ends: not the total divided by the slots."""
    from cluster_train.experiments.estimate import wall_seconds

    assert wall_seconds([60.0, 60.0, 60.0], 2) == 120.0  # the third waits: 2 h for 3 one-hour trials, not 1.5
    assert wall_seconds([90.0, 30.0, 30.0, 30.0], 2) == 90.0  # the short ones share the other slot
    assert wall_seconds([30.0, 30.0, 90.0], 2) == 120.0  # a long trial last starts late
    assert wall_seconds([10.0, 20.0], 1) == 30.0 and wall_seconds([10.0], 4) == 10.0 and wall_seconds([], 2) == 0.0


def test_an_estimate_timed_on_a_busy_machine_says_so():
    """Steps timed while other work holds the CPUs run slower than the trials will: the estimate says
    the machine was busy, from half its CPUs' load up."""
    from cluster_train.experiments.estimate import busy_warning

    assert busy_warning(0.3, 2) is None and busy_warning(0.99, 2) is None and busy_warning(7.9, 16) is None
    assert "busy as the steps were timed (load 2.1 on 2 CPUs)" in busy_warning(2.1, 2)
    assert busy_warning(8.0, 16) is not None


def test_a_finished_trials_line_counts_every_epoch_it_trained():
    """A trial resumed across sittings reports the seconds of all its epochs (its record's curve), not
    those of its last sitting (the run's `seconds`, and Tune's clock after a restore)."""
    from cluster_train.experiments.tuning import DONE, _result

    resumed = {"seconds": 200.0, "epochs_run": 3, "curves": {"time/epoch": [100.0, 110.0, 120.0]},
               "last_epoch": {"dev/best_loss": 1.5, "train/loss": 2.0}, "scores": {"test": {"arousal": 0.5}}}
    result = _result(resumed)
    assert result["seconds"] == 330.0 and result[DONE] == 1.0 and result["epochs_run"] == 3.0
    assert result["dev/best_loss"] == 1.5 and "train/loss" not in result and result["test/ccc_arousal"] == 0.5
    assert _result({"seconds": 42.0})["seconds"] == 42.0  # a search trial: no curves, its run's seconds


def test_the_space_becomes_tune_domains_and_an_experiment_is_named_after_its_plan(tmp_path):
    """Each kind of range as Ray Tune's domain over the same values; the Tune experiment of a sweep
    is named after its trials, so a changed plan starts anew instead of restoring other trials."""
    from ray import tune

    from cluster_train.experiments.tuning import _experiment, search_space

    config = load_sweep_config(_sweep_file(tmp_path, tmp_path / "data", """
name: domains
search:
  space:
    clustering.num_clusters: {choice: [5, 10]}
    cluster_weight: {loguniform: [0.1, 3.0]}
    optim.encoder.lr: {uniform: [1.0e-4, 1.0e-3]}
    data.batch_size: {randint: [4, 9]}
"""))
    space = search_space(config)
    assert space["clustering.num_clusters"].categories == [5, 10]
    assert isinstance(space["cluster_weight"].get_sampler(), tune.search.sample.LogUniform)
    assert (space["cluster_weight"].lower, space["cluster_weight"].upper) == (0.1, 3.0)
    assert (space["optim.encoder.lr"].lower, space["optim.encoder.lr"].upper) == (1e-4, 1e-3)
    assert (space["data.batch_size"].lower, space["data.batch_size"].upper) == (4, 9)
    storage, name = _experiment(str(tmp_path / "out"), "grid", ["a-seed0", "b-seed0"])
    assert storage == str(tmp_path / "out" / "tune") and name.startswith("grid-")
    assert _experiment(str(tmp_path / "out"), "grid", ["b-seed0", "a-seed0"])[1] != name  # another plan
    assert _experiment(str(tmp_path / "out"), "grid", ["a-seed0", "b-seed0"])[1] == name  # the same, restorable
    assert _experiment("s3://bucket/sweeps/x", "grid", [])[0] == "s3://bucket/sweeps/x/tune"


def test_each_search_trial_reserves_what_its_sampled_settings_need(tmp_path):
    """A space that varies `scaling.*` gives each trial the CPUs (or the Ray Train share) of its own
    sampled config, not the first trial's."""
    from functools import partial

    from cluster_train.experiments.sweep import search_trial_config
    from cluster_train.experiments.tuning import DRIVER_CPU, search_resources

    config = load_sweep_config(_sweep_file(tmp_path, tmp_path / "data", """
name: sized
search:
  space: {scaling.cpus_per_worker: {choice: [1, 2]}, scaling.num_workers: {choice: [0, 2]}}
"""))
    make_config = partial(search_trial_config, config, None)
    example = make_config({"scaling.cpus_per_worker": 1, "scaling.num_workers": 0}, "example")
    reserves = search_resources(make_config, example, list(config.search.space))
    sampled = [{"scaling.cpus_per_worker": cpus, "scaling.num_workers": workers} for cpus, workers in ((1, 0), (2, 0), (2, 2))]
    assert [reserves(params).required_resources for params in sampled] == [{"CPU": 1}, {"CPU": 2}, {"CPU": DRIVER_CPU}]
    assert search_resources(make_config, example, ["cluster_weight"]).required_resources == {"CPU": 1}  # the example's


def test_the_search_point_is_planned_by_the_search_alone(tmp_path):
    """`--only searched` trains the search (and the reference), and a shared `trial_prefix` names the
    trials as the sweep whose records they reuse."""
    config = load_sweep_config(_sweep_file(tmp_path, tmp_path / "data", """
name: searching
trial_prefix: ravdess-quarter
points:
  - {name: dec, model_kind: deepemocluster}
  - {name: regressor, model_kind: cnn_regressor}
reference: regressor
search:
  space: {cluster_weight: {uniform: [0.5, 2.0]}}
"""))
    assert [t.config.name for t in plan_trials(config, ["searched"])] == ["ravdess-quarter-regressor-seed0"]
    assert [t.config.name for t in plan_trials(config)] == ["ravdess-quarter-dec-seed0", "ravdess-quarter-regressor-seed0"]


@pytest.mark.slow
def test_a_trial_trained_through_tune_equals_the_same_run_trained_directly(prepared, tmp_path):
    """One DeepEmoCluster trial as a Tune grid, and the same config trained by `run_training` in
    this process under another name: the same metrics at every epoch and the same scores."""
    from cluster_train.train.launch import run_training

    file = _sweep_file(tmp_path / "tune", prepared, """
name: through-tune
points: [{name: dec, model_kind: deepemocluster}]
""", ("epochs=2",))
    config = load_sweep_config(file)
    result = run_sweep(config)
    [trial] = plan_trials(config)
    direct = run_training(dataclasses.replace(trial.config, name="direct"))
    [run] = result.runs
    untimed = {k: v for k, v in direct.metrics.items() if not k.startswith("time/") and k != "mlflow_run_id"}
    assert {k: v for k, v in run["last_epoch"].items() if k in untimed} == untimed
    assert run["scores"] == direct.scores
    client = MlflowClient(f"sqlite:///{tmp_path / 'tune' / 'mlflow.db'}")
    for key in ("dev/ccc_arousal", "train/stage1_loss", "cluster/kmeans_objective"):
        through = [m.value for m in sorted(client.get_metric_history(run["mlflow_run_id"], key), key=lambda m: m.step)]
        alone = [m.value for m in sorted(client.get_metric_history(direct.mlflow_run_id, key), key=lambda m: m.step)]
        assert through == alone and len(through) == 2, key


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sweep_whose_driver_is_killed_is_restored_by_tune(prepared, tmp_path):
    """`jobs/sweep.py` (joined to the running Ray, as a submitted job's driver is) killed with
    SIGKILL once its first trial has a checkpoint; run again, it restores the Tune experiment: the
    cut trial goes on from its checkpoint (its MLflow run is re-opened, no epoch logged twice) and
    the other trains; every trial ends with a record and the table compares them.

    The other trial has a Ray Train worker (`scaling.num_workers=1`): its Tune trial reserves a
    hundredth of a CPU (the worker and the K-means actor take theirs), and every epoch reaches Tune
    through Ray Train's callback, so a scheduler could act on it."""
    from cluster_train.experiments.tuning import DRIVER_CPU, grid_resources, trial_resources

    file = _sweep_file(tmp_path, prepared, """
name: restored
points:
  - {name: regressor, model_kind: cnn_regressor}
  - {name: dec, model_kind: deepemocluster, scaling.num_workers: 1, scaling.cpus_per_worker: 1}
reference: regressor
max_concurrent: 1
""", ("epochs=3", "patience=3"))
    in_process, on_ray_train = plan_trials(load_sweep_config(file))
    assert trial_resources(on_ray_train.config) == {"cpu": DRIVER_CPU} != trial_resources(in_process.config)
    reserves = grid_resources({trial.config.name: trial.config for trial in (in_process, on_ray_train)})
    assert [reserves({"trial": trial.config.name}).required_resources for trial in (in_process, on_ray_train)] == [
        {"CPU": in_process.config.scaling.cpus_per_worker}, {"CPU": DRIVER_CPU}]  # each its own, in one grid
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "jobs/sweep.py", "--config", str(file)]
    first_run = tmp_path / "runs" / "restored-regressor-seed0"
    with (tmp_path / "first.log").open("w") as log:
        driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while not list(first_run.glob("checkpoint_*/")) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        experiment = tmp_path / "sweeps" / "restored" / "tune"
        while not list(experiment.glob("grid-*/experiment_state-*.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    first_log = (tmp_path / "first.log").read_text()
    assert driver.returncode == -signal.SIGKILL, first_log[-3000:]
    assert not (tmp_path / "records" / "restored-dec-seed0.json").exists()  # killed before the last trial ended

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "tune: restoring experiment" in again.stdout, again.stdout[-3000:]
    assert "trial 2 of 2 done" in again.stdout
    assert len(list(experiment.glob("grid-*"))) == 1  # the same experiment, not a new one
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "records").glob("*.json")}
    assert sorted(records) == ["restored-dec-seed0", "restored-regressor-seed0"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    cut = records["restored-regressor-seed0"]
    assert [m.step for m in client.get_metric_history(cut["mlflow_run_id"], "dev/loss")] == list(range(cut["epochs_run"]))
    sittings = [m.step for m in client.get_metric_history(cut["mlflow_run_id"], "precision/bf16")]
    assert len(sittings) in (1, 2) and sittings[0] == 0 and sittings == sorted(set(sittings))  # resumed, not restarted
    table = json.loads((tmp_path / "sweeps" / "restored" / "table.json").read_text())
    assert sorted(table["models"]) == ["dec", "regressor"]
    assert records["restored-dec-seed0"]["epochs_run"] == 3
    [progress] = experiment.glob("grid-*/restored-dec-seed0/progress.csv")
    rows = progress.read_text().splitlines()
    epochs = [row.split(",")[rows[0].split(",").index("epoch")] for row in rows[1:]]
    assert epochs[:3] == ["0", "1", "2"], rows  # one Tune result per epoch, then the trial's final one


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_search_finds_the_setting_that_learns_and_retrains_it(prepared, tmp_path, capsys, monkeypatch):
    """A search over the regressor's learning rate and the cluster-loss weight: Optuna samples, ASHA
    may end poor trials after their first epoch (their MLflow runs KILLED, the others FINISHED), no
    search trial scores the test split, the chosen setting is the one with the lowest development
    loss; it is retrained over the seeds and compared on test with the reference; run again,
    nothing searches or trains again. Every path in its config is relative, as in the shipped
    configs: a search trial, which builds its config in Tune's trial folder, finds them all."""
    monkeypatch.chdir(tmp_path)
    file = _sweep_file(tmp_path, prepared, relative=True, body="""
name: searched
points: [{name: dec, model_kind: deepemocluster}]
reference: dec
max_concurrent: 2
search:
  space:
    optim.regressor.lr: {choice: [1.0e-30, 1.0e-3]}
    cluster_weight: {uniform: [0.5, 2.0]}
  samples: 3
  startup_samples: 2
  grace_epochs: 1
""", overrides=("epochs=2", "patience=2"))
    config = load_sweep_config(file)
    result = run_sweep(config)
    printed = capsys.readouterr().out
    search = json.loads((tmp_path / "records" / "searched-search.json").read_text())
    tried = search["trials"]
    assert search["complete"] is True  # written as each trial ended, complete once the search did
    assert len(tried) == 3 and [t["dev/best_loss"] for t in tried] == sorted(t["dev/best_loss"] for t in tried)
    assert {t["settings"]["optim.regressor.lr"] for t in tried} == {1e-30, 1e-3}  # both values were tried
    assert "trial 3 of 3 done" in printed and "chosen {" in printed

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("searched").experiment_id
    searched_runs = client.search_runs([experiment], "tags.mlflow.runName LIKE 'searched-search-%'")
    assert len(searched_runs) == 3
    for run in searched_runs:
        assert not any(key.startswith("test/") for key in run.data.metrics)  # development only
        assert run.data.tags.get("mlflow.parentRunId") == result.table["parent_run_id"]
        epochs = len(client.get_metric_history(run.info.run_id, "dev/loss"))
        assert run.info.status == ("FINISHED" if epochs == 2 else "KILLED"), (epochs, run.info.status)
    assert list(result.table["models"]) == ["dec", "searched"]
    logged = json.loads(Path(client.download_artifacts(result.table["parent_run_id"], "search.json", str(tmp_path))).read_text())
    assert logged == search  # the parent run holds the search's record, every setting tried
    ranking = result.table["development"]  # the points by development CCC: what settings are chosen by
    assert [row["mean"] for row in ranking] == sorted((row["mean"] for row in ranking), reverse=True)
    for row in ranking:
        [run] = [r for r in result.runs if r["point"] == row["point"]]
        development = run["scores"]["development"]
        assert row["arousal"] == development["arousal"] and row["runs"] == 1
        assert row["mean"] == pytest.approx(sum(development[a] for a in ("arousal", "dominance", "valence")) / 3)
    retrained = [r for r in result.runs if r["point"] == "searched"]
    assert [r["seed"] for r in retrained] == [0]
    retrained_config = json.loads((tmp_path / "records" / "searched-searched-seed0.json").read_text())["config"]
    assert {key: retrained_config[key] for key in tried[0]["settings"]} == tried[0]["settings"]  # the lowest loss

    from cluster_train.experiments.report import write_report

    report = write_report(config, tmp_path / "report")  # the searched point's trials and the search's table
    assert (report.trained, report.planned) == (2, 2) and "| searched |" in report.markdown
    assert "## Development CCC" in report.markdown and "## Search" in report.markdown and report.markdown.count("(ended early)") == sum(t["stopped_early"] for t in tried)

    runs_before = len(client.search_runs([experiment]))
    again = run_sweep(config)
    assert "searching" not in capsys.readouterr().out
    assert again.table["models"] == result.table["models"] and len(client.search_runs([experiment])) == runs_before

    # Cut short on another machine: its record kept two finished trials, the Tune experiment is not
    # here. Run again, Optuna is told those two and only the third trains; the record ends complete.
    kept = tried[:2]
    (tmp_path / "records" / "searched-search.json").write_text(json.dumps(search | {"complete": False, "trials": kept}))
    (tmp_path / "records" / "searched-searched-seed0.json").unlink()  # the retrain comes after the search
    shutil.rmtree(tmp_path / "sweeps" / "searched" / "tune")
    dry_run = subprocess.run([sys.executable, str(REPO / "jobs/sweep.py"), "--config", str(file), "--dry-run"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert "then a search of 3 trials over optim.regressor.lr, cluster_weight (2 finished before it was cut short" \
        in dry_run.stdout, dry_run.stdout + dry_run.stderr[-3000:]
    assert "dec seed 0: searched-dec-seed0 (trained)" in dry_run.stdout
    assert "  search: 1 trial(s) x " in dry_run.stdout and "\n  dec:" not in dry_run.stdout  # only the search's trial left
    resumed = run_sweep(config)
    printed = capsys.readouterr().out
    assert "searching optim.regressor.lr, cluster_weight over 3 trials (optuna, scheduler asha), 2 of them tried before" in printed
    assert "trial 3 of 3 done" in printed and "trial 1 of 3" not in printed and "trial 2 of 3" not in printed
    ended = json.loads((tmp_path / "records" / "searched-search.json").read_text())
    assert ended["complete"] is True and len(ended["trials"]) == 3
    assert [t for t in ended["trials"] if t["trial_id"] in {k["trial_id"] for k in kept}] == kept
    [new] = [t for t in ended["trials"] if t["trial_id"] not in {k["trial_id"] for k in kept}]
    assert new["trial_id"] not in {t["trial_id"] for t in tried}
    assert len(client.search_runs([experiment], "tags.mlflow.runName LIKE 'searched-search-%'")) == 4
    assert [r["seed"] for r in resumed.runs if r["point"] == "searched"] == [0]


@pytest.mark.slow
def test_a_search_whose_every_trial_fails_names_the_first_error(prepared, tmp_path):
    """Every trial of a search fails in its trial (here its training config file is gone by the time
    the trial reads it): the search ends with an error that says so and carries the first trial's
    own error, not only Tune's folder."""
    from functools import partial

    from cluster_train.experiments import tuning
    from cluster_train.experiments.sweep import search_trial_config

    config = load_sweep_config(_sweep_file(tmp_path, prepared, """
name: failing
trial_retries: 0
search:
  space:
    cluster_weight: {uniform: [0.5, 2.0]}
  samples: 1
  algorithm: random
  scheduler: none
"""))
    example = plan_trials(config)[0].config
    progress = tuning.SearchProgress(str(tmp_path / "records"), "failing-search.json", {}, ["cluster_weight"], [])
    gone = partial(search_trial_config, dataclasses.replace(config, train_config=str(tmp_path / "gone.yaml")), None)
    with pytest.raises(RuntimeError, match=r"no search trial finished an epoch .*first trial's error: .*"
                                           r"config file not found: .*gone\.yaml"):
        tuning.run_search(config, gone, example, str(tmp_path / "sweeps"), [], progress)
    assert not (tmp_path / "records" / "failing-search.json").exists()  # nothing finished, nothing kept
