"""The paper's comparison table from trained models:
`python jobs/paper_table.py --data D --model NAME=M [--model NAME=M ...] --reference NAME [--json out.json]`.

Repeat `--model NAME=M` once per training run (seed) of a model; M is a bundle directory,
`runs:/<run_id>/best_model` or `models:/<name>/<version>`. Each run is scored at sentence level on
`--split` (default test), split at random into `--subsets` (the paper: 4) equal parts, giving
subsets x runs CCCs per model and attribute (the paper: 4 x 5 = 20); the table shows their mean and
marks with * a model that differs from the reference by a two-tailed t-test at p < 0.05.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for a bare checkout

from cluster_train.serve.bundle import BundleError, resolve_bundle  # noqa: E402
from cluster_train.serve.evaluate import EvaluationError, compare_models, format_comparison, predict_split  # noqa: E402
from data_prep.dataset import DatasetError, PreparedDataset  # noqa: E402


def named_model(text: str) -> tuple[str, str]:
    name, _, source = text.partition("=")
    if not name or not source:
        raise argparse.ArgumentTypeError(f"--model {text!r}: expected NAME=MODEL, e.g. deepemocluster=runs:/<id>/best_model")
    return name, source


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python jobs/paper_table.py", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="prepared dataset (local folder or URI)")
    parser.add_argument("--model", type=named_model, action="append", required=True, metavar="NAME=MODEL",
                        help="one training run of model NAME; repeat per run and per model")
    parser.add_argument("--reference", required=True, help="the NAME the others are tested against")
    parser.add_argument("--split", default="test")
    parser.add_argument("--subsets", type=int, default=4, help="random equal parts of the split (paper: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random partition")
    parser.add_argument("--json", help="also write the table to this JSON file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = [name for name, _ in args.model]
    if args.reference not in names:
        print(f"error: --reference {args.reference!r} names no --model (have: {', '.join(dict.fromkeys(names))})",
              file=sys.stderr)
        return 2
    try:
        dataset = PreparedDataset(args.data)
        runs: dict[str, list] = {}
        for name, source in args.model:
            runs.setdefault(name, []).append(predict_split(resolve_bundle(source), dataset, args.split))
        table = compare_models(runs, args.reference, k=args.subsets, seed=args.seed)
    except (BundleError, DatasetError, EvaluationError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.split} split of {args.data}: sentence-level CCC, mean over {args.subsets} subsets x runs")
    print(format_comparison(table))
    if args.json:
        table["models_given"] = [{"name": name, "model": source} for name, source in args.model]
        Path(args.json).write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
