#!/usr/bin/env bash
# docs/RESULTS.md's experiments from scratch: prepare all of RAVDESS, train both sweeps, write their
# reports to docs/results/. Each sweep prints its time estimate first (many hours on 2 cores); stopped,
# run it again: finished trials are kept, a trial cut short goes on from its last epoch.
# Every finished trial leaves a record in docs/results/<sweep>/trials/ (kept in git), so a run on a
# new machine trains only the trials without one. The order fills RESULTS.md soonest: the controls
# beside the headline's seeds 0-1 and Fig. 3's model; Table 3 (unlabeled audio); Table 2 (all
# labels); Table 4 (K); the search; then the rest of the 25%-label sweep (the headline's seeds 2-4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python jobs/prep.py --config configs/prep/ravdess_full.yaml  # does nothing once prepared

sweep() { .venv/bin/python jobs/sweep.py --config "configs/sweep/$1.yaml" "${@:2}"; }
report() { .venv/bin/python jobs/report.py --config "configs/sweep/$1.yaml" --output "docs/results/${1//_/-}"; }

# the headline's seeds 0-1 (the reference, the CNN-regressor, comes with every --only), the controls, Fig. 3's model
sweep ravdess_quarter --only deepemocluster,dec_shuffled_labels,cnn_regressor_matched_steps,dec_stage1_off,\
dec_unsupervised_only 'seeds=[0,1]'
sweep ravdess_quarter --only dec_unlabeled_0,dec_unlabeled_1of3,dec_unlabeled_2of3  # Table 3, 2 seeds each
report ravdess_quarter
sweep ravdess_table2
report ravdess_table2
sweep ravdess_quarter --only dec_k20,dec_k30  # Table 4: K = 20 and 30 beside the headline's K = 10, 2 seeds each
report ravdess_quarter
sweep ravdess_quarter_search  # K and the cluster weight searched on development, the choice retrained on seeds 0-1
report ravdess_quarter_search
sweep ravdess_quarter  # the rest: the headline's seeds 2-4
report ravdess_quarter
