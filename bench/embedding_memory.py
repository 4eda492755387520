"""The K-means embedding pass's memory: how much a training worker's RSS grows over the pass.

    python bench/embedding_memory.py [--batches 1500]

Runs the trainer's own embedding pass (`Trainer._embed`) over `--batches` batches of real RAVDESS
rows (configs/prep/ravdess_full.yaml's dataset, cycled), with the rehearsal's narrow model
(`bench/scale_rehearsal.py`'s `NARROW_MODEL`, untrained) on one CPU thread, the rows handed over by
a second thread as Ray Data's formatting threads hand them to a worker. Each variant runs in a fresh
process:
- `row_buffer`: the embeddings collected in 64 MiB blocks (`train/row_buffer.py`, the code now);
- `batch_arrays`: one small array per batch, concatenated at the end (the code before it).
Writes bench/results/embedding_memory.json: value = RSS growth over the pass with `row_buffer`,
baseline = with `batch_arrays`, both measured in this run (the RSS before the first batch, after
the model and the rows are loaded, to the RSS after the embeddings are returned); details: the
embeddings' own size, the peak and the seconds of each.
"""

from __future__ import annotations

import argparse
import itertools
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

VARIANTS = ("row_buffer", "batch_arrays")
PREP_CONFIG = "configs/prep/ravdess_full.yaml"


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


class CycledRows:
    """`iter_batches` over a table's rows, round and round, `batches` batches handed over by a
    thread (what a worker's Ray Data iterator does)."""

    def __init__(self, rows, batches: int):
        self.rows, self.batches = rows, batches

    def iter_batches(self, batch_size: int, **_) -> Iterator:
        handed = queue.Queue(maxsize=2)

        def produce():
            source = itertools.cycle(list(self.rows.iter_batches(batch_size, drop_last=True)))
            for batch in itertools.islice(source, self.batches):
                handed.put(batch.combine_chunks())  # one chunk a column (a copy where a batch spans two)
            handed.put(None)

        threading.Thread(target=produce, daemon=True).start()
        return iter(handed.get, None)


def embed_batch_arrays(self, shard):
    """The embedding pass before `RowBuffer`: one array per batch, concatenated at the end."""
    import numpy as np
    import torch

    self.module.eval()
    keys, features = [], []
    with torch.no_grad():
        for batch in self.batches(shard, self.config.data.batch_size, drop_last=False):
            keys.append(batch.keys)
            with self.precision.autocast():
                embedded = self.module.embed(batch.chunks)
            features.append(embedded.float().cpu().numpy())
    return np.concatenate(keys), np.concatenate(features)


def measure(variant: str, batches: int) -> dict:
    """One variant in this process: RSS before and after the pass, peak RSS sampled by a thread."""
    import torch

    from accuracy_bench import prepared_dataset
    from scale_rehearsal import NARROW_MODEL

    from cluster_train.data.batches import ROW_COLUMNS, ChunkBatches, InMemoryRows
    from cluster_train.train.config import load_train_config
    from cluster_train.train.launch import fit_label_scaler
    from cluster_train.train.loop import Trainer
    from cluster_train.train.precision import Precision

    torch.set_num_threads(1)
    dataset = prepared_dataset(PREP_CONFIG)
    config = load_train_config(REPO / "configs/train/msp_podcast.yaml", [f"data.dataset={dataset.location}", "tracking.tracking_uri=unused",
                                                                         "storage_path=unused",
                                                                         *NARROW_MODEL])
    rows = InMemoryRows.from_arrow(dataset.read_table(["train"], ROW_COLUMNS))
    trainer = SimpleNamespace(
        module=config.kind.build(config.model).to(memory_format=torch.channels_last), config=config,
        precision=Precision.for_device(config.precision, torch.device("cpu")),
        batches=ChunkBatches(dataset.normalizer(), fit_label_scaler(dataset, config), torch.device("cpu"), dataset.frame_format,
                             config.data.chunks))
    embed = Trainer._embed if variant == "row_buffer" else embed_batch_arrays
    peak, stop = [rss_bytes()], threading.Event()

    def sample():
        while not stop.wait(0.05):
            peak[0] = max(peak[0], rss_bytes())

    before = rss_bytes()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    keys, features = embed(trainer, CycledRows(rows, batches))
    seconds = time.perf_counter() - started
    after = rss_bytes()
    stop.set()
    sampler.join()
    return {"rss_before_mb": before / 1e6, "rss_after_mb": after / 1e6, "growth_mb": (after - before) / 1e6,
            "peak_mb": max(peak[0], after) / 1e6, "embeddings_mb": (keys.nbytes + features.nbytes) / 1e6,
            "rows": int(len(features)), "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1500)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in a child
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args.variant, args.batches)))
        return 0
    from accuracy_bench import cpu_model

    from cluster_train.tracking import git_commit

    runs = {}
    for variant in VARIANTS:
        child = subprocess.run([sys.executable, __file__, "--batches", str(args.batches), "--variant", variant],
                               capture_output=True, text=True, check=True)
        runs[variant] = json.loads(child.stdout.strip().splitlines()[-1])
        print(variant, runs[variant], flush=True)
    ours, base = runs["row_buffer"]["growth_mb"], runs["batch_arrays"]["growth_mb"]
    result = {"name": "embedding_memory", "value": round(ours, 1), "unit": "MB of RSS growth over the pass",
              "baseline": "one array per batch, concatenated at the end (before train/row_buffer.py)",
              "baseline_value": round(base, 1), "ratio": round(ours / base, 3),
              "command": f"python bench/embedding_memory.py --batches {args.batches}",
              "details": {"runs": runs, "batches": args.batches, "model": "NARROW_MODEL of bench/scale_rehearsal.py",
                          "cpu": cpu_model(), "commit": git_commit(),
                          "measured": time.strftime("%Y-%m-%d")}}
    path = REPO / "bench" / "results" / "embedding_memory.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}: {ours:.0f} MB with RowBuffer vs {base:.0f} MB with one array a batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
