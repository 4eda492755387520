"""Shared fixtures: the real RAVDESS sample shipped in data/ravdess_sample."""

from __future__ import annotations

import sys
from pathlib import Path

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
