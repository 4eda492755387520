"""Train: `python jobs/train.py --config configs/train/X.yaml [key=value ...]`.

Runs unchanged on a laptop (a local Ray) and as `ray job submit -- python jobs/train.py ...`.
Prints the CCC of the best checkpoint on development and test and where the MLflow run is.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for a bare checkout

from cluster_train.train.config import load_train_config  # noqa: E402
from data_prep.config import ConfigError  # noqa: E402
from data_prep.dataset import DatasetError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train DeepEmoCluster or a baseline on Ray Train.")
    parser.add_argument("--config", help="YAML file of TrainConfig settings (cluster_train/train/config.py)")
    parser.add_argument("--verbose", action="store_true",
                        help="keep Ray Train's per-worker report lines and MLflow's logs and progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        config = load_train_config(args.config, args.overrides)
        from cluster_train.train.launch import run_training

        result = run_training(config, verbose=args.verbose)
    except (ConfigError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"train: {result.name}: {result.epochs_run} epochs in {result.seconds:.0f} s; best model in {result.best_bundle}")
    attributes = list(next(iter(result.scores.values())).keys())
    print("CCC (sentence level, best checkpoint)  " + "  ".join(f"{a:>9}" for a in attributes))
    for split, values in result.scores.items():
        print(f"  {split:<36}" + "  ".join(f"{values[a]:9.4f}" if isinstance(values[a], float) else f"{values[a]:>9}" for a in attributes))
    if result.mlflow_run_id:
        store = config.tracking.resolved_uri()
        ui = store if store.startswith(("http://", "https://")) else (
            f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri {store} --host 127.0.0.1 --workers 1")
        print(f"MLflow run {result.mlflow_run_id}; UI: {ui}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
