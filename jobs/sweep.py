"""Sweep: `python jobs/sweep.py --config configs/sweep/X.yaml [--only POINT,...] [key=value ...]`.

Trains every grid point x seed of the sweep config as Ray Tune trials (cluster_train/experiments/),
skipping trials already trained; with a `search:` section, first searches those settings on
development CCC and retrains the chosen ones over the seeds. Then prints the paper's table: mean
test CCC over subsets x seeds per grid point, * where a two-tailed t-test finds it differs from the
reference. Killed, run it again: Tune restores the experiment. Runs unchanged under `ray job submit`.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for a bare checkout

from cluster_train.experiments.sweep import (  # noqa: E402
    check_search,
    estimate_sweep,
    is_complete,
    load_sweep_config,
    plan_trials,
    search_record,
    trained_before,
)
from cluster_train.experiments.records import development_markdown  # noqa: E402
from cluster_train.serve.evaluate import format_comparison  # noqa: E402
from data_prep.config import ConfigError  # noqa: E402
from data_prep.dataset import DatasetError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train a grid of configs x seeds and compare them.")
    parser.add_argument("--config", required=True, help="YAML file of SweepConfig settings (cluster_train/experiments/sweep.py)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check every trial's config, list them and time a few steps for the estimate; train nothing")
    parser.add_argument("--only", type=lambda names: [n for n in names.split(",") if n], default=[],
                        metavar="POINT[,POINT...]",
                        help="train and compare only these grid points (and the reference) now; the rest on a later run")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        config = load_sweep_config(args.config, args.overrides)
        trials = plan_trials(config, args.only)
        if config.search is not None:
            check_search(config)
        print(f"sweep {config.name}: {len(trials)} trials")
        if args.dry_run:
            trained = [trained_before(config, trial) is not None for trial in trials]
            for trial, done in zip(trials, trained):
                print(f"  {trial.point} seed {trial.seed}: {trial.config.name}{' (trained)' if done else ''}")
            if config.search is not None:
                print(f"  then a search of {config.search.samples} trials over {', '.join(config.search.space)}"
                      f"{_search_state(config)}, its chosen settings retrained over seeds {config.seeds} as point "
                      f"{config.search.point}")
            print(estimate_sweep(config, [trial for trial, done in zip(trials, trained) if not done]))
            return 0
        from cluster_train.experiments.sweep import run_sweep

        result = run_sweep(config, args.only)
    except (ConfigError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("development CCC of each point's best models (choose settings here):")
    print(development_markdown(result.table["development"]))
    print(f"\ntest CCC ({result.table['split']}):")
    print(format_comparison(result.table))
    print(f"table and runs: {result.table_file}; MLflow experiment {config.name}")
    return 0


def _search_state(config) -> str:
    """What the search's record says: done (its choice), cut short (how many trials it finished), or nothing."""
    record = search_record(config)
    if record is None:
        return ""
    if is_complete(record):
        return f" (done: chose {record['trials'][0]['settings']})"
    return f" ({len(record['trials'])} finished before it was cut short: it goes on from them)"


if __name__ == "__main__":
    sys.exit(main())
