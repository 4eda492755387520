"""Test CCC of DeepEmoCluster and the paper's three baselines on RAVDESS, with the paper's statistics.

    python bench/accuracy_bench.py [--prep-config configs/prep/ravdess_sample.yaml]
        [--train-config configs/train/ravdess_sample.yaml] [--epochs 4] [--seeds 1] [key=value ...]
    python bench/accuracy_bench.py --name recipes_sample --grid recipe=paper,default \
        --reference recipe=paper --ours recipe=default --epochs 2 --seeds 3

A sweep (`cluster_train/experiments/sweep.py`) over one grid (default: the model kinds) x seeds: each trains with
the same config, data and seeds through the real job (Ray Train, K-means actor, MLflow off), its best
checkpoint is scored at sentence level on the test split, and `evaluation.compare_models` gives mean
CCC over 4 random test subsets x seeds with a two-tailed t-test against the reference. Trained models
are kept in --storage; a rerun trains only what is missing. The prepared dataset is made first when
missing. Writes bench/results/<name>.json: value = the --ours point's test CCC averaged over the
attributes, baseline = the reference's, both from this run.
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

from cluster_train.experiments.sweep import SweepConfig, run_sweep  # noqa: E402
from cluster_train.model.kinds import MODEL_KINDS  # noqa: E402
from cluster_train.serve.evaluate import format_comparison  # noqa: E402
from cluster_train.tracking import git_commit  # noqa: E402
from data_prep.config import PrepConfig, load_config  # noqa: E402
from data_prep.dataset import DatasetError, PreparedDataset  # noqa: E402


def cpu_model() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")


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
    parser.add_argument("--name", default="accuracy_ravdess", help="the sweep and bench/results/<name>.json")
    parser.add_argument("--grid", default="model_kind=" + ",".join(MODEL_KINDS),
                        help="KEY=V1,V2,...: the training setting compared (default: the four models)")
    parser.add_argument("--reference", default="model_kind=cnn_regressor", help="the grid point tested against")
    parser.add_argument("--ours", default="model_kind=deepemocluster", help="the grid point the value reports")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=1, help="training runs per model (the paper: 5)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-concurrent", type=int, default=1, help="trials training at once")
    parser.add_argument("--storage", default=str(REPO / "outputs/bench/accuracy"), help="trained models, reused")
    parser.add_argument("--output", help="default: bench/results/<name>.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="more training config overrides")
    args = parser.parse_args(argv)
    key, _, values = args.grid.partition("=")
    points = [f"{key}={value}" for value in values.split(",")]
    for flag in ("reference", "ours"):
        if getattr(args, flag) not in points:
            parser.error(f"--{flag} {getattr(args, flag)} is not one of the grid points {points}")
    output = args.output or str(REPO / "bench" / "results" / f"{args.name}.json")

    dataset = prepared_dataset(args.prep_config)
    sweep = SweepConfig(
        name=args.name.replace("_", "-"), train_config=str(REPO / args.train_config),
        overrides=[f"data.dataset={dataset.location}", f"epochs={args.epochs}", "tracking.enabled=false",
                   f"storage_path={args.storage}", *args.overrides],
        grid={key: values.split(",")}, seeds=list(range(args.seeds)),
        reference=args.reference, split=args.split, max_concurrent=args.max_concurrent,
        output=str(Path(args.storage) / "tables"))
    import ray

    if not ray.is_initialized():  # preparing the dataset may have started it
        ray.init(address="local", logging_level="WARNING")  # with the dashboard: Ray Train's cleaner needs its state API
    result = run_sweep(sweep)
    ray.shutdown()
    table = result.table
    print(format_comparison(table))

    def average(point: str) -> float:
        means = [row["mean"] for row in table["models"][point]["ccc"].values()]
        return sum(means) / len(means)

    ours, reference = args.ours, args.reference
    runs = [{k: run.get(k) for k in ("point", "seed", "seconds", "epochs_run", "scores", "reused", "note")}
            | {"seconds_per_step_last_epoch": {k.removeprefix("time/"): round(v, 1)
                                               for k, v in run.get("last_epoch", {}).items() if k.startswith("time/")},
               "best_epoch": run.get("last_epoch", {}).get("dev/best_epoch")}
            for run in result.runs]
    report = {
        "name": args.name,
        "value": round(average(ours), 4),
        "unit": f"test CCC, mean of arousal/dominance/valence ({ours})",
        "baseline": f"{reference}, same data, epochs and seeds, same run",
        "baseline_value": round(average(reference), 4),
        "ratio": round(average(ours) / average(reference), 4),
        "command": "python bench/accuracy_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "details": {
            "dataset": dataset.location, "dataset_hash": dataset.dataset_hash, "split": args.split,
            "train_config": args.train_config, "epochs": args.epochs, "seeds": args.seeds,
            "comparison": {k: v for k, v in table.items() if k != "runs"}, "runs": runs,
            "total_training_seconds": round(sum(r["seconds"] or 0 for r in runs), 1),
            "machine": f"{os.cpu_count()} CPUs ({cpu_model()}), no GPU",
            "code": git_commit(str(REPO)),
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
    }
    Path(output).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
