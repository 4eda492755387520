"""Score a model bundle: `python jobs/evaluate.py --model M --data D [--split test ...] [--json out.json]`.

M: a bundle directory (cluster_train/serve/bundle.py), `runs:/<run_id>/<name>` or
`models:/<name>/<version>` (MLFLOW_TRACKING_URI says which MLflow). D: a prepared dataset.
Prints the sentence-level CCC per attribute for each split (raw 1-7 label scale).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for a bare checkout

from cluster_train.serve.bundle import BundleError, resolve_bundle  # noqa: E402
from cluster_train.serve.evaluate import EvaluationError, evaluate_split  # noqa: E402
from data_prep.dataset import DatasetError, PreparedDataset  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python jobs/evaluate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="bundle directory, runs:/<run_id>/<name> or models:/<name>/<version>")
    parser.add_argument("--data", required=True, help="prepared dataset (local folder or URI)")
    parser.add_argument("--split", action="append", help="split to score; repeat for several (default: test)")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per forward pass")
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser.parse_args(argv)


def table(results: list[dict]) -> str:
    attributes = list(results[0]["ccc"]) if results else []
    lines = [f"{'split':<14}{'utterances':>11}" + "".join(f"{name:>11}" for name in attributes)]
    for result in results:
        values = "".join(f"{result['ccc'][name]:>11.4f}" for name in attributes)
        lines.append(f"{result['split']:<14}{result['utterances']:>11}" + values)
    return "\n".join(lines)


def json_safe(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        dataset = PreparedDataset(args.data)
        bundle = resolve_bundle(args.model)
        results = [evaluate_split(bundle, dataset, split, args.batch_size) for split in args.split or ["test"]]
    except (BundleError, DatasetError, EvaluationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"model {args.model} ({bundle.model_kind}), data {args.data}: CCC per attribute")
    print(table(results))
    if args.json:
        report = {"model": args.model, "model_kind": bundle.model_kind, "data": args.data,
                  "dataset_hash": dataset.dataset_hash, "trained_on": bundle.extra.get("dataset_hash"),
                  "results": results}
        Path(args.json).write_text(json.dumps(json_safe(report), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
