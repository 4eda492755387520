"""The MLflow model that takes audio: logged to a real sqlite store, loaded with
`mlflow.pyfunc.load_model` and served by `mlflow models serve --env-manager local` on 127.0.0.1,
against `jobs/predict.py`'s numbers for the same real RAVDESS files.

The bundle is untrained (seeded weights, Kaiming-initialised so that files give different values) with
a normaliser from the real mel frames of sample files: what is checked is that the MLflow model
computes what the CLI computes, which needs no training and no Ray.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import yaml
from torch import nn

from cluster_train.data.labels import LabelScaler
from cluster_train.model.blocks import ModelConfig
from cluster_train.model.kinds import build_model
from cluster_train.serve.bundle import load_bundle, resolve_bundle, save_bundle
from cluster_train.serve.predict import predict_file
from cluster_train.serve.pyfunc import AudioScorer, log_audio_model, pinned_requirements
from cluster_train.tracking import mlflow_globals
from data_prep.config import ChunkConfig, FeatureConfig
from data_prep.shards import ChunkRecipe
from data_prep.stats import Normalizer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "ravdess_sample"
ATTRS = ("arousal", "dominance", "valence")


def sample_audio(count: int = 3) -> list[Path]:
    """Real RAVDESS files of different actors."""
    files = sorted(SAMPLE.glob("Actor_*/*.flac"))
    return files[:: max(1, len(files) // count)][:count]


def make_audio_bundle(folder: Path, seed: int = 0) -> str:
    """A bundle that scores raw audio: seeded weights, the normaliser of real sample frames, RAVDESS's
    label range, the default feature and chunk settings."""
    recipe = ChunkRecipe(FeatureConfig(), ChunkConfig())
    mel = np.concatenate([recipe.load_frames(str(f)).mel for f in sample_audio(4)])
    normalizer = Normalizer(mel.mean(axis=0), mel.std(axis=0))
    scaler = LabelScaler(ATTRS, [3.2, 3.0, 3.9], [1.2, 1.1, 1.4], low=[1.0, 1.0, 1.0], high=[7.0, 7.0, 7.0])
    torch.manual_seed(seed)
    model = build_model("deepemocluster", ModelConfig())
    for layer in model.modules():  # PyTorch's default init shrinks the signal ~6x per layer: outputs ~constant
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    save_bundle(str(folder), model, "deepemocluster", ModelConfig(), normalizer, scaler, features=recipe.settings(),
                extra={"epoch": 1, "dev_loss": 0.5})  # as the checkpointer saves it
    return str(folder)


def cli_values(bundle_dir: str, files: list[Path]) -> np.ndarray:
    """What `jobs/predict.py --model M FILE` prints, per file (its function, in this process)."""
    bundle = load_bundle(bundle_dir)
    return np.array([[predict_file(bundle, str(f))[a] for a in ATTRS] for f in files])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> str:
    return make_audio_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, str]:
    """A sqlite MLflow store and a run in it; (tracking URI, run id)."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("pyfunc", artifact_location=(folder / "artifacts").as_uri())
    return uri, client.create_run(experiment).info.run_id


@pytest.fixture(scope="module")
def logged(bundle_dir, store):
    uri, run_id = store
    client = mlflow.MlflowClient(uri)
    for epoch, value in enumerate([0.513, 0.553, 0.541]):  # the weights are epoch 1's
        client.log_metric(run_id, "dev/ccc_arousal", value, step=epoch)
    info = log_audio_model(bundle_dir, "best_model", run_id=run_id, tracking_uri=uri, step=1)
    return uri, run_id, info


@pytest.fixture(scope="module")
def loaded(logged):
    """The logged model, loaded the way users load it (a runs:/ URI; models:/ URIs in test_registry.py)."""
    uri, run_id, _ = logged
    with mlflow_globals(uri):
        return mlflow.pyfunc.load_model(f"runs:/{run_id}/best_model")


