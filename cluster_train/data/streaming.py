"""Streamed datasets (data beyond `DataConfig.cache_max_mb`): epochs that mix, rows read where the
ranks ask for them.

The driver plans each dataset once (`plan_streams`): which rows of which shard it holds, as ids per
shard. Every pass, every rank derives the same order of the shards from the pass's seed (fixed
order for passes without one: the K-means embedding, validation), lays the rows end to end in
that order and takes an equal, contiguous share of them (`deal`): equal rows, so every rank trains
the same number of DDP steps, and a rank's share is a few dozen shards scattered over the corpus,
different every epoch. Its shards are read by Ray Data tasks (`data.read_tasks` per rank at once,
each given only its shard's ids) in that order, and Ray's local shuffle buffer
(`data.shuffle_buffer_rows`) mixes the rows of many shards into each batch.

Why not Ray Data's `streaming_split` over one dataset: it hands blocks to whichever rank asks
first, so the split is neither seeded nor repeatable, and a dataset read in one order every epoch
puts the same one to three podcasts into a batch each time (MSP-Podcast ids sort by podcast).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cluster_train.seeding import derive

READ_CPUS = 0.25  # Parquet reads are light; a full CPU each would starve beside the training workers


@dataclass(frozen=True)
class StreamPlan:
    """The rows of one streamed dataset: for each shard that holds any (`shards`, indices into
    dataset.json's list), the ids of its rows."""

    location: str
    shards: np.ndarray  # (S,) int
    ids: list[list[str]]  # (S,) the ids read from each shard

    @property
    def rows(self) -> np.ndarray:
        return np.array([len(ids) for ids in self.ids], dtype=np.int64)

    @classmethod
    def from_index(cls, location: str, index: pa.Table) -> "StreamPlan":
        """From a `PreparedDataset.row_index` table (id, shard) of the dataset's rows."""
        if index.num_rows == 0:
            return cls(location, np.empty(0, np.int64), [])
        index = index.sort_by([("shard", "ascending"), ("id", "ascending")])
        shards, starts = np.unique(index["shard"].to_numpy(), return_index=True)
        ids = index["id"].to_pylist()
        bounds = [*starts.tolist(), len(ids)]
        return cls(location, shards.astype(np.int64), [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])])


def deal(rows: np.ndarray, world_size: int, seed: int | None) -> list[list[tuple[int, int, int]]]:
    """Each rank's share of a pass: [(shard position, first row, end row), ...] in reading order.

    The shards in a seeded order (`seed` None: as planned), their rows end to end, rank r takes rows
    [r N / W, (r + 1) N / W) of that sequence: the same on every rank, equal to a row, a shard
    split between two ranks at each boundary."""
    order = np.arange(len(rows)) if seed is None else np.random.default_rng(seed).permutation(len(rows))
    ends = np.cumsum(rows[order])
    total = int(ends[-1]) if len(ends) else 0
    shares: list[list[tuple[int, int, int]]] = []
    for rank in range(world_size):
        first, last = rank * total // world_size, (rank + 1) * total // world_size
        share = []
        for position, end in zip(order, ends):
            start = int(end - rows[position])
            a, b = max(first, start), min(last, int(end))
            if a < b:
                share.append((int(position), a - start, b - start))
        shares.append(share)
    return shares


class StreamedShard:
    """One rank's rows of a planned dataset, pass after pass: `iter_batches` as Ray's DataIterator
    has it, read as the module docstring says. `local_shuffle_seed` is the pass's seed: it orders
    the shards and the shuffle buffer; without it rows come in the planned order, unshuffled."""

    def __init__(self, plan: StreamPlan, rank: int, world_size: int, read_tasks: int, shuffle_rows: int,
                 columns: list[str]):
        self.plan, self.rank, self.world_size = plan, rank, world_size
        self.read_tasks, self.shuffle_rows, self.columns = read_tasks, shuffle_rows, columns

    def share(self, seed: int | None) -> list[tuple[int, list[str]]]:
        """(shard index, ids) this rank reads in a pass with `seed`, in reading order."""
        order_seed = None if seed is None else derive(seed, "shard_order")
        return [(int(self.plan.shards[p]), self.plan.ids[p][a:b])
                for p, a, b in deal(self.plan.rows, self.world_size, order_seed)[self.rank]]

    def iter_batches(self, batch_size: int, batch_format: str = "pyarrow", drop_last: bool = False,
                     local_shuffle_buffer_size: int | None = None, local_shuffle_seed: int | None = None
                     ) -> Iterator[pa.Table]:  # fmt: skip
        """Batches of this rank's share. With `drop_last`, every rank yields the same number of
        batches (its share's rows // batch_size of the smallest share): DDP steps stay in step."""
        if batch_format != "pyarrow":
            raise ValueError(f"StreamedShard serves pyarrow batches, not {batch_format!r}")
        share = self.share(local_shuffle_seed)
        if not share:
            return
        limit = None
        if drop_last:
            total = int(self.plan.rows.sum())
            limit = (total // self.world_size) // batch_size  # shares differ by at most one row
        rows = self._dataset(share)
        shuffle = ({} if local_shuffle_seed is None else
                   {"local_shuffle_buffer_size": self.shuffle_rows,
                    "local_shuffle_seed": derive(local_shuffle_seed, "row_order")})
        batches = rows.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=drop_last, **shuffle)
        try:
            for index, batch in enumerate(batches):
                if limit is not None and index >= limit:
                    break
                yield batch
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # ends the pass's Ray Data execution when it stops early

    def _dataset(self, share: list[tuple[int, list[str]]]):
        import ray.data

        items = [{"shard": shard, "ids": ids} for shard, ids in share]
        rows = ray.data.from_items(items, override_num_blocks=len(items))
        # The share's order is the pass's seeded order: kept, so that a pass repeats for its seed.
        rows.context.execution_options.preserve_order = True
        return rows.map_batches(_read_planned, fn_kwargs={"location": self.plan.location, "columns": self.columns},
                                batch_size=None, batch_format="pyarrow", num_cpus=READ_CPUS,
                                compute=ray.data.TaskPoolStrategy(size=self.read_tasks))


def read_rows(dataset, share: list[tuple[int, list[str]]], columns: list[str]) -> pa.Table:
    """`columns` of the rows with the given ids of each (shard index, ids), shard after shard, each
    shard's rows in its own order."""
    parts = []
    for shard, ids in share:
        table = dataset.read_table(None, columns, shards=[shard])
        parts.append(table.filter(pc.is_in(table["id"], value_set=pa.array(ids, table["id"].type))))
    return pa.concat_tables(parts) if parts else dataset.read_table(None, columns, shards=[]).slice(0, 0)


def _read_planned(batch: pa.Table, location: str, columns: list[str]) -> pa.Table:
    """Ray Data task: (shard, ids) items -> `read_rows` of them."""
    from data_prep.dataset import PreparedDataset

    return read_rows(PreparedDataset(location), list(zip(batch["shard"].to_pylist(), batch["ids"].to_pylist())),
                     columns)
