"""MSP-Podcast scale, rehearsed on one machine: a 500K-segment manifest of MSP-style ids over the
1,440 real RAVDESS files (decode and mel are real), prepared with the real prep job (killed once
and resumed), then trained for 2 epochs on 2 Ray Train workers with a narrow model and the K-means
mode `configs/train/msp_podcast.yaml` chooses. The same at 1% and 10% shows which costs grow with
the data and which stay flat.

    python bench/scale_rehearsal.py [--root /work/rehearsal] [--scales 0.01 0.1 1] [--stages prep train]

Everything runs as the user runs it: `jobs/prep.py` and `jobs/train.py` in their own processes,
each starting its own local Ray (under `<root>/ray`, so it never meets another Ray on the machine).
Per stage: seconds, rows or chunks per second, peak RSS of the driver, of each Ray Train worker,
of the K-means actor and of everything else Ray runs, Ray's object-store spill, and disk. Each
finished (scale, stage) is kept in `<root>/measured.json`: a rehearsal killed midway runs again
from where it stopped (prep skips the shards it wrote, training resumes from its checkpoint).
Writes bench/results/scale.json from every finished (scale, stage).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.importers import import_ravdess  # noqa: E402

FULL_SEGMENTS = 500_000
SEGMENTS_PER_PODCAST = 250  # MSP ids sort by podcast: a 256-row shard holds one or two podcasts
# Shares of the podcasts by split: MSP-Podcast's labelled sets are a small part of its audio.
SPLIT_SHARES = {"train": 0.08, "development": 0.02, "test1": 0.01, "test2": 0.01}  # the rest: unlabeled
# Whose RAVDESS audio each split's podcasts use: speakers apart, as the real splits are.
ACTORS_OF_SPLIT = {"train": range(1, 17), "unlabeled": range(1, 17), "development": range(17, 21),
                   "test1": range(21, 25), "test2": range(21, 25)}
KILL_AT = 0.3  # prep is killed once this share of its shards is written, then run again
# The paper's network costs ~13 training chunks per CPU-second here; this one ~1,900 (stride 2 from the
# first block), so that 2 epochs over 5.5M chunks fit a night on 2 cores. The data path is the same.
NARROW_MODEL = ["model.channels=[8,8,16,16,32,32,32]", "model.strides=[2,2,2,2,2,1,1]", "model.feature_dim=64"]


def podcast_splits(podcasts: int) -> list[str]:
    """The split of each podcast: every labelled split at least one podcast, else its share, the
    podcasts of each split spread over the ids by a fixed permutation."""
    counts = {split: max(1, round(share * podcasts)) for split, share in SPLIT_SHARES.items()}
    splits = [split for split, count in counts.items() for _ in range(count)]
    splits += ["unlabeled"] * (podcasts - len(splits))
    order = np.random.default_rng(0).permutation(podcasts)
    return [splits[i] for i in order]


def write_manifest(path: Path, segments: int, ravdess: Path) -> dict:
    """`segments` rows `MSP-PODCAST_<podcast>_<segment>` over the RAVDESS files; labels on the
    labelled splits only. Returns rows per split."""
    files = {}
    for u in import_ravdess(str(ravdess)):
        files.setdefault(int(u.speaker.split("_")[1]), []).append(u)
    counts: dict[str, int] = {}
    splits = podcast_splits(-(-segments // SEGMENTS_PER_PODCAST))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "audio", "split", "arousal", "dominance", "valence", "speaker"])
        for row in range(segments):
            podcast, segment = divmod(row, SEGMENTS_PER_PODCAST)
            split = splits[podcast]
            actors = ACTORS_OF_SPLIT[split]
            actor = actors[podcast % len(actors)]
            u = files[actor][(segment * 7 + podcast) % len(files[actor])]
            labels = ([u.arousal, u.dominance, u.valence] if split != "unlabeled" else ["", "", ""])
            writer.writerow([f"MSP-PODCAST_{podcast:04d}_{segment:04d}", u.audio, split, *labels, f"podcast_{podcast}"])
            counts[split] = counts.get(split, 0) + 1
    return counts


def private_bytes(pid: int) -> int:
    """A process's anonymous memory (its own heap and stacks: not the object store's shared pages,
    which RSS also counts, nor mapped files), from /proc/<pid>/smaps_rollup; 0 where unreadable."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    found = re.search(r"^Anonymous:\s+(\d+) kB", text, re.M)
    return int(found.group(1)) * 1024 if found else 0


