"""One shard: a fixed group of utterances -> one Parquet file of mel chunks + a JSON summary.

The pipeline plans shards deterministically from the manifest (sorted ids, fixed size, a name that
hashes the rows and the settings) so a rerun finds the shards already written and skips them.
A shard's JSON summary is written last: its presence is what marks the shard done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa

from data_prep.audio import AudioRejected, load_audio
from data_prep.chunking import chunk_starts, split_into_chunks
from data_prep.config import ChunkConfig, FeatureConfig, PrepConfig
from data_prep.manifest import ATTRIBUTES, Utterance
from data_prep.mel import MelSpectrogram
from data_prep.stats import RunningStats
from data_prep.storage import OutputFolder, read_bytes

SCHEMA_METADATA_KEY = b"deepemocluster"
# Dictionary encoding and min/max statistics pay off for these; on the chunk values they only cost.
SMALL_COLUMNS = ["id", "split", "category", "speaker"]


@dataclass(frozen=True)
class ShardPlan:
    name: str
    rows: tuple[Utterance, ...]

    @property
    def parquet(self) -> str:
        return f"{self.name}.parquet"

    @property
    def summary(self) -> str:
        return f"{self.name}.json"


def plan_shards(manifest: list[Utterance], settings: dict, shard_size: int) -> list[ShardPlan]:
    settings_json = json.dumps(settings, sort_keys=True)
    plans = []
    for index, start in enumerate(range(0, len(manifest), shard_size)):
        rows = tuple(manifest[start : start + shard_size])
        digest = hashlib.sha256(settings_json.encode())
        for row in rows:
            digest.update(json.dumps(dataclasses.asdict(row), sort_keys=True).encode())
        plans.append(ShardPlan(f"part-{index:05d}-{digest.hexdigest()[:10]}", rows))
    return plans


def chunk_schema(config: PrepConfig) -> pa.Schema:
    """The Parquet schema of every shard; the settings travel in the schema metadata."""
    value_type = pa.float16() if config.storage_dtype == "float16" else pa.float32()
    chunks = config.chunks
    shape = (chunks.num_chunks, chunks.chunk_frames, config.features.n_mels)
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        *(pa.field(name, pa.float32()) for name in ATTRIBUTES),
        pa.field("category", pa.string()),
        pa.field("speaker", pa.string()),
        pa.field("duration", pa.float32(), nullable=False),
        pa.field("n_frames", pa.int32(), nullable=False),
        pa.field("chunk_starts", pa.list_(pa.int32(), chunks.num_chunks), nullable=False),
        pa.field("chunks", pa.fixed_shape_tensor(value_type, shape), nullable=False),
    ]
    metadata = {SCHEMA_METADATA_KEY: json.dumps({"chunk_shape": shape}).encode()}
    return pa.schema(fields, metadata=metadata)


def to_storage_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """Cast through torch: numpy's float32 -> float16 conversion is ~20x slower."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(values)).to(getattr(torch, dtype)).numpy()


@lru_cache(maxsize=4)
def _mel_extractor(features: tuple) -> MelSpectrogram:
    sample_rate, n_fft, hop_length, n_mels, scale, peak_normalize = features
    return MelSpectrogram(sample_rate, n_fft, hop_length, n_mels, scale, peak_normalize)


def mel_extractor(features: FeatureConfig) -> MelSpectrogram:
    return _mel_extractor(tuple(dataclasses.asdict(features).values()))


def mel_for(config: PrepConfig) -> MelSpectrogram:
    return mel_extractor(config.features)


# The settings that decide what chunks a file gives: a model trained on a dataset keeps them
# (its bundle's `features`) so that prediction on raw audio computes the very same chunks.
CHUNK_SETTINGS = ("features", "chunks", "storage_dtype")


@dataclass(frozen=True)
class ChunkRecipe:
    """Audio file -> a sentence's C chunks: the part of a dataset's settings a model's input depends on."""

    features: FeatureConfig
    chunks: ChunkConfig
    storage_dtype: str = "float16"

    @classmethod
    def from_config(cls, config: PrepConfig) -> "ChunkRecipe":
        return cls(config.features, config.chunks, config.storage_dtype)

    @classmethod
    def from_settings(cls, settings: dict) -> "ChunkRecipe":
        """From a dataset's settings (`dataset.json`) or a bundle's `features`; ValueError when incomplete."""
        missing = [key for key in CHUNK_SETTINGS if key not in settings]
        if missing:
            raise ValueError(f"settings lack {', '.join(missing)} (need {', '.join(CHUNK_SETTINGS)})")
        try:
            return cls(FeatureConfig(**settings["features"]), ChunkConfig(**settings["chunks"]),
                       str(settings["storage_dtype"]))
        except TypeError as error:  # an unknown or missing key inside features / chunks
            raise ValueError(f"settings do not fit this version's FeatureConfig / ChunkConfig: {error}") from error


