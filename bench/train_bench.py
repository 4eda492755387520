"""Training throughput of the real loop: Ray Train with 1 and 2 workers against the same loop in one
plain process, and what precision auto chooses on this CPU.

    python bench/train_bench.py [--prep-config configs/prep/ravdess_sample.yaml] [--epochs 2]

Every side is `run_training` on the same config and prepared data (MLflow off): the Ray Train runs
with Ray Data shards, the K-means actor and checkpoints through `ray.train.report`; the baseline with
`scaling.num_workers=0`, the same `Trainer` in one process without Ray (`train/runtime.py`), run in a
child process at the niceness Ray gives its workers (15). Throughput = chunks trained in the stages
per second of those stages, in the last epoch (the first carries one-off start-up); each run's last
epoch is also split per step (`time/*` metrics). The precision probe times forward + backward of the
paper's encoder in fp32 and in bf16 autocast and records what `precision=auto` picks here.
Writes bench/results/train.json: value = Ray Train with 1 worker, baseline = the plain process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.accuracy_bench import prepared_dataset  # noqa: E402
from cluster_train.model.kinds import build_model  # noqa: E402
from cluster_train.model.losses import cluster_ce  # noqa: E402
from cluster_train.train.config import TrainConfig, load_train_config  # noqa: E402
from cluster_train.train.launch import run_training, with_dataset_shape  # noqa: E402
from cluster_train.train.precision import Precision, cpu_flags, cpu_model, resolve  # noqa: E402

RAY_WORKER_NICENESS = 15  # Ray's default for the processes of tasks and actors (RAY_worker_niceness)
STEPS = ("data_loading", "precise_bn", "embedding", "clustering", "stage1", "stage2", "validation", "checkpoint")


def summarize(result, workers: int) -> dict:
    metrics = result.metrics
    stages = [k for k in ("stage1", "stage2") if f"time/{k}" in metrics]
    # rank 0's chunks x workers: Ray Data splits the rows equally
    chunks = max(workers, 1) * sum(metrics[f"train/{k}_chunks"] for k in stages)
    return {"workers": workers, "epochs_run": result.epochs_run, "run_seconds": round(result.seconds, 1),
            "stage_chunks": chunks, "chunks_per_second": chunks / sum(metrics[f"time/{k}"] for k in stages),
            "last_epoch_seconds": {s: round(metrics[f"time/{s}"], 2) for s in STEPS if f"time/{s}" in metrics},
            "dev_ccc": result.scores["development"]}


def in_process(config: TrainConfig) -> dict:
    return summarize(run_training(config), 0)


def in_process_at(niceness: int, config: TrainConfig) -> dict:
    """The loop without Ray in a child process at `niceness`, as Ray's workers run."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=os.nice, initargs=(niceness,)) as pool:
        return pool.submit(in_process, config).result() | {"niceness": niceness}


def precision_probe(config: TrainConfig, sentences: int = 4, steps: int = 2) -> dict:
    """Seconds per forward + backward step of the model on `sentences` x 11 chunks, fp32 and bf16."""
    torch.set_num_threads(1)
    model = build_model(config.model_kind, config.model).to(memory_format=torch.channels_last).train()
    chunks = torch.randn(sentences * 11, config.model.chunk_frames, config.model.n_mels)
    labels = torch.randint(0, config.clustering.num_clusters, (len(chunks),))
    seconds = {}
    for name in ("fp32", "bf16"):
        precision = Precision(name, torch.device("cpu"))
        for step in range(steps + 1):  # the first step warms up
            started = time.perf_counter()
            with precision.autocast():
                outputs = model(chunks)
            cluster_ce(Precision.outputs(outputs)["cluster_logits"], labels).backward()
            if step == 1:
                seconds[name] = 0.0
            if step >= 1:
                seconds[name] += (time.perf_counter() - started) / steps
    return {"seconds_per_step": {k: round(v, 3) for k, v in seconds.items()}, "chunks_per_step": len(chunks),
            "bf16_vs_fp32_speed": round(seconds["fp32"] / seconds["bf16"], 3),
            "auto_chooses": resolve("auto", torch.device("cpu")), "threads": 1}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prep-config", default="configs/prep/ravdess_sample.yaml")
    parser.add_argument("--train-config", default="configs/train/ravdess_sample.yaml")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--output", default=str(REPO / "bench/results/train.json"))
    args = parser.parse_args(argv)

    import ray

    dataset = prepared_dataset(args.prep_config)
    storage = tempfile.mkdtemp(prefix="train-bench-")
    overrides = [f"data.dataset={dataset.location}", f"epochs={args.epochs}", f"patience={args.epochs}",
                 "tracking.enabled=false", f"storage_path={storage}"]
    config = load_train_config(REPO / args.train_config, overrides)
    print("[train-bench] precision probe", flush=True)
    probe = precision_probe(with_dataset_shape(config, dataset))
    print(f"[train-bench] {probe}", flush=True)
    print("[train-bench] the loop in one process, no Ray, 1 thread", flush=True)
    plain = in_process_at(RAY_WORKER_NICENESS, dataclasses.replace(
        config, name="bench-plain", scaling=dataclasses.replace(config.scaling, num_workers=0, cpus_per_worker=1)))
    print(f"[train-bench] {plain['chunks_per_second']:.1f} chunks/s", flush=True)
    started = time.perf_counter()
    ray.init(address="local", logging_level="WARNING", include_dashboard=False)
    ray_start = time.perf_counter() - started
    runs = {}
    for workers in (1, 2):
        cpus = 1.0 if workers == 1 else 0.5  # reads need one free CPU (launch.warn_if_reads_starve)
        print(f"[train-bench] Ray Train, {workers} worker(s)", flush=True)
        run = dataclasses.replace(config, name=f"bench-{workers}w", scaling=dataclasses.replace(
            config.scaling, num_workers=workers, cpus_per_worker=cpus))
        runs[workers] = summarize(run_training(run), workers) | {"cpus_per_worker": cpus}
        print(f"[train-bench] {runs[workers]['chunks_per_second']:.1f} chunks/s", flush=True)
    ray.shutdown()

    baseline = plain["chunks_per_second"]
    one, two = runs[1]["chunks_per_second"], runs[2]["chunks_per_second"]
    report = {
        "name": "train",
        "value": round(one, 2),
        "unit": "chunks/s trained (stages 1 + 2, last epoch), Ray Train 1 worker x 1 thread",
        "baseline": "the same loop (Trainer) in one process without Ray (scaling.num_workers=0), 1 thread, "
                    "niceness 15 as Ray's workers, same run",
        "baseline_value": round(baseline, 2),
        "ratio": round(one / baseline, 3),
        "command": "python bench/train_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "details": {
            "ratio_2_workers_vs_1_worker": round(two / one, 3),
            "in_process": plain, "ray_train_1_worker": runs[1], "ray_train_2_workers": runs[2],
            "ray_start_seconds": round(ray_start, 1),
            "precision": probe,
            "dataset": dataset.location, "batch_size": config.data.batch_size, "epochs": args.epochs,
            "note": "seconds per step of the last epoch; data_loading is the part of the precise-BN, embedding, "
                    "stage and validation time spent waiting on data and building batches. 2 workers hold 0.5 "
                    "CPU each (1 torch thread each) on 2 cores, beside Ray Data's reads.",
            "cpu": cpu_model(), "cpu_bf16_flags": sorted(f for f in cpu_flags() if "bf16" in f),
            "machine": f"{os.cpu_count()} CPUs, no GPU",
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
    }
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("value", "baseline_value", "ratio")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
