"""Prediction from raw audio: batch on a real local Ray, one file, MLflow URIs and the registry.

The model is untrained (seeded random weights with the normaliser and label scaler of a tiny
prepared dataset): prediction must reproduce what evaluation computes from the prepared chunks,
which needs no training.
"""

from __future__ import annotations

import csv
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from conftest import local_ray
from torch import nn

from cluster_train.data.labels import LabelScaler
from cluster_train.model.blocks import ModelConfig
from cluster_train.model.kinds import build_model
from cluster_train.serve.bundle import load_bundle, log_bundle, save_bundle
from cluster_train.serve.evaluate import predict_split
from cluster_train.serve.predict import (
    PredictConfig,
    PredictError,
    chunk_recipe,
    load_model,
    predict_file,
    run_prediction,
)
from data_prep.config import ChunkConfig, ConfigError, PrepConfig, load_config
from data_prep.dataset import PreparedDataset
from data_prep.importers import import_ravdess
from data_prep.pipeline import run_prep
from data_prep.shards import ChunkRecipe

REPO = Path(__file__).resolve().parents[1]
ATTRS = ("arousal", "dominance", "valence")
SPLITS = ("train", "development", "test")


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray():
        yield


@pytest.fixture(scope="module")
def utterances():
    """Six real sample files, two per split."""
    found = import_ravdess(str(REPO / "data" / "ravdess_sample"))
    return [u for split in SPLITS for u in [u for u in found if u.split == split][::25][:2]]


@pytest.fixture(scope="module")
def dataset(utterances, ray_cluster, tmp_path_factory) -> PreparedDataset:
    folder = tmp_path_factory.mktemp("prepared")
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "audio", "split", *ATTRS])
        writer.writerows([u.id, u.audio, u.split, u.arousal, u.dominance, u.valence] for u in utterances)
    config = load_config(PrepConfig, None, [f"sources=[{{kind: csv, path: {manifest}}}]",
                                            f"output={folder / 'out'}", "progress=false", "shard_size=3"])
    run_prep(config)
    return PreparedDataset(config.output)


def chunk_settings(dataset: PreparedDataset, chunks: ChunkConfig | None = None) -> dict:
    """What training keeps in a bundle: the dataset's frame settings and the run's chunking."""
    return ChunkRecipe.for_dataset(dataset.settings, chunks or ChunkConfig()).settings()


def make_bundle(dataset: PreparedDataset, path: Path, features: dict | None) -> str:
    torch.manual_seed(0)
    model = build_model("deepemocluster", ModelConfig())
    for layer in model.modules():  # PyTorch's default init shrinks the signal ~6x per layer: outputs ~constant
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    scaler = LabelScaler.fit(dataset.read_table(columns=["split", *ATTRS]))
    save_bundle(str(path), model, "deepemocluster", ModelConfig(), dataset.normalizer(), scaler, features=features)
    return str(path)


@pytest.fixture(scope="module")
def bundle_dir(dataset, tmp_path_factory) -> str:
    return make_bundle(dataset, tmp_path_factory.mktemp("bundle"), chunk_settings(dataset))


@pytest.fixture(scope="module")
def audio_folder(utterances, tmp_path_factory) -> Path:
    """The six real files, a corrupt one, an empty one and a too-short one."""
    folder = tmp_path_factory.mktemp("audio")
    for u in utterances:
        shutil.copy(u.audio, folder / Path(u.audio).name)
    (folder / "corrupt.wav").write_bytes(b"RIFF" + bytes(range(256)) * 8)
    (folder / "empty.wav").write_bytes(b"")
    sf.write(folder / "short.wav", 0.3 * np.sin(np.arange(1600) / 5.0), 16000)  # 0.1 s < min_seconds
    return folder


@pytest.fixture(scope="module")
def batch(bundle_dir, audio_folder, ray_cluster, tmp_path_factory):
    """Parquet predictions and rejects for the folder."""
    output = tmp_path_factory.mktemp("out") / "nested" / "predictions.parquet"
    summary = run_prediction(PredictConfig(model=bundle_dir, input=str(audio_folder), output=str(output),
                                           batch_size=4, files_per_task=3))
    return summary, pq.read_table(output), pq.read_table(output.parent / "predictions.rejects.parquet")


