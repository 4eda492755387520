#!/usr/bin/env bash
# docs/RESULTS.md's experiments from scratch: prepare all of RAVDESS, train both sweeps, write their
# reports to docs/results/. Each sweep prints its time estimate first (many hours on 2 cores); stopped,
# run it again: finished trials are kept, a trial cut short goes on from its last epoch.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python jobs/prep.py --config configs/prep/ravdess_full.yaml  # does nothing once prepared
for sweep in ravdess_quarter ravdess_table2; do
  .venv/bin/python jobs/sweep.py --config "configs/sweep/$sweep.yaml"
  .venv/bin/python jobs/report.py --config "configs/sweep/$sweep.yaml" --output "docs/results/${sweep//_/-}"
done
