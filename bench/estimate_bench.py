"""Does the sweep's time estimate match what its trials do? DeepEmoCluster's training step timed by
the estimator (`cluster_train/experiments/estimate.py`) against the real step of a trial (the loss
and batch `bench/trial_parallelism_bench.py` times), each trial beside another, as
`configs/sweep/ravdess_quarter.yaml` trains them.

    python bench/estimate_bench.py [--steps 3]

Value: the estimator's seconds per trained chunk / the real step's, measured in the same run (1.0 is
exact; above 1 the estimate is an upper bound). Baseline: the same for the first estimator (2 steps
of 32 chunks in one process). Writes bench/results/estimate.json. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SENTENCES = 64  # the sweep's data.batch_size: 704 chunks a step


def main(argv=None) -> int:
    from bench.trial_parallelism_bench import run
    from cluster_train.experiments.estimate import time_steps, time_steps_side_by_side
    from cluster_train.train.config import load_train_config
    from cluster_train.train.precision import cpu_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps of the real trial step, per process")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    config = load_train_config(REPO / "configs/train/ravdess_full.yaml",
                               ["scaling.num_workers=0", "scaling.cpus_per_worker=1", f"data.batch_size={SENTENCES}"])
    real = run(cores, 1, SENTENCES, args.steps)  # chunks/s of each single-thread process, side by side
    real_s = sum(1 / rate for rate in real) / len(real)
    ours = time_steps_side_by_side(config, cores)
    small = load_train_config(REPO / "configs/train/ravdess_full.yaml",
                              ["scaling.num_workers=0", "scaling.cpus_per_worker=1", "data.batch_size=3"])
    first = time_steps(small, steps=2)  # 33 chunks, one process: what the first estimator timed
    alone = time_steps(config)  # the real batch, one process
    report = {
        "name": "estimate",
        "value": round(ours.train / real_s, 3),
        "unit": "estimated / measured seconds per trained chunk (DeepEmoCluster, 1 thread, trials side by side)",
        "baseline": "the first estimator: 2 steps of 33 chunks in one process, same run",
        "baseline_value": round(first.train / real_s, 3),
        "ratio": round(ours.train / first.train, 3),
        "command": "python bench/estimate_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "details": {"real_step_ms_per_chunk": round(real_s * 1e3, 1),
                    "estimator_ms_per_chunk": round(ours.train * 1e3, 1),
                    "estimator_forward_ms_per_chunk": round(ours.forward * 1e3, 1),
                    "first_estimator_ms_per_chunk": round(first.train * 1e3, 1),
                    "real_batch_alone_ms_per_chunk": round(alone.train * 1e3, 1),
                    "peak_gib_per_trial": round(ours.peak_bytes / 2**30, 2),
                    "chunks_per_step": SENTENCES * 11, "processes_side_by_side": cores, "steps": args.steps,
                    "cpu": cpu_model(), "cores": cores, "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
    }
    (REPO / "bench" / "results" / "estimate.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("value", "baseline_value", "ratio")} | report["details"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