def test_loaded_model_predicts_what_the_cli_prints(loaded, bundle_dir):
    files = sample_audio(3)
    want = cli_values(bundle_dir, files)
    assert np.ptp(want, axis=0).min() > 0.01  # the files differ: the comparison is not trivial
    got = loaded.predict(pd.DataFrame({"audio": [f.read_bytes() for f in files]}))
    assert list(got.columns) == ["input", "start", "end", *ATTRS]
    assert got["input"].tolist() == [0, 1, 2] and (got["start"] == 0).all()
    np.testing.assert_allclose(got[list(ATTRS)].to_numpy(), want, rtol=0, atol=1e-5)
    by_uri = loaded.predict(pd.DataFrame({"uri": [str(f) for f in files]}))
    np.testing.assert_allclose(by_uri[list(ATTRS)].to_numpy(), want, rtol=0, atol=1e-5)
    durations = [sf.info(str(f)).duration for f in files]
    np.testing.assert_allclose(got["end"].to_numpy(), durations, atol=1e-3)


def test_logged_model_has_signature_example_code_and_installable_requirements(logged, tmp_path):
    uri, run_id, info = logged
    with mlflow_globals(uri):
        folder = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
        meta = mlflow.models.get_model_info(info.model_uri)
        logged_model = mlflow.get_logged_model(info.model_id)
    inputs = {c["name"]: c for c in json.loads(meta.signature.inputs.to_json())}
    assert inputs["audio"]["type"] == "binary" and inputs["uri"]["type"] == "string"
    assert {p.name for p in meta.signature.params} == {"raw", "window_seconds"}
    assert (folder / "serving_input_example.json").is_file()
    assert (folder / "code" / "cluster_train" / "serve" / "pyfunc.py").is_file()
    assert (folder / "code" / "data_prep" / "shards.py").is_file()
    assert (folder / "artifacts" / "model.pt").is_file()
    assert not list(folder.rglob("*.pkl")), "nothing in the model is a pickle"
    assert yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"].get("model_code_path")
    requirements = (folder / "requirements.txt").read_text().split()
    assert requirements == pinned_requirements()
    assert all("+" not in line and "==" in line for line in requirements)
    assert "torch==" + torch.__version__.split("+")[0] in requirements
    assert logged_model.source_run_id == run_id
    assert {m.key: m.value for m in logged_model.metrics} == {"dev/ccc_arousal": 0.553}  # its epoch's, not epoch 0's
    # the bundle beside it: the project's own loaders read runs:/ URIs of this model too
    with mlflow_globals(uri):
        assert resolve_bundle(f"runs:/{run_id}/best_model").model_kind == "deepemocluster"


def test_bad_audio_names_the_row_and_the_reason(loaded):
    model = loaded
    good = sample_audio(1)[0].read_bytes()
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"row 1 \(uploaded audio\): unreadable"):
        model.predict(pd.DataFrame({"audio": [good, b"RIFF" + bytes(range(256)) * 8]}))
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"row 0 \(/nonexistent/a.wav\): unreadable"):
        model.predict(pd.DataFrame({"uri": ["/nonexistent/a.wav"]}))
    with pytest.raises(mlflow.exceptions.MlflowException, match="window_seconds"):
        model.predict(pd.DataFrame({"audio": [good]}), params={"window_seconds": -1.0})


