"""Prep throughput against the machine's ceiling and a plain librosa loop; memory and storage, at
1x and 10x RAVDESS.

    python bench/prep_bench.py [--source ../shared/data/ravdess16k] [--scales 1 10]

Measured in the same run on the same files, each warmed up first (librosa compiles on its first call;
Ray workers import torch once):
- the ceiling: read + decode + mel (prep's own functions), nothing written, in one plain process per
  core, all cores at once: what this CPU can do before any storage, Ray or Arrow;
- the librosa loop: librosa.load + melspectrogram in one process (the baseline of earlier runs);
- the pipeline: `run_prep` on a running Ray (its start-up is reported on its own line).
The headline ratio is pipeline / ceiling at the largest scale. 10x repeats every file under new ids.
Writes bench/results/prep.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.config import PrepConfig, load_config  # noqa: E402
from data_prep.dataset import PreparedDataset  # noqa: E402
from data_prep.importers import import_ravdess  # noqa: E402
from data_prep.pipeline import run_prep  # noqa: E402

PROJECTION_SEGMENTS, PROJECTION_SECONDS = 500_000, 6.0


class PeakMemory:
    """Samples the RSS of this process (the driver) and of Ray's worker processes (`ray::...`)."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.driver, self.workers = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            workers = 0
            for process in psutil.process_iter(["name", "cmdline", "memory_info"]):
                try:
                    title = " ".join(process.info["cmdline"] or [])
                    if title.startswith("ray::") and process.info["memory_info"] is not None:
                        workers += process.info["memory_info"].rss
                except psutil.Error:
                    continue
            self.driver = max(self.driver, me.memory_info().rss)
            self.workers = max(self.workers, workers)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def write_manifest(path: Path, rows: list, scale: int) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "audio", "split", "arousal", "dominance", "valence"])
        for copy in range(scale):
            for u in rows:
                writer.writerow([f"x{copy}/{u.id}", u.audio, u.split, u.arousal, u.dominance, u.valence])
    return path


def _decode_and_mel(paths: list[str]) -> float:
    """Audio seconds of `paths` read, decoded and turned into mel frames by prep's own functions."""
    import torch

    from data_prep.audio import load_audio
    from data_prep.config import FeatureConfig
    from data_prep.shards import mel_extractor
    from data_prep.storage import read_bytes

    torch.set_num_threads(1)
    mel, audio = mel_extractor(FeatureConfig()), 0.0
    for path in paths:
        wave = load_audio(read_bytes(path), path, 16000)
        mel(wave)
        audio += len(wave) / 16000
    return audio


