#!/usr/bin/env bash
# Set everything up and run the main job end to end on the RAVDESS sample shipped in data/:
# prepare Parquet mel frames with Ray Data, train DeepEmoCluster with Ray Train (local Ray, faiss
# K-means, a local MLflow store in ./mlflow.db), then score the best checkpoint on dev and test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python jobs/prep.py --config configs/prep/ravdess_sample.yaml
.venv/bin/python jobs/train.py --config configs/train/ravdess_sample.yaml "$@"