def test_long_audio_windows_have_their_times_and_a_single_number_warns(bundle_dir, caplog):
    """Three real files laid end to end: windows of each file's length give that file's own number."""
    scorer = AudioScorer(load_bundle(bundle_dir))
    files = sample_audio(3)
    waves = [sf.read(str(f), dtype="float32")[0] for f in files]
    waves = [0.5 * w / np.abs(w).max() for w in waves]  # one peak: the features' peak normalisation is per file
    hop = scorer.seconds_per_frame
    # each piece a whole number of frames long, so that a window boundary falls on a file boundary
    size = max(len(w) for w in waves) // 256 * 256 + 256 * 8
    padded = [np.pad(w, (0, size - len(w))) for w in waves]
    buffer = io.BytesIO()
    sf.write(buffer, np.concatenate(padded * 3), 16000, format="WAV", subtype="FLOAT")
    audio = scorer.frames(buffer.getvalue(), "long.wav")
    window = size / 16000
    scored = scorer.score([audio], window_seconds=window)
    assert len(scored) == 9
    assert [round(s.start, 3) for s in scored] == [round(i * size * hop / 256, 3) for i in range(9)]
    single = []
    for w in padded:
        one = io.BytesIO()
        sf.write(one, w, 16000, format="WAV", subtype="FLOAT")
        single.append(scorer.score([scorer.frames(one.getvalue(), "one.wav")])[0].values)
    windows = np.stack([s.values for s in scored])
    single = np.stack(single)
    # only the frames at a window's edges see the neighbouring file (the STFT's window overlaps it)
    np.testing.assert_allclose(windows, np.tile(single, (3, 1)), atol=0.08)
    nearest = [int(np.argmin(np.abs(single - w).sum(axis=1))) for w in windows]
    assert nearest == [0, 1, 2] * 3 and np.ptp(single, axis=0).max() > 0.05
    minutes = np.tile(waves[0], int(60 * 16000 / len(waves[0])) + 1)
    buffer = io.BytesIO()
    sf.write(buffer, minutes, 16000, format="WAV", subtype="FLOAT")
    with caplog.at_level("WARNING"):
        scorer.score([scorer.frames(buffer.getvalue(), "minute.wav")], names=["minute.wav"])
    assert "minute.wav: 62.8 s of audio scored as one number from chunks covering 10.9 s" in caplog.text


@pytest.mark.slow
def test_mlflow_models_serve_answers_the_cli_numbers(logged, bundle_dir, tmp_path):
    uri, run_id, _ = logged
    files = sample_audio(2)
    want = cli_values(bundle_dir, files)
    port = free_port()
    # mlflow starts `uvicorn` by name: this venv's scripts must be on PATH (CI runs .venv/bin/python
    # without activating the venv)
    scripts = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow_cli = str(Path(scripts) / "mlflow")
    server = subprocess.Popen([mlflow_cli, "models", "serve", "-m", f"runs:/{run_id}/best_model", "--env-manager",
                               "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=(tmp_path / "serve.log").open("w"))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow models serve did not answer within 120 s"
                time.sleep(1)
        body = {"dataframe_split": {"columns": ["audio"],
                                    "data": [[base64.b64encode(f.read_bytes()).decode()] for f in files]}}
        answer = post_json(f"http://127.0.0.1:{port}/invocations", body)
        got = np.array([[row[a] for a in ATTRS] for row in answer[1]["predictions"]])
        assert answer[0] == 200
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        bad = {"dataframe_split": {"columns": ["audio"], "data": [[base64.b64encode(b"not audio").decode()]]}}
        status, error = post_json(f"http://127.0.0.1:{port}/invocations", bad)
        assert status == 400 and "row 0 (uploaded audio): unreadable" in error["message"]
    finally:
        server.terminate()
        server.wait(30)


def post_json(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow  # torch.export of the network: ~30 s here
def test_the_network_alone_is_logged_without_pickle_and_scores_chunks(bundle_dir, store, tmp_path):
    from cluster_train.serve.pyfunc import log_network
    from data_prep.chunking import cut_chunks

    uri, run_id = store
    info = log_network(bundle_dir, run_id=run_id, tracking_uri=uri, step=1)
    with mlflow_globals(uri):
        folder = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
        network = mlflow.pytorch.load_model(info.model_uri)
    assert not list(folder.rglob("*.pkl")) and list(folder.rglob("*.pt2"))
    bundle = load_bundle(bundle_dir)
    chunks = bundle.chunks
    for path in sample_audio(2):
        frames = ChunkRecipe.from_settings(bundle.features).load_frames(str(path)).stored
        cut = cut_chunks(frames, np.array([len(frames)]), chunks.num_chunks, chunks.chunk_frames)[0]
        with torch.inference_mode():
            sentence = network(torch.from_numpy(cut.astype(np.float32))).mean(dim=0).numpy()
        want = predict_file(bundle, str(path), raw=True)
        np.testing.assert_allclose(sentence, [want[a] for a in ATTRS], rtol=0, atol=1e-4)
