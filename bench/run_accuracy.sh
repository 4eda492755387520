#!/usr/bin/env bash
# The accuracy figures of the README, as one background job (hours on a 2-core machine). Every trial
# is kept under outputs/bench/accuracy, so a killed run, started again, trains only what is missing.
# The runs are tracked in outputs/bench/mlflow.db, one experiment per sweep.
#   nohup bash bench/run_accuracy.sh > outputs/bench/accuracy.log 2>&1 &
# Run nothing else on Ray meanwhile: two Ray clusters on one machine confuse Ray Train's cleaner,
# which then removes the other cluster's training workers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
TRACK=(tracking.enabled=true "tracking.tracking_uri=sqlite:///$PWD/outputs/bench/mlflow.db")
mkdir -p outputs/bench
# Recipes on the bundled sample, demo conditions (2 epochs), 3 seeds: which optimisers are the default.
$PY bench/accuracy_bench.py --name recipes_sample --grid recipe=paper,default --reference recipe=paper \
  --ours recipe=default --epochs 2 --seeds 3 --max-concurrent 2 scaling.cpus_per_worker=0.5 "${TRACK[@]}"
# Precise BatchNorm against BatchNorm's running averages, demo config.
$PY bench/precise_bn_bench.py
# The four models on the bundled sample, 4 epochs, 1 seed.
$PY bench/accuracy_bench.py --epochs 4 --max-concurrent 2 scaling.cpus_per_worker=0.5 "${TRACK[@]}"
# CNN-regressor and DeepEmoCluster on all of RAVDESS (configs/train/ravdess_full.yaml: 2 workers,
# early stopping after 5 epochs without a better development loss), 1 seed, 6 epochs each: about
# 85 minutes for both on a 2-core machine (~250 s per CNN-regressor epoch, ~600 s per DeepEmoCluster
# epoch); the config's 30 epochs take about 7 hours.
$PY bench/accuracy_bench.py --name accuracy_ravdess_full --prep-config configs/prep/ravdess_full.yaml \
  --train-config configs/train/ravdess_full.yaml --grid model_kind=cnn_regressor,deepemocluster --epochs 6 \
  "${TRACK[@]}"
