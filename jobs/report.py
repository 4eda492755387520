"""A sweep's report: `python jobs/report.py --config configs/sweep/X.yaml [--output FOLDER] [key=value ...]`.

Writes FOLDER/report.md with the paper's tables (test CCC, t-tests against the sweep's reference and
DeepEmoCluster), Fig. 3, learning curves and a 2-D projection of the embeddings, as PNGs beside it,
and logs them to the sweep's MLflow parent run (cluster_train/experiments/report.py). Reports the
trials trained so far, so it can follow a sweep still training.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for a bare checkout

from cluster_train.experiments.sweep import load_sweep_config  # noqa: E402
from data_prep.config import ConfigError  # noqa: E402
from data_prep.dataset import DatasetError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Tables and figures of a sweep's trained trials.")
    parser.add_argument("--config", required=True, help="the sweep's YAML file (configs/sweep/...)")
    parser.add_argument("--output", help="folder for report.md and the figures (default: <sweep output>/<name>/report)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="the sweep's own overrides, if it had any")
    args = parser.parse_args(argv)
    try:
        config = load_sweep_config(args.config, args.overrides)
        from cluster_train.experiments.report import write_report

        report = write_report(config, args.output or f"{config.output.rstrip('/')}/{config.name}/report")
    except (ConfigError, DatasetError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.markdown)
    print(f"\nreport: {report.folder / 'report.md'} ({report.trained} of {report.planned} trials trained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
