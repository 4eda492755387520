"""The one Ray-specific seam of training: what each Ray Train worker runs (`train_func`), and the
`Runtime` it gives the loop: its rank and device, DDP, its Ray Data shards, `ray.train.report`."""

from __future__ import annotations

import contextlib
from typing import Iterator

import ray.train
import ray.train.torch
from torch import nn

from cluster_train.console import quiet_process
from cluster_train.data.batches import ShardCache
from cluster_train.train.loop import train


class RayTrainRuntime:
    def __init__(self, cache_shards: bool) -> None:
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self._shards = ShardCache(cache_shards)  # name -> this rank's rows: Ray Data's, or kept in memory

    def prepare_model(self, module: nn.Module, find_unused_parameters: bool) -> nn.Module:
        return ray.train.torch.prepare_model(
            module, parallel_strategy_kwargs={"find_unused_parameters": find_unused_parameters})

    def shard(self, name: str):
        return self._shards(name, ray.train.get_dataset_shard(name))

    @contextlib.contextmanager
    def resume_folder(self) -> Iterator[str | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield folder

    def report(self, metrics: dict, folder: str | None) -> None:
        ray.train.report(metrics, checkpoint=None if folder is None else ray.train.Checkpoint.from_directory(folder))


def train_func(loop_config: dict) -> None:
    """What each Ray Train worker runs."""
    quiet_process(loop_config.get("verbose", False))
    runtime = RayTrainRuntime(loop_config.get("cache_shards", False))
    train(loop_config["config"], runtime, loop_config["label_scaler"], loop_config["service"],
          dict(loop_config["params"]), dict(loop_config["tags"]))
