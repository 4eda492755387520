"""The registry on a real sqlite MLflow store: training's publish step (model, linked scores, a tagged
version), registering a run by hand, and `jobs/register.py promote` moving `@champion` only to a
version that beats the current one on the same dataset.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from cluster_train.serve.registry import RegistryError, promote, publish_best_model, version_tags
from cluster_train.tracking import mlflow_globals
from test_pyfunc import ATTRS, cli_values, make_audio_bundle, sample_audio

REPO = Path(__file__).resolve().parents[1]
SLOW = pytest.mark.slow  # the published versions: three models logged and checked by MLflow, ~40 s


@pytest.fixture(scope="module")
def job():
    spec = importlib.util.spec_from_file_location("register_job", REPO / "jobs" / "register.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("registry", artifact_location=(folder / "artifacts").as_uri())
    return uri, client, experiment, folder


def scores(dev: float, test: float) -> dict:
    return {"development": dict(zip(ATTRS, (dev + 0.1, dev, dev - 0.1))),
            "test": dict(zip(ATTRS, (test + 0.1, test, test - 0.1)))}


@pytest.fixture(scope="module")
def published(store):
    """Training's finish, twice: version 1 (dev mean .50), version 2 (dev mean .55)."""
    uri, client, experiment, folder = store
    bundle_dir = make_audio_bundle(folder / "bundle")
    uris, runs = [], []
    for dev in (0.50, 0.55):
        run_id = client.create_run(experiment).info.run_id
        for epoch in range(3):
            client.log_metric(run_id, "dev/ccc_arousal", 0.1 * epoch, step=epoch)
        final = {f"dev/final_ccc_{a}": v for a, v in scores(dev, dev - 0.05)["development"].items()}
        uris.append(publish_best_model(bundle_dir, run_id=run_id, tracking_uri=uri, scores=scores(dev, dev - 0.05),
                                       development_split="development", metrics=final, dataset_hash="h" * 40,
                                       dataset_location="/data/prepared/ravdess", git_commit="abc123",
                                       registered_model="emotion", network=dev == 0.50))  # once: torch.export is slow
        runs.append(run_id)
    return uris, runs, bundle_dir


@SLOW
def test_training_registers_a_tagged_version_with_scores_linked_to_its_epoch_and_dataset(published, store):
    uris, runs, bundle_dir = published
    uri, client, _, _ = store
    assert uris == ["models:/emotion/1", "models:/emotion/2"]
    version = client.get_model_version("emotion", "2")
    assert version.tags["dataset_hash"] == "h" * 40 and version.tags["git_commit"] == "abc123"
    assert version.tags["best_epoch"] == "1" and version.tags["run_id"] == runs[1]
    assert float(version.tags["dev_ccc_mean"]) == pytest.approx(0.55)
    assert float(version.tags["test_ccc_valence"]) == pytest.approx(0.40)
    model = client.get_logged_model(version.source.removeprefix("models:/"))  # the sqlite store keeps no model_id
    linked = {(m.key, m.step): m for m in model.metrics}
    assert linked[("dev/ccc_arousal", 1)].value == pytest.approx(0.1)  # the epoch of its weights (bundle extra)
    final = linked[("dev/final_ccc_arousal", 1)]
    assert final.value == pytest.approx(0.65) and final.dataset_name == "prepared/ravdess"
    assert final.dataset_digest == "h" * 36
    names = {m.name for m in client.search_logged_models([model.experiment_id],
                                                         filter_string=f"source_run_id = '{runs[0]}'")}
    assert names == {"best_model", "best_network"}
    with mlflow_globals(uri):
        loaded = mlflow.pyfunc.load_model("models:/emotion/2")
    got = loaded.predict(pd.DataFrame({"uri": [str(f) for f in sample_audio(2)]}))[list(ATTRS)].to_numpy()
    assert got == pytest.approx(cli_values(bundle_dir, sample_audio(2)), abs=1e-5)


