"""Train one small, fixed DeepEmoCluster run with the code of the current checkout and print its
metrics and scores as JSON (after the trainer's epoch lines, which carry timings): run it in two
checkouts and compare the JSON to show a change leaves training unchanged.

    python scripts/training_fingerprint.py <work folder> > fingerprint.txt

The run: the RAVDESS sample (prepared into <work folder>/prepared by this checkout's prep),
25% of the labels, 2 epochs, one process without Ray, seed 3. Timings are left out.
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

    config = load_train_config(REPO / "configs/train/ravdess_sample.yaml", [
        f"data.dataset={prepared}", "scaling.num_workers=0", f"storage_path={work}/runs", "epochs=2",
        "data.label_fraction=0.25", "tracking.enabled=false", "name=fingerprint", "seed=3",
        "precise_bn.utterances=32"])
    result = run_training(config)
    metrics = {k: v for k, v in sorted(result.metrics.items()) if not k.startswith("time/") and k != "mlflow_run_id"}
    print(json.dumps({"metrics": metrics, "scores": result.scores}, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
