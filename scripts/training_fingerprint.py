"""Train one small, fixed DeepEmoCluster run with the code of the current checkout and print its
metrics and scores as JSON (after the trainer's epoch lines, which carry timings): run it in two
checkouts and compare the JSON to show a change leaves training unchanged.

    python scripts/training_fingerprint.py <work folder> [--tune] > fingerprint.txt

The run: the RAVDESS sample (prepared into <work folder>/prepared by this checkout's prep),
25% of the labels, 2 epochs, one process without Ray, seed 3. Timings are left out. `--tune`: the
same run as the one trial of a sweep, trained as a Ray Tune trial (`experiments/tuning.py`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    work = Path(sys.argv[1]).resolve()
    prepared = work / "prepared"
    if not (prepared / "dataset.json").exists():
        subprocess.run([sys.executable, "jobs/prep.py", "--config", "configs/prep/ravdess_sample.yaml",
                        f"output={prepared}", "progress=false"], cwd=REPO, check=True, stdout=sys.stderr)
    sys.path.insert(0, str(REPO))
    from cluster_train.train.config import load_train_config
    from cluster_train.train.launch import run_training

    overrides = [f"data.dataset={prepared}", "scaling.num_workers=0", f"storage_path={work}/runs", "epochs=2",
                 "data.label_fraction=0.25", "tracking.enabled=false", "precise_bn.utterances=32"]
    if "--tune" in sys.argv[2:]:
        from cluster_train.experiments.sweep import SweepConfig, run_sweep

        sweep = SweepConfig(name="fingerprint", train_config=str(REPO / "configs/train/ravdess_sample.yaml"),
                            overrides=overrides, seeds=[3], subsets=1, output=str(work / "sweeps"),
                            records=str(work / "records"))
        [run] = run_sweep(sweep).runs
        found, scores = run["last_epoch"], run["scores"]
    else:
        config = load_train_config(REPO / "configs/train/ravdess_sample.yaml", [*overrides, "name=fingerprint", "seed=3"])
        result = run_training(config)
        found, scores = result.metrics, result.scores
    metrics = {k: v for k, v in sorted(found.items()) if not k.startswith("time/") and k != "mlflow_run_id"}
    print(json.dumps({"metrics": metrics, "scores": scores}, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
