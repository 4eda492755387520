"""What a training run prints: one line per epoch from world rank 0, and little else.

Quiet by default: Ray Train's per-worker report lines (a 2 KB metrics dict per worker per epoch) and
resource messages, Ray Data's per-dataset messages, MLflow's INFO logs and artifact progress bars.
`verbose=True` (`jobs/train.py --verbose`) keeps them all. Ray Data's actors read their logging
config at start, so its quieting reaches them only on a Ray that the run starts itself or joins as a
submitted job (`ray_env`: the driver's runtime env), unless the job's own env sets the key.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from data_prep.guards import submitted_job_runtime_env

RAY_DATA_QUIET = Path(__file__).resolve().parents[1] / "configs" / "logging" / "ray_data_quiet.yaml"


def quiet_process(verbose: bool) -> None:
    """Silence this process's MLflow chatter and Ray Train's report lines unless `verbose` (a
    variable the user set stays as set)."""
    if verbose:
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # Ray Train 2.60 logs "Reporting training result ..." (the metrics again) through a logger named
    # after its file, which RunConfig's LoggingConfig does not reach. (A private module: a later Ray
    # may move it, and then there is nothing to quiet here.)
    with contextlib.suppress(ImportError):
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)


def ray_env(verbose: bool) -> dict[str, str]:
    """Environment variables for the Ray a run joins or starts (`ray.init(runtime_env={"env_vars": ...})`).

    In a `ray job submit` driver, only those its job's runtime env leaves unset: Ray 2.60's ray.init
    refuses a key both set ("Failed to merge the Job's runtime env"), even to the same value."""
    # PYTHONWARNINGS: Ray 2.60 warns in every Ray Data actor that its own `exclude_resources` is deprecated.
    wanted = {} if verbose else {"RAY_DATA_LOGGING_CONFIG": str(RAY_DATA_QUIET),
                                 "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    job_env_vars = (submitted_job_runtime_env() or {}).get("env_vars") or {}
    return {key: value for key, value in wanted.items() if key not in job_env_vars}


def ray_train_log_level(verbose: bool) -> str:
    """For `ray.train.LoggingConfig`: the level of Ray Train's own logs on controller and workers."""
    return "INFO" if verbose else "WARNING"


def epoch_line(metrics: dict, epochs: int, attributes: tuple[str, ...], run: str = "") -> str:
    """`[run] epoch 3/30  stage 1 2.071  stage 2 1.402  dev CCC A 0.612 D 0.433 V 0.120  best 3  41 s`:
    the run named, as trials of a sweep print side by side."""
    parts = [f"[{run}] " * bool(run) + f"epoch {int(metrics['epoch']) + 1}/{epochs}"]
    for stage in (1, 2):
        if f"train/stage{stage}_loss" in metrics:
            parts.append(f"stage {stage} {metrics[f'train/stage{stage}_loss']:.3f}")
    ccc = " ".join(f"{a[0].upper()} {metrics[f'dev/ccc_{a}']:.3f}" for a in attributes)
    parts += [f"dev CCC {ccc}", f"best {int(metrics['dev/best_epoch']) + 1}", f"{metrics['time/epoch']:.0f} s"]
    return "  ".join(parts)


def print_line(line: str) -> None:
    """Print once. Ray Train patches `print` in its workers to log the text as well as print it
    when stdout is wrapped, which showed each line twice; the process's own stdout is not patched."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()
