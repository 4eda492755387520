"""One shard: a fixed group of utterances -> one Parquet file of mel frames + a JSON summary.

Each utterance is stored once, as its (T, n_mels) frames; readers cut chunks (`chunking.cut_chunks`).

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
from data_prep.config import ChunkConfig, FeatureConfig, PrepConfig
from data_prep.frames import FrameFormat
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


def frame_schema(config: PrepConfig) -> pa.Schema:
    """The Parquet schema of every shard: `frames` holds an utterance's mel frames (`FrameFormat`)."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        *(pa.field(name, pa.float32()) for name in ATTRIBUTES),
        pa.field("category", pa.string()),
        pa.field("speaker", pa.string()),
        pa.field("duration", pa.float32(), nullable=False),
        pa.field("n_frames", pa.int32(), nullable=False),
        pa.field("frames", pa.binary(), nullable=False),
    ]
    layout = {"frames": {"dtype": config.storage_dtype, "n_mels": config.features.n_mels, "order": "frame-major"}}
    return pa.schema(fields, metadata={SCHEMA_METADATA_KEY: json.dumps(layout).encode()})


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


# The settings that decide what chunks a file gives: a model keeps them (its bundle's `features`):
# the dataset's frame settings and the run's `data.chunks`, so that prediction on raw audio
# computes the very chunks the model was trained on.
CHUNK_SETTINGS = ("features", "chunks", "storage_dtype", "min_seconds")


@dataclass(frozen=True)
class ChunkRecipe:
    """Audio file -> a sentence's C chunks: what a model's input depends on."""

    features: FeatureConfig
    chunks: ChunkConfig
    storage_dtype: str = "float16"
    min_seconds: float = 0.25

    @classmethod
    def for_dataset(cls, settings: dict, chunks: ChunkConfig) -> "ChunkRecipe":
        """A prepared dataset's frames (its `dataset.json` settings), cut as a run's `data.chunks` says."""
        return cls.from_settings({**settings, "chunks": dataclasses.asdict(chunks)})

    @classmethod
    def from_settings(cls, settings: dict) -> "ChunkRecipe":
        """From a bundle's `features` (or dataset settings plus `chunks`); ValueError when incomplete.
        Bundles saved when prep cut the chunks keep `min_seconds` inside `chunks`."""
        missing = [key for key in ("features", "chunks", "storage_dtype") if key not in settings]
        if missing:
            raise ValueError(f"settings lack {', '.join(missing)} (need {', '.join(CHUNK_SETTINGS)})")
        chunks = dict(settings["chunks"])
        min_seconds = settings.get("min_seconds", chunks.pop("min_seconds", 0.25))  # pops it either way
        try:
            return cls(FeatureConfig(**settings["features"]), ChunkConfig(**chunks), str(settings["storage_dtype"]),
                       float(min_seconds))
        except TypeError as error:  # an unknown or missing key inside features / chunks
            raise ValueError(f"settings do not fit this version's FeatureConfig / ChunkConfig: {error}") from error

    @property
    def frame_format(self) -> FrameFormat:
        return FrameFormat(self.storage_dtype, self.features.n_mels)

    def load_frames(self, location: str, expected_duration: float | None = None) -> "AudioFrames":
        """`load_frames` with this recipe's feature settings."""
        return load_frames(location, self.features, self.storage_dtype, self.min_seconds, expected_duration)

    def settings(self) -> dict:
        """The CHUNK_SETTINGS as plain values (what a bundle keeps)."""
        return {"features": dataclasses.asdict(self.features), "chunks": dataclasses.asdict(self.chunks),
                "storage_dtype": self.storage_dtype, "min_seconds": self.min_seconds}


@dataclass(frozen=True)
class AudioFrames:
    """One file as prep stores it: its duration and mel frames."""

    duration: float  # seconds, at the features' sample rate
    mel: np.ndarray  # (T, n_mels) float32, un-normalised
    stored: np.ndarray  # (T, n_mels) in the storage dtype: what prep writes and readers cut chunks from


