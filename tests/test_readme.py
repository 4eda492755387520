"""Every command of README.md, run as a user types it, in a folder laid out as a checkout (the
project's configs, data and jobs, a copy of the sweep records; `python` is this interpreter, `.venv`
this environment), with no MLflow or Ray address in the environment.

Not run here: the README's first two lines (CI runs `bash scripts/test.sh`, each change is checked
with `bash scripts/demo.sh` from a fresh clone) and the demo's own lines, which are README commands
too (checked below). The demo's model is a 2-epoch run of several minutes; a one-epoch model of the
tests' tiny width, trained here in one process and registered as the demo registers its model
(`deepemocluster` version 1 in ./mlflow.db), stands in for it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
ATTRIBUTES = ("arousal", "dominance", "valence")
ONE_FILE = "data/ravdess_sample/Actor_21/03-01-01-01-01-01-21.flac"

pytestmark = pytest.mark.slow  # jobs as subprocesses, three of them on Ray: ~2.5 min


def readme_commands() -> list[str]:
    """The commands of README.md's bash blocks, each line without its comment."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def demo_commands() -> list[str]:
    """What scripts/demo.sh runs, as the README writes it."""
    lines = (REPO / "scripts" / "demo.sh").read_text().splitlines()
    return [line.replace(".venv/bin/python", "python").replace(' "$@"', "")
            for line in lines if line.startswith(".venv/bin/python ")]


FIRST_LINES = ("bash scripts/demo.sh", "bash scripts/test.sh")

# Each README command this module runs, by a fragment that names it alone.
RUN_HERE = {
    "prep": "jobs/prep.py --config configs/prep/ravdess_sample.yaml",
    "msp dry run": "-m data_prep --config configs/prep/msp_podcast.yaml --dry-run",
    "evaluate": "jobs/evaluate.py --model models:/deepemocluster/1",
    "predict one": f"jobs/predict.py --model models:/deepemocluster/1 {ONE_FILE}",
    "predict folder": "jobs/predict.py --model models:/deepemocluster/1 --input",
    "promote": "jobs/register.py promote",
    "serve": "jobs/serve.py --model",
    "search dry run": "jobs/sweep.py --config configs/sweep/ravdess_quarter_search.yaml --dry-run",
    "report": "jobs/report.py --config configs/sweep/ravdess_quarter.yaml",
    "mlflow ui": "mlflow ui --backend-store-uri sqlite:///mlflow.db",
}


def readme_command(key: str) -> str:
    [command] = [c for c in readme_commands() if RUN_HERE[key] in c]
    return command


def test_every_readme_command_is_run_here_or_is_one_of_the_demos():
    commands = readme_commands()
    assert commands[:2] == list(FIRST_LINES)
    assert set(demo_commands()) <= set(commands), "scripts/demo.sh runs what the README shows"
    for command in commands[2:]:
        runs_here = [key for key, fragment in RUN_HERE.items() if fragment in command]
        assert len(runs_here) == 1 or command in demo_commands(), f"README command not run by a test: {command}"
    for key in RUN_HERE:
        readme_command(key)  # each names one README command


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    for name in ("configs", "data", "jobs"):
        (folder / name).symlink_to(REPO / name)
    (folder / ".venv").symlink_to(Path(sys.prefix))
    results = Path("docs/results/ravdess-quarter")
    shutil.copytree(REPO / results, folder / results)  # the records, which the search's dry run and the report read
    return folder


ASSIGNMENT = re.compile(r"[A-Z_][A-Z0-9_]*=")  # VAR=value before a command's program


