"""The prep job: manifest -> shards processed in parallel by Ray Data -> one dataset folder.

Output layout (local folder or URI):
    part-NNNNN-<hash>.parquet   mel frames of one shard's utterances (schema: `shards.frame_schema`)
    part-NNNNN-<hash>.json      that shard's summary: counts, statistics, rejects (marks it done)
    settings.json               the settings the output was made with (a rerun must match them)
    dataset.json                counts, settings, normalisation statistics, listing hash, shards
    rejects.parquet             id, audio, split, reason of every file that was not used
    manifest.parquet            the input manifest
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import ray
from tqdm import tqdm

from data_prep.config import ConfigError, PrepConfig, output_settings
from data_prep.frames import FORMAT
from data_prep.guards import refuse_node_local_paths, refuse_outputs_lost_after_job
from data_prep.importers import build_manifest
from data_prep.manifest import Utterance, listing_hash, manifest_table
from data_prep.shards import ShardPlan, plan_shards, write_shard
from data_prep.stats import RunningStats
from data_prep.storage import OutputFolder

log = logging.getLogger(__name__)


@dataclass
class PrepSummary:
    output: str
    utterances: dict[str, int]
    audio_seconds: dict[str, float]
    rejected: int
    rejected_by_kind: dict[str, int]
    shards_total: int
    shards_written: int
    stats_frames: int
    wall_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def text(self) -> str:
        total = sum(self.utterances.values())
        hours = sum(self.audio_seconds.values()) / 3600
        splits = ", ".join(f"{s} {n}" for s, n in sorted(self.utterances.items()))
        lines = [
            f"prep: wrote {total} utterances ({hours:.2f} audio-hours; {splits}) to {self.output}",
            f"prep: shards {self.shards_written} written now, {self.shards_total - self.shards_written} "
            f"already done, {self.shards_total} in all; {self.wall_seconds:.1f} s",
            f"prep: rejected {self.rejected}"
            + (f" ({', '.join(f'{k} {n}' for k, n in sorted(self.rejected_by_kind.items()))})" if self.rejected else "")
            + " -> rejects.parquet",
            f"prep: normalisation statistics over {self.stats_frames} frames",
        ]
        return "\n".join(lines + [f"prep: warning: {w}" for w in self.warnings])


def run_prep(config: PrepConfig) -> PrepSummary:
    """Prepare the dataset; resumes a killed run and does nothing new on a finished one."""
    refuse_outputs_lost_after_job({"output": config.output})
    if not ray.is_initialized() and os.environ.get("RAY_ADDRESS"):  # joining a cluster (as a job does): look first
        ray.init(logging_level=logging.WARNING)
    if ray.is_initialized():  # else checked once _process_on_ray starts or finds a Ray
        _refuse_node_local_paths(config)
    started = time.perf_counter()
    manifest = build_manifest(config.sources)  # a manifest error stops here, before any work
    output = OutputFolder(config.output)
    settings = output_settings(config)
    _claim_output(output, settings, config.overwrite)
    plans = plan_shards(manifest, settings, config.shard_size)
    finished = set(output.list("part-"))
    todo = [plan for plan in plans if plan.summary not in finished]
    if todo:
        _process_on_ray(todo, config)
    summary = _finalize(output, plans, manifest, settings)
    summary.shards_written = len(todo)
    summary.wall_seconds = time.perf_counter() - started
    return summary


def _claim_output(output: OutputFolder, settings: dict, overwrite: bool) -> None:
    output.make()
    if output.exists("settings.json") and not overwrite:
        previous = output.read_json("settings.json")
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise ConfigError(
                f"config key '{changed[0] if changed else 'output'}': {output.location} was prepared "
                f"with other settings ({', '.join(changed)} differ); use a new output or overwrite=true"
            )
    output.remove_temporaries()
    output.write_json("settings.json", settings)


def _refuse_node_local_paths(config: PrepConfig) -> None:
    refuse_node_local_paths({"output": config.output,
                             **{f"sources[{i}].path": source.path for i, source in enumerate(config.sources)}})


def _process_on_ray(todo: list[ShardPlan], config: PrepConfig) -> None:
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
        _refuse_node_local_paths(config)
    context = ray.data.DataContext.get_current()
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our progress bar replaces Ray Data's own
    items = [{"name": plan.name, "rows": json.dumps([dataclasses.asdict(row) for row in plan.rows])} for plan in todo]
    results = ray.data.from_items(items, override_num_blocks=len(items)).map(
        _write_shard_row, fn_kwargs={"config": config}, num_cpus=config.cpus_per_task, concurrency=config.max_workers
    )
    total = sum(len(plan.rows) for plan in todo)
    audio_seconds = 0.0
    started = time.perf_counter()
    with tqdm(total=total, unit="utt", desc="prep", disable=None if config.progress is None else not config.progress) as bar:
        # A bar off by choice stays quiet; one off because the output is not a terminal (a log, `ray job
        # logs`) becomes plain lines.
        lines = ProgressLines(total, config.progress_seconds) if config.progress is None and bar.disable else None
        for row in results.iter_rows():
            summary = json.loads(row["summary"])
            audio_seconds += sum(summary["audio_seconds"].values())
            bar.update(row["rows"])
            rate = audio_seconds / 3600 / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"{rate:.3f} audio-h/s")
            if lines is not None:
                lines.update(row["rows"])


class ProgressLines:
    """Progress as plain lines on stdout, for output that is not a terminal:
    `prep 12,345/500,000 utterances (2.5%)  310 utt/s  ~26 min left`, at most one every `seconds`,
    and a last one when all are done."""

    def __init__(self, total: int, seconds: float):
        self.total, self.seconds = total, seconds
        self.done = 0
        self.started = self.printed = time.perf_counter()

    def update(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self.printed >= self.seconds or self.done >= self.total:
            self.printed = now
            print(self.line(now - self.started), flush=True)

    def line(self, elapsed: float) -> str:
        rate = self.done / max(elapsed, 1e-9)
        if self.done < self.total:
            when = f"~{_duration((self.total - self.done) / rate)} left"
        else:
            when = f"done in {_duration(elapsed)}"
        speed = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"
        share = 100 * self.done / self.total
        return f"prep {self.done:,}/{self.total:,} utterances ({share:.1f}%)  {speed} utt/s  {when}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _write_shard_row(item: dict, config: PrepConfig) -> dict:
    import torch

    torch.set_num_threads(max(1, int(config.cpus_per_task)))
    plan = ShardPlan(item["name"], tuple(Utterance(**row) for row in json.loads(item["rows"])))
    return {"rows": len(plan.rows), "summary": json.dumps(write_shard(plan, config))}


def _finalize(output: OutputFolder, plans: list[ShardPlan], manifest: list[Utterance], settings: dict) -> PrepSummary:
    summaries = [output.read_json(plan.summary) for plan in plans]
    stats = RunningStats.empty(settings["features"]["n_mels"])
    utterances: Counter = Counter()
    seconds: Counter = Counter()
    frames: Counter = Counter()
    rejects: list[dict] = []
    for summary in summaries:
        stats = stats.merge(RunningStats.from_dict(summary["stats"]))
        utterances.update(summary["utterances"])
        seconds.update(summary["audio_seconds"])
        frames.update(summary["frames"])
        rejects.extend(summary["rejects"])
    kinds = Counter(reject["reason"].split(":", 1)[0] for reject in rejects)
    warnings = []
    if stats.count == 0:
        warnings.append(f"no frames in stats_splits {settings['stats_splits']}: no normalisation statistics")
    listing = listing_hash(manifest)
    dataset = {
        "format": FORMAT,
        "settings": settings,
        "listing_hash": listing,
        "dataset_hash": hashlib.sha256((listing + json.dumps(settings, sort_keys=True)).encode()).hexdigest(),
        "shards": [{"file": plan.parquet, "utterances": sum(s["utterances"].values()), "frames": sum(s["frames"].values())}
                   for plan, s in zip(plans, summaries)],
        "counts": {
            "utterances": dict(sorted(utterances.items())),
            "audio_seconds": {k: round(v, 3) for k, v in sorted(seconds.items())},
            "frames": dict(sorted(frames.items())),
            "rejected": len(rejects),
            "rejected_by_kind": dict(sorted(kinds.items())),
        },
        "stats": {
            "splits": settings["stats_splits"],
            **stats.to_dict(),
            "std": stats.std.tolist() if stats.count else None,
        },
    }
    reject_columns = ("id", "audio", "split", "reason")
    output.write_parquet(
        "rejects.parquet",
        pa.table({c: pa.array([r[c] for r in rejects], pa.string()) for c in reject_columns}),
        "zstd",
    )
    output.write_parquet("manifest.parquet", manifest_table(manifest), "zstd")
    output.write_json("dataset.json", dataset)
    planned = {name for plan in plans for name in (plan.parquet, plan.summary)}
    for stale in set(output.list("part-")) - planned:
        output.delete(stale)
    return PrepSummary(
        output=output.location,
        utterances=dict(utterances),
        audio_seconds=dict(seconds),
        rejected=len(rejects),
        rejected_by_kind=dict(kinds),
        shards_total=len(plans),
        shards_written=0,
        stats_frames=stats.count,
        warnings=warnings,
    )