def load_frames(location: str, features: FeatureConfig, storage_dtype: str, min_seconds: float,
                expected_duration: float | None = None) -> AudioFrames:
    """Read, decode, check and turn one file into mel frames; raises AudioRejected with the reason
    (`load_audio`'s, or `too short`, `too long`: more frames than one stored value holds, `overflow`).

    The one implementation of audio -> frames: prep's shards and prediction both call it.
    """
    try:
        data = read_bytes(location)
    except OSError as error:
        raise AudioRejected(f"unreadable: {error}") from error
    wave = load_audio(data, location, features.sample_rate, expected_duration)
    duration = len(wave) / features.sample_rate
    if duration < min_seconds:
        raise AudioRejected(f"too short: {duration:.3f} s is below min_seconds = {min_seconds} s")
    extractor = mel_extractor(features)
    frames, layout = extractor.num_frames(len(wave)), FrameFormat(storage_dtype, features.n_mels)
    if frames > layout.max_frames:
        raise AudioRejected(f"too long: {duration:.1f} s gives {frames:,} frames of {layout.frame_bytes} bytes, more "
                            f"than the {layout.max_frames:,} one stored utterance may hold (Arrow/Parquet's 2 GiB "
                            "per value); cut the audio into shorter segments")
    mel = extractor(wave)
    largest = float(np.abs(mel).max())
    if largest > np.finfo(storage_dtype).max:
        raise AudioRejected(f"overflow: mel value {largest:.4g} exceeds {storage_dtype}; use storage_dtype=float32")
    return AudioFrames(duration, mel, to_storage_dtype(mel, storage_dtype))


def reject_reason(error: Exception) -> str:
    """The reason recorded for a file that failed: AudioRejected's own, else the error, marked 'failed'."""
    if isinstance(error, AudioRejected):
        return error.reason
    return f"failed: {type(error).__name__}: {error}"


class ShardBuilder:
    """Accumulates the good utterances, the rejects and the statistics of one shard."""

    def __init__(self, config: PrepConfig):
        self.config = config
        self.columns: dict[str, list] = {name: [] for name in frame_schema(config).names}
        self.stats = RunningStats.empty(config.features.n_mels)
        self.rejects: list[dict] = []
        self.seconds_by_split: Counter = Counter()
        self.count_by_split: Counter = Counter()
        self.frames_by_split: Counter = Counter()

    def add(self, row: Utterance) -> None:
        try:
            self._add(row)
        except Exception as error:  # noqa: BLE001 - one bad file must never stop the job
            self.rejects.append({"id": row.id, "audio": row.audio, "split": row.split, "reason": reject_reason(error)})

    def _add(self, row: Utterance) -> None:
        config = self.config
        audio = load_frames(row.audio, config.features, config.storage_dtype, config.min_seconds, row.duration)
        if row.split in config.stats_splits:
            self.stats.update(audio.mel)
        values = {
            "id": row.id,
            "split": row.split,
            "category": row.category,
            "speaker": row.speaker,
            "duration": audio.duration,
            "n_frames": len(audio.mel),
            "frames": audio.stored,
        }
        values.update({name: getattr(row, name) for name in ATTRIBUTES})
        for name, value in values.items():
            self.columns[name].append(value)
        self.seconds_by_split[row.split] += audio.duration
        self.count_by_split[row.split] += 1
        self.frames_by_split[row.split] += len(audio.mel)

    def table(self) -> pa.Table:
        schema = frame_schema(self.config)
        frames = FrameFormat(self.config.storage_dtype, self.config.features.n_mels)
        arrays = [frames.column(self.columns["frames"]) if field.name == "frames"
                  else pa.array(self.columns[field.name], type=field.type) for field in schema]
        return pa.Table.from_arrays(arrays, schema=schema)

    def summary(self, name: str, seconds: float) -> dict:
        return {
            "name": name,
            "utterances": dict(self.count_by_split),
            "audio_seconds": dict(self.seconds_by_split),
            "frames": dict(self.frames_by_split),
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
