"""Training throughput: Ray Train with 1 and 2 workers against a plain single-process PyTorch loop.

    python bench/train_bench.py [--prep-config configs/prep/ravdess_sample.yaml] [--epochs 2]

All sides train DeepEmoCluster (same model, optimizers, batch size and prepared data) for the same
epochs of the paper's loop: embed every training chunk -> K-means -> stage 1 -> stage 2 ->
development CCC. The plain loop reads the Parquet shards with pyarrow into memory and runs in a
child process with no Ray at all, at the niceness Ray gives its workers (15; also once at 0, for
the record), and records torch's thread count at its end. The Ray Train runs are the real job
(`run_training`: Ray Data shards, K-means actor, checkpoints; MLflow off). Throughput = chunks
trained in stages 1 + 2 per second of those stages, in the last epoch (the first carries one-off
start-up). Each run's time is also split per step. Writes bench/results/train.json: value = Ray Train with 1 worker, baseline = the plain
loop on the same single thread, same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.accuracy_bench import prepared_dataset  # noqa: E402
from cluster_train.clustering.kmeans import fit_clusters  # noqa: E402
from cluster_train.clustering.service import lookup_labels  # noqa: E402
from cluster_train.data.batches import ROW_COLUMNS, ChunkBatches, InMemoryRows  # noqa: E402
from cluster_train.data.labels import LabelScaler  # noqa: E402
from cluster_train.model.kinds import build_model  # noqa: E402
from cluster_train.model.losses import ccc, ccc_loss, cluster_ce, sentence_mean  # noqa: E402
from cluster_train.seeding import derive  # noqa: E402
from cluster_train.train.config import TrainConfig, load_train_config  # noqa: E402
from cluster_train.train.loop import build_optimizer, optimizer_config  # noqa: E402
from data_prep.dataset import PreparedDataset  # noqa: E402
from data_prep.manifest import ATTRIBUTES  # noqa: E402

RAY_WORKER_NICENESS = 15  # Ray's default for the processes of tasks and actors (RAY_worker_niceness)
STEPS = ("data_loading", "embedding", "clustering", "stage1", "stage2", "validation", "checkpoint")


def plain_loop(config: TrainConfig, dataset: PreparedDataset, threads: int) -> dict:
    """The paper's epoch in one process: the same model, losses, optimizers and batches, no Ray."""
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    train = InMemoryRows.from_arrow(dataset.read_table(config.data.labeled_splits, ROW_COLUMNS))
    development = InMemoryRows.from_arrow(dataset.read_table([config.data.development_split], ROW_COLUMNS))
    read_seconds = time.perf_counter() - started
    scaler = LabelScaler.fit(dataset.read_table(config.data.labeled_splits, list(ATTRIBUTES)), config.model.attributes)
    batches = ChunkBatches(dataset.normalizer(), scaler, torch.device("cpu"))
    model = build_model(config.model_kind, config.model).to(memory_format=torch.channels_last)
    optimizers = {g: build_optimizer(p, optimizer_config(g, config)) for g, p in model.param_groups().items()}
    size = config.data.batch_size
    epochs = []
    for epoch in range(config.epochs):
        seconds = {}
        loading_before = batches.loading_seconds
        started = time.perf_counter()
        model.eval()
        keys, features = [], []
        with torch.no_grad():
            for batch in batches(train, size, drop_last=False):
                keys.append(batch.keys)
                features.append(model.embed(batch.chunks).numpy())
        seconds["embedding"] = time.perf_counter() - started
        started = time.perf_counter()
        keys = np.concatenate(keys)
        order = np.argsort(keys)
        _, result = fit_clusters(np.concatenate(features)[order], config.clustering, derive(config.seed, "kmeans", epoch))
        table = (keys[order], result.assignments)
        top = model.cluster_head.reset_top(config.model.num_clusters, torch.Generator().manual_seed(epoch))
        optimizers["cluster_top"] = build_optimizer(list(top.parameters()), config.optim.cluster_top)
        seconds["clustering"] = time.perf_counter() - started
        chunks = 0
        for stage in (1, 2):
            started = time.perf_counter()
            model.train()
            groups = [g for g in optimizers if stage == 2 or g != "regressor"]
            for batch in batches(train, size, drop_last=True, seed=config.seed + epoch):
                for group in groups:
                    optimizers[group].zero_grad(set_to_none=True)
                out = model(batch.chunks)
                loss = cluster_ce(out["cluster_logits"], torch.from_numpy(lookup_labels(*table, batch.keys)))
                if stage == 2:
                    loss = loss + ccc_loss(sentence_mean(out["prediction"], batch.num_chunks), batch.targets)
                loss.backward()
                for group in groups:
                    optimizers[group].step()
                chunks += len(batch.keys)
            seconds[f"stage{stage}"] = time.perf_counter() - started
        started = time.perf_counter()
        model.eval()
        with torch.no_grad():
            pairs = [(sentence_mean(model(b.chunks)["prediction"], b.num_chunks), b.targets)
                     for b in batches(development, size, drop_last=False)]
        dev_ccc = ccc(torch.cat([p for p, _ in pairs]), torch.cat([t for _, t in pairs]))
        seconds["validation"] = time.perf_counter() - started
        seconds["data_loading"] = batches.loading_seconds - loading_before + (read_seconds if epoch == 0 else 0.0)
        epochs.append({"seconds": {k: round(v, 2) for k, v in seconds.items()}, "stage_chunks": chunks,
                       "chunks_per_second": chunks / (seconds["stage1"] + seconds["stage2"]),
                       "dev_ccc": [round(float(v), 4) for v in dev_ccc]})
    # torch's count at the end: K-means (faiss) once left it at all CPUs (clustering.faiss_omp_threads)
    return {"threads": threads, "threads_at_end": torch.get_num_threads(), "epochs": epochs,
            "chunks_per_second": epochs[-1]["chunks_per_second"]}


