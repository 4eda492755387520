"""Shared fixtures: the real RAVDESS sample shipped in data/ravdess_sample."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# The project is not installed into the venv; make `import data_prep` work under plain `pytest`.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SAMPLE_DIR = REPO_ROOT / "data" / "ravdess_sample"


@pytest.fixture(scope="session")
def sample_files() -> list[Path]:
    """Sorted paths of the sample FLACs (16 kHz mono)."""
    files = sorted(SAMPLE_DIR.glob("Actor_*/*.flac"))
    assert files, f"no sample FLACs under {SAMPLE_DIR}"
    return files


def train_sample_manifest(folder: Path) -> Path:
    """A CSV manifest of 24 sample utterances (8 per split, with their emotion category), for
    end-to-end training tests."""
    from data_prep.importers import import_ravdess

    rows = import_ravdess(str(SAMPLE_DIR))
    chosen = [u for split in ("train", "development", "test") for u in [r for r in rows if r.split == split][::15][:8]]
    manifest = folder / "manifest.csv"
    manifest.write_text("id,audio,split,arousal,dominance,valence,category\n" + "".join(
        f"{u.id},{u.audio},{u.split},{u.arousal},{u.dominance},{u.valence},{u.category}\n" for u in chosen))
    return manifest


_PREPARED_SAMPLE = Path(tempfile.mkdtemp(prefix="prepared-sample-")) / "prepared"  # this session's first
atexit.register(shutil.rmtree, _PREPARED_SAMPLE.parent, ignore_errors=True)


def prepare_train_sample(folder: Path) -> Path:
    """`train_sample_manifest` prepared with the real pipeline into `folder`/prepared. The session's
    first call prepares it (Ray must be running) and keeps a copy that later calls copy: prep is
    deterministic, and tests/test_pipeline.py tests it."""
    from data_prep.config import PrepConfig, load_config
    from data_prep.pipeline import run_prep

    manifest = train_sample_manifest(folder)
    if _PREPARED_SAMPLE.exists():
        return Path(shutil.copytree(_PREPARED_SAMPLE, folder / "prepared"))
    run_prep(load_config(PrepConfig, None, [f"sources=[{{kind: csv, path: {manifest}}}]",
                                            f"output={folder / 'prepared'}", "progress=false"]))
    shutil.copytree(folder / "prepared", _PREPARED_SAMPLE)
    return folder / "prepared"


@contextlib.contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[None]:
    """A local Ray of `num_cpus` CPUs for one test module, shut down after it."""
    import ray

    with pytest.MonkeyPatch.context() as environment:
        if "RAY_agent_register_timeout_ms" not in os.environ:  # Ray starts slowly on a busy machine
            environment.setenv("RAY_agent_register_timeout_ms", "120000")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
        try:
            yield
        finally:
            ray.shutdown()


def gloo_pair(actor_class, tries: int = 3) -> list:
    """Two actors of `actor_class` joined by gloo through their `setup(rank, world_size, port)`. The
    port is free when picked but may be taken before rank 0 binds it: then the actors are dropped and
    it is tried again with another."""
    import ray

    for attempt in range(tries):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        handles = [actor_class.remote() for _ in range(2)]
        try:
            ray.get([r.setup.remote(i, 2, port) for i, r in enumerate(handles)], timeout=120)
            return handles
        except (ray.exceptions.RayError, TimeoutError):
            for handle in handles:
                ray.kill(handle)
            if attempt == tries - 1:
                raise
