#!/usr/bin/env bash
# The accuracy figures of the README, as one background job (hours on a 2-core machine): every trial is
# kept under outputs/bench/accuracy, so a killed run, started again, trains only what is missing.
#   nohup bash bench/run_accuracy.sh > outputs/bench/accuracy.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
# Recipes on the bundled sample, demo conditions (2 epochs), 3 seeds: which optimisers are the default.
$PY bench/accuracy_bench.py --name recipes_sample --grid recipe=paper,default --reference recipe=paper \
  --ours recipe=default --epochs 2 --seeds 3 --max-concurrent 2 scaling.cpus_per_worker=0.5
# The four models on the bundled sample, 4 epochs, 1 seed.
$PY bench/accuracy_bench.py --epochs 4 --max-concurrent 2 scaling.cpus_per_worker=0.5
# CNN-regressor and DeepEmoCluster on all of RAVDESS (configs/train/ravdess_full.yaml: 2 workers,
# up to 30 epochs, early stopping after 5 without a better development loss), 1 seed.
$PY bench/accuracy_bench.py --name accuracy_ravdess_full --prep-config configs/prep/ravdess_full.yaml \
  --train-config configs/train/ravdess_full.yaml --grid model_kind=cnn_regressor,deepemocluster --epochs 30