@pytest.fixture(scope="module")
def job():
    """jobs/predict.py loaded in this process (a subprocess costs seconds of imports)."""
    spec = importlib.util.spec_from_file_location("predict_job", REPO / "jobs" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_job(job, capsys, *args: str) -> tuple[int, str, str]:
    code = job.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def printed_values(stdout: str) -> dict[str, float]:
    return {name: float(value) for name, value in (line.split() for line in stdout.strip().splitlines())}


@pytest.mark.slow
def test_batch_matches_evaluation_of_the_prepared_chunks_and_lists_rejects(batch, bundle_dir, dataset, utterances):
    summary, results, rejects = batch
    assert results.column_names == ["id", "audio", "duration", *ATTRS]
    assert results["id"].to_pylist() == sorted(Path(u.audio).name for u in utterances)
    assert summary.predicted == 6 and summary.device == "CPU"
    bundle = load_bundle(bundle_dir)
    expected = {}
    for split in SPLITS:
        split_predictions = predict_split(bundle, dataset, split)
        expected.update(zip(split_predictions.ids, split_predictions.prediction))
    got = np.stack([np.array([row[a] for a in ATTRS]) for row in results.to_pylist()])
    want = np.stack([expected[Path(name).stem] for name in results["id"].to_pylist()])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.ptp(got, axis=0).min() > 0.01  # files give different predictions: the comparison is not trivial
    durations = dataset.read_table(columns=["id", "duration"]).to_pydict()
    by_id = dict(zip(durations["id"], durations["duration"]))
    assert [round(d, 4) for d in results["duration"].to_pylist()] == [
        round(by_id[Path(n).stem], 4) for n in results["id"].to_pylist()]
    reasons = dict(zip(rejects["id"].to_pylist(), rejects["reason"].to_pylist()))
    assert sorted(reasons) == ["corrupt.wav", "empty.wav", "short.wav"]
    assert reasons["corrupt.wav"].startswith("unreadable") and reasons["empty.wav"].startswith("unreadable")
    assert reasons["short.wav"].startswith("too short: 0.100 s")
    assert rejects["audio"].to_pylist()[0].endswith("corrupt.wav")
    assert summary.rejected_by_kind == {"unreadable": 2, "too short": 1}


@pytest.mark.slow
def test_csv_output_from_a_manifest_csv_matches_parquet(batch, bundle_dir, audio_folder, ray_cluster, tmp_path):
    _, results, _ = batch
    manifest = tmp_path / "to_score.csv"
    names = results["id"].to_pylist()[:3] + ["missing.wav"]
    manifest.write_text("id,audio,split\n" + "".join(f"{n},{audio_folder / n},unlabeled\n" for n in names))
    output = tmp_path / "predictions.csv"
    # the GPU layout: a separate decoding stage before the model actors (on CPUs Ray Data may fuse the two);
    # a pool that may grow to 3 replicas, more than the 1 CPU left beside decoding holds now (an autoscaler's case)
    summary = run_prediction(PredictConfig(model=bundle_dir, input=str(manifest), output=str(output),
                                           decode_in_actors=False, min_actors=1, actors=3))
    assert summary.actors == 3
    table = pacsv.read_csv(output)
    assert table["id"].to_pylist() == names[:3]
    for a in ATTRS:
        np.testing.assert_allclose(table[a].to_numpy(), results[a].to_numpy()[:3], rtol=0, atol=1e-6)
    rejects = pacsv.read_csv(tmp_path / "predictions.rejects.csv")
    assert rejects["id"].to_pylist() == ["missing.wav"] and rejects["reason"][0].as_py().startswith("unreadable")
    with pytest.raises(ConfigError, match="output"):
        PredictConfig(model=bundle_dir, input=str(manifest), output=str(tmp_path / "predictions.json"))
    with pytest.raises(ConfigError, match=r"'actors': 2 is below min_actors \(3\)"):
        PredictConfig(model=bundle_dir, input=str(manifest), output=str(output), min_actors=3, actors=2)
    with pytest.raises(ConfigError, match="'gpus_per_actor'"):
        PredictConfig(model=bundle_dir, input=str(manifest), output=str(output), gpus_per_actor=0)


@pytest.mark.slow
def test_one_file_prints_the_batch_result(batch, bundle_dir, audio_folder, job, capsys):
    _, results, _ = batch
    row = results.to_pylist()[2]
    command = [sys.executable, "jobs/predict.py", "--model", bundle_dir, str(audio_folder / row["id"])]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)  # as a user runs it
    assert done.returncode == 0, done.stderr
    values = printed_values(done.stdout)
    assert list(values) == list(ATTRS)
    for a in ATTRS:
        assert values[a] == pytest.approx(row[a], abs=1e-4)
    code, _, err = run_job(job, capsys, "--model", bundle_dir, str(audio_folder / "corrupt.wav"))
    assert code == 2 and "corrupt.wav: unreadable" in err


