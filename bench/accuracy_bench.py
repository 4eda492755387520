"""Test CCC of DeepEmoCluster and the paper's three baselines on RAVDESS, with the paper's statistics.

    python bench/accuracy_bench.py [--prep-config configs/prep/ravdess_sample.yaml]
        [--train-config configs/train/ravdess_sample.yaml] [--epochs 4] [--seeds 1] [key=value ...]

A sweep (`cluster_train/sweep.py`) over the model kinds x seeds: each trains with the same config,
data and seeds through the real job (Ray Train, K-means actor, MLflow off), its best checkpoint is
scored at sentence level on the test split, and `evaluation.compare_models` gives mean CCC over 4
random test subsets x seeds with a two-tailed t-test against the CNN-regressor. Trained models are
kept in --storage; a rerun trains only what is missing. The prepared dataset is made first when
missing. Writes
bench/results/accuracy_ravdess.json: value = DeepEmoCluster's test CCC averaged over the attributes,
baseline = the CNN-regressor's, both from this run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster_train.evaluation import format_comparison  # noqa: E402
from cluster_train.models import MODEL_KINDS  # noqa: E402
from cluster_train.sweep import SweepConfig, run_sweep  # noqa: E402
from data_prep.config import PrepConfig, load_config  # noqa: E402
from data_prep.dataset import DatasetError, PreparedDataset  # noqa: E402

REFERENCE = "cnn_regressor"


def prepared_dataset(prep_config: str) -> PreparedDataset:
    config = load_config(PrepConfig, REPO / prep_config, ["progress=false"])
    output = config.output if "://" in config.output else str((REPO / config.output).resolve())
    try:
        return PreparedDataset(output)
    except DatasetError:
        from data_prep.pipeline import run_prep

        run_prep(load_config(PrepConfig, REPO / prep_config, ["progress=false", f"output={output}"]))
        return PreparedDataset(output)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prep-config", default="configs/prep/ravdess_sample.yaml")
    parser.add_argument("--train-config", default="configs/train/ravdess_sample.yaml")
    parser.add_argument("--models", nargs="+", default=list(MODEL_KINDS), choices=MODEL_KINDS)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=1, help="training runs per model (the paper: 5)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-concurrent", type=int, default=1, help="trials training at once")
    parser.add_argument("--storage", default=str(REPO / "outputs/bench/accuracy"), help="trained models, reused")
    parser.add_argument("--output", default=str(REPO / "bench/results/accuracy_ravdess.json"))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="more training config overrides")
    args = parser.parse_args(argv)
    if REFERENCE not in args.models:
        parser.error(f"--models must include the reference {REFERENCE}")

    dataset = prepared_dataset(args.prep_config)
    sweep = SweepConfig(
        name="accuracy-ravdess", train_config=str(REPO / args.train_config),
        overrides=[f"data.dataset={dataset.location}", f"epochs={args.epochs}", "tracking.enabled=false",
                   f"storage_path={args.storage}", *args.overrides],
        grid={"model_kind": list(args.models)}, seeds=list(range(args.seeds)),
        reference=f"model_kind={REFERENCE}", split=args.split, max_concurrent=args.max_concurrent, output=str(Path(args.storage) / "tables"))
    import ray

    ray.init(address="local", logging_level="WARNING", include_dashboard=False)
    result = run_sweep(sweep)
    ray.shutdown()
    table = result.table
    print(format_comparison(table))

    def average(kind: str) -> float:
        means = [row["mean"] for row in table["models"][f"model_kind={kind}"]["ccc"].values()]
        return sum(means) / len(means)

    ours = "deepemocluster" if "deepemocluster" in args.models else args.models[0]
    runs = [{k: run.get(k) for k in ("point", "seed", "seconds", "epochs_run", "scores", "reused", "note")}
            | {"seconds_per_step_last_epoch": {k.removeprefix("seconds_"): round(v, 1)
                                               for k, v in run.get("last_epoch", {}).items() if k.startswith("seconds_")},
               "best_epoch": run.get("last_epoch", {}).get("best_epoch")}
            for run in result.runs]
    report = {
        "name": "accuracy_ravdess",
        "value": round(average(ours), 4),
        "unit": f"test CCC, mean of arousal/dominance/valence ({ours})",
        "baseline": f"{REFERENCE}, same data, epochs and seeds, same run",
        "baseline_value": round(average(REFERENCE), 4),
        "ratio": round(average(ours) / average(REFERENCE), 4),
        "command": "python bench/accuracy_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "details": {
            "dataset": dataset.location, "dataset_hash": dataset.dataset_hash, "split": args.split,
            "train_config": args.train_config, "epochs": args.epochs, "seeds": args.seeds,
            "comparison": {k: v for k, v in table.items() if k != "runs"}, "runs": runs,
            "total_training_seconds": round(sum(r["seconds"] or 0 for r in runs), 1),
            "machine": f"{os.cpu_count()} CPUs, no GPU, shared with other jobs while it ran",
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
    }
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
