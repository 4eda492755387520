"""How should a sweep use a CPU machine's cores: one trial at a time on every core, or one trial per
core? DeepEmoCluster's training step (forward + backward + Adam, stage 2) timed both ways in the same run.

    python bench/trial_parallelism_bench.py [--sentences 32] [--steps 4]

Baseline: one process with as many threads as cores. Ours: as many single-thread processes as
cores, stepping at once (what `configs/sweep/ravdess_quarter.yaml` runs: `scaling.num_workers=0`,
`cpus_per_worker=1`, `max_concurrent` = cores). Writes bench/results/trial_parallelism.json: chunks
trained per second, all processes together. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def chunks_per_second(threads: int, sentences: int, steps: int, start, out) -> None:
    """In a fresh process: time `steps` training steps after one warm-up, once `start` is set."""
    import torch

    from cluster_train.model.blocks import ModelConfig
    from cluster_train.model.kinds import Stage, get_kind

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    kind, stage = get_kind("deepemocluster"), Stage(2, "labeled", ())
    model = kind.build(ModelConfig()).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    chunks = torch.randn(sentences * 11, 62, 128)
    targets, labels = torch.randn(sentences, 3), torch.randint(0, 10, (sentences * 11,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        kind.loss(stage, model(chunks), chunks, targets, 11, labels).backward()
        optimizer.step()

    step()
    start.wait()
    began = time.perf_counter()
    for _ in range(steps):
        step()
    out.put(steps * len(chunks) / (time.perf_counter() - began))


def run(processes: int, threads: int, sentences: int, steps: int) -> list[float]:
    context = multiprocessing.get_context("spawn")
    start, out = context.Event(), context.Queue()
    workers = [context.Process(target=chunks_per_second, args=(threads, sentences, steps, start, out))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    time.sleep(1)
    start.set()
    rates = [out.get(timeout=1800) for _ in workers]
    for worker in workers:
        worker.join()
    return rates


def main(argv=None) -> int:
    from cluster_train.train.precision import cpu_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    one = run(1, cores, args.sentences, args.steps)
    many = run(cores, 1, args.sentences, args.steps)
    report = {
        "name": "trial_parallelism",
        "value": round(sum(many), 1), "unit": f"chunks trained per second, {cores} single-thread processes together",
        "baseline": f"one process with {cores} threads, same run", "baseline_value": round(one[0], 1),
        "ratio": round(sum(many) / one[0], 3),
        "command": "python bench/trial_parallelism_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "details": {"per_process": [round(r, 1) for r in many], "chunks_per_step": args.sentences * 11,
                    "steps": args.steps, "cpu": cpu_model(), "cores": cores,
                    "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
    }
    (REPO / "bench" / "results" / "trial_parallelism.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("value", "baseline_value", "ratio")} | report["details"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
