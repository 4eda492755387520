"""The one Ray-specific seam of training: what each Ray Train worker runs (`train_func`), and the
`Runtime` it gives the loop: its rank and device, DDP, its rows of each dataset (Ray Train's split
of small data, kept in memory; or its share of streamed data, `data/streaming.py`),
`ray.train.report`."""

from __future__ import annotations

import contextlib
from typing import Iterator

import ray
import ray.train
import ray.train.torch
from torch import nn

from cluster_train.console import quiet_process
from cluster_train.data.batches import ROW_COLUMNS, RankSlice, ShardCache
from cluster_train.data.streaming import StreamedShard, StreamPlan
from cluster_train.train.loop import train


class RayTrainRuntime:
    """`streams`: the plans of the datasets this rank streams (None: every dataset comes from Ray
    Train, small enough to keep in memory); `read_tasks`, `shuffle_rows`: how it streams them."""

    def __init__(self, streams: dict[str, StreamPlan] | None, read_tasks: int, shuffle_rows: int) -> None:
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self._shards = ShardCache()  # name -> this rank's rows of Ray Train's datasets, kept in memory
        self._streamed = {name: StreamedShard(plan, self.rank, self.world_size, read_tasks, shuffle_rows, ROW_COLUMNS)
                          for name, plan in (streams or {}).items()}

    def prepare_model(self, module: nn.Module, find_unused_parameters: bool) -> nn.Module:
        return ray.train.torch.prepare_model(
            module, parallel_strategy_kwargs={"find_unused_parameters": find_unused_parameters})

    def shard(self, name: str):
        if name in self._streamed:
            return self._streamed[name]
        rows = self._shards(name, ray.train.get_dataset_shard(name))
        return RankSlice(rows, self.rank, self.world_size) if name == "development" else rows

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
    streams = loop_config.get("streams")
    data = loop_config["config"].data
    runtime = RayTrainRuntime(None if streams is None else ray.get(streams), data.read_tasks, data.shuffle_buffer_rows)
    train(loop_config["config"], runtime, loop_config["label_scaler"], loop_config["service"],
          dict(loop_config["params"]), dict(loop_config["tags"]))
