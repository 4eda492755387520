"""Training data: which rows each stage reads, and how a worker batches them.

A run reads these datasets of one prepared dataset:
    labeled      stage 2 rows: labelled utterances (after `label_fraction`), shared out over ranks
    unlabeled    stage 1 rows: unlabeled audio (+ labelled audio, by default), shared out
    cluster      what K-means embeds every epoch: labeled + unlabeled rows, shared out
    development  early stopping: each rank scores its part, the CCC sums are added up over ranks
    precise_bn   a fixed sample of training utterances, drawn from every shard, the BatchNorm
                 statistics are recomputed on (`train/precise_bn.py`); each rank holds all of it
Rows hold each utterance's frames; workers cut them into chunks (`data.chunks`, the paper's Eq. 1-2)
and turn them into (chunk keys, normalised chunks, z-scored labels) with `ChunkBatches`. Data small
enough (`DataConfig.cache_max_mb`) the driver reads itself (`build_tables`) and hands Ray Train as
tables; workers keep their rows (`ShardCache`) and permute all of them every pass. Larger data
streams from the shards, a seeded order over shards and rows every pass (`data/streaming.py`,
planned here by `plan_streams`). A pseudo-label is keyed by utterance and chunk (`chunk_keys`),
never by worker.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from cluster_train.data.config import DataConfig
from cluster_train.data.labels import LabelScaler
from cluster_train.data.streaming import StreamPlan, read_rows
from cluster_train.seeding import derive
from data_prep.config import MAX_CHUNKS, ChunkConfig
from data_prep.dataset import PreparedDataset
from data_prep.frames import MAX_ARRAY_BYTES, FrameFormat
from data_prep.manifest import ATTRIBUTES
from data_prep.stats import Normalizer

SPLIT_DATASETS = ["labeled", "unlabeled", "cluster"]
ROW_COLUMNS = ["id", *ATTRIBUTES, "frames"]


def utterance_key_bits(num_chunks: int) -> int:
    """The width of an utterance key at C chunks: 56 bits up to C = 128, a bit less for each doubling
    above, so that every chunk key, utterance key * C + chunk index, is below 2**63 (int64, >= 0)."""
    if not 1 <= num_chunks <= MAX_CHUNKS:
        raise ValueError(f"{num_chunks} chunks: chunk keys hold 1 to {MAX_CHUNKS} (data.chunks.num_chunks)")
    return min(56, 63 - (num_chunks - 1).bit_length())


def _hash56(utterance_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(utterance_id.encode(), digest_size=7).digest(), "little")


def utterance_key(utterance_id: str, num_chunks: int) -> int:
    """A stable integer for an utterance id (the same on every worker and every run) at C chunks."""
    return _hash56(utterance_id) >> (56 - utterance_key_bits(num_chunks))


def utterance_keys(ids, num_chunks: int) -> np.ndarray:
    """(B,) ids -> (B,) int64 utterance keys at C chunks: each chunk key // C."""
    shift = 56 - utterance_key_bits(num_chunks)
    return np.fromiter((_hash56(str(i)) >> shift for i in ids), dtype=np.int64, count=len(ids))


def join_chunk_keys(utterances: np.ndarray, num_chunks: int) -> np.ndarray:
    """(U,) utterance keys -> (U * C,) chunk keys: utterance key * C + chunk index, C per utterance."""
    return (np.asarray(utterances, dtype=np.int64)[:, None] * num_chunks + np.arange(num_chunks)).reshape(-1)