def machine_used_bytes() -> int:
    """Memory the machine has in use: total - available, shared pages counted once."""
    memory = psutil.virtual_memory()
    return memory.total - memory.available


class Sampler:
    """Peak RSS by role over a process and everything it starts, the same of each process's private
    (anonymous) memory, the machine's memory in use, and the largest object-store spill, sampled every
    `interval` seconds. A Ray worker's RSS counts the object-store pages it has read, which the store
    holds once for the machine: its private memory is what the worker itself adds. With `state`, the
    peaks so far are saved there every `save_every` samples and taken up again by the next Sampler:
    a job interrupted and resumed (a rehearsal longer than a session) reports its peaks over all its
    parts. With `timeline`, a line of JSON is added there every `timeline_every` seconds: the job's
    seconds so far (over all its parts), the largest RSS and private memory of one process of each
    role, and the machine's memory in use, in MB."""

    def __init__(self, pid: int, spill_dir: Path, interval: float = 1.0, state: Path | None = None,
                 save_every: int = 30, timeline: Path | None = None, timeline_every: float = 60.0):
        self.pid, self.spill_dir, self.interval, self.state, self.save_every = pid, spill_dir, interval, state, save_every
        self.timeline, self.timeline_every = timeline, timeline_every
        saved = json.loads(state.read_text()) if state is not None and state.exists() else {}
        self.peak: dict[str, int] = saved.get("peak", {})
        self.peak_total, self.spill_bytes = saved.get("peak_total", 0), saved.get("spill_bytes", 0)
        self.peak_machine = saved.get("peak_machine", 0)
        self.earlier_seconds, self.parts = saved.get("seconds", 0.0), saved.get("parts", 0) + 1
        self._started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def role(title: str) -> str:
        if "RayTrainWorker" in title:
            return "train_worker"
        if "KMeansService" in title:
            return "kmeans_actor"
        return "ray_other" if title.startswith("ray::") or "/ray/" in title else "other"

    def save(self) -> None:
        if self.state is not None:
            self.state.write_text(json.dumps({"peak": self.peak, "peak_total": self.peak_total, "parts": self.parts,
                                              "peak_machine": self.peak_machine, "spill_bytes": self.spill_bytes,
                                              "seconds": self.seconds}))

    @property
    def seconds(self) -> float:
        """Wall seconds over every part of the job."""
        return self.earlier_seconds + time.perf_counter() - self._started

    def _run(self) -> None:
        samples, last_line = 0, -math.inf
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                processes = [root, *root.children(recursive=True)]
            except psutil.Error:
                processes = []
            now: dict[str, list[int]] = {}
            private: dict[str, list[int]] = {}
            for process in processes:
                try:
                    title = " ".join(process.cmdline()) or process.name()
                    rss = process.memory_info().rss
                except psutil.Error:
                    continue
                role = "driver" if process.pid == self.pid else self.role(title)
                now.setdefault(role, []).append(rss)
                private.setdefault(role, []).append(private_bytes(process.pid))
            for role, values in now.items():  # per process for workers: each worker's own peak
                self.peak[role] = max(self.peak.get(role, 0), max(values))
                self.peak[f"{role}_all"] = max(self.peak.get(f"{role}_all", 0), sum(values))
                self.peak[f"private_{role}"] = max(self.peak.get(f"private_{role}", 0), max(private[role]))
            self.peak_total = max(self.peak_total, sum(sum(v) for v in now.values()))
            used = machine_used_bytes()
            self.peak_machine = max(self.peak_machine, used)
            self.spill_bytes = max(self.spill_bytes, folder_bytes(self.spill_dir, only="spill"))
            samples += 1
            if samples % self.save_every == 0:
                self.save()
            if self.timeline is not None and now and self.seconds - last_line >= self.timeline_every:
                last_line = self.seconds
                line = {"seconds": round(self.seconds), "rss_mb": {role: round(max(v) / 2**20) for role, v in now.items()},
                        "private_mb": {role: round(max(v) / 2**20) for role, v in private.items()},
                        "machine_used_mb": round(used / 2**20)}
                with self.timeline.open("a") as out:
                    out.write(json.dumps(line) + "\n")
            self._stop.wait(self.interval)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.save()

    def summary(self) -> dict:
        mb = {(f"peak_{role}_mb" if role.startswith("private_") else f"peak_rss_{role}_mb"): round(value / 2**20, 1)
              for role, value in sorted(self.peak.items())}
        return mb | {"peak_rss_total_mb": round(self.peak_total / 2**20, 1),
                     "peak_machine_used_mb": round(self.peak_machine / 2**20, 1),
                     "object_store_spill_mb": round(self.spill_bytes / 2**20, 1), "job_parts": self.parts}


