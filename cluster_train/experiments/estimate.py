"""How long a sweep will take, said before it trains: a few timed steps of each model kind on this
machine x the chunks each trial passes through per epoch x its epochs.

    costs = {kind: time_steps(config) for ...}  # seconds per chunk, training and forward-only, per kind
    print(format_estimate(trials, costs, concurrent=2, dataset=dataset))

An upper bound per trial: early stopping (`patience`) often ends a trial sooner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cluster_train.data.batches import row_counts
from cluster_train.model.kinds import get_kind
from cluster_train.train.config import TrainConfig
from data_prep.dataset import PreparedDataset


@dataclass(frozen=True)
class StepCost:
    train: float  # seconds per chunk of a training step (forward, backward, optimizer)
    forward: float  # seconds per chunk in eval mode (embedding, validation, precise BN)


def time_steps(config: TrainConfig, steps: int = 2, chunks: int = 32) -> StepCost:
    """Time `steps` training steps and forward passes of `config`'s model on `chunks` random chunks
    (the cost per chunk barely depends on the batch on CPU), with the threads a trial gets
    (`scaling.cpus_per_worker`), after one warm-up step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    try:
        model = get_kind(config.model_kind).build(config.model).to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        x = torch.randn(chunks, config.model.chunk_frames, config.model.n_mels)
        for step in range(steps + 1):
            if step == 1:
                started = time.perf_counter()
            outputs = model(x)
            sum(value.float().mean() for value in outputs.values()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        train = (time.perf_counter() - started) / (steps * chunks)
        model.eval()
        with torch.no_grad():
            started = time.perf_counter()
            for _ in range(steps):
                model(x)
        return StepCost(train, (time.perf_counter() - started) / (steps * chunks))
    finally:
        torch.set_num_threads(threads)


def epoch_chunks(config: TrainConfig, dataset: PreparedDataset, rows: dict[str, int]) -> tuple[int, int]:
    """(chunks trained on, chunks passed forward only) in one epoch of `config`, all workers together;
    `rows`: the run's utterances per dataset (`data.batches.row_counts`)."""
    per_row, batch = config.data.chunks.num_chunks, config.data.batch_size
    kind = config.kind
    train = 0
    for stage in kind.stages:
        passes = config.labeled_passes if stage.shard == "labeled" else 1
        train += passes * (rows[stage.shard] // batch) * batch * per_row  # full batches only (drop_last)
    forward = rows["development"] * per_row
    recomputes = 2 if kind.clusters else 1  # precise BN before the embedding pass and before validation
    forward += recomputes * config.precise_bn.utterances * per_row
    if kind.clusters:
        forward += rows["cluster"] * per_row
    return train, forward


def trial_seconds(config: TrainConfig, cost: StepCost, dataset: PreparedDataset, rows: dict[str, int]) -> float:
    """At most this many seconds for `config` (every epoch run; one worker's speed x its workers)."""
    train, forward = epoch_chunks(config, dataset, rows)
    workers = max(1, config.scaling.num_workers)
    return config.epochs * (train * cost.train + forward * cost.forward) / workers


def format_estimate(pending: list, costs: dict[str, StepCost], concurrent: int, dataset: PreparedDataset) -> str:
    """Lines for the console: seconds per trial by grid point, and the total wall time."""
    by_point: dict[str, list[float]] = {}
    rows: dict[tuple, dict[str, int]] = {}  # trials of one data config and seed read the same rows
    for trial in pending:
        key = (repr(trial.config.data), trial.config.seed)
        if key not in rows:
            rows[key] = row_counts(dataset, trial.config.data, trial.config.seed)
        seconds = trial_seconds(trial.config, costs[trial.config.model_kind], dataset, rows[key])
        by_point.setdefault(trial.point, []).append(seconds)
    total = sum(sum(seconds) for seconds in by_point.values())
    lines = [f"estimate, from {', '.join(f'{k} {c.train * 1e3:.1f} ms/chunk' for k, c in costs.items())} "
             f"timed here (an upper bound: every epoch run):"]
    for point, seconds in by_point.items():
        lines.append(f"  {point}: {len(seconds)} trial(s) x {_duration(max(seconds))}")
    lines.append(f"  total {_duration(total)} of training, {_duration(total / max(1, concurrent))} with "
                 f"{concurrent} trial(s) at a time")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(minutes, 1)} min"
