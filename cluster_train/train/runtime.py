"""Where the training loop runs: what it asks of Ray Train, or of one plain process.

The loop (`train/loop.py`) reads its rank, device, dataset shards and last checkpoint from a
`Runtime`, and hands it each epoch's metrics and checkpoint folder. `train/ray_worker.py` has the
Ray Train one (DDP over workers, Ray Data shards, checkpoints through `ray.train.report`);
`LocalRuntime` runs the same loop in this process without Ray (`scaling.num_workers=0`): the rows
in memory, checkpoints in `<storage_path>/<name>/checkpoint_<epoch>`.
"""

from __future__ import annotations

import contextlib
import tempfile
from typing import Iterator, Protocol

import pyarrow as pa
import pyarrow.fs as pafs
import torch
from torch import nn

from cluster_train.data.batches import InMemoryRows
from data_prep.storage import copy_folder, download_folder, open_filesystem

CHECKPOINT_PREFIX = "checkpoint_"


def checkpoint_folders(filesystem: pafs.FileSystem, root: str) -> list[str]:
    """The names of the checkpoint folders under `root`, oldest first."""
    infos = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(i.base_name for i in infos
                  if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX))


def epochs_checkpointed(run_dir: str) -> int:
    """How many epochs a run under `run_dir` has finished, from its checkpoint folders' numbers
    (every epoch writes one, numbered from 0, whether Ray Train or `LocalRuntime` wrote it)."""
    numbers = [name[len(CHECKPOINT_PREFIX):] for name in checkpoint_folders(*open_filesystem(run_dir.rstrip("/")))]
    return max((int(n) + 1 for n in numbers if n.isdigit()), default=0)


class Runtime(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, module: nn.Module, find_unused_parameters: bool) -> nn.Module:
        """The module to train: wrapped for data parallelism where there are several ranks
        (`find_unused_parameters`: some stage's loss leaves parameters out)."""

    def shard(self, name: str):
        """This rank's rows of a dataset (`data/batches.py` names them): anything with `iter_batches`."""

    def resume_folder(self) -> contextlib.AbstractContextManager[str | None]:
        """The latest checkpoint's folder, or None on a fresh start."""

    def report(self, metrics: dict, folder: str | None) -> None:
        """End of an epoch: metrics, and on rank 0 the folder of its checkpoint."""


class LocalRuntime:
    """One process, no Ray: rank 0 of 1, rows held in memory, checkpoints kept under `run_dir`."""

    rank, world_size = 0, 1

    def __init__(self, tables: dict[str, pa.Table], run_dir: str, device: torch.device | None = None,
                 keep: int = 2) -> None:
        self.rows = {name: InMemoryRows.from_arrow(table) for name, table in tables.items()}
        self.run_dir, self.keep = run_dir.rstrip("/"), keep
        self.filesystem, self.root = open_filesystem(self.run_dir)
        self.device = device or torch.device("cpu")
        self.last_metrics: dict = {}
        self.last_checkpoint: str | None = None

    def prepare_model(self, module: nn.Module, find_unused_parameters: bool) -> nn.Module:
        return module.to(self.device)

    def shard(self, name: str) -> InMemoryRows:
        return self.rows[name]

    def checkpoints(self) -> list[str]:
        """The names of the checkpoint folders kept, oldest first."""
        return checkpoint_folders(self.filesystem, self.root)

    @contextlib.contextmanager
    def resume_folder(self) -> Iterator[str | None]:
        found = self.checkpoints()
        if not found:
            yield None
            return
        with tempfile.TemporaryDirectory() as folder:
            download_folder(f"{self.run_dir}/{found[-1]}", folder)
            yield folder

    def report(self, metrics: dict, folder: str | None) -> None:
        self.last_metrics = dict(metrics)
        if folder is None:
            return
        location = f"{self.run_dir}/{CHECKPOINT_PREFIX}{int(metrics['epoch']):06d}"
        copy_folder(folder, location)
        self.last_checkpoint = location
        for old in self.checkpoints()[: -self.keep]:
            self.filesystem.delete_dir(f"{self.root.rstrip('/')}/{old}")
