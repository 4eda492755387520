#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the project with its pinned dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch first and pinned: the CPU wheel lies on these machines' disk; unpinned it pulls CUDA.
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -e ".[cpu,test]"  # cpu: faiss-cpu (the gpu extra has faiss-gpu)
  touch "$stamp"
fi