def split_chunk_keys(keys: np.ndarray, num_chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk keys -> (utterance keys, chunk indices): `join_chunk_keys` undone."""
    return np.divmod(np.asarray(keys, dtype=np.int64), num_chunks)


def chunk_keys(ids, num_chunks: int) -> np.ndarray:
    """(B,) ids -> (B * C,) int64 keys: utterance key * C + chunk index."""
    return join_chunk_keys(utterance_keys(ids, num_chunks), num_chunks)


def kept_label_ids(dataset: PreparedDataset, config: DataConfig, seed: int) -> list[str]:
    """Ids of the labelled utterances whose labels training may use (`label_fraction` of them)."""
    table = dataset.read_table(config.labeled_splits, ["id", *ATTRIBUTES])
    labelled = np.logical_and.reduce([pc.is_valid(table[a]).to_numpy(zero_copy_only=False) for a in ATTRIBUTES])
    ids = sorted(table.filter(labelled)["id"].to_pylist())
    if config.label_fraction >= 1:
        return ids
    rng = np.random.default_rng(derive(seed, "label_subset"))
    count = max(1, round(config.label_fraction * len(ids)))
    return sorted(np.asarray(ids, dtype=object)[rng.permutation(len(ids))[:count]].tolist())


def kept_unlabeled_ids(dataset: PreparedDataset, config: DataConfig, kept: list[str], seed: int) -> list[str] | None:
    """Ids of the audio-only utterances (no kept label) that stage 1 and the clustering use
    (`unlabeled_fraction` of them, nested across fractions for one seed); None: all of them."""
    if config.unlabeled_fraction >= 1:
        return None
    ids = sorted(set(dataset.read_table(_cluster_splits(config), ["id"])["id"].to_pylist()) - set(kept))
    rng = np.random.default_rng(derive(seed, "unlabeled_subset"))
    count = round(config.unlabeled_fraction * len(ids))
    return sorted(np.asarray(ids, dtype=object)[rng.permutation(len(ids))[:count]].tolist())


def precise_bn_table(dataset: PreparedDataset, splits: list[str], utterances: int, seed: int,
                     ids: list[str] | None = None) -> pa.Table:
    """`utterances` rows of `splits` (of `ids` among them, where given: the audio a run uses, so
    audio it leaves out never reaches even its BatchNorm statistics) drawn at random (seeded) from
    all of them: at MSP-Podcast scale nearly one a shard, many podcasts, where a whole shard holds
    one or two. Reads the id column, then only the shards holding the rows drawn. Sorted by id."""
    index = dataset.row_index(splits, ["id"])
    if ids is not None:
        index = index.filter(pc.is_in(index["id"], value_set=pa.array(ids, index["id"].type)))
    index = index.sort_by("id")  # the draw does not depend on the order the shards were listed in
    rng = np.random.default_rng(derive(seed, "precise_bn"))
    chosen = index.take(np.sort(rng.choice(index.num_rows, min(utterances, index.num_rows), replace=False)))
    plan = StreamPlan.from_index(dataset.location, chosen)
    table = read_rows(dataset, list(zip(plan.shards.tolist(), plan.ids)), ROW_COLUMNS)
    return table.take(pc.sort_indices(table, [("id", "ascending")]))


def _kept_ids(dataset: PreparedDataset, config: DataConfig, seed: int) -> tuple[list[str], list[str] | None]:
    """(labelled ids whose labels the run uses, audio-only ids it uses or None for all of them)."""
    labelled = kept_label_ids(dataset, config, seed)
    return labelled, kept_unlabeled_ids(dataset, config, labelled, seed)


def _audio_used(labelled: list[str], audio_only: list[str] | None) -> list[str] | None:
    """Ids of every train utterance whose audio the run uses; None: all of them."""
    return None if audio_only is None else sorted({*audio_only, *labelled})


def _select(rows, config: DataConfig, labelled: list[str], audio_only: list[str] | None) -> dict:
    """Each dataset's rows (see the module docstring) through `rows(splits, ids, keep)`."""
    unlabeled_splits = _unlabeled_splits(config)
    if audio_only is None:
        unlabeled = (rows(unlabeled_splits) if config.labeled_as_unlabeled
                     else rows(unlabeled_splits + list(config.labeled_splits), ids=labelled, keep=False))
        cluster = rows(_cluster_splits(config))
    else:
        every = _audio_used(labelled, audio_only)
        unlabeled = rows(_cluster_splits(config), ids=every if config.labeled_as_unlabeled else audio_only)
        cluster = rows(_cluster_splits(config), ids=every)
    return {"labeled": rows(list(config.labeled_splits), ids=labelled), "unlabeled": unlabeled,
            "cluster": cluster, "development": rows([config.development_split])}


def _unlabeled_splits(config: DataConfig) -> list[str]:
    splits = list(config.unlabeled_splits)
    if config.labeled_as_unlabeled:
        splits += [s for s in config.labeled_splits if s not in splits]
    return splits


def _cluster_splits(config: DataConfig) -> list[str]:
    return sorted(set(_unlabeled_splits(config)) | set(config.labeled_splits))


def build_tables(dataset: PreparedDataset, config: DataConfig, seed: int, precise_bn_utterances: int = 0
                 ) -> dict[str, pa.Table]:
    """The rows of each dataset of a run as Arrow tables, read here: what a run in one process
    without Ray trains on (`train/runtime.py`), the same rows `build_datasets` gives Ray Data."""
    table = dataset.read_table([*_cluster_splits(config), config.development_split], [*ROW_COLUMNS, "split"])
    labelled, audio_only = _kept_ids(dataset, config, seed)
    tables = _select(_TableRows(table), config, labelled, audio_only)
    if precise_bn_utterances > 0:
        tables["precise_bn"] = precise_bn_table(dataset, _cluster_splits(config), precise_bn_utterances, seed,
                                                _audio_used(labelled, audio_only))
    return tables


def row_counts(dataset: PreparedDataset, config: DataConfig, seed: int) -> dict[str, int]:
    """Utterances in each dataset of a run (the rows `build_tables` holds), read from the ids alone."""
    table = dataset.read_table([*_cluster_splits(config), config.development_split], ["id", "split"])
    selected = _select(_TableRows(table), config, *_kept_ids(dataset, config, seed))
    return {name: rows.num_rows for name, rows in selected.items()}


def build_datasets(dataset: PreparedDataset, config: DataConfig, seed: int, in_memory: bool = False,
                   precise_bn_utterances: int = 0) -> dict:
    """The Ray Datasets Ray Train hands its workers, built on the driver: with `in_memory` (data
    within `cache_max_mb`, see `cache_shards`) every dataset of the module docstring, from the rows
    the driver read with pyarrow (`build_tables`; Ray Train splits `SPLIT_DATASETS` over workers);
    streamed, only `precise_bn`: the rest the workers read themselves (`plan_streams`)."""
    import ray.data

    if in_memory:
        datasets = {name: ray.data.from_arrow(table)
                    for name, table in build_tables(dataset, config, seed, precise_bn_utterances).items()}
        datasets["development"] = datasets["development"].materialize()  # read once, every epoch
    else:
        datasets = {}
        if precise_bn_utterances > 0:
            labelled, audio_only = _kept_ids(dataset, config, seed)
            datasets["precise_bn"] = ray.data.from_arrow(precise_bn_table(
                dataset, _cluster_splits(config), precise_bn_utterances, seed, _audio_used(labelled, audio_only)))
    if "precise_bn" in datasets:
        datasets["precise_bn"] = datasets["precise_bn"].materialize()
    return datasets


def plan_streams(dataset: PreparedDataset, config: DataConfig, seed: int) -> dict[str, StreamPlan]:
    """The streamed datasets of a run (all but `precise_bn`) as plans: the ids each reads from each
    shard, from the id column alone. A read task is then given its own shard's ids, never a run's."""
    index = dataset.row_index([*_cluster_splits(config), config.development_split], ["id", "split"])
    selected = _select(_TableRows(index), config, *_kept_ids(dataset, config, seed))
    return {name: StreamPlan.from_index(dataset.location, rows.select(["id", "shard"]))
            for name, rows in selected.items()}


class _TableRows:
    """Rows of some splits, cut from one Arrow table."""

    def __init__(self, table: pa.Table):
        self.table = table

    def __call__(self, splits: list[str], ids: list[str] | None = None, keep: bool = True) -> pa.Table:
        rows = self.table.filter(pc.is_in(self.table["split"], value_set=pa.array(splits, self.table["split"].type)))
        if ids is not None:
            wanted = pc.is_in(rows["id"], value_set=pa.array(ids, rows["id"].type))
            rows = rows.filter(wanted if keep else pc.invert(wanted))
        return rows


def as_float(values: np.ndarray) -> np.ndarray:
    """A label column as float32 with NaN for null (Arrow nulls may arrive as None)."""
    if values.dtype == object:
        return np.array([np.nan if v is None else v for v in values], dtype=np.float32)
    return values.astype(np.float32)


class InMemoryRows:
    """Rows held as one Arrow table, served through the `iter_batches(batch_format="pyarrow")` call
    `ChunkBatches` makes on a Ray DataIterator. Rows are in id order; a shuffle seed permutes them
    all (not a local buffer)."""

    def __init__(self, table: pa.Table):
        if "frames" in table.column_names and table["frames"].nbytes > MAX_ARRAY_BYTES:
            # a take across pieces would join them into one binary array, which stops at 2 GiB
            table = table.set_column(table.column_names.index("frames"), "frames",
                                     table["frames"].cast(pa.large_binary()))
        self.table = table.take(pc.sort_indices(table, [("id", "ascending")])) if table.num_rows else table
        self.num_rows = table.num_rows

    @classmethod
    def from_arrow(cls, table: pa.Table) -> "InMemoryRows":
        return cls(table)

    @classmethod
    def read(cls, iterator, read_batch_size: int = 1024) -> "InMemoryRows":
        parts = list(iterator.iter_batches(batch_size=read_batch_size, batch_format="pyarrow"))
        return cls(pa.concat_tables(parts) if parts else pa.table({"id": pa.array([], pa.string())}))

    def iter_batches(self, batch_size: int, batch_format: str = "pyarrow", drop_last: bool = False,
                     local_shuffle_buffer_size: int | None = None, local_shuffle_seed: int | None = None):
        if batch_format != "pyarrow":
            raise ValueError(f"InMemoryRows serves pyarrow batches, not {batch_format!r}")
        order = np.arange(self.num_rows)
        if local_shuffle_seed is not None:
            order = np.random.default_rng(local_shuffle_seed).permutation(self.num_rows)
        stop = self.num_rows - self.num_rows % batch_size if drop_last else self.num_rows
        for start in range(0, stop, batch_size):
            yield self.table.take(order[start : start + batch_size])


class RankSlice:
    """A rank's part of rows every rank holds (development and precise-BatchNorm rows, which Ray
    Train does not split): batches r, r + W, r + 2W, ... of them."""

    def __init__(self, rows, rank: int, world_size: int):
        self.rows, self.rank, self.world_size = rows, rank, world_size

    def iter_batches(self, batch_size: int, **options) -> Iterator[pa.Table]:
        for index, batch in enumerate(self.rows.iter_batches(batch_size, **options)):
            if index % self.world_size == self.rank:
                yield batch


class ShardCache:
    """A worker's dataset shards, read whole on first use and kept (see `DataConfig.cache_max_mb`).

    Order does not depend on whether a shard was cached before (a resumed run reads it anew and
    gets the same batches): rows are sorted by id, then shuffled with the pass's seed."""

    def __init__(self):
        self._rows = {}

    def __call__(self, name: str, shard):
        if name not in self._rows:
            self._rows[name] = InMemoryRows.read(shard)
        return self._rows[name]


def cache_shards(dataset: PreparedDataset, config: DataConfig) -> bool:
    return dataset.frames_nbytes() <= config.cache_max_mb * 1e6


@dataclass
class Batch:
    keys: np.ndarray  # (B * C,) chunk keys
    chunks: torch.Tensor  # (B * C, frames, mels) float32, normalised
    targets: torch.Tensor  # (B, A) z-scored labels, NaN where missing
    num_chunks: int


class ChunkBatches:
    """Rows of a rank (`InMemoryRows`, `StreamedShard`: anything with `iter_batches`) -> `Batch`es
    on `device`: chunks cut from each row's frames (held as `frames` says, cut as `chunks` says),
    normalised as the dataset prescribes."""

    def __init__(self, normalizer: Normalizer, scaler: LabelScaler, device: torch.device, frames: FrameFormat,
                 chunks: ChunkConfig):
        self.normalizer, self.scaler, self.device = normalizer, scaler, device
        self.frames, self.chunks = frames, chunks
        self.loading_seconds = 0.0  # waiting on Ray Data + turning rows into tensors, all calls so far

    def __call__(self, iterator, batch_size: int, drop_last: bool, seed: int | None = None) -> Iterator[Batch]:
        shuffle = {} if seed is None else {"local_shuffle_seed": seed}  # how far each source mixes is its own
        rows_iter = iter(iterator.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=drop_last,
                                               **shuffle))
        while True:
            started = time.perf_counter()
            batch = self._next_batch(rows_iter)
            self.loading_seconds += time.perf_counter() - started
            if batch is None:
                return
            yield batch

    def _next_batch(self, rows_iter) -> Batch | None:
        rows = next(rows_iter, None)
        if rows is None:
            return None
        chunks = self.frames.chunks_of(rows["frames"], self.chunks)
        batch, num_chunks = chunks.shape[0], chunks.shape[1]
        x = torch.from_numpy(chunks).to(self.device).float()
        x = self.normalizer.torch(x).reshape(batch * num_chunks, *chunks.shape[2:])
        labels = np.stack([as_float(rows[a].to_numpy(zero_copy_only=False)) for a in self.scaler.attributes], axis=1)
        targets = torch.from_numpy(self.scaler.to_z(labels).astype(np.float32)).to(self.device)
        return Batch(chunk_keys(rows["id"].to_pylist(), num_chunks), x, targets, num_chunks)
