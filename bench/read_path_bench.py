"""What the training read path delivers to a worker: Parquet shards -> chunks, per CPU core.

    python bench/read_path_bench.py [--source ../shared/data/ravdess16k] [--scale 5] [--passes 2]

RAVDESS is prepared `--scale` times over (every file under new ids) by `run_prep`. Then, measured in
the same run on the same rows:
- per step, one process, one thread, shard by shard: read + decompress the Parquet (`id`, labels,
  `frames`), cut the chunks (`chunks_of`), chunk keys and labels, and the normalisation a CPU worker
  does (on a GPU worker it runs on the device, after the copy);
- the baseline, the layout before this one: the same rows with their 11 chunks of 62 frames stored
  by prep (an Arrow fixed-shape tensor column, float16, zstd, same shard sizes), read the same way;
- streaming as at MSP-Podcast scale: the rows from Ray Data (`PreparedDataset.ray_dataset` as
  training streams them: a pyarrow read task per shard, no in-memory cache; and, for comparison,
  Ray Data's own `read_parquet`) through the trainer's own `ChunkBatches` with its shuffle buffer,
  batch 64. The
  batches go to PyTorch's "meta" device, which stands in for the GPU: what runs on the accelerator
  (the cast to float32 and the normalisation) costs nothing here, as it costs the CPUs nothing there.
  Busy CPU time is measured machine-wide (every Ray process included), so chunks per busy
  CPU-second is what one core delivers.
The cores per GPU follow from the chunks/s one H100 trains (bench/results/gpu_check.json, 23K/s).
Writes bench/results/read_path.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster_train.data.batches import ROW_COLUMNS, ChunkBatches, chunk_keys  # noqa: E402
from cluster_train.data.streaming import READ_CPUS, StreamedShard, StreamPlan  # noqa: E402
from cluster_train.data.config import DataConfig  # noqa: E402
from cluster_train.data.labels import LabelScaler  # noqa: E402
from data_prep.config import ChunkConfig, PrepConfig, load_config  # noqa: E402
from data_prep.dataset import PreparedDataset  # noqa: E402
from data_prep.frames import FrameFormat  # noqa: E402
from data_prep.importers import import_ravdess  # noqa: E402
from data_prep.manifest import ATTRIBUTES  # noqa: E402
from data_prep.pipeline import run_prep  # noqa: E402

GPU_CHUNKS_PER_S_FALLBACK = 23_000  # bench/results/gpu_check.json on one H100, when the file is absent
GOAL_CORES_PER_GPU = 4
BATCH = 64


def gpu_chunks_per_s() -> tuple[float, str]:
    path = REPO / "bench/results/gpu_check.json"
    if path.exists():
        rate = json.loads(path.read_text())["details"]["ddp"]["cuda"]["chunks_per_second"]
        return float(rate), "bench/results/gpu_check.json details.ddp.cuda.chunks_per_second (one H100, DDP step)"
    return float(GPU_CHUNKS_PER_S_FALLBACK), "fallback constant"


def prepare(source: str, scale: int, work: Path) -> PreparedDataset:
    rows = import_ravdess(source)
    manifest = work / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "audio", "split", *ATTRIBUTES])
        for copy in range(scale):
            for u in rows:
                writer.writerow([f"x{copy}/{u.id}", u.audio, u.split, u.arousal, u.dominance, u.valence])
    config = load_config(PrepConfig, None, [f"sources=[{{kind: csv, path: {manifest}}}]",
                                            f"output={work / 'frames'}", "progress=false"])
    run_prep(config)
    return PreparedDataset(config.output)


def write_chunk_layout(dataset: PreparedDataset, chunking: ChunkConfig, folder: Path) -> list[Path]:
    """The same shards with each utterance's chunks stored (the layout before frames-once)."""
    folder.mkdir()
    paths = []
    for index, uri in enumerate(dataset.shard_uris()):
        table = pq.read_table(uri, columns=["id", *ATTRIBUTES, "frames"])
        chunks = np.ascontiguousarray(dataset.frame_format.chunks_of(table["frames"], chunking))
        stored = table.drop(["frames"]).append_column("chunks", pa.FixedShapeTensorArray.from_numpy_ndarray(chunks))
        paths.append(folder / f"part-{index:05d}.parquet")
        pq.write_table(stored, paths[-1], compression="zstd", use_dictionary=["id"], write_statistics=["id"])
    return paths