def plain_loop_at(niceness: int, config: TrainConfig, dataset: PreparedDataset, threads: int) -> dict:
    """`plain_loop` in a child process at `niceness`: Ray starts its workers at niceness 15
    (RAY_worker_niceness), so on a shared machine a loop at 0 would win CPU the workers lose."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=os.nice, initargs=(niceness,)) as pool:
        return pool.submit(plain_loop, config, dataset, threads).result() | {"niceness": niceness}


def ray_train(train_config: str, overrides: list[str], workers: int) -> dict:
    """The real job with `workers` Ray Train workers; the last epoch's throughput and time split."""
    from cluster_train.train.launch import run_training

    cpus = 1.0 if workers == 1 else 0.5  # reads need one free CPU (launch.warn_if_reads_starve)
    config = load_train_config(REPO / train_config, [*overrides, f"scaling.num_workers={workers}",
                                                     f"scaling.cpus_per_worker={cpus}", f"name=bench-{workers}w"])
    result = run_training(config)
    metrics = result.metrics
    chunks = workers * (metrics["train/stage1_chunks"] + metrics["train/stage2_chunks"])  # equal shards: rank 0's x workers
    seconds = {step: round(metrics.get(f"time/{step}", 0.0), 2) for step in STEPS if f"time/{step}" in metrics}
    return {"workers": workers, "cpus_per_worker": cpus, "threads_per_worker": max(1, int(cpus)),
            "epochs_run": result.epochs_run, "run_seconds": round(result.seconds, 1), "stage_chunks": chunks,
            "chunks_per_second": chunks / (metrics["time/stage1"] + metrics["time/stage2"]),
            "last_epoch_seconds": seconds, "dev_ccc": result.scores[config.data.development_split]}


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
    print("[train-bench] plain loop, 1 thread", flush=True)
    plain_1 = plain_loop_at(RAY_WORKER_NICENESS, config, dataset, threads=1)
    print("[train-bench] plain loop, 2 threads", flush=True)
    plain_2 = plain_loop_at(RAY_WORKER_NICENESS, config, dataset, threads=2)
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    ray.init(address="local", logging_level="WARNING", include_dashboard=False)
    ray_start = time.perf_counter() - started
    runs = {}
    for workers in (1, 2):
        print(f"[train-bench] Ray Train, {workers} worker(s)", flush=True)
        runs[workers] = ray_train(args.train_config, overrides, workers)
        print(f"[train-bench] {runs[workers]['chunks_per_second']:.1f} chunks/s", flush=True)
    ray.shutdown()
    print("[train-bench] plain loop, 1 thread, again (the machine's drift)", flush=True)
    plain_1_again = plain_loop_at(RAY_WORKER_NICENESS, config, dataset, threads=1)
    plain_1_nice_0 = plain_loop_at(0, config, dataset, threads=1)

    baseline = (plain_1["chunks_per_second"] + plain_1_again["chunks_per_second"]) / 2
    one, two = runs[1]["chunks_per_second"], runs[2]["chunks_per_second"]
    report = {
        "name": "train",
        "value": round(one, 2),
        "unit": "chunks/s trained (stages 1 + 2, last epoch), Ray Train 1 worker x 1 thread",
        "baseline": "plain single-process PyTorch loop, same model/data/batches, 1 thread, niceness 15 as Ray's workers, same run "
                    "(mean of a run before and after the Ray runs)",
        "baseline_value": round(baseline, 2),
        "ratio": round(one / baseline, 3),
        "command": "python bench/train_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "details": {
            "ratio_2_workers_vs_plain_1_thread": round(two / baseline, 3),
            "ratio_2_workers_vs_plain_2_threads": round(two / plain_2["chunks_per_second"], 3),
            "plain_1_thread": plain_1, "plain_1_thread_again": plain_1_again, "plain_2_threads": plain_2,
            "plain_1_thread_at_niceness_0": plain_1_nice_0,
            "ratio_1_worker_vs_plain_at_niceness_0": round(one / plain_1_nice_0["chunks_per_second"], 3),
            "ray_train_1_worker": runs[1], "ray_train_2_workers": runs[2],
            "ray_start_seconds": round(ray_start, 1),
            "dataset": dataset.location, "batch_size": config.data.batch_size, "epochs": args.epochs,
            "note": "seconds per step of the last epoch; data_loading is the part of the embedding, stage and "
                    "validation time spent waiting on data and building batches",
            "machine": f"{os.cpu_count()} CPUs, no GPU; other processes shared the CPUs",
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
    }
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("value", "baseline_value", "ratio")}), f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
