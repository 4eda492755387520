"""Command line of the prep job: `python -m data_prep [--config FILE] [key=value ...]`."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from data_prep.config import ConfigError, PrepConfig, load_config, to_yaml
from data_prep.manifest import ManifestError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Turn audio into Parquet mel-spectrogram frames with Ray Data (training cuts the chunks).",
        epilog="Example: python -m data_prep --config configs/prep/ravdess_sample.yaml output=outputs/sample",
    )
    parser.add_argument("--config", help="YAML file with PrepConfig settings (see data_prep/config.py)")
    parser.add_argument("--dry-run", action="store_true", help="validate config and manifest, print them, stop")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. shard_size=32")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(PrepConfig, args.config, args.overrides)
        if args.dry_run:
            from data_prep.importers import build_manifest

            manifest = build_manifest(config.sources)
            print(to_yaml(config))
            print(f"manifest: {len(manifest)} utterances")
            return 0
        from data_prep.pipeline import run_prep

        summary = run_prep(config)
    except (ConfigError, ManifestError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary.text())
    return 0
