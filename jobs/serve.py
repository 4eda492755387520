"""Serve a model over HTTP on Ray Serve: `python jobs/serve.py --model M [--port 8000]`.

M: a bundle folder, `models:/<name>@<alias>` (e.g. models:/emotion@champion), `models:/<name>/<version>`
or `runs:/<run_id>/<name>`; MLFLOW_TRACKING_URI (or --tracking-uri) says which MLflow. Listens on
127.0.0.1 unless --host says otherwise; runs until interrupted. On a Ray cluster use the serve config
(infra/serve/serve_config.yaml: `serve deploy`) or the KubeRay RayService (infra/kuberay/rayservice.yaml).

    curl -F file=@a.wav http://127.0.0.1:8000/predict
    curl --data-binary @a.flac -H 'Content-Type: audio/flac' 'http://127.0.0.1:8000/predict?window_seconds=10'
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for a bare checkout

from cluster_train.serve.bundle import BundleError  # noqa: E402
from cluster_train.serve.endpoint import EndpointConfig, run_endpoint  # noqa: E402
from cluster_train.serve.predict import PredictError  # noqa: E402
from data_prep.config import ConfigError  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python jobs/serve.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="bundle folder, models:/<name>@<alias>, models:/<name>/<n>, "
                                                       "runs:/<run>/<name>")
    parser.add_argument("--tracking-uri", help="MLflow for models:/ and runs:/ (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument("--target-ongoing-requests", type=float, default=4.0,
                        help="requests in flight per replica the autoscaler aims at")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests scored in one forward pass")
    parser.add_argument("--batch-wait-ms", type=float, default=20.0, help="how long a batch waits to fill")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--allow-uri", action="append", default=[], metavar="PREFIX",
                        help="let requests name audio under PREFIX (s3://bucket/audio/, /data/); repeatable")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = EndpointConfig(model=args.model, tracking_uri=args.tracking_uri, min_replicas=args.min_replicas,
                                max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests,
                                max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000,
                                num_cpus=args.num_cpus, num_gpus=args.num_gpus, threads=args.threads,
                                uri_prefixes=args.allow_uri)
        print(f"serve: {args.model} on http://{args.host}:{args.port}/predict (Ctrl-C stops it)", flush=True)
        run_endpoint(config, args.host, args.port, blocking=True)
    except (BundleError, ConfigError, PredictError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
