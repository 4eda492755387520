"""Does `torch.compile` pay for the paper's encoder on this machine? Forward + backward + Adam step of
DeepEmoCluster on one training batch, eager against `torch.compile` (inductor), in the same run.

    python bench/compile_bench.py [--sentences 16] [--steps 5] [--threads 1] [--device cpu]

Writes bench/results/compile_<device>.json: value = compiled steps/s, baseline = eager steps/s, plus
the one-off compile time and how many steps it takes to earn it back.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster_train.model.blocks import ModelConfig  # noqa: E402
from cluster_train.model.kinds import Stage, get_kind  # noqa: E402
from cluster_train.train.precision import cpu_model  # noqa: E402


def time_steps(model, step, steps: int) -> tuple[float, float]:
    """(seconds of the first step, mean seconds of the next `steps`)."""
    started = time.perf_counter()
    step(model)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step(model)
    return first, (time.perf_counter() - started) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kind = get_kind("deepemocluster")
    stage = Stage(2, "labeled", ())
    chunks = torch.randn(args.sentences * 11, 62, 128, device=device)
    targets = torch.randn(args.sentences, 3, device=device)
    labels = torch.randint(0, 10, (len(chunks),), device=device)

    def build():
        torch.manual_seed(0)
        module = kind.build(ModelConfig()).to(device, memory_format=torch.channels_last).train()
        return module, torch.optim.Adam(module.parameters(), lr=5e-4)

    def make_step(optimizer):
        def step(model):
            optimizer.zero_grad(set_to_none=True)
            kind.loss(stage, model(chunks), chunks, targets, 11, labels).backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return step

    module, optimizer = build()
    eager_first, eager = time_steps(module, make_step(optimizer), args.steps)
    module, optimizer = build()
    compiled_first, compiled = time_steps(torch.compile(module), make_step(optimizer), args.steps)
    saved = eager - compiled
    report = {
        "name": f"compile_{device.type}",
        "value": round(1 / compiled, 4), "unit": f"training steps/s ({len(chunks)} chunks a step), torch.compile",
        "baseline": "the same steps in eager mode, same run", "baseline_value": round(1 / eager, 4),
        "ratio": round(eager / compiled, 3),
        "command": "python bench/compile_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "details": {"compile_seconds": round(compiled_first - compiled, 1), "eager_first_step_s": round(eager_first, 2),
                    "steps_to_earn_back_the_compile": (round((compiled_first - compiled) / saved) if saved > 0 else None),
                    "threads": args.threads, "torch": torch.__version__, "cpu": cpu_model(),
                    "device": str(device), "machine": f"{os.cpu_count()} CPUs",
                    "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
    }
    output = REPO / "bench" / "results" / f"compile_{device.type}.json"
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("value", "baseline_value", "ratio")} | report["details"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
