#!/usr/bin/env bash
# Set everything up and run the main job end to end on the RAVDESS sample shipped in data/:
# prepare Parquet mel chunks with Ray Data (local Ray).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python jobs/prep.py --config configs/prep/ravdess_sample.yaml "$@"
