"""The Ray Serve endpoint against batch prediction, on the same files, in one run on this machine.

    python bench/serve_bench.py [--model M] [--files 96] [--concurrency 8] [--max-batch-size 8]

M: a bundle folder or an MLflow model URI; by default an untrained bundle of the paper's network
(speed does not depend on the weights). Files: the first N real RAVDESS files of data/ravdess_sample.
Measured on one local Ray (all the machine's CPUs):
- batch: `run_prediction` (what `jobs/predict.py --input --output` runs: Ray Data, an actor pool)
  over the N files, after one warm-up run; files per second, wall clock from call to file written;
- endpoint: `run_endpoint` (jobs/serve.py's deployment), then N uploads from `--concurrency` client
  threads (file bytes as the body); requests per second and each request's latency (median, p95),
  and the batch sizes `@serve.batch` formed; then the same one at a time (latency without queueing).
Writes bench/results/serve.json: value = endpoint requests/s, baseline = batch files/s.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster_train.serve.endpoint import EndpointConfig, run_endpoint  # noqa: E402
from cluster_train.serve.predict import PredictConfig, run_prediction  # noqa: E402

RESULT = REPO / "bench" / "results" / "serve.json"


def untrained_bundle(folder: Path) -> str:
    """The paper's network with seeded weights, a normaliser from real frames, the default features."""
    import torch

    from cluster_train.data.labels import LabelScaler
    from cluster_train.model.blocks import ModelConfig
    from cluster_train.model.kinds import build_model
    from cluster_train.serve.bundle import save_bundle
    from data_prep.config import ChunkConfig, FeatureConfig
    from data_prep.shards import ChunkRecipe
    from data_prep.stats import Normalizer

    recipe = ChunkRecipe(FeatureConfig(), ChunkConfig())
    mel = np.concatenate([recipe.load_frames(str(f)).mel for f in sample_files(4)])
    torch.manual_seed(0)
    attributes = ("arousal", "dominance", "valence")
    save_bundle(str(folder), build_model("deepemocluster", ModelConfig()), "deepemocluster", ModelConfig(),
                Normalizer(mel.mean(axis=0), mel.std(axis=0)), LabelScaler(attributes, [4, 4, 4], [1, 1, 1]),
                features=recipe.settings())
    return str(folder)


def sample_files(count: int) -> list[Path]:
    files = sorted((REPO / "data" / "ravdess_sample").glob("Actor_*/*.flac"))
    if len(files) < count:
        raise SystemExit(f"data/ravdess_sample has {len(files)} files, fewer than --files {count}")
    return files[:count]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, data: bytes) -> tuple[float, dict]:
    started = time.perf_counter()
    request = urllib.request.Request(url, data, {"Content-Type": "audio/flac"})
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - started, answer


def load(url: str, payloads: list[bytes], concurrency: int) -> dict:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda data: post(url, data), payloads))
    wall = time.perf_counter() - started
    latencies = sorted(seconds for seconds, _ in results)
    batches = [answer["batch_size"] for _, answer in results]
    return {"requests": len(payloads), "concurrency": concurrency, "wall_s": round(wall, 3),
            "requests_per_s": round(len(payloads) / wall, 2),
            "latency_median_ms": round(1000 * statistics.median(latencies), 1),
            "latency_p95_ms": round(1000 * float(np.percentile(latencies, 95)), 1),
            "mean_batch_size": round(float(np.mean(batches)), 2), "largest_batch": int(max(batches))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="bundle folder or MLflow URI (default: an untrained bundle)")
    parser.add_argument("--files", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=20.0)
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument("--output", default=str(RESULT))
    args = parser.parse_args()

    import ray
    from ray import serve

    files = sample_files(args.files)
    payloads = [f.read_bytes() for f in files]
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as folder:
        model = args.model or untrained_bundle(Path(folder) / "bundle")
        listing = Path(folder) / "files.txt"
        listing.write_text("".join(f"{f}\n" for f in files))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="WARNING")  # never a running one
        try:
            run_prediction(PredictConfig(model=model, input=str(listing), output=f"{folder}/warm.parquet"))
            started = time.perf_counter()
            summary = run_prediction(PredictConfig(model=model, input=str(listing), output=f"{folder}/p.parquet"))
            batch_wall = time.perf_counter() - started
            batch_files_per_s = summary.predicted / batch_wall

            port = free_port()
            config = EndpointConfig(model=model, max_batch_size=args.max_batch_size,
                                    batch_wait_timeout_s=args.batch_wait_ms / 1000, max_replicas=args.max_replicas,
                                    num_cpus=cpus / max(args.max_replicas, 1) / 2)
            started = time.perf_counter()
            run_endpoint(config, "127.0.0.1", port)
            deploy_s = time.perf_counter() - started
            url = f"http://127.0.0.1:{port}/predict"
            load(url, payloads[: args.concurrency * 2], args.concurrency)  # warm-up: first calls, autoscaling
            concurrent_run = load(url, payloads, args.concurrency)
            replicas = sum(d.replica_states.get("RUNNING", 0)
                           for d in serve.status().applications[config.name].deployments.values())
            one_at_a_time = load(url, payloads[: min(32, len(payloads))], 1)
            serve.shutdown()
        finally:
            ray.shutdown()

    value = concurrent_run["requests_per_s"]
    result = {
        "name": "serve",
        "value": value,
        "unit": "requests/s (one audio file each, over HTTP on 127.0.0.1)",
        "baseline": "batch prediction (run_prediction, as jobs/predict.py --input/--output) over the same files, "
                    "files/s, same local Ray, same run",
        "baseline_value": round(batch_files_per_s, 2),
        "ratio": round(value / batch_files_per_s, 3),
        "command": "python bench/serve_bench.py " + " ".join(sys.argv[1:]),
        "details": {
            "cpus": cpus, "files": len(files), "audio_seconds": round(summary.audio_seconds, 1),
            "model": args.model or "untrained deepemocluster bundle (weights do not change the speed)",
            "endpoint": {**concurrent_run, "replicas_running_after": replicas, "deploy_s": round(deploy_s, 1),
                         "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
                         "max_replicas": args.max_replicas, "cpus_per_replica": config.num_cpus},
            "endpoint_one_at_a_time": one_at_a_time,
            "batch": {"wall_s": round(batch_wall, 2), "files_per_s": round(batch_files_per_s, 2),
                      "actors": summary.actors, "device": summary.device},
            "note": "the client threads run on the same cores as the replicas; the batch wall time includes Ray Data's "
                    "start-up and the actors' model load, a fixed cost per job that 96 files do not amortise; "
                    "the autoscaler's upscale delay (30 s) is longer than the load, so one replica served it",
        },
    }
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