def per_step(paths: list, column: str, frames: FrameFormat, chunking: ChunkConfig, normalizer,
             scaler: LabelScaler) -> dict:
    """Seconds per step over every shard, one thread; chunks either cut from `frames` or stored."""
    torch.set_num_threads(1)
    seconds = dict.fromkeys(["read_decompress", "to_chunks", "keys_labels", "normalise_on_cpu"], 0.0)
    chunks_total = 0
    for path in paths:
        started = time.perf_counter()
        table = pq.read_table(path, columns=["id", *ATTRIBUTES, column])
        seconds["read_decompress"] += time.perf_counter() - started
        for start in range(0, table.num_rows, BATCH):
            rows = table.slice(start, BATCH)
            t0 = time.perf_counter()
            if column == "frames":
                chunks = frames.chunks_of(rows["frames"], chunking)
            else:
                chunks = rows["chunks"].combine_chunks().to_numpy_ndarray()
            t1 = time.perf_counter()
            chunk_keys(rows["id"].to_pylist(), chunks.shape[1])
            scaler.to_z(np.stack([rows[a].to_numpy(zero_copy_only=False) for a in scaler.attributes], axis=1))
            t2 = time.perf_counter()
            normalizer.torch(torch.from_numpy(chunks).float())
            t3 = time.perf_counter()
            seconds["to_chunks"] += t1 - t0
            seconds["keys_labels"] += t2 - t1
            seconds["normalise_on_cpu"] += t3 - t2
            chunks_total += chunks.shape[0] * chunks.shape[1]
    return {"seconds": seconds, "chunks": chunks_total}


def busy_cpu_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


class RayRows:
    """A Ray Dataset served as training's rows are (`iter_batches` with a pass's seed), through Ray's
    local shuffle buffer of `buffer_rows`."""

    def __init__(self, rows, buffer_rows: int):
        self.rows, self.buffer_rows = rows, buffer_rows

    def iter_batches(self, batch_size: int, local_shuffle_seed: int | None = None, **options):
        buffer = None if local_shuffle_seed is None else self.buffer_rows
        return self.rows.iterator().iter_batches(batch_size=batch_size, local_shuffle_buffer_size=buffer,
                                                 local_shuffle_seed=local_shuffle_seed, **options)


