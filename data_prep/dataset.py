"""Reading a prepared dataset: its description, its normalisation, its shards by split, and how its
rows hold their frames (`frame_format`: `.chunks_of(rows["frames"], chunks)` cuts the chunks)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from data_prep.frames import FORMAT, OLD_FORMATS, FrameFormat
from data_prep.stats import Normalizer
from data_prep.storage import OutputFolder


class DatasetError(ValueError):
    """A prepared dataset that is missing, unfinished or of another format."""


@dataclass
class PreparedDataset:
    location: str

    def __post_init__(self) -> None:
        self.folder = OutputFolder(self.location)
        if not self.folder.exists("dataset.json"):
            raise DatasetError(f"{self.location}: no dataset.json; run the prep job (python -m data_prep) first")
        self.info = self.folder.read_json("dataset.json")
        if self.info.get("format") in OLD_FORMATS:
            raise DatasetError(
                f"{self.location}: prepared in an older layout ({self.info['format']}: chunks cut by prep); this "
                f"version stores frames once and cuts chunks as it reads (data.chunks). Prepare it again: "
                f"python jobs/prep.py --config <its prep config> output=<a new folder> (or overwrite=true)")
        if self.info.get("format") != FORMAT:
            raise DatasetError(f"{self.location}/dataset.json: format {self.info.get('format')!r}, expected {FORMAT!r}")

    @property
    def settings(self) -> dict:
        return self.info["settings"]

    @property
    def dataset_hash(self) -> str:
        return self.info["dataset_hash"]

    def normalizer(self, clip: float = 3.0) -> Normalizer:
        stats = self.info["stats"]
        if not stats.get("count"):
            raise DatasetError(f"{self.location}: no normalisation statistics (no frames in {stats['splits']})")
        return Normalizer(np.asarray(stats["mean"]), np.asarray(stats["std"]), clip)

    @property
    def frame_format(self) -> FrameFormat:
        return FrameFormat.from_settings(self.settings)

    def frames_nbytes(self) -> int:
        """Bytes of every utterance's frames in memory (all splits), from dataset.json alone."""
        return sum(int(shard["frames"]) for shard in self.info["shards"]) * self.frame_format.frame_bytes

    def shard_uris(self) -> list[str]:
        return [self.folder.uri(shard["file"]) for shard in self.info["shards"]]

    def _arrow_dataset(self, shards: Sequence[int] | None = None) -> pads.Dataset:
        listed = self.info["shards"]
        paths = [self.folder.path(listed[i]["file"]) for i in (range(len(listed)) if shards is None else shards)]
        return pads.dataset(paths, format="parquet", filesystem=self.folder.fs)

    def read_table(self, splits: Sequence[str] | None = None, columns: Sequence[str] | None = None,
                   shards: Sequence[int] | None = None) -> pa.Table:
        """Rows of the given splits (all when None) as one Arrow table: for small data, tests, and
        a few `shards` (indices into dataset.json's shard list; None: all)."""
        dataset = self._arrow_dataset(shards)
        where = None if splits is None else pads.field("split").isin(list(splits))
        return dataset.to_table(columns=list(columns) if columns else None, filter=where)

    def row_index(self, splits: Sequence[str] | None = None, columns: Sequence[str] = ("id",)) -> pa.Table:
        """`columns` of every row of the given splits, with `shard`: the index of the shard (in
        dataset.json's list) that holds the row. Reads only those columns, shards in parallel (in a
        bucket, each read waits on the network)."""
        where = None if splits is None else pads.field("split").isin(list(splits))
        fragments = list(self._arrow_dataset().get_fragments())

        def read(shard: int) -> pa.Table:
            table = fragments[shard].to_table(columns=list(columns), filter=where)
            return table.append_column("shard", pa.array(np.full(table.num_rows, shard, np.int32)))

        with ThreadPoolExecutor(max_workers=16) as pool:
            return pa.concat_tables(pool.map(read, range(len(fragments))))

    def ray_dataset(self, splits: Sequence[str] | None = None, columns: Sequence[str] | None = None,
                    read_cpus: float = 1.0, ids: Sequence[str] | None = None, keep: bool = True,
                    read_tasks: int | None = None):
        """The rows of the given splits (all when None) as a Ray Dataset, a read task per shard; with
        `ids`, only those rows (`keep`) or all but those (not `keep`).

        Each task reads its shard with pyarrow and filters it there: Ray Data's own `read_parquet`
        delivered a tenth of the rows per CPU-second on these shards (bench/read_path_bench.py).
        `read_cpus`: CPUs each read task reserves; below 1 lets reads run beside training workers
        that hold most of a small machine's CPUs. `read_tasks`: at most that many at once (None: as
        the CPUs allow); with fractional `read_cpus`, Ray otherwise starts more worker processes than
        the node has CPUs and stops them again between passes.
        """
        import ray.data

        items = [{"shard": index} for index in range(len(self.info["shards"]))]
        rows = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        read = {"location": self.location, "splits": None if splits is None else list(splits),
                "columns": None if columns is None else list(columns), "ids": None if ids is None else list(ids),
                "keep": keep}
        return rows.map_batches(_read_shards, fn_kwargs=read, batch_size=None, batch_format="pyarrow",
                                num_cpus=read_cpus, compute=ray.data.TaskPoolStrategy(size=read_tasks))


def _read_shards(batch: pa.Table, location: str, splits: list[str] | None, columns: list[str] | None,
                 ids: list[str] | None, keep: bool) -> pa.Table:
    """Ray Data task: shard indices -> their rows (the wanted splits, ids and columns) as one table."""
    table = PreparedDataset(location).read_table(splits, columns, shards=batch["shard"].to_pylist())
    if ids is None:
        return table
    wanted = pc.is_in(table["id"], value_set=pa.array(ids, pa.string()))
    return table.filter(wanted if keep else pc.invert(wanted))