def folder_bytes(folder: Path, only: str = "") -> int:
    """Bytes of the files under `folder` (whose path contains `only`)."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        if only not in dirpath:
            continue
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def ray_env(root: Path) -> dict:
    """The environment of a job: its own Ray temp folder (no other Ray on the machine is found or
    disturbed), no dashboard needed."""
    return {**os.environ, "RAY_TMPDIR": str(root / "ray"), "PYTHONUNBUFFERED": "1"}


def end_leftover_ray(root: Path) -> None:
    """Kill what a killed job's Ray left running: processes whose command line names its folder."""
    marker = str(root / "ray")
    for process in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(process.info["cmdline"] or []):
                process.kill()
        except psutil.Error:
            continue


def run_job(command: list[str], root: Path, log: Path, kill_when=None, state: Path | None = None,
            timeline: Path | None = None) -> tuple[int, float, dict]:
    """Run `command` (a job of the project) in its own session; (exit code, seconds, sampled memory).
    `kill_when()`: checked every second; when true the job's whole session is killed (SIGKILL).
    `state`: where the job's peaks and seconds so far are kept, for a job that resumes; `timeline`:
    where its memory is written every minute (`Sampler`)."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        job = subprocess.Popen(command, cwd=REPO, env=ray_env(root), stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
        with Sampler(job.pid, root / "ray", state=state, timeline=timeline) as sampler:
            while job.poll() is None:
                if kill_when is not None and kill_when():
                    os.killpg(job.pid, signal.SIGKILL)
                    job.wait()
                    end_leftover_ray(root)
                    break
                time.sleep(1.0)
    return job.returncode, sampler.seconds, sampler.summary()


def shard_files(prepared: Path) -> dict[str, tuple[int, int]]:
    """Shard name -> (inode, mtime) of every Parquet shard whose summary (written last) exists."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in prepared.glob("part-*.parquet")
            if p.with_suffix(".json").exists()}