def stream(dataset: PreparedDataset, shard, chunking: ChunkConfig, normalizer, scaler: LabelScaler,
           passes: int) -> dict:
    """Chunks/s and busy CPU-seconds of rows (anything with `iter_batches`) -> ChunkBatches, streamed
    `passes` times after one warm-up pass."""
    batches = ChunkBatches(normalizer, scaler, torch.device("meta"), dataset.frame_format, chunking)

    def one_pass(seed: int) -> int:
        return sum(batch.num_chunks * len(batch.targets) for batch in batches(shard, BATCH, False, seed))

    one_pass(0)
    cpu, started = busy_cpu_seconds(), time.perf_counter()
    chunks = sum(one_pass(seed) for seed in range(1, passes + 1))
    wall, busy = time.perf_counter() - started, busy_cpu_seconds() - cpu
    return {"chunks": chunks, "wall_s": round(wall, 2), "chunks_per_s": round(chunks / wall, 1),
            "busy_cpu_s": round(busy, 2), "busy_cores": round(busy / wall, 2),
            "chunks_per_busy_cpu_s": round(chunks / busy, 1), "loading_s_in_consumer": round(batches.loading_seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(REPO.parent / "shared/data/ravdess16k"))
    parser.add_argument("--scale", type=int, default=5)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench/results/read_path.json"))
    args = parser.parse_args()

    import ray

    ray.init(logging_level="WARNING", include_dashboard=False)
    work = Path(tempfile.mkdtemp(prefix="read-path-bench-"))
    dataset = prepare(args.source, args.scale, work)
    chunking = ChunkConfig()
    normalizer = dataset.normalizer()
    scaler = LabelScaler.fit(dataset.read_table(["train"], ["split", *ATTRIBUTES]))
    frames_paths = dataset.shard_uris()
    chunk_paths = write_chunk_layout(dataset, chunking, work / "chunks")
    on_disk = {"frames": sum(os.path.getsize(p) for p in frames_paths),
               "chunks": sum(os.path.getsize(p) for p in chunk_paths)}

    steps = {}
    for layout, paths in (("frames", frames_paths), ("chunks", chunk_paths)):
        per_step(paths[:1], layout, dataset.frame_format, chunking, normalizer, scaler)  # warm-up: first calls
        profile = per_step(paths, layout, dataset.frame_format, chunking, normalizer, scaler)
        seconds, chunks = profile["seconds"], profile["chunks"]
        cpu_side = seconds["read_decompress"] + seconds["to_chunks"] + seconds["keys_labels"]
        steps[layout] = {
            "chunks": chunks,
            "us_per_chunk": {k: round(1e6 * v / chunks, 2) for k, v in seconds.items()},
            "chunks_per_core_s_gpu_worker": round(chunks / cpu_side, 1),
            "chunks_per_core_s_cpu_worker": round(chunks / (cpu_side + seconds["normalise_on_cpu"]), 1),
            "bytes_on_disk_per_chunk": round(on_disk[layout] / chunks, 1),
        }
        print(f"{layout}: {json.dumps(steps[layout])}")

    # what training streams (`data/streaming.py`): a pyarrow read task per shard, one rank's share
    defaults = DataConfig(dataset="")
    ours_rows = StreamedShard(StreamPlan.from_index(dataset.location, dataset.row_index(None, ["id"])), 0, 1,
                              defaults.read_tasks, defaults.shuffle_buffer_rows, ROW_COLUMNS)
    streamed = stream(dataset, ours_rows, chunking, normalizer, scaler, args.passes)
    print(f"Ray Data (a pyarrow read task per shard) -> ChunkBatches, streamed: {json.dumps(streamed)}")
    # what it streamed before: Ray Data's own Parquet reader
    read_parquet = RayRows(ray.data.read_parquet(frames_paths, num_cpus=READ_CPUS).select_columns(ROW_COLUMNS),
                           defaults.shuffle_buffer_rows)
    before = stream(dataset, read_parquet, chunking, normalizer, scaler, args.passes)
    print(f"ray.data.read_parquet -> ChunkBatches, streamed: {json.dumps(before)}")
    gpu_rate, gpu_source = gpu_chunks_per_s()
    cores_per_gpu = gpu_rate / streamed["chunks_per_busy_cpu_s"]
    ours, baseline = steps["frames"]["chunks_per_core_s_gpu_worker"], steps["chunks"]["chunks_per_core_s_gpu_worker"]
    result = {
        "name": "read_path",
        "value": ours,
        "unit": "chunks per CPU-core-second, Parquet -> chunks a GPU worker copies (read, decompress, cut, keys, labels)",
        "baseline": "the same rows with their chunks stored by prep (the layout before frames-once), read the same way",
        "baseline_value": baseline,
        "ratio": round(ours / baseline, 3),
        "command": "python bench/read_path_bench.py " + " ".join(sys.argv[1:]),
        "details": {
            "cpus": os.cpu_count(),
            "utterances": dataset.info["counts"]["utterances"],
            "chunking": {"num_chunks": chunking.num_chunks, "chunk_frames": chunking.chunk_frames},
            "per_step_one_thread": steps,
            "ray_data_streamed": streamed,
            "ray_data_streamed_with_read_parquet": before,
            "gpu_chunks_per_s": gpu_rate,
            "gpu_chunks_per_s_from": gpu_source,
            "cores_per_gpu_streamed": round(cores_per_gpu, 2),
            "cores_per_gpu_per_step": round(gpu_rate / ours, 2),
            "goal_cores_per_gpu": GOAL_CORES_PER_GPU,
            "meets_goal": bool(cores_per_gpu <= GOAL_CORES_PER_GPU),
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"cores per GPU at {gpu_rate:.0f} chunks/s: {cores_per_gpu:.2f} streamed through Ray Data, "
          f"{gpu_rate / ours:.2f} from the per-step profile (goal <= {GOAL_CORES_PER_GPU}); wrote {args.out}")
    ray.shutdown()


if __name__ == "__main__":
    main()
