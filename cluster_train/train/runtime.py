"""Where the training loop runs: what it asks of Ray Train, or of one plain process.

The loop (`train/loop.py`) reads its rank, device, dataset shards and last checkpoint from a
`Runtime`, and hands it each epoch's metrics and checkpoint folder. `train/ray_worker.py` has the
Ray Train one (DDP over workers, Ray Data shards, checkpoints through `ray.train.report`);
`LocalRuntime` runs the same loop in this process without Ray (`scaling.num_workers=0`): the rows
in memory, checkpoints in `<storage_path>/<name>/checkpoint_<epoch>`, each one complete or not
counted (a process killed while writing one resumes from the one before).
"""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from typing import Callable, Iterator, Protocol

import pyarrow as pa
import pyarrow.fs as pafs
import torch
from torch import nn

from cluster_train.data.batches import InMemoryRows
from cluster_train.train.checkpointer import TrainState, read_report
from data_prep.storage import download_folder, open_filesystem

CHECKPOINT_PREFIX = "checkpoint_"
COMPLETE_FILE = ".complete"  # written last into a `LocalRuntime` checkpoint
TEMPORARY_PREFIX = f".tmp-{CHECKPOINT_PREFIX}"


def checkpoint_folders(filesystem: pafs.FileSystem, root: str) -> list[str]:
    """The names of the checkpoint folders under `root`, in name order."""
    infos = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(i.base_name for i in infos
                  if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX))


def latest_state(run_dir: str) -> TrainState | None:
    """The `TrainState` of the furthest checkpoint of a run under `run_dir`, from the reports in its
    checkpoint folders (Ray Train names them after the time they were written, `LocalRuntime` after
    the epoch); None without one."""
    location = run_dir.rstrip("/")
    reports = [read_report(f"{location}/{name}") for name in checkpoint_folders(*open_filesystem(location))]
    return max((state for _, state in filter(None, reports)), key=lambda state: state.epoch, default=None)


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
    """One process, no Ray: rank 0 of 1, rows held in memory, checkpoints kept under `run_dir`.

    A checkpoint is copied under a temporary name, marked complete (`COMPLETE_FILE`), then moved to
    its name; in a bucket, where a move is a copy, it is copied to its name and marked complete
    last. Only folders marked complete are checkpoints."""

    rank, world_size = 0, 1

    def __init__(self, tables: dict[str, pa.Table], run_dir: str, device: torch.device | None = None,
                 keep: int = 2, on_report: Callable[[dict], None] | None = None) -> None:
        self.rows = {name: InMemoryRows.from_arrow(table) for name, table in tables.items()}
        self.on_report = on_report  # each epoch's metrics, once its checkpoint is kept (Ray Tune's report)
        self.run_dir, self.keep = run_dir.rstrip("/"), keep
        self.filesystem, self.root = open_filesystem(self.run_dir)
        self.root = self.root.rstrip("/")
        self.device = device or torch.device("cpu")

    def prepare_model(self, module: nn.Module, find_unused_parameters: bool) -> nn.Module:
        return module.to(self.device)

    def shard(self, name: str) -> InMemoryRows:
        return self.rows[name]

    def checkpoints(self) -> list[str]:
        """The names of the complete checkpoint folders kept, oldest first."""
        return [name for name in checkpoint_folders(self.filesystem, self.root)
                if self.filesystem.get_file_info(f"{self.root}/{name}/{COMPLETE_FILE}").type == pafs.FileType.File]

    @contextlib.contextmanager
    def resume_folder(self) -> Iterator[str | None]:
        found = self.checkpoints()
        if not found:
            yield None
            return
        with tempfile.TemporaryDirectory() as folder:
            download_folder(f"{self.run_dir}/{found[-1]}", folder)
            yield folder

    def last_metrics(self) -> dict | None:
        """What the epoch of the latest checkpoint reported; None without a checkpoint."""
        found = self.checkpoints()
        report = read_report(f"{self.run_dir}/{found[-1]}") if found else None
        return None if report is None else report[0]

    def report(self, metrics: dict, folder: str | None) -> None:
        if folder is None:
            return
        name = f"{CHECKPOINT_PREFIX}{int(metrics['epoch']):06d}"
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            temporary = f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}"
            self._write(folder, temporary)
            self._delete(name)
            self.filesystem.move(f"{self.root}/{temporary}", f"{self.root}/{name}")
        else:
            self._delete(name)
            self._write(folder, name)
        for old in self.checkpoints()[: -self.keep]:
            self._delete(old)
        for info in self.filesystem.get_file_info(pafs.FileSelector(self.root)):
            if info.base_name.startswith(TEMPORARY_PREFIX):  # left by a process killed while writing
                self._delete(info.base_name)
        if self.on_report is not None:
            self.on_report(metrics)

    def _write(self, folder: str, name: str) -> None:
        """Copy the local `folder` to `name` under the run's folder, then mark it complete."""
        written = f"{self.root}/{name}"
        self.filesystem.create_dir(written, recursive=True)
        pafs.copy_files(folder, written, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.filesystem)
        with self.filesystem.open_output_stream(f"{written}/{COMPLETE_FILE}"):
            pass

    def _delete(self, name: str) -> None:
        if self.filesystem.get_file_info(f"{self.root}/{name}").type == pafs.FileType.Directory:
            self.filesystem.delete_dir(f"{self.root}/{name}")
