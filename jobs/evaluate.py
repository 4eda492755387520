"""Score a model bundle: `python jobs/evaluate.py --model M --data D [--split test ...] [--json out.json]`.

M: a bundle directory (cluster_train/serve/bundle.py), `runs:/<run_id>/<name>` or
`models:/<name>/<version>` (MLFLOW_TRACKING_URI says which MLflow). D: a prepared dataset.
Prints the sentence-level CCC per attribute for each split (raw 1-7 label scale).

Under `ray job submit` (or wherever RAY_ADDRESS names a cluster) the splits are scored on a Ray Data
actor pool of model replicas that grows from --min-actors to --max-actors; elsewhere in this
process (`--ray yes` starts a local Ray instead, `--ray no` never uses Ray). Same numbers either way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for a bare checkout

from cluster_train.serve.bundle import BundleError, resolve_bundle  # noqa: E402
from cluster_train.serve.evaluate import DEVICES, ActorPool, EvaluationError, score_splits  # noqa: E402
from data_prep.config import ConfigError  # noqa: E402
from data_prep.dataset import DatasetError, PreparedDataset  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python jobs/evaluate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="bundle directory, runs:/<run_id>/<name> or models:/<name>/<version>")
    parser.add_argument("--data", required=True, help="prepared dataset (local folder or URI)")
    parser.add_argument("--split", action="append", help="split to score; repeat for several (default: test)")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per forward pass")
    parser.add_argument("--json", help="also write the results to this JSON file")
    pool = parser.add_argument_group("actor pool (scoring on Ray)")
    pool.add_argument("--ray", choices=("auto", "yes", "no"), default="auto",
                      help="auto: on an actor pool when RAY_ADDRESS names a cluster (as under `ray job submit`), "
                           "else in this process; yes: on an actor pool, starting a local Ray if none")
    pool.add_argument("--device", choices=DEVICES, default="auto", help="auto: GPU actors when the cluster has GPUs")
    pool.add_argument("--min-actors", type=int, default=1, help="model replicas at the start (default: 1)")
    pool.add_argument("--max-actors", type=int,
                      help="most model replicas; above the cluster's size now, an autoscaler adds nodes "
                           "(default: as many as its GPUs or CPUs hold now)")
    pool.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (torch threads) per replica")
    pool.add_argument("--gpus-per-actor", type=float, default=1.0, help="share of a GPU per GPU replica")
    return parser.parse_args(argv)


def on_ray(choice: str) -> bool:
    """--ray: whether to score on an actor pool (`score_splits` joins RAY_ADDRESS's cluster, or starts a Ray)."""
    if choice != "auto":
        return choice == "yes"
    return bool(os.environ.get("RAY_ADDRESS")) or ("ray" in sys.modules and sys.modules["ray"].is_initialized())


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
        pool = ActorPool(device=args.device, min_actors=args.min_actors, max_actors=args.max_actors,
                         cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor)
        dataset = PreparedDataset(args.data)
        bundle = resolve_bundle(args.model)
        splits = args.split or ["test"]
        scored = score_splits(bundle, dataset, splits, on_ray(args.ray), pool, args.batch_size)
        results = [scored[split] for split in splits]
    except (BundleError, ConfigError, DatasetError, EvaluationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ConnectionError as error:  # RAY_ADDRESS names a cluster that does not answer
        print(f"error: cannot join the Ray cluster at RAY_ADDRESS={os.environ.get('RAY_ADDRESS')}: {error}; "
              "--ray no scores in this process", file=sys.stderr)
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
