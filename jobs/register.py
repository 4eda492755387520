"""The model registry: register a run's best model, move an alias after comparing.

    python jobs/register.py register --run-id RUN --name emotion        # -> models:/emotion/<n>
    python jobs/register.py promote --name emotion --version 7          # @champion -> 7 if it beats it
    python jobs/register.py promote --name emotion --version 7 --metric test_ccc_mean --min-gain 0.01
    python jobs/register.py show --name emotion                          # versions, their tags, aliases

MLFLOW_TRACKING_URI (or --tracking-uri) says which MLflow (default sqlite:///./mlflow.db). promote
compares a version tag (default dev_ccc_mean, higher is better) with the alias's current version and
moves the alias only when the new one beats it; versions of different datasets are refused unless
--force. Exit status 0: the alias points at the version; 1: left as it was; 2: an error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for a bare checkout

from cluster_train.serve.registry import (  # noqa: E402
    BEST_MODEL,
    DEFAULT_ALIAS,
    DEFAULT_METRIC,
    RegistryError,
    promote,
    register_run,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python jobs/register.py", description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", help="MLflow (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    commands = parser.add_subparsers(dest="command", required=True)
    register = commands.add_parser("register", help="register a run's logged model as a new version")
    register.add_argument("--run-id", required=True)
    register.add_argument("--name", required=True, help="the registered model")
    register.add_argument("--artifact", default=BEST_MODEL, help="the run's model name (default: %(default)s)")
    move = commands.add_parser("promote", help="move an alias to a version that beats the current one")
    move.add_argument("--name", required=True)
    move.add_argument("--version", required=True)
    move.add_argument("--alias", default=DEFAULT_ALIAS)
    move.add_argument("--metric", default=DEFAULT_METRIC, help="version tag to compare, higher is better")
    move.add_argument("--min-gain", type=float, default=0.0, help="how much better it must be")
    move.add_argument("--force", action="store_true", help="move it without comparing")
    show = commands.add_parser("show", help="a registered model's versions, tags and aliases")
    show.add_argument("--name", required=True)
    return parser.parse_args(argv)


def show(name: str, tracking_uri: str | None) -> str:
    from mlflow import MlflowClient

    from cluster_train.tracking import TrackingConfig

    client = MlflowClient(tracking_uri or TrackingConfig().resolved_uri())
    model = client.get_registered_model(name)
    aliases = ", ".join(f"@{alias} -> version {version}" for alias, version in sorted(model.aliases.items()))
    lines = [f"{name}: {aliases or 'no aliases'}"]
    for version in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)):
        tags = ", ".join(f"{k}={v}" for k, v in sorted(version.tags.items()))
        lines.append(f"  version {version.version}: {tags}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from mlflow.exceptions import MlflowException

    args = parse_args(argv)
    try:
        if args.command == "register":
            print(register_run(args.run_id, args.name, args.tracking_uri, args.artifact))
        elif args.command == "show":
            print(show(args.name, args.tracking_uri))
        else:
            result = promote(args.name, args.version, args.alias, args.metric, args.force, args.min_gain,
                             args.tracking_uri)
            print(result.text())
            return 0 if result.moved or result.previous == result.version else 1
    except (RegistryError, MlflowException) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
