"""Predict arousal / dominance / valence from raw audio with a trained model.

    python jobs/predict.py --model M --input I --output O.parquet   # batch, on Ray Data (or O.csv)
    python jobs/predict.py --model M path/to/file.wav              # one file: prints three numbers
    python jobs/predict.py --register NAME --run-id RUN            # registers the run's best model

M: a bundle directory, `runs:/<run_id>/best_model` or `models:/<name>/<version>`; MLFLOW_TRACKING_URI
says which MLflow (default sqlite:///./mlflow.db). I: a folder of audio, a .txt listing or a manifest
CSV as prep reads it (id, audio, split, ...). O: a path or URI; the files that gave no prediction go
to O's `.rejects` sibling (O = preds.parquet: preds.rejects.parquet).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for a bare checkout

from cluster_train.serve.bundle import BundleError  # noqa: E402
from cluster_train.serve.predict import (  # noqa: E402
    INPUT_KINDS,
    REGISTERED_ARTIFACT,
    PredictConfig,
    PredictError,
    load_model,
    predict_file,
    register_model,
    run_prediction,
)
from data_prep.audio import AudioRejected  # noqa: E402
from data_prep.config import ConfigError  # noqa: E402
from data_prep.manifest import ManifestError  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python jobs/predict.py", description=__doc__.splitlines()[0])
    parser.add_argument("audio", nargs="?", help="one audio file (path or URI): print its three predictions")
    parser.add_argument("--model", help="bundle directory, runs:/<run_id>/<name> or models:/<name>/<version>")
    parser.add_argument("--input", help="folder of audio, .txt listing or manifest CSV (path or URI)")
    parser.add_argument("--output", help="predictions file, .parquet or .csv (path or URI)")
    parser.add_argument("--input-kind", choices=INPUT_KINDS, help="how to read --input (default: by its name)")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per forward pass")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="auto: one GPU per model actor when the cluster has GPUs")
    parser.add_argument("--actors", type=int,
                        help="most model replicas; above the cluster's size now, an autoscaler adds nodes "
                             "(default: one per GPU, or per --cpus-per-actor CPUs, of the cluster now)")
    parser.add_argument("--min-actors", type=int, default=1,
                        help="model replicas at the start; the pool grows to --actors while files wait (default: 1)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (torch threads) per replica")
    parser.add_argument("--gpus-per-actor", type=float, default=1.0, help="share of a GPU per GPU replica")
    parser.add_argument("--raw", action="store_true",
                        help="the model's values, not clipped to the range of the labels it was trained on")
    parser.add_argument("--register", metavar="NAME", help="register --run-id's best model under NAME")
    parser.add_argument("--run-id", help="the MLflow run whose best model --register registers")
    parser.add_argument("--artifact", default=REGISTERED_ARTIFACT, help="the run's model name (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.register:
        if not args.run_id:
            parser.error("--register needs --run-id")
    elif not args.model:
        parser.error("--model is required (or --register NAME --run-id RUN)")
    elif args.audio and (args.input or args.output):
        parser.error("give one audio file, or --input and --output, not both")
    elif not args.audio and not (args.input and args.output):
        parser.error("give one audio file, or --input and --output")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.register:
            print(register_model(args.run_id, args.register, args.artifact))
        elif args.audio:
            for name, value in predict_file(load_model(args.model), args.audio, raw=args.raw).items():
                print(f"{name:<10} {value:.6f}")
        else:
            config = PredictConfig(model=args.model, input=args.input, output=args.output,
                                   input_kind=args.input_kind, batch_size=args.batch_size, device=args.device,
                                   actors=args.actors, min_actors=args.min_actors,
                                   cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
                                   raw=args.raw)
            print(run_prediction(config).text())
    except AudioRejected as rejected:
        print(f"error: {args.audio}: {rejected.reason}", file=sys.stderr)
        return 2
    except (BundleError, ConfigError, ManifestError, PredictError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