def prep(root: Path, scale: float, ravdess: Path) -> dict:
    """Manifest, then prep killed at KILL_AT of its shards and run again: every shard written once."""
    folder = root / f"scale_{scale:g}"
    segments = round(FULL_SEGMENTS * scale)
    rows = write_manifest(folder / "manifest.csv", segments, ravdess)
    prepared = folder / "prepared"
    command = [sys.executable, "jobs/prep.py", f"sources=[{{kind: csv, path: {folder / 'manifest.csv'}}}]",
               f"output={prepared}", "progress=false"]
    planned = -(-segments // 256)
    first_code, first_s, first_mem = run_job(
        command, root, folder / "prep.log", kill_when=lambda: len(shard_files(prepared)) >= KILL_AT * planned)
    before_resume = shard_files(prepared)
    code, second_s, second_mem = run_job(command, root, folder / "prep.log")
    if code != 0:
        raise RuntimeError(f"prep at scale {scale:g} failed: see {folder / 'prep.log'}")
    after = shard_files(prepared)
    rewritten = [name for name, stamp in before_resume.items() if after.get(name) != stamp]
    info = json.loads((prepared / "dataset.json").read_text())
    audio_s = sum(info["counts"]["audio_seconds"].values()) if "audio_seconds" in info["counts"] else None
    seconds = first_s + second_s
    return {
        "segments": segments, "rows_by_split": rows, "shards": len(info["shards"]), "planned_shards": planned,
        "killed_after_shards": len(before_resume), "killed_exit_code": first_code,
        "shards_rewritten_on_resume": len(rewritten), "shards_written_once": len(rewritten) == 0 and len(after) == planned,
        "seconds": round(seconds, 1), "first_run_s": round(first_s, 1), "resumed_run_s": round(second_s, 1),
        "segments_per_s": round(segments / seconds, 1), "audio_seconds": audio_s,
        "disk_gb": round(folder_bytes(prepared) / 1e9, 3),
        "memory_first_run": first_mem, "memory_resumed_run": second_mem,
    }


def load_measured(root: Path) -> dict:
    path = root / "measured.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_measured(root: Path, measured: dict) -> None:
    path = root / "measured.json"
    path.write_text(json.dumps(measured, indent=2, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/work/rehearsal"))
    parser.add_argument("--scales", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--stages", nargs="+", default=["prep", "mixing", "train"], choices=["prep", "mixing", "train"])
    parser.add_argument("--ravdess", type=Path, default=REPO.parent / "shared" / "data" / "ravdess16k")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    measured = load_measured(args.root)
    for scale in args.scales:
        for stage in args.stages:
            key = f"{stage}@{scale:g}"
            if key in measured:
                continue
            print(f"{time.strftime('%H:%M:%S')} {key} ...", flush=True)
            run = {"prep": prep, "mixing": mixing, "train": train}[stage]
            measured[key] = run(args.root, scale, args.ravdess) | {"commit": git_commit()}
            save_measured(args.root, measured)
            print(f"{time.strftime('%H:%M:%S')} {key}: {json.dumps(measured[key])}", flush=True)
            write_results(measured, args.scales)


def write_results(measured: dict, scales: list[float]) -> None:
    """bench/results/scale.json: a training worker's peak memory at the largest scale trained
    against the smallest (flat: ratio near 1), everything measured in `details`."""
    trained = sorted(float(key.split("@")[1]) for key in measured if key.startswith("train@"))
    worker = {scale: measured[f"train@{scale:g}"]["memory"]["peak_rss_train_worker_mb"] for scale in trained}
    largest, smallest = (trained[-1], trained[0]) if trained else (None, None)
    result = {
        "name": "scale_rehearsal",
        "value": worker.get(largest), "unit": f"MB peak RSS of a training worker at {largest:g}x 500K segments"
        if largest is not None else "MB",
        "baseline": f"the same at {smallest:g}x" if smallest is not None else None,
        "baseline_value": worker.get(smallest),
        "ratio": round(worker[largest] / worker[smallest], 3) if trained else None,
        "command": "python bench/scale_rehearsal.py --scales " + " ".join(f"{s:g}" for s in scales),
        "details": {"machine": machine(), "full_segments": FULL_SEGMENTS, "narrow_model": NARROW_MODEL,
                    "pending": [f"{stage}@{scale:g}" for scale in scales for stage in ("prep", "mixing", "train")
                                if f"{stage}@{scale:g}" not in measured],
                    "measured": measured},
    }
    path = REPO / "bench" / "results" / "scale.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"{os.cpu_count()} cores ({model}), {psutil.virtual_memory().total / 2**30:.0f} GiB"


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()


def mixing(root: Path, scale: float, ravdess: Path, batches: int = 200) -> dict:
    """Shards a stage-1 batch of 64 draws from: rank 0 of 2, the first `batches` batches of an epoch
    as training streams them, and of the same rows read in order (the stream before: no shuffle)."""
    os.environ.update({"RAY_TMPDIR": str(root / "ray")})
    import ray

    from cluster_train.data.batches import plan_streams
    from cluster_train.data.config import DataConfig
    from cluster_train.data.streaming import StreamedShard
    from cluster_train.train.config import load_train_config
    from data_prep.dataset import PreparedDataset

    dataset = PreparedDataset(str(root / f"scale_{scale:g}" / "prepared"))
    config: DataConfig = load_train_config(REPO / "configs/train/msp_podcast.yaml", [
        f"data.dataset={dataset.location}", f"storage_path={root / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}"]).data
    index = dataset.row_index(None, ["id"])
    shard_of = dict(zip(index["id"].to_pylist(), index["shard"].to_pylist()))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        plan = plan_streams(dataset, config, seed=0)["unlabeled"]
        stream = StreamedShard(plan, 0, 2, config.read_tasks, config.shuffle_buffer_rows, ["id"])

        def shards_per_batch(seed: int | None) -> list[int]:
            counts = []
            for batch in stream.iter_batches(config.batch_size, drop_last=True, local_shuffle_seed=seed):
                counts.append(len({shard_of[i] for i in batch["id"].to_pylist()}))
                if len(counts) == batches:
                    break
            return counts

        mixed, in_order = shards_per_batch(123), shards_per_batch(None)
    finally:
        ray.shutdown()
    return {"batch_size": config.batch_size, "shuffle_buffer_rows": config.shuffle_buffer_rows,
            "shards": len(plan.shards), "batches": len(mixed),
            "shards_per_batch_streamed": {"mean": round(float(np.mean(mixed)), 2), "min": int(np.min(mixed))},
            "shards_per_batch_in_order": {"mean": round(float(np.mean(in_order)), 2), "max": int(np.max(in_order))}}


STAGE_TIMES = ("precise_bn", "embedding", "clustering", "stage1", "stage2", "validation", "data_loading",
               "checkpoint", "epoch")


def train(root: Path, scale: float, ravdess: Path) -> dict:
    """2 epochs of `configs/train/msp_podcast.yaml` on 2 CPU workers with a narrow model, scored
    at the end as every run is; per epoch the stage times and chunks the run logged to MLflow."""
    from mlflow import MlflowClient

    folder = root / f"scale_{scale:g}"
    name, store = f"rehearsal-{scale:g}", f"sqlite:///{root / 'mlflow.db'}"
    command = [sys.executable, "jobs/train.py", "--config", "configs/train/msp_podcast.yaml",
               f"data.dataset={folder / 'prepared'}", f"storage_path={root / 'runs'}", f"tracking.tracking_uri={store}",
               f"name={name}", "epochs=2", "scaling.num_workers=2", "scaling.use_gpu=false",
               "scaling.cpus_per_worker=0.5", *NARROW_MODEL]
    end_leftover_ray(root)  # a part killed with its session (the end of a work session) leaves its Ray
    timeline = folder / "train_timeline.jsonl"
    code, seconds, memory = run_job(command, root, folder / "train.log", state=folder / "train_progress.json",
                                    timeline=timeline)
    if code != 0:
        raise RuntimeError(f"training at scale {scale:g} failed: see {folder / 'train.log'}")
    client = MlflowClient(store)
    run = client.search_runs(client.get_experiment_by_name("deepemocluster").experiment_id,
                             f"tags.mlflow.runName = '{name}'")[0]

    def history(key: str) -> list[float]:
        by_step = {m.step: m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp)}
        return [by_step[step] for step in sorted(by_step)]

    epochs = []
    for epoch in range(2):
        row = {f"{stage}_s": round(history(f"time/{stage}")[epoch], 1) for stage in STAGE_TIMES
               if len(history(f"time/{stage}")) > epoch}
        for stage in ("stage1", "stage2"):
            chunks = 2 * history(f"train/{stage}_chunks")[epoch]  # rank 0's share, as large as rank 1's
            row[f"{stage}_chunks"] = int(chunks)
            row[f"{stage}_chunks_per_s"] = round(chunks / history(f"time/{stage}")[epoch], 1)
        row["clustered_chunks"] = int(sum(history(f"cluster_size/{k}")[epoch] for k in range(10)))
        row["embedding_chunks_per_s"] = round(row["clustered_chunks"] / row["embedding_s"], 1)
        row["dev_ccc"] = {a: round(history(f"dev/ccc_{a}")[epoch], 4) for a in ("arousal", "dominance", "valence")}
        epochs.append(row)
    final = run.data.metrics
    return {
        "seconds": round(seconds, 1), "epochs": epochs,
        "scoring_and_start_s": round(seconds - sum(e["epoch_s"] for e in epochs), 1),
        "scores": {key: round(value, 4) for key, value in final.items() if "/ccc_" in key and key.split("/")[0] != "dev"},
        "memory": memory, "mlflow_run_id": run.info.run_id,
        "worker_rss_timeline": worker_timeline(timeline),
    }


def worker_timeline(path: Path, points: int = 60) -> list[list[int]]:
    """[seconds, MB] of the largest training worker, at most `points` of the timeline's lines
    (evenly spaced), for the memory of a training worker over the whole run."""
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    lines = [line for line in lines if "train_worker" in line["rss_mb"]]
    step = max(1, math.ceil(len(lines) / points))
    return [[line["seconds"], line["rss_mb"]["train_worker"]] for line in lines[::step]]


if __name__ == "__main__":
    main()
