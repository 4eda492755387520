"""How long a sweep will take, said before it trains: a few timed steps of each model kind on this
machine x the chunks each trial passes through per epoch x its epochs.

    costs = {kind: time_steps_side_by_side(config, 2) for ...}  # seconds per chunk, as 2 trials at once
    print(format_estimate(trials, costs, concurrent=2, dataset=dataset))

An upper bound per trial: early stopping (`patience`) often ends a trial sooner.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

import torch

from cluster_train.data.batches import row_counts
from cluster_train.model.kinds import get_kind
from cluster_train.train.config import TrainConfig
from cluster_train.train.runtime import latest_state
from data_prep.config import ConfigError
from data_prep.dataset import PreparedDataset


@dataclass(frozen=True)
class StepCost:
    train: float  # seconds per chunk of a training step (forward, backward, optimizer)
    forward: float  # seconds per chunk in eval mode (embedding, validation, precise BN)
    peak_bytes: int = 0  # the timing process's peak resident memory: about what one trial needs


def time_steps(config: TrainConfig, steps: int = 1, barrier=None) -> StepCost:
    """Time `steps` training steps and forward passes of `config`'s model on batches of its size
    (`data.batch_size` utterances x `data.chunks.num_chunks`, as the trial allocates them), with the
    threads a trial gets (`scaling.cpus_per_worker`), after a small warm-up step; with a `barrier`,
    all its parties start timing at once."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    try:
        model = get_kind(config.model_kind).build(config.model).to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        chunks = config.data.batch_size * config.data.chunks.num_chunks
        x = torch.randn(chunks, config.model.chunk_frames, config.model.n_mels)

        def train_step(batch: torch.Tensor) -> None:
            outputs = model(batch)
            sum(value.float().mean() for value in outputs.values()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        train_step(x[:32])
        if barrier is not None:
            barrier.wait()
        started = time.perf_counter()
        for _ in range(steps):
            train_step(x)
        train = (time.perf_counter() - started) / (steps * chunks)
        model.eval()
        with torch.no_grad():
            started = time.perf_counter()
            for _ in range(steps):
                model(x)
        forward = (time.perf_counter() - started) / (steps * chunks)
        return StepCost(train, forward, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux
    finally:
        torch.set_num_threads(threads)


def time_steps_side_by_side(config: TrainConfig, copies: int, steps: int = 1) -> StepCost:
    """`time_steps` in `copies` processes at once, the mean of them: trials that share this machine
    share its memory bandwidth and caches, so the estimate times them as they will train
    (`bench/estimate_bench.py` compares it with the real trial step)."""
    if copies <= 1:
        return time_steps(config, steps)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(copies, mp_context=context) as pool:
        barrier = manager.Barrier(copies)
        futures = [pool.submit(time_steps, config, steps, barrier=barrier) for _ in range(copies)]
        try:
            costs = [future.result() for future in futures]
        except BrokenProcessPool as error:
            raise ConfigError(f"config key 'max_concurrent': {copies} {config.model_kind} trials at once did not "
                              f"survive a timed step each here (a process was killed: out of memory?); train "
                              f"fewer at a time") from error
    return StepCost(sum(c.train for c in costs) / copies, sum(c.forward for c in costs) / copies,
                    max(c.peak_bytes for c in costs))


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


def trial_seconds(config: TrainConfig, cost: StepCost, dataset: PreparedDataset, rows: dict[str, int],
                  epochs: int | None = None) -> float:
    """At most this many seconds for `epochs` of `config` (all of them by default; one worker's
    speed x its workers)."""
    train, forward = epoch_chunks(config, dataset, rows)
    workers = max(1, config.scaling.num_workers)
    epochs = config.epochs if epochs is None else epochs
    return epochs * (train * cost.train + forward * cost.forward) / workers


def format_estimate(pending: list, costs: dict[str, StepCost], concurrent: int, dataset: PreparedDataset) -> str:
    """Lines for the console: seconds per trial by grid point, and the total wall time. A trial
    killed before is counted for the epochs its checkpoints have not finished."""
    by_point: dict[str, list[float]] = {}
    resumed = 0
    rows: dict[tuple, dict[str, int]] = {}  # trials of one data config and seed read the same rows
    for trial in pending:
        key = (repr(trial.config.data), trial.config.seed)
        if key not in rows:
            rows[key] = row_counts(dataset, trial.config.data, trial.config.seed)
        state = latest_state(trial.config.run_dir)
        left = trial.config.epochs if state is None else state.epochs_left(trial.config.epochs, trial.config.patience)
        resumed += left < trial.config.epochs
        seconds = trial_seconds(trial.config, costs[trial.config.model_kind], dataset, rows[key], left)
        by_point.setdefault(trial.point, []).append(seconds)
    total = sum(sum(seconds) for seconds in by_point.values())
    wall = wall_seconds([seconds for point in by_point.values() for seconds in point], concurrent)
    timed = ", ".join(f"{k} {c.train * 1e3:.1f} ms/chunk ({c.forward * 1e3:.1f} forward only)" for k, c in costs.items())
    lines = [f"estimate, from {timed} timed here (an upper bound: every epoch run):"]
    if resumed:
        lines.append(f"  {resumed} trial(s) resume from a checkpoint: counted for their epochs left (none for "
                     f"one that stopped early)")
    for point, seconds in by_point.items():
        shortest, longest = _duration(min(seconds)), _duration(max(seconds))
        each = f"x {longest}" if shortest == longest else f"of {shortest} to {longest} each"  # resumed ones: fewer epochs
        lines.append(f"  {point}: {len(seconds)} trial(s) {each}")
    lines.append(f"  total {_duration(total)} of training, {_duration(wall)} with {concurrent} trial(s) at a time")
    need = max(c.peak_bytes for c in costs.values()) * concurrent
    lines.append(f"  memory: about {need / 2**30:.1f} GiB for {concurrent} trial(s) at once (the largest step timed "
                 f"here); this machine has {memory_bytes() / 2**30:.1f} GiB")
    return "\n".join(lines)


def wall_seconds(seconds: list[float], concurrent: int) -> float:
    """How long trials of these lengths take in this order, `concurrent` at a time, each starting
    when one before it ends (as Tune starts them): 3 equal trials 2 at a time take two trials' time."""
    slots = [0.0] * max(1, concurrent)
    for length in seconds:
        slots[slots.index(min(slots))] += length
    return max(slots)


def busy_warning(load: float, cpus: int) -> str | None:
    """A line for an estimate whose steps were timed while other work ran here (`load`: the load
    average over the minute before timing): they ran slower than trials that get the CPUs to
    themselves will train."""
    if load < 0.5 * cpus:
        return None
    return (f"  this machine was busy as the steps were timed (load {load:.1f} on {cpus} CPUs): the estimate is "
            f"too long for trials that will have the CPUs to themselves")


def memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if seconds <= 0:
        return "0 min"
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(minutes, 1)} min"
