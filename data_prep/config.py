"""Typed configuration: a dataclass schema, then a YAML file, then `key=value` overrides.

`load_config` is shared by every entry point (prep, train, evaluate). A mistyped key, a value of
the wrong type or a value outside what a setting allows fails here, naming the key, before any Ray
resource is taken.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration mistake; the message names the key (dotted path) and what is wrong."""


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


def require_choice(value: object, key: str, choices: Sequence[object]) -> None:
    require(value in choices, key, f"{value!r} is not one of {', '.join(map(repr, choices))}")


def load_config(
    schema: type[T], path: str | Path | DictConfig | None = None, overrides: Sequence[str] = (),
    base_files: Sequence[str | Path] = (),
) -> T:  # fmt: skip
    """Merge `schema` defaults <- `base_files` (e.g. a recipe) <- YAML file <- dotted overrides and
    return a validated `schema`."""
    layers = [OmegaConf.structured(schema)]
    where = "defaults"
    try:
        for base in base_files:
            where = str(base)
            layers.append(OmegaConf.load(base))
        if path is not None:
            where = str(path)
            layers.append(path if isinstance(path, DictConfig) else OmegaConf.load(path))
        if overrides:
            where = "command-line overrides"
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(OmegaConf.merge(*layers))  # type: ignore[return-value]
    except FileNotFoundError as error:
        raise ConfigError(f"config file not found: {path}") from error
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        message = str(getattr(error, "msg", error)).splitlines()[0]
        raise ConfigError(f"config key '{key}' ({where}): {message}") from error
    except TypeError as error:
        raise ConfigError(f"config ({where}): {error}") from error


def to_yaml(config: object) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_flat_dict(config: object) -> dict[str, object]:
    """Dotted key -> value, for logging a resolved config as parameters."""
    flat: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = value

    walk("", OmegaConf.to_container(OmegaConf.structured(config)))
    return flat


# --- data_prep's own settings -------------------------------------------------------------------

SOURCE_KINDS = ("msp_podcast", "ravdess", "csv", "folder")
SCALES = ("power", "log")
STORAGE_DTYPES = ("float16", "float32")
COMPRESSIONS = ("none", "snappy", "lz4", "zstd")


@dataclass
class SourceConfig:
    kind: str = MISSING  # msp_podcast | ravdess | csv | folder
    path: str = MISSING  # release root, CSV file, folder, or .txt listing; local path or URI
    split: str = "unlabeled"  # the split of every file a `folder` source lists

    def __post_init__(self) -> None:
        require_choice(self.kind, "sources.kind", SOURCE_KINDS)


@dataclass
class FeatureConfig:
    sample_rate: int = 16000  # audio at another rate is resampled to it
    n_fft: int = 512  # 32 ms
    hop_length: int = 256  # 16 ms
    n_mels: int = 128  # mel bands a frame has
    scale: str = "power"  # the original code feeds the mel power without a log
    peak_normalize: bool = True  # scale each utterance to a peak of 1 before the mel (the original code's)

    def __post_init__(self) -> None:
        require(self.sample_rate >= 4000, "features.sample_rate", f"{self.sample_rate} Hz is too low")
        require(self.n_fft >= 16, "features.n_fft", f"{self.n_fft} is too small")
        require(0 < self.hop_length <= self.n_fft, "features.hop_length", "must be in (0, n_fft]")
        require(0 < self.n_mels <= self.n_fft // 2 + 1, "features.n_mels", "must be in (0, n_fft/2 + 1]")
        require_choice(self.scale, "features.scale", SCALES)


# The most chunks an utterance may have: a chunk key (`cluster_train.data.batches.chunk_keys`) is an
# utterance hash of 63 - ceil(log2 C) bits (56 up to C = 128) times C plus the chunk index, a non-negative
# int64; at C = 4096 the hash keeps 51 bits, so that 1M utterances share one with probability 2e-4.
MAX_CHUNKS = 4096


@dataclass
class ChunkConfig:
    """How a run cuts each utterance's frames into chunks when it reads them (Eq. 1-2): an option
    of training (`data.chunks`), kept in the model bundle for prediction; prep stores frames only."""

    num_chunks: int = 11  # paper Eq. 1: C = ceil(T_max / w_c) with T_max = 11 s, w_c = 1 s
    chunk_frames: int = 62  # w_c = 1 s at a 16 ms hop

    def __post_init__(self) -> None:
        require(1 <= self.num_chunks <= MAX_CHUNKS, "data.chunks.num_chunks",
                f"must be at least 1 and at most {MAX_CHUNKS}: a chunk key, utterance key * C + chunk index, "
                "must fit in int64")
        require(self.chunk_frames >= 1, "data.chunks.chunk_frames", "must be at least 1")


@dataclass
class PrepConfig:
    sources: list[SourceConfig] = field(default_factory=list)  # where the audio and labels are listed
    output: str = MISSING  # local folder or URI (s3://, gs://) of the prepared dataset
    features: FeatureConfig = field(default_factory=FeatureConfig)
    min_seconds: float = 0.25  # shorter audio is rejected; a reader repeats audio under one chunk to fill it
    storage_dtype: str = "float16"  # one of STORAGE_DTYPES: the frames as stored
    compression: str = "zstd"  # one of COMPRESSIONS: Parquet's
    stats_splits: list[str] = field(default_factory=lambda: ["train"])  # the splits the mel mean and variance come from
    shard_size: int = 256  # utterances per Parquet shard and per Ray task
    cpus_per_task: float = 1.0  # Ray CPUs each shard's task reserves
    max_workers: int | None = None  # shards written at once; None: as many as the cluster's CPUs allow
    overwrite: bool = False  # allow replacing an output prepared with other settings
    progress: bool | None = None  # None: a progress bar when stderr is a terminal, else plain lines
    progress_seconds: float = 30.0  # between those lines (a log file, `ray job logs`)

    def __post_init__(self) -> None:
        require(len(self.sources) > 0, "sources", "at least one source is needed")
        require(self.min_seconds >= 0, "min_seconds", "must not be negative")
        require_choice(self.storage_dtype, "storage_dtype", STORAGE_DTYPES)
        require_choice(self.compression, "compression", COMPRESSIONS)
        require(self.shard_size >= 1, "shard_size", "must be at least 1")
        require(self.cpus_per_task > 0, "cpus_per_task", "must be positive")
        require(self.max_workers is None or self.max_workers >= 1, "max_workers", "must be at least 1")
        require(self.progress_seconds >= 0, "progress_seconds", "must not be negative")
        require(len(self.stats_splits) > 0, "stats_splits", "name at least one split")


def output_settings(config: PrepConfig) -> dict[str, object]:
    """The settings that decide an output's content: a rerun must match them to resume."""
    return {
        "features": dataclasses.asdict(config.features),
        "min_seconds": config.min_seconds,
        "storage_dtype": config.storage_dtype,
        "compression": config.compression,
        "stats_splits": list(config.stats_splits),
        "shard_size": config.shard_size,
    }
