"""Reading a prepared dataset: its description, its normalisation, its shards by split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from data_prep.pipeline import FORMAT
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

    def chunk_bytes(self) -> int:
        """Bytes of every utterance's chunks in memory (all splits), from dataset.json alone."""
        settings = self.settings
        chunks, features = settings["chunks"], settings["features"]
        utterances = sum(int(shard["utterances"]) for shard in self.info["shards"])
        itemsize = np.dtype(settings["storage_dtype"]).itemsize
        return utterances * chunks["num_chunks"] * chunks["chunk_frames"] * features["n_mels"] * itemsize

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

    def ray_dataset(self, splits: Sequence[str] | None = None, columns: Sequence[str] | None = None,
                    read_cpus: float = 1.0):
        """The rows of the given splits (all when None) as a Ray Dataset, read in parallel.

        `read_cpus`: CPUs each read task reserves; below 1 lets reads run beside training workers
        that hold most of a small machine's CPUs.
        """
        import ray.data
        from ray.data.expressions import col

        wanted = None if columns is None else list(dict.fromkeys([*columns, *(["split"] if splits else [])]))
        dataset = ray.data.read_parquet(self.shard_uris(), num_cpus=read_cpus)
        if wanted is not None:
            dataset = dataset.select_columns(wanted)  # pushed down into the read by Ray Data's optimizer
        return dataset if splits is None else dataset.filter(expr=col("split").is_in(list(splits)))
