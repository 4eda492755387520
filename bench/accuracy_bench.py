"""Test CCC of DeepEmoCluster and the paper's three baselines on RAVDESS, with the paper's statistics.

    python bench/accuracy_bench.py [--prep-config configs/prep/ravdess_sample.yaml]
        [--train-config configs/train/ravdess_sample.yaml] [--epochs 4] [--seeds 1] [key=value ...]

Each model trains with the same config, data and seeds through the real job (`run_training`: Ray
Train, K-means actor, MLflow off), its best checkpoint is scored at sentence level on the test split,
and `evaluation.compare_models` gives mean CCC over 4 random test subsets x seeds with a two-tailed
t-test against the CNN-regressor. The prepared dataset is made first when missing. Writes
bench/results/accuracy_ravdess.json: value = DeepEmoCluster's test CCC averaged over the attributes,
baseline = the CNN-regressor's, both from this run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster_train.checkpoint import load_bundle  # noqa: E402
from cluster_train.config import load_train_config  # noqa: E402
from cluster_train.evaluation import compare_models, format_comparison, predict_split, score  # noqa: E402
from cluster_train.models import MODEL_KINDS  # noqa: E402
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
    parser.add_argument("--output", default=str(REPO / "bench/results/accuracy_ravdess.json"))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="more training config overrides")
    args = parser.parse_args(argv)
    if REFERENCE not in args.models:
        parser.error(f"--models must include the reference {REFERENCE}")

    import ray

    from cluster_train.launch import run_training

    dataset = prepared_dataset(args.prep_config)
    storage = tempfile.mkdtemp(prefix="accuracy-bench-")
    ray.init(address="local", logging_level="WARNING", include_dashboard=False)
    predictions, runs = {}, {}
    for kind in args.models:
        for seed in range(args.seeds):
            overrides = [f"model_kind={kind}", f"data.dataset={dataset.location}", f"epochs={args.epochs}",
                         f"seed={seed}", "tracking.enabled=false", f"storage_path={storage}",
                         f"name={kind}-seed{seed}", *args.overrides]
            config = load_train_config(REPO / args.train_config, overrides)
            print(f"[accuracy] training {kind} seed {seed}", flush=True)
            result = run_training(config)
            split = predict_split(load_bundle(result.best_bundle), dataset, args.split)
            predictions.setdefault(kind, []).append(split)
            runs.setdefault(kind, []).append({
                "seed": seed, "seconds": round(result.seconds, 1), "epochs_run": result.epochs_run,
                "best_epoch": int(result.metrics.get("best_epoch", -1)),
                "ccc": score(split.prediction, split.labels, split.attributes),
                "dev_ccc": result.scores[config.data.development_split],
                "seconds_per_step": {k.removeprefix("seconds_"): round(v, 2) for k, v in result.metrics.items()
                                     if k.startswith("seconds_")},
            })
            print(f"[accuracy] {kind} seed {seed}: {runs[kind][-1]['ccc']} in {result.seconds:.0f} s", flush=True)
    ray.shutdown()

    table = compare_models(predictions, reference=REFERENCE)
    print(format_comparison(table))

    def average(kind: str) -> float:
        means = [row["mean"] for row in table["models"][kind]["ccc"].values()]
        return sum(means) / len(means)

    ours = "deepemocluster" if "deepemocluster" in args.models else args.models[0]
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
            "utterances": len(next(iter(predictions.values()))[0].ids),
            "train_config": args.train_config, "epochs": args.epochs, "seeds": args.seeds,
            "comparison": table, "runs": runs,
            "total_seconds": round(sum(r["seconds"] for rs in runs.values() for r in rs), 1),
            "machine": f"{__import__('os').cpu_count()} CPUs, no GPU",
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
    }
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
