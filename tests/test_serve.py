"""The Ray Serve endpoint on a real local Ray: HTTP on 127.0.0.1, real RAVDESS files, the model read
from the MLflow registry by alias (`models:/emotion@champion`), answers equal to `jobs/predict.py`'s.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
import soundfile as sf
from ray import serve

from cluster_train.serve.endpoint import EndpointConfig, build_app, run_endpoint
from cluster_train.serve.pyfunc import log_audio_model
from data_prep.config import ConfigError
from test_pyfunc import ATTRS, cli_values, make_audio_bundle, sample_audio

pytestmark = pytest.mark.slow  # a Ray and Serve start: ~30 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, data: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def multipart(name: str, data: bytes, field: str = "file") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> tuple[str, str]:
    """A bundle logged as the pyfunc to a sqlite store and registered as emotion@champion; (uri, bundle)."""
    folder = tmp_path_factory.mktemp("serve")
    bundle_dir = make_audio_bundle(folder / "bundle")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("serve", artifact_location=(folder / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    info = log_audio_model(bundle_dir, run_id=run_id, tracking_uri=uri, registered_model_name="emotion")
    client.set_registered_model_alias("emotion", "champion", info.registered_model_version)
    return uri, bundle_dir


@pytest.fixture(scope="module")
def endpoint(registered):
    uri, _ = registered
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    config = EndpointConfig(model="models:/emotion@champion", tracking_uri=uri, num_cpus=0.5, max_replicas=2,
                            max_batch_size=4, batch_wait_timeout_s=0.2,
                            uri_prefixes=[str(Path(sample_audio(1)[0]).parents[1])])
    run_endpoint(config, "127.0.0.1", port)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def test_uploads_and_uris_answer_the_cli_numbers(endpoint, registered):
    _, bundle_dir = registered
    files = sample_audio(3)
    want = cli_values(bundle_dir, files)
    status, one = post(f"{endpoint}/predict", *multipart(files[0].name, files[0].read_bytes()))
    assert status == 200, one
    status, two = post(f"{endpoint}/predict", files[1].read_bytes(), "audio/flac")
    assert status == 200, two
    status, three = post(f"{endpoint}/predict", json.dumps({"uri": str(files[2])}).encode(), "application/json")
    assert status == 200, three
    got = np.array([[answer[a] for a in ATTRS] for answer in (one, two, three)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert one["duration"] == pytest.approx(sf.info(str(files[0])).duration, abs=1e-3) and one["warnings"] == []
    with urllib.request.urlopen(f"{endpoint}/healthz", timeout=30) as response:
        health = json.loads(response.read())
    assert health["model"] == "models:/emotion@champion" and health["attributes"] == list(ATTRS)


def test_concurrent_requests_are_batched(endpoint, registered):
    _, bundle_dir = registered
    files = sample_audio(4)
    want = cli_values(bundle_dir, files)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda f: post(f"{endpoint}/predict", f.read_bytes(), "audio/flac"), files * 2))
    assert all(status == 200 for status, _ in answers), answers
    got = np.array([[answer[a] for a in ATTRS] for _, answer in answers])
    np.testing.assert_allclose(got, np.concatenate([want, want]), rtol=0, atol=1e-5)
    assert max(answer["batch_size"] for _, answer in answers) > 1  # scored together, not one by one


def test_windows_have_their_times(endpoint):
    status, answer = post(f"{endpoint}/predict?window_seconds=1.5", sample_audio(1)[0].read_bytes(), "audio/flac")
    assert status == 200, answer
    windows = answer["windows"]
    assert len(windows) >= 2 and windows[0]["start"] == 0 and windows[1]["start"] == pytest.approx(1.5, abs=0.02)
    assert windows[-1]["end"] == pytest.approx(answer["duration"], abs=1e-6)


def test_bad_requests_get_a_clear_4xx(endpoint):
    corrupt = b"RIFF" + bytes(range(256)) * 8
    status, answer = post(f"{endpoint}/predict", *multipart("corrupt.wav", corrupt))
    assert status == 400 and answer["error"].startswith("uploaded audio: unreadable"), answer
    status, answer = post(f"{endpoint}/predict", json.dumps({"uri": "/etc/passwd"}).encode(), "application/json")
    assert status == 403 and "/etc/passwd: not under an allowed URI prefix" in answer["error"]
    status, answer = post(f"{endpoint}/predict", b"{}", "text/plain")
    assert status == 415 and "Content-Type text/plain" in answer["error"]
    status, answer = post(f"{endpoint}/predict", *multipart("a.wav", b"x", field="audio"))
    assert status == 400 and "no file field 'file'" in answer["error"]
    status, answer = post(f"{endpoint}/predict?window_seconds=-2", corrupt, "audio/wav")
    assert status == 400 and "window_seconds='-2'" in answer["error"]
    status, answer = post(f"{endpoint}/predict", b"\0" * 1000, "audio/wav")
    assert status == 400 and "unreadable" in answer["error"]


def test_a_model_that_does_not_load_fails_before_deploying(tmp_path):
    with pytest.raises(Exception, match=f"{tmp_path}: no model bundle here"):
        run_endpoint(EndpointConfig(model=str(tmp_path)), "127.0.0.1", free_port())
    with pytest.raises(ConfigError, match="min_replicas"):
        EndpointConfig(model="x", min_replicas=3, max_replicas=2)
    app = build_app(EndpointConfig(model="x", min_replicas=0, max_replicas=5, target_ongoing_requests=3))
    autoscaling = app._bound_deployment._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (0, 5, 3)