@SLOW
def test_promote_moves_champion_only_to_a_better_version(published, store, job, capsys):
    uri, client, _, _ = store
    assert job.main(["--tracking-uri", uri, "promote", "--name", "emotion", "--version", "1"]) == 0
    assert "no @champion yet" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias("emotion", "champion").version) == "1"
    assert job.main(["--tracking-uri", uri, "promote", "--name", "emotion", "--version", "2"]) == 0
    assert "dev_ccc_mean 0.5500 > version 1's 0.5000" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias("emotion", "champion").version) == "2"
    assert job.main(["--tracking-uri", uri, "promote", "--name", "emotion", "--version", "1"]) == 1
    assert "does not beat version 2's 0.5500" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias("emotion", "champion").version) == "2"
    with mlflow_globals(uri):
        champion = mlflow.pyfunc.load_model("models:/emotion@champion")
    assert f"models:/{champion.metadata.model_id}" == client.get_model_version("emotion", "2").source
    result = promote("emotion", "1", force=True, tracking_uri=uri)
    assert result.moved and result.previous == "2"
    assert str(client.get_model_version_by_alias("emotion", "champion").version) == "1"


@SLOW
def test_promote_refuses_other_datasets_and_missing_figures(published, store, job, capsys):
    uri, client, _, _ = store
    client.create_registered_model("other")
    source = client.get_model_version("emotion", "1")
    for tags in ({**source.tags, "dataset_hash": "x" * 40, "dev_ccc_mean": "0.9"}, {"dataset_hash": "h" * 40}):
        with mlflow_globals(uri):  # MLflow's sqlite registry looks the source up in the global store
            client.create_model_version("other", source.source, tags=tags)
    client.set_registered_model_alias("other", "champion", "2")
    with pytest.raises(RegistryError, match="version 1 was trained on dataset x+, @champion .version 2. on h+"):
        promote("other", "1", tracking_uri=uri)
    client.delete_registered_model_alias("other", "champion")
    with pytest.raises(RegistryError, match="other version 2 has no number in tag 'dev_ccc_mean'"):
        promote("other", "2", tracking_uri=uri)
    assert job.main(["--tracking-uri", uri, "promote", "--name", "other", "--version", "9"]) == 2
    assert "other version 9: not in the registry" in capsys.readouterr().err


@SLOW
def test_register_a_run_by_hand(published, store, job, capsys):
    uri, client, _, _ = store
    _, runs, _ = published
    assert job.main(["--tracking-uri", uri, "register", "--run-id", runs[0], "--name", "by-hand"]) == 0
    assert capsys.readouterr().out.strip() == "models:/by-hand/1"
    assert float(client.get_model_version("by-hand", "1").tags["dev_ccc_mean"]) == pytest.approx(0.50)
    assert job.main(["--tracking-uri", uri, "register", "--run-id", runs[0], "--name", "x", "--artifact", "no"]) == 2
    assert "no logged model 'no'" in capsys.readouterr().err


def test_promote_compares_on_the_same_dataset_only(tmp_path, job, capsys):
    """The alias logic on versions made directly (no model logged): fast."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_registered_model("fast")
    for tags in ({"dataset_hash": "a", "dev_ccc_mean": "0.40"}, {"dataset_hash": "a", "dev_ccc_mean": "0.42"},
                 {"dataset_hash": "b", "dev_ccc_mean": "0.90"}, {"dataset_hash": "a"}):
        client.create_model_version("fast", (tmp_path / "model").as_uri(), tags=tags)
    assert promote("fast", "1", tracking_uri=uri).moved
    assert not promote("fast", "2", min_gain=0.05, tracking_uri=uri).moved  # .42 is not .05 better than .40
    assert promote("fast", "2", tracking_uri=uri).reason == "dev_ccc_mean 0.4200 > version 1's 0.4000"
    with pytest.raises(RegistryError, match="version 3 was trained on dataset b, @champion .version 2. on a"):
        promote("fast", "3", tracking_uri=uri)
    with pytest.raises(RegistryError, match="fast version 4 has no number in tag 'dev_ccc_mean'"):
        promote("fast", "4", tracking_uri=uri)
    assert job.main(["--tracking-uri", uri, "promote", "--name", "fast", "--version", "3", "--force"]) == 0
    assert "fast@champion: -> version 3 (forced)" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias("fast", "champion").version) == "3"
    assert client.get_model_version("fast", "3").tags["champion_since"] == "forced"
    assert job.main(["--tracking-uri", uri, "show", "--name", "fast"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("fast: @champion -> version 3\n") and "version 4: dataset_hash=a" in shown


def test_version_tags_skip_missing_scores():
    tags = version_tags({"development": {"arousal": 0.5, "valence": float("nan")}}, "development",
                        dataset_hash="h", git_commit="c", best_epoch=None, run_id=None)
    assert tags == {"dataset_hash": "h", "git_commit": "c", "dev_ccc_arousal": "0.500000", "dev_ccc_mean": "0.500000"}