def _env(command: str = "") -> dict[str, str]:
    """This environment without a tracking store or Ray address of its own, and the variables
    `command` sets before its program."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    for word in shlex.split(command):
        if not ASSIGNMENT.match(word):
            break
        key, value = word.split("=", 1)
        env[key] = value
    return env


def _argv(command: str) -> list[str]:
    argv = shlex.split(command)
    while ASSIGNMENT.match(argv[0]):
        argv.pop(0)
    return [sys.executable, *argv[1:]] if argv[0] == "python" else argv


def run(checkout: Path, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_argv(command), cwd=checkout, env=_env(command), capture_output=True, text=True, timeout=timeout)


def succeeded(done: subprocess.CompletedProcess) -> bool:
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
    return done.returncode == 0


@pytest.fixture(scope="module")
def prepared(checkout) -> Path:
    assert succeeded(run(checkout, readme_command("prep")))
    return checkout / "outputs" / "ravdess_sample" / "prepared"


@pytest.fixture(scope="module")
def registered(checkout, prepared):
    """A one-epoch model of the tests' tiny width trained in one process and registered as the demo
    registers its model: `deepemocluster` version 1 in ./mlflow.db."""
    from test_train import TINY_MODEL

    from cluster_train.train.config import load_train_config
    from cluster_train.train.launch import run_training

    config = load_train_config(checkout / "configs/train/ravdess_sample.yaml", [
        f"data.dataset={prepared}", f"storage_path={checkout / 'outputs' / 'runs'}", "name=readme",
        "scaling.num_workers=0", "epochs=1", *TINY_MODEL, f"tracking.tracking_uri=sqlite:///{checkout / 'mlflow.db'}"])
    result = run_training(config)
    [version] = MlflowClient(config.tracking.resolved_uri()).search_model_versions("name='deepemocluster'")
    assert version.version in (1, "1")
    return result


def test_prep_writes_the_sample(prepared):
    dataset = json.loads((prepared / "dataset.json").read_text())
    assert dataset["counts"]["utterances"] == {"train": 120, "development": 120, "test": 120}


def test_the_msp_podcast_dry_run_names_the_release_file_it_lacks(checkout):
    done = run(checkout, readme_command("msp dry run"), timeout=120)
    assert done.returncode != 0  # no MSP-Podcast release on this machine
    assert "Labels/labels_consensus.csv: does not exist" in done.stdout + done.stderr


def _printed_scores(stdout: str, split: str) -> list[float]:
    """A split's CCCs from evaluate's table: `split  utterances  arousal  dominance  valence`."""
    [line] = [line for line in stdout.splitlines() if line.split()[:1] == [split]]
    return [float(value) for value in line.split()[2:]]


def test_evaluate_scores_the_registered_model_as_training_did(checkout, registered):
    done = run(checkout, readme_command("evaluate"))
    assert succeeded(done)
    printed = _printed_scores(done.stdout, "test")
    np.testing.assert_allclose(printed, [registered.scores["test"][a] for a in ATTRIBUTES], atol=1e-4)


def _one_file_prediction(checkout: Path) -> dict[str, float]:
    done = run(checkout, readme_command("predict one"))
    assert succeeded(done)
    values = dict(re.findall(r"(arousal|dominance|valence)\s*[:=]?\s*([-0-9.]+)", done.stdout))
    assert set(values) == set(ATTRIBUTES), done.stdout
    return {a: float(v) for a, v in values.items()}


def test_predict_one_file_and_a_folder_agree(checkout, registered):
    one = _one_file_prediction(checkout)
    assert all(1.0 <= value <= 7.0 for value in one.values())
    done = run(checkout, readme_command("predict folder"))
    assert succeeded(done)
    output = shlex.split(readme_command("predict folder"))[-1]
    table = pq.read_table(checkout / output).to_pylist()
    assert len(table) == len(list((checkout / "data/ravdess_sample/Actor_21").glob("*.flac")))
    [row] = [row for row in table if Path(row["audio"]).name == Path(ONE_FILE).name]
    for attribute in ATTRIBUTES:
        assert row[attribute] == pytest.approx(one[attribute], abs=1e-3)


def test_promote_then_serve_the_champion(checkout, registered):
    assert succeeded(run(checkout, readme_command("promote")))
    client = MlflowClient(f"sqlite:///{checkout / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("deepemocluster", "champion").version) == "1"
    one = _one_file_prediction(checkout)

    server = subprocess.Popen(_argv(readme_command("serve")), cwd=checkout, env=_env(), start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = _wait_for("http://127.0.0.1:8000/healthz", server, 180)
        assert json.loads(health)["model"] == "models:/deepemocluster@champion"
        request = urllib.request.Request("http://127.0.0.1:8000/predict", (checkout / ONE_FILE).read_bytes(),
                                         {"Content-Type": "audio/flac"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        for attribute in ATTRIBUTES:
            assert answer[attribute] == pytest.approx(one[attribute], abs=1e-3)
    finally:
        _stop(server)


def _wait_for(url: str, process: subprocess.Popen, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{url}: the server exited ({process.returncode}): {process.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return response.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"{url}: no answer within {seconds} s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_the_search_dry_run_checks_the_space_and_lists_the_trials_it_reuses(checkout):
    search = run(checkout, readme_command("search dry run"), timeout=120)
    assert succeeded(search)
    assert "deepemocluster seed 1: ravdess-quarter-deepemocluster-seed1 (trained)" in search.stdout  # a record of ravdess-quarter
    assert "then a search of 8 trials over clustering.num_clusters, cluster_weight" in search.stdout
    assert "estimate: none before the dataset is prepared" in search.stdout  # its search trains, on data not here
    assert not (checkout / "outputs" / "sweeps").exists()  # nothing trained, no experiment started


def test_the_report_gives_back_the_committed_tables_from_the_records_alone(checkout):
    """No model and no prepared data here: the tables come from the predictions in the records, and
    equal the committed ones (the dataset line aside, which says where they came from)."""
    results = Path("docs/results/ravdess-quarter")
    assert not (checkout / "outputs" / "ravdess_full").exists()
    report = run(checkout, readme_command("report"), timeout=180)
    assert succeeded(report)
    tables = json.loads((checkout / results / "tables.json").read_text())
    assert tables == json.loads((REPO / results / "tables.json").read_text())
    assert "| deepemocluster |" in (markdown := (checkout / results / "report.md").read_text())
    assert "not prepared here, so the tables are the predictions the records hold" in markdown

    def without_dataset_line(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("Dataset ")]
    assert without_dataset_line(markdown) == without_dataset_line((REPO / results / "report.md").read_text())


def test_the_mlflow_ui_shows_the_runs(checkout, registered):
    ui = subprocess.Popen(_argv(readme_command("mlflow ui")), cwd=checkout, env=_env(readme_command("mlflow ui")), start_new_session=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "<title>MLflow" in _wait_for("http://127.0.0.1:5000/", ui, 120)
        runs = json.loads(_post("http://127.0.0.1:5000/api/2.0/mlflow/runs/search",
                                {"experiment_ids": [_experiment_id(checkout)]}))
        assert [run["info"]["run_name"] for run in runs["runs"]] == ["readme"]
    finally:
        _stop(ui)


def _experiment_id(checkout: Path) -> str:
    client = MlflowClient(f"sqlite:///{checkout / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run.info.experiment_id


def _post(url: str, body: dict) -> str:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()