def test_models_from_mlflow_runs_and_the_registry(bundle_dir, audio_folder, tmp_path, job, capsys, monkeypatch):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking)
    experiment = client.create_experiment("predict", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking)
    try:
        with mlflow.start_run(run_id=run_id):
            log_bundle(bundle_dir, name="best_model")  # where the training job puts a run's best model
    finally:
        mlflow.set_tracking_uri(previous)
    audio = str(sorted(audio_folder.glob("*.flac"))[0])
    local = predict_file(load_bundle(bundle_dir), audio)
    from_run = load_model(f"runs:/{run_id}/best_model", tracking_uri=tracking)
    assert from_run.features == load_bundle(bundle_dir).features
    assert predict_file(from_run, audio) == pytest.approx(local, abs=1e-6)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    code, out, err = run_job(job, capsys, "--register", "emotion", "--run-id", run_id)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == "models:/emotion/1"
    code, out, err = run_job(job, capsys, "--model", "models:/emotion/1", audio)
    assert code == 0, err
    assert printed_values(out) == pytest.approx(local, abs=1e-4)
    code, _, err = run_job(job, capsys, "--register", "emotion", "--run-id", run_id, "--artifact", "nothing")
    assert code == 2 and f"runs:/{run_id}/nothing" in err


def test_a_file_much_longer_than_its_chunks_cover_warns(dataset, utterances, tmp_path):
    """Six real files end to end, twice (~40 s), scored as one number from 11 chunks of 62 frames (~11 s):
    said, not silent; one file alone is not warned about."""
    import warnings

    bundle = load_bundle(make_bundle(dataset, tmp_path / "bundle", chunk_settings(dataset)))
    long = tmp_path / "long.wav"
    sf.write(long, np.concatenate([sf.read(u.audio, dtype="float32")[0] for u in utterances * 2]), 16000)
    with pytest.warns(RuntimeWarning, match=r"long.wav: \d+\.\d s of audio scored as one number from chunks covering 10.9 s"):
        predict_file(bundle, str(long))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predict_file(bundle, utterances[0].audio)


def test_predictions_stay_in_the_range_of_the_training_labels_unless_raw(dataset, utterances, tmp_path):
    """A model's values can leave the 1-7 scale (one file got dominance 7.82); predictions are
    clipped to the range of the labels it was trained on, kept in its bundle."""
    bundle = load_bundle(make_bundle(dataset, tmp_path / "bundle", chunk_settings(dataset)))
    audio = utterances[0].audio
    raw = predict_file(bundle, audio, raw=True)
    middle = np.array([raw[a] for a in ATTRS])
    bundle.label_scaler = LabelScaler(ATTRS, bundle.label_scaler.mean, bundle.label_scaler.std,
                                      low=middle + 0.5, high=middle + 1.0)  # a range the raw values miss
    clipped = predict_file(bundle, audio)
    assert [clipped[a] for a in ATTRS] == pytest.approx(list(middle + 0.5))
    assert predict_file(bundle, audio, raw=True) == pytest.approx(raw)
    stored = load_bundle(make_bundle(dataset, tmp_path / "stored", chunk_settings(dataset))).label_scaler
    labels = dataset.read_table(["train"], list(ATTRS))
    assert stored.low.tolist() == [min(labels[a].to_pylist()) for a in ATTRS]  # the train labels' range
    assert stored.high.tolist() == [max(labels[a].to_pylist()) for a in ATTRS]


def test_a_bundle_without_features_is_refused_by_name(dataset, audio_folder, ray_cluster, tmp_path, job, capsys):
    old = make_bundle(dataset, tmp_path / "old-bundle", features=None)
    assert load_bundle(old).features is None
    with pytest.raises(PredictError, match=f"model bundle {old}: it has no feature settings"):
        run_prediction(PredictConfig(model=old, input=str(audio_folder), output=str(tmp_path / "p.parquet")))
    assert not (tmp_path / "p.parquet").exists()
    code, _, err = run_job(job, capsys, "--model", old, str(sorted(audio_folder.glob("*.flac"))[0]))
    assert code == 2 and f"model bundle {old}: it has no feature settings" in err
    other = {**chunk_settings(dataset), "features": {**dataset.settings["features"], "n_mels": 64}}
    with pytest.raises(ValueError, match=r"chunks of \(62, 64\)"):
        make_bundle(dataset, tmp_path / "mismatch", features=other)
    assert chunk_recipe(load_bundle(make_bundle(dataset, tmp_path / "new", chunk_settings(dataset)))).features.n_mels == 128
