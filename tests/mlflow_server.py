"""A real MLflow tracking server for tests, started the way the cluster starts it.

    with mlflow_server(tmp_path) as uri:        # http://127.0.0.1:<free port>
        TrackingConfig(tracking_uri=uri) ...

`mlflow_server` runs infra/mlflow/serve.sh (the launch script the cluster configs and the KubeRay
manifest use) with a sqlite store and an artifact folder under `root`, on 127.0.0.1 (serve.sh's
default: MLFLOW_HOST is left unset) and a free port, waits until /health answers, yields the URI,
and on exit stops the server's whole process group (mlflow server forks uvicorn workers).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVE_SCRIPT = REPO_ROOT / "infra" / "mlflow" / "serve.sh"
# Settings serve.sh reads; a developer's own values must not leak into a test server.
SERVER_ENV = (
    "MLFLOW_HOST", "MLFLOW_PORT", "MLFLOW_WORKERS", "MLFLOW_BACKEND_STORE_URI",
    "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_SERVER_ALLOWED_HOSTS", "MLFLOW_SERVER_DIR", "MLFLOW_BIN",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
)


class MlflowServerError(RuntimeError):
    """The server exited or did not answer in time; the message carries its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(
    root: Path, *, env: dict[str, str] | None = None, timeout_s: float = 300.0
) -> Iterator[str]:
    """Serve an MLflow store kept under `root` (mlflow.db, artifacts/, server.log); yields its URI.

    `env` adds serve.sh settings (e.g. MLFLOW_SERVER_ALLOWED_HOSTS); one worker process by default,
    the machine has two cores.
    """
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server_env = {k: v for k, v in os.environ.items() if k not in SERVER_ENV}
    server_env.update(
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
        MLFLOW_SERVER_DIR=str(root),
        MLFLOW_BIN=str(Path(sys.executable).with_name("mlflow")),  # the venv's, whatever PATH says
    )
    server_env.update(env or {})
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["bash", str(SERVE_SCRIPT)], cwd=root, env=server_env, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        uri = f"http://127.0.0.1:{port}"
        _wait_until_healthy(uri, process, log_path, timeout_s)
        yield uri
    finally:
        _stop(process)


def _wait_until_healthy(uri: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise MlflowServerError(f"mlflow server exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise MlflowServerError(f"mlflow server at {uri} did not answer /health in {timeout_s:.0f} s:\n{_tail(log_path)}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (its own session), SIGKILL what is left after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 0)  # forked workers may outlive the main process
                continue
            break
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