def ceiling(paths: list[str], processes: int) -> tuple[float, float]:
    """(wall seconds, audio seconds) of `_decode_and_mel` in `processes` plain processes at once,
    each on an equal share of `paths` (started and warmed up before the clock starts)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_decode_and_mel, [paths[:4]] * processes)  # imports and first-call costs, off the clock
        shares = [paths[i::processes] for i in range(processes)]
        started = time.perf_counter()
        audio = sum(pool.map(_decode_and_mel, shares))
        return time.perf_counter() - started, audio


def librosa_loop(paths: list[str]) -> tuple[float, float]:
    """(wall seconds, audio seconds) of librosa.load + melspectrogram over `paths`, one process."""
    import librosa

    started, audio = time.perf_counter(), 0.0
    for path in paths:
        wave, rate = librosa.load(path, sr=16000)
        librosa.feature.melspectrogram(y=wave, sr=rate, n_fft=512, hop_length=256, n_mels=128, power=2.0)
        audio += len(wave) / rate
    return time.perf_counter() - started, audio


def run_pipeline(manifest: Path, output: Path, *overrides: str) -> dict:
    config = load_config(
        PrepConfig, None,
        [f"sources=[{{kind: csv, path: {manifest}}}]", f"output={output}", "progress=false", *overrides],
    )
    driver, machine = psutil.Process(), psutil.cpu_times()
    driver_before = sum(driver.cpu_times()[:2])
    with PeakMemory() as memory:
        started = time.perf_counter()
        summary = run_prep(config)
        wall = time.perf_counter() - started
    after = psutil.cpu_times()
    busy = (sum(after) - after.idle) - (sum(machine) - machine.idle)
    driver_cpu = sum(driver.cpu_times()[:2]) - driver_before
    audio = sum(summary.audio_seconds.values())
    utterances = sum(summary.utterances.values())
    stored = sum(p.stat().st_size for p in output.glob("part-*.parquet"))
    return {
        "wall_s": round(wall, 3),
        "audio_s": round(audio, 1),
        "utterances": utterances,
        "audio_s_per_s": round(audio / wall, 1),
        "ms_per_utterance": round(1000 * wall / utterances, 3),
        "peak_rss_driver_mb": round(memory.driver / 2**20, 1),
        "peak_rss_workers_mb": round(memory.workers / 2**20, 1),
        "bytes_per_audio_s": round(stored / audio, 1),
        "busy_cores": round(busy / wall, 2),  # machine-wide, of os.cpu_count()
        "driver_share_of_busy_cpu": round(driver_cpu / busy, 3),  # Ray Data's executor, the progress loop, this bench's sampler
    }


def float16_error(output16: Path, output32: Path) -> float:
    """Largest |normalised float16 - normalised float32| over every stored value (z units)."""
    d16, d32 = PreparedDataset(str(output16)), PreparedDataset(str(output32))
    normalize = d32.normalizer()
    worst = 0.0
    for shard16, shard32 in zip(d16.shard_uris(), d32.shard_uris()):
        import pyarrow.parquet as pq

        a = d16.frame_format.frames_of(pq.read_table(shard16, columns=["frames"])["frames"])[0]
        b = d32.frame_format.frames_of(pq.read_table(shard32, columns=["frames"])["frames"])[0]
        worst = max(worst, float(np.abs(normalize(a.astype(np.float32)) - normalize(b)).max()))
    return worst


def storage_bound(output: Path) -> dict:
    """What lossless storage of these float16 frames can reach: their order-0 entropy, and zstd on
    the raw bytes against zstd on the bytes split into low and high planes (Parquet's
    BYTE_STREAM_SPLIT idea), as bytes per audio-second."""
    import pyarrow as pa

    dataset = PreparedDataset(str(output))
    table = dataset.read_table(columns=["duration", "frames"])
    frames = dataset.frame_format.frames_of(table["frames"])[0]
    audio = float(np.sum(table["duration"].to_numpy()))
    _, counts = np.unique(frames.view(np.uint16), return_counts=True)
    share = counts / counts.sum()
    bits = float(-(share * np.log2(share)).sum())
    zstd = pa.Codec("zstd", compression_level=1)
    planes = np.ascontiguousarray(frames.view(np.uint8).reshape(-1, 2).T)
    return {
        "raw_bytes_per_audio_s": round(frames.nbytes / audio, 1),
        "order0_entropy_bits_per_value": round(bits, 2),
        "order0_entropy_bytes_per_audio_s": round(bits / 8 * frames.size / audio, 1),
        "zstd_raw_bytes_per_audio_s": round(len(zstd.compress(frames.tobytes())) / audio, 1),
        "zstd_byte_planes_bytes_per_audio_s": round(len(zstd.compress(planes.tobytes())) / audio, 1),
    }


def stage_costs(rows: list, config: PrepConfig) -> dict[str, float]:
    """Milliseconds per utterance of each step of one shard, one process, one thread, warmed up."""
    import pyarrow.parquet as pq
    import torch

    from data_prep.audio import load_audio
    from data_prep.shards import SMALL_COLUMNS, ShardBuilder, mel_for, to_storage_dtype
    from data_prep.stats import RunningStats
    from data_prep.storage import read_bytes

    torch.set_num_threads(1)
    mel = mel_for(config)
    stats = RunningStats.empty(config.features.n_mels)
    costs = dict.fromkeys(["read", "decode", "mel", "cast_and_stats"], 0.0)
    for row in rows:
        t0 = time.perf_counter()
        data = read_bytes(row.audio)
        t1 = time.perf_counter()
        wave = load_audio(data, row.audio, 16000)
        t2 = time.perf_counter()
        frames = mel(wave)
        t3 = time.perf_counter()
        to_storage_dtype(frames, config.storage_dtype)
        stats.update(frames)
        t4 = time.perf_counter()
        for key, seconds in zip(costs, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            costs[key] += seconds
    builder = ShardBuilder(config)
    for row in rows:
        builder.add(row)
    started = time.perf_counter()
    table = builder.table()
    costs["arrow_table"] = time.perf_counter() - started
    started = time.perf_counter()
    pq.write_table(table, tempfile.mktemp(suffix=".parquet"), compression=config.compression,
                   use_dictionary=SMALL_COLUMNS, write_statistics=SMALL_COLUMNS)
    costs["parquet_write"] = time.perf_counter() - started
    return {key: round(1000 * seconds / len(rows), 3) for key, seconds in costs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(REPO.parent / "shared/data/ravdess16k"))
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--out", default=str(REPO / "bench/results/prep.json"))
    args = parser.parse_args()

    rows = import_ravdess(args.source)
    work = Path(tempfile.mkdtemp(prefix="prep-bench-"))
    import ray

    started = time.perf_counter()
    ray.init(logging_level="WARNING", include_dashboard=False)
    startup = time.perf_counter() - started
    print(f"ray start-up: {startup:.2f} s ({os.cpu_count()} CPUs)")

    warm = write_manifest(work / "warm.csv", rows[:64], 1)
    run_pipeline(warm, work / "warm-out")
    librosa_loop([u.audio for u in rows[:4]])

    stage_config = load_config(PrepConfig, None, ["sources=[{kind: ravdess, path: .}]", f"output={work / 'stages'}"])
    stages = stage_costs(rows[:256], stage_config)
    print(f"one process, ms per utterance by step: {stages}")

    cores = os.cpu_count() or 1
    results = {}
    for scale in args.scales:
        manifest = write_manifest(work / f"x{scale}.csv", rows, scale)
        ours = run_pipeline(manifest, work / f"x{scale}")
        paths = [u.audio for u in rows] * scale
        top_wall, top_audio = ceiling(paths, cores)
        base_wall, base_audio = librosa_loop(paths)
        ours["ceiling_audio_s_per_s"] = round(top_audio / top_wall, 1)
        ours["ceiling_ms_per_utterance_per_core"] = round(1000 * top_wall * cores / len(paths), 3)
        ours["librosa_audio_s_per_s"] = round(base_audio / base_wall, 1)
        ours["librosa_ms_per_utterance"] = round(1000 * base_wall / len(paths), 3)
        ours["share_of_ceiling"] = round(ours["audio_s_per_s"] / ours["ceiling_audio_s_per_s"], 3)
        ours["ratio_to_librosa"] = round(ours["audio_s_per_s"] / ours["librosa_audio_s_per_s"], 2)
        results[f"x{scale}"] = ours
        print(f"{scale}x: pipeline {ours['audio_s_per_s']} audio-s/s, ceiling {ours['ceiling_audio_s_per_s']} "
              f"({ours['share_of_ceiling']:.0%}), librosa loop {ours['librosa_audio_s_per_s']}; {json.dumps(ours)}")

    float32 = run_pipeline(write_manifest(work / "x1.csv", rows, 1), work / "x1-float32", "storage_dtype=float32")
    error = float16_error(work / "x1", work / "x1-float32")
    bound = storage_bound(work / "x1")
    print(f"storage bound of the float16 frames: {json.dumps(bound)}")
    print(f"float16 storage: {results['x1']['bytes_per_audio_s']} B/audio-s, float32 {float32['bytes_per_audio_s']}; "
          f"largest error after normalisation {error:.2e}")

    top = results[f"x{max(args.scales)}"]
    per_core = top["audio_s_per_s"] / cores
    total_audio = PROJECTION_SEGMENTS * PROJECTION_SECONDS
    projection = {
        "segments": PROJECTION_SEGMENTS,
        "seconds_each": PROJECTION_SECONDS,
        "audio_s_per_s_per_core": round(per_core, 1),
        "this_machine_hours": round(total_audio / top["audio_s_per_s"] / 3600, 2),
        **{f"{n}_workers_of_16_cores_hours": round(total_audio / (per_core * 16 * n) / 3600, 3) for n in (1, 4, 16)},
        "output_gb_float16": round(top["bytes_per_audio_s"] * total_audio / 1e9, 1),
        "assumes": "throughput linear in cores and workers (tasks share nothing but the output store)",
    }
    result = {
        "name": "prep",
        "value": top["audio_s_per_s"],
        "unit": "audio-seconds per wall-second",
        "baseline": "the ceiling: read + decode + mel by prep's functions, nothing written, one plain process per "
                    "core, all cores at once, same files, warmed up",
        "baseline_value": top["ceiling_audio_s_per_s"],
        "ratio": top["share_of_ceiling"],
        "command": "python bench/prep_bench.py " + " ".join(sys.argv[1:]),
        "details": {
            "cpus": cores,
            "goals": {"share_of_ceiling": ">= 0.75 at the largest scale", "bytes_per_audio_s": "<= 5110 (half of "
                      "10,220: chunks stored by prep)", "peak_rss": "flat from 1x to 10x"},
            "ray_startup_s": round(startup, 2),
            "peak_rss_workers_ratio_10x_vs_1x": round(
                results[f"x{max(args.scales)}"]["peak_rss_workers_mb"] / results[f"x{min(args.scales)}"]["peak_rss_workers_mb"], 3),
            "single_process_ms_per_utterance_by_step": stages,
            "scales": results,
            "time_per_utterance_ratio_10x_vs_1x": round(
                results[f"x{max(args.scales)}"]["ms_per_utterance"] / results[f"x{min(args.scales)}"]["ms_per_utterance"], 3),
            "storage": {
                "float16_bytes_per_audio_s": results["x1"]["bytes_per_audio_s"],
                "float32_bytes_per_audio_s": float32["bytes_per_audio_s"],
                "float16_max_abs_error_after_normalisation": error,
                "before_frames_once_bytes_per_audio_s": 10220.4,
                "lossless_bound_float16": bound,
            },
            "projection": projection,
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["details"]["projection"], indent=1))
    print(f"wrote {args.out}")
    ray.shutdown()


if __name__ == "__main__":
    main()
