"""One pseudo-label step at 100K, 1M and 5.5M synthetic 256-d chunk embeddings over 2 workers, for
each clustering mode, against faiss K-means trained and assigned on all vectors in one process.

    python bench/kmeans_bench.py [--sizes 100001 1000010 5500000] [--modes gather sample allreduce]

Workers are 2 Ray actors (1 CPU, 1 thread each) joined by a gloo process group, as Ray Train's
workers are; each generates its own half of the rows (the driver never holds them). The reference
runs in a separate process (`--reference`, 1 thread by default) on the same rows (the same blockwise
generator), so peak memories are measured apart. Same clustering config everywhere: the project's
defaults (K = 10, 20 iterations) and `--preprocessing` (default: the project's L2 only;
`pca-whiten`: DeepCluster's PCA-256 whitening + L2, the costliest), so labels are comparable by NMI.
Writes bench/results/kmeans.json: value = mode "sample" seconds at the largest size, baseline = the
one-process reference at that size, ratio = ours / baseline.

Data: K = 10 Gaussian blobs, centres N(0, 0.5^2 I), unit noise, d = 256 (separable, not trivially:
the reference finds them, see nmi_reference_vs_truth). Sizes are whole utterances of 11 chunks.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster_train.clustering.kmeans import ClusteringConfig, nmi  # noqa: E402

D, K, NUM_CHUNKS, BLOCK, KEY_BASE = 256, 10, 11, 65_536, 10**9
SEED = 0
# --preprocessing: "default" is the project's (L2 only, bench/results/clustering_ablation.json);
# "pca-whiten" is DeepCluster's, the most expensive (a 256 x 256 projection of every vector). The
# choice travels in the environment so the Ray workers and the reference process apply the same.
PREPROCESSING_CHOICES = {
    "default": dict(pca_dim=None, whiten=False, l2_normalize=True),
    "pca-whiten": dict(pca_dim=256, whiten=True, l2_normalize=True),
}
PREPROCESSING_NAME = os.environ.get("KMEANS_BENCH_PREPROCESSING", "default")
PREPROCESSING = PREPROCESSING_CHOICES[PREPROCESSING_NAME]
GATHER_MAX_ROWS = 1_100_000  # beyond this gather-to-one needs > 14 GB here (see details)


def generate(start: int, stop: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Rows [start, stop) of the synthetic data and their true blob, the same in any process."""
    import torch

    centres = torch.randn(K, D, generator=torch.Generator().manual_seed(seed)) * 0.5
    x = np.empty((stop - start, D), dtype=np.float32)
    truth = np.empty(stop - start, dtype=np.uint8)
    for block in range(start // BLOCK, (stop - 1) // BLOCK + 1):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block + 1)
        rows = torch.randn(BLOCK, D, generator=generator)
        which = torch.randint(0, K, (BLOCK,), generator=generator)
        rows += centres[which]
        lo, hi = max(start, block * BLOCK), min(stop, (block + 1) * BLOCK)
        x[lo - start : hi - start] = rows[lo - block * BLOCK : hi - block * BLOCK].numpy()
        truth[lo - start : hi - start] = which[lo - block * BLOCK : hi - block * BLOCK].numpy()
    return x, truth


def config_for(mode: str) -> ClusteringConfig:
    return ClusteringConfig(num_clusters=K, mode=mode, threads=1, use_gpu=False, **PREPROCESSING)


class BenchRank:
    """One of the 2 workers: its rows, a gloo process group, one pseudo-label step at a time."""

    def setup(self, rank: int, world_size: int, port: int) -> int:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        self.rank, self.world_size = rank, world_size
        return os.getpid()

    def load(self, size: int) -> int:
        utterances = size // NUM_CHUNKS
        bounds = [round(utterances * r / self.world_size) * NUM_CHUNKS for r in range(self.world_size + 1)]
        self.start, stop = bounds[self.rank], bounds[self.rank + 1]
        self.x = None
        self.x, _ = generate(self.start, stop)
        self.keys = KEY_BASE * NUM_CHUNKS + np.arange(self.start, stop, dtype=np.int64)
        return len(self.x)

    def release(self) -> None:
        self.x = None

    def step(self, mode: str, service, epoch: int) -> dict:
        from cluster_train.clustering.labelers import build_labeler

        labeler = build_labeler(config_for(mode), service)
        started = time.perf_counter()
        result = labeler.label(epoch, self.keys, self.x, NUM_CHUNKS)  # allreduce preprocesses x in place
        seconds = time.perf_counter() - started
        if mode == "allreduce":
            self.x = None  # consumed
        labels = result.table.lookup(self.keys).astype(np.uint8)
        return {"seconds": seconds, "labels": labels, "timings": result.timings,
                "summary": {k: v.tolist() if hasattr(v, "tolist") else v for k, v in result.summary.items()},
                "table_bytes": int(result.table.group_keys.nbytes + result.table.labels.nbytes)}


class PeakRss:
    """Polls the RSS of some processes every 20 ms; `peak` per pid (bytes)."""

    def __init__(self, pids: dict[str, int]):
        self.pids, self.peak = pids, {name: 0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        processes = {name: psutil.Process(pid) for name, pid in self.pids.items()}
        while not self._stop.is_set():
            for name, process in processes.items():
                try:
                    self.peak[name] = max(self.peak[name], process.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.02)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def actor_pid(name: str) -> int:
    for process in psutil.process_iter(["cmdline"]):
        if "KMeansService" in " ".join(process.info["cmdline"] or []):
            return process.pid
    raise RuntimeError(f"no KMeansService process found for {name}")


def run_reference(size: int, out: str) -> None:
    """The one-process reference: all rows, PCA-whitening + L2 + faiss.Kmeans on every row."""
    import resource

    import torch

    from cluster_train.clustering.kmeans import fit_preprocessor, preprocess_inplace, run_kmeans

    threads = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(threads)
    x, truth = generate(0, size)
    config = ClusteringConfig(num_clusters=K, threads=threads, use_gpu=False, **PREPROCESSING)
    started = time.perf_counter()
    preprocessor = fit_preprocessor(x, config)
    y = preprocess_inplace(x, preprocessor)  # in place: one N x d array, as the workers hold
    result = run_kmeans(y, config, seed=0)
    seconds = time.perf_counter() - started
    np.save(out + ".labels.npy", result.assignments.astype(np.uint8))
    np.save(out + ".truth.npy", truth)
    Path(out + ".json").write_text(json.dumps({
        "seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "objective": result.objective, "cluster_sizes": result.cluster_sizes.tolist()}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_001, 1_000_010, 5_500_000])
    parser.add_argument("--modes", nargs="+", default=["gather", "sample", "allreduce"])
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "kmeans.json"))
    # 1: on this shared 2-core machine 2 OpenMP threads ran faiss K-means 5x slower than 1 (busy cores)
    parser.add_argument("--reference-threads", type=int, default=1)
    parser.add_argument("--preprocessing", choices=sorted(PREPROCESSING_CHOICES), default=PREPROCESSING_NAME)
    parser.add_argument("--reference", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--reference-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        run_reference(args.reference, args.reference_out)
        return

    if args.preprocessing != PREPROCESSING_NAME:  # re-run with the choice in the environment (see above)
        os.environ["KMEANS_BENCH_PREPROCESSING"] = args.preprocessing
        os.execv(sys.executable, [sys.executable, __file__, *sys.argv[1:]])

    import ray

    from cluster_train.clustering.service import get_or_create_service

    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")  # Ray starts slowly on a busy machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    rank_actor = ray.remote(num_cpus=1)(BenchRank)
    ranks = [rank_actor.remote() for _ in range(2)]
    port = free_port()
    pids = ray.get([r.setup.remote(i, 2, port) for i, r in enumerate(ranks)])
    details: dict = {"sizes": {}, "setup": {
        "workers": 2, "threads_per_worker": 1, "reference_threads": args.reference_threads, "d": D, "k": K, "iterations": 20,
        "preprocessing": {"default": "L2 normalisation only (the project's default)",
                          "pca-whiten": "PCA-256 whitening (eigen floor 1e-5) + L2"}[PREPROCESSING_NAME], "sample_size": config_for("sample").sample_size,
        "cpu": "2 cores (AMD EPYC), shared with other engineers' jobs: load average "
               f"{os.getloadavg()[0]:.1f} at the start", "machine_memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}}
    for size in args.sizes:
        entry: dict = {}
        counts = ray.get([r.load.remote(size) for r in ranks])
        n = sum(counts)
        data_rss = [rss(pid) for pid in pids]
        labels_by_mode = {}
        for mode in args.modes:
            if mode == "gather" and n > GATHER_MAX_ROWS:
                entry[mode] = {"skipped": f"{n} x {D} float32 = {n * D * 4 / 2**30:.1f} GiB would sit in the object "
                               "store and about 3x that in the actor (concatenate, dedup, preprocess): over the "
                               "~14 GB this 23 GB machine can give"}
                continue
            service = None
            watched = {f"worker_{i}": pid for i, pid in enumerate(pids)}
            if mode != "allreduce":
                service = get_or_create_service(f"bench-{mode}-{size}", config_for(mode), 2, max_restarts=0)
                watched["actor"] = actor_pid(mode)
                before_actor = rss(watched["actor"])
            before = {name: rss(pid) for name, pid in watched.items()}
            started = time.perf_counter()
            with PeakRss(watched) as peak:
                outs = ray.get([r.step.remote(mode, service, 0) for r in ranks])
            seconds = time.perf_counter() - started
            labels_by_mode[mode] = np.concatenate([o["labels"] for o in outs])
            entry[mode] = {
                "seconds": round(seconds, 3),
                "seconds_by_step_rank0": {k: round(v, 3) for k, v in outs[0]["timings"].items()},
                "peak_rss_mb": {name: round(v / 2**20) for name, v in peak.peak.items()},
                "rss_before_mb": {name: round(v / 2**20) for name, v in before.items()},
                "objective": outs[0]["summary"]["objective"],
                "cluster_sizes": outs[0]["summary"]["cluster_sizes"],
                "label_table_bytes_per_chunk": round(outs[0]["table_bytes"] / n, 3),
            }
            if service is not None:
                entry[mode]["actor_growth_mb"] = round((peak.peak["actor"] - before_actor) / 2**20)
                ray.kill(service)
            print(f"{n:>9} {mode:>9}: {seconds:7.2f} s  peak RSS {entry[mode]['peak_rss_mb']}", flush=True)
        ray.get([r.release.remote() for r in ranks])  # the reference runs with the workers' rows freed
        out = f"/tmp/kmeans_bench_ref_{os.getpid()}_{size}"
        threads = str(args.reference_threads)
        env = os.environ | {"OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        subprocess.run([sys.executable, __file__, "--reference", str(size), "--reference-out", out], check=True, env=env)
        reference = json.loads(Path(out + ".json").read_text())
        ref_labels, truth = np.load(out + ".labels.npy"), np.load(out + ".truth.npy")
        for suffix in (".json", ".labels.npy", ".truth.npy"):
            os.unlink(out + suffix)
        entry["reference"] = {"seconds": round(reference["seconds"], 3),
                              "peak_rss_mb": round(reference["peak_rss_bytes"] / 2**20),
                              "objective": reference["objective"], "cluster_sizes": reference["cluster_sizes"],
                              "nmi_vs_truth": round(nmi(ref_labels, truth), 4)}
        print(f"{n:>9} reference: {reference['seconds']:7.2f} s  peak RSS {entry['reference']['peak_rss_mb']} MB", flush=True)
        for mode, labels in labels_by_mode.items():
            entry[mode]["nmi_vs_reference"] = round(nmi(labels, ref_labels), 4)
            entry[mode]["nmi_vs_truth"] = round(nmi(labels, truth), 4)
            entry[mode]["ratio_to_reference"] = round(entry[mode]["seconds"] / reference["seconds"], 4)
        entry["rows"], entry["worker_data_rss_mb"] = n, [round(v / 2**20) for v in data_rss]
        details["sizes"][str(n)] = entry
        Path(args.output).write_text(json.dumps(_result(details, args), indent=2) + "\n")  # partial results survive
    ray.shutdown()
    details["setup"]["load_average_end"] = round(os.getloadavg()[0], 1)
    Path(args.output).write_text(json.dumps(_result(details, args), indent=2) + "\n")
    print(json.dumps(_result(details, args)["value"]))


def _result(details: dict, args) -> dict:
    largest = details["sizes"][max(details["sizes"], key=int)]
    ours = largest.get("sample", {}).get("seconds")
    baseline = largest.get("reference", {}).get("seconds")
    return {
        "name": Path(args.output).stem,
        "value": ours, "unit": f"s per pseudo-label step, mode sample, {max(details['sizes'], key=int)} x 256-d over 2 workers",
        "baseline": f"faiss.Kmeans (same preprocessing, {PREPROCESSING_NAME}, all vectors) trained and assigned in one process, "
                    f"{args.reference_threads} thread(s)",
        "baseline_value": baseline,
        "ratio": round(ours / baseline, 4) if ours and baseline else None,
        "command": "python bench/kmeans_bench.py " + " ".join(
            ["--sizes", *map(str, args.sizes), "--modes", *args.modes, "--reference-threads", str(args.reference_threads),
             "--preprocessing", PREPROCESSING_NAME, "--output", os.path.relpath(args.output, REPO)]),
        "details": details,
    }


if __name__ == "__main__":
    main()