@dataclass(frozen=True)
class ChunkedAudio:
    """One file as prep stores it: its mel spectrogram and the C chunks cut from it."""

    duration: float  # seconds, at the recipe's sample rate
    mel: np.ndarray  # (T, n_mels) float32, un-normalised
    chunks: np.ndarray  # (C, w_c, n_mels) in the recipe's storage dtype


def chunk_audio(location: str, recipe: ChunkRecipe, expected_duration: float | None = None) -> ChunkedAudio:
    """Read, decode, check and cut one file into chunks; raises AudioRejected with the reason.

    The one implementation of audio -> chunks: prep's shards and prediction both call it.
    """
    features, chunking = recipe.features, recipe.chunks
    try:
        data = read_bytes(location)
    except OSError as error:
        raise AudioRejected(f"unreadable: {error}") from error
    wave = load_audio(data, location, features.sample_rate, expected_duration)
    duration = len(wave) / features.sample_rate
    if duration < chunking.min_seconds:
        raise AudioRejected(f"too short: {duration:.3f} s is below chunks.min_seconds = {chunking.min_seconds} s")
    mel = mel_extractor(features)(wave)
    largest = float(np.abs(mel).max())
    if largest > np.finfo(recipe.storage_dtype).max:
        raise AudioRejected(
            f"overflow: mel value {largest:.4g} exceeds {recipe.storage_dtype}; use storage_dtype=float32"
        )
    stored = to_storage_dtype(mel, recipe.storage_dtype)
    return ChunkedAudio(duration, mel, split_into_chunks(stored, chunking.num_chunks, chunking.chunk_frames))


def reject_reason(error: Exception) -> str:
    """The reason recorded for a file that failed: AudioRejected's own, else the error, marked 'failed'."""
    if isinstance(error, AudioRejected):
        return error.reason
    return f"failed: {type(error).__name__}: {error}"


class ShardBuilder:
    """Accumulates the good utterances, the rejects and the statistics of one shard."""

    def __init__(self, config: PrepConfig):
        self.config = config
        self.recipe = ChunkRecipe.from_config(config)
        self.columns: dict[str, list] = {name: [] for name in chunk_schema(config).names}
        self.stats = RunningStats.empty(config.features.n_mels)
        self.rejects: list[dict] = []
        self.seconds_by_split: Counter = Counter()
        self.count_by_split: Counter = Counter()

    def add(self, row: Utterance) -> None:
        try:
            self._add(row)
        except Exception as error:  # noqa: BLE001 - one bad file must never stop the job
            self.rejects.append({"id": row.id, "audio": row.audio, "split": row.split, "reason": reject_reason(error)})

    def _add(self, row: Utterance) -> None:
        chunking = self.config.chunks
        audio = chunk_audio(row.audio, self.recipe, row.duration)
        mel = audio.mel
        if row.split in self.config.stats_splits:
            self.stats.update(mel)
        values = {
            "id": row.id,
            "split": row.split,
            "category": row.category,
            "speaker": row.speaker,
            "duration": audio.duration,
            "n_frames": len(mel),
            "chunk_starts": chunk_starts(len(mel), chunking.num_chunks, chunking.chunk_frames).tolist(),
            "chunks": audio.chunks,
        }
        values.update({name: getattr(row, name) for name in ATTRIBUTES})
        for name, value in values.items():
            self.columns[name].append(value)
        self.seconds_by_split[row.split] += audio.duration
        self.count_by_split[row.split] += 1

    def table(self) -> pa.Table:
        schema = chunk_schema(self.config)
        arrays = []
        for field in schema:
            if field.name == "chunks":
                flat = [chunk.reshape(-1) for chunk in self.columns["chunks"]]
                values = np.concatenate(flat) if flat else np.empty(0, self.config.storage_dtype)
                storage = pa.FixedSizeListArray.from_arrays(pa.array(values), field.type.storage_type.list_size)
                arrays.append(pa.ExtensionArray.from_storage(field.type, storage))
            else:
                arrays.append(pa.array(self.columns[field.name], type=field.type))
        return pa.Table.from_arrays(arrays, schema=schema)

    def summary(self, name: str, seconds: float) -> dict:
        return {
            "name": name,
            "utterances": dict(self.count_by_split),
            "audio_seconds": dict(self.seconds_by_split),
            "stats": self.stats.to_dict(),
            "rejects": self.rejects,
            "processing_seconds": seconds,
        }


def write_shard(plan: ShardPlan, config: PrepConfig) -> dict:
    """Process and write one shard; returns its summary (also written next to it)."""
    started = time.perf_counter()
    builder = ShardBuilder(config)
    for row in plan.rows:
        builder.add(row)
    output = OutputFolder(config.output)
    output.write_parquet(plan.parquet, builder.table(), config.compression, small_columns=SMALL_COLUMNS)
    summary = builder.summary(plan.name, time.perf_counter() - started)
    output.write_json(plan.summary, summary)
    return summary
