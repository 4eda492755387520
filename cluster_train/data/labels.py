"""Emotion labels as arrays, and their z-scoring with the train statistics.

The model trains on z-scored labels (as the original code: (y - train mean) / train std per
attribute); evaluation maps predictions back to the raw 1-7 scale with `LabelScaler.from_z`.
A missing label is NaN throughout (Parquet null -> NaN) and stays NaN through the scaler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from data_prep.manifest import ATTRIBUTES

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)
Labels = pa.Table | Mapping[str, Any] | np.ndarray


def label_matrix(table: pa.Table, attributes: Sequence[str] = ATTRIBUTES) -> np.ndarray:
    """(N, A) float64 labels of a table's rows; null -> NaN."""
    columns = [pc.fill_null(table[name].cast(pa.float64()), np.nan).to_numpy() for name in attributes]
    return np.stack(columns, axis=1) if columns else np.empty((table.num_rows, 0))


@dataclass
class LabelScaler:
    """Per-attribute mean and std of the train labels; std == 0 counts as 1. `low` and `high`: the
    range of those labels, which predictions are clipped to (`clip`); None where unknown (bundles
    saved before the range was kept)."""

    attributes: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.attributes = tuple(self.attributes)
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.std = np.asarray(self.std, dtype=np.float64)
        shape = (len(self.attributes),)
        if self.mean.shape != shape or self.std.shape != shape:
            raise ValueError(f"mean {self.mean.shape} and std {self.std.shape} must have shape {shape}")
        if (self.low is None) != (self.high is None):
            raise ValueError("give both low and high, or neither")
        if self.low is not None:
            self.low, self.high = np.asarray(self.low, dtype=np.float64), np.asarray(self.high, dtype=np.float64)
            if self.low.shape != shape or self.high.shape != shape or not (self.low <= self.high).all():
                raise ValueError(f"low {self.low} and high {self.high} must have shape {shape} and low <= high")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.std).all() and (self.std >= 0).all()):
            raise ValueError(f"mean and std must be finite and std >= 0, got {self.mean}, {self.std}")
        self.std = np.where(self.std > 0, self.std, 1.0)

    @classmethod
    def fit(cls, labels: Labels, attributes: Sequence[str] = ATTRIBUTES, split: str | None = "train") -> LabelScaler:
        """Statistics of the labelled values (NaN / null left out) of each attribute.

        `labels`: an Arrow table (only its rows of `split` when it has a "split" column and `split`
        is not None), a mapping attribute -> values, or an (N, A) array in `attributes` order.
        """
        attributes = tuple(attributes)
        if isinstance(labels, pa.Table):
            if split is not None and "split" in labels.column_names:
                labels = labels.filter(pc.equal(labels["split"], split))
            values = label_matrix(labels, attributes)
        elif isinstance(labels, Mapping):
            values = np.stack([np.asarray(labels[name], dtype=np.float64) for name in attributes], axis=1)
        else:
            values = np.asarray(labels, dtype=np.float64).reshape(-1, len(attributes))
        counts = (~np.isnan(values)).sum(axis=0)
        if (counts == 0).any():
            missing = [name for name, count in zip(attributes, counts) if count == 0]
            raise ValueError(f"no {split or 'given'} labels for {', '.join(missing)}: cannot fit a LabelScaler")
        return cls(attributes, np.nanmean(values, axis=0), np.nanstd(values, axis=0),
                   np.nanmin(values, axis=0), np.nanmax(values, axis=0))

    def _stats(self, like: ArrayT) -> tuple[ArrayT, ArrayT]:
        if like.shape[-1] != len(self.attributes):
            raise ValueError(f"last axis has {like.shape[-1]} values, the scaler {len(self.attributes)} attributes")
        if isinstance(like, torch.Tensor):
            dtype = like.dtype if like.is_floating_point() else torch.float32
            return (torch.as_tensor(self.mean, dtype=dtype, device=like.device),
                    torch.as_tensor(self.std, dtype=dtype, device=like.device))
        return self.mean, self.std

    def to_z(self, y: ArrayT) -> ArrayT:
        """Raw labels (..., A) -> z-scores; numpy in, numpy out (float64); torch keeps its float dtype."""
        y = y if isinstance(y, torch.Tensor) else np.asarray(y, dtype=np.float64)
        mean, std = self._stats(y)
        return (y - mean) / std

    def from_z(self, z: ArrayT) -> ArrayT:
        """z-scores (..., A) -> the raw label scale."""
        z = z if isinstance(z, torch.Tensor) else np.asarray(z, dtype=np.float64)
        mean, std = self._stats(z)
        return z * std + mean

    def clip(self, y: np.ndarray) -> np.ndarray:
        """Raw-scale values (..., A) clipped to the range of the training labels (as they are when
        the range is unknown)."""
        return np.asarray(y) if self.low is None else np.clip(y, self.low, self.high)

    def to_dict(self) -> dict[str, list]:
        known = {} if self.low is None else {"low": self.low.tolist(), "high": self.high.tolist()}
        return {"attributes": list(self.attributes), "mean": self.mean.tolist(), "std": self.std.tolist()} | known

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LabelScaler:
        return cls(tuple(d["attributes"]), np.asarray(d["mean"]), np.asarray(d["std"]), d.get("low"), d.get("high"))
