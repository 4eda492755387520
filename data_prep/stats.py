"""Per-mel-bin mean and std over all training frames, and the normaliser built from them.

`RunningStats` accumulates count, mean and sum of squared deviations (M2) in float64 and merges
partial results with the parallel algorithm of Chan, Golub & LeVeque, so statistics computed by
many workers over any partition of the frames combine to the same values as one pass.
`Normalizer` applies the paper's z-normalisation: (x - mean) / std, NaN -> 0, clipped to [-3, 3].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def _combine(
    count_a: int, mean_a: np.ndarray, m2_a: np.ndarray, count_b: int, mean_b: np.ndarray, m2_b: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray]:
    count = count_a + count_b
    if count_a == 0 or count_b == 0:
        return (count, mean_b.copy(), m2_b.copy()) if count_a == 0 else (count, mean_a.copy(), m2_a.copy())
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / count)
    m2 = m2_a + m2_b + delta * delta * (count_a * count_b / count)
    return count, mean, m2


@dataclass
class RunningStats:
    """Streaming, exactly mergeable per-bin count / mean / M2 (float64, shape (n_mels,))."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    def __post_init__(self) -> None:
        self.count = int(self.count)
        self.mean = np.array(self.mean, dtype=np.float64)
        self.m2 = np.array(self.m2, dtype=np.float64)
        if self.mean.ndim != 1 or self.mean.shape != self.m2.shape:
            raise ValueError(f"mean and m2 must be 1-D of one shape, got {self.mean.shape}, {self.m2.shape}")
        if self.count < 0:
            raise ValueError(f"count must not be negative, got {self.count}")

    @classmethod
    def empty(cls, n_mels: int) -> RunningStats:
        return cls(0, np.zeros(n_mels), np.zeros(n_mels))

    @property
    def n_mels(self) -> int:
        return self.mean.shape[0]

    def update(self, frames: np.ndarray) -> None:
        """Add frames (T, n_mels) of any float dtype; every frame counts, NaN included."""
        frames = np.asarray(frames, dtype=np.float64)
        if frames.ndim != 2 or frames.shape[1] != self.n_mels:
            raise ValueError(f"frames must have shape (T, {self.n_mels}), got {frames.shape}")
        if frames.shape[0] == 0:
            return
        block_mean = frames.mean(axis=0)
        block_m2 = np.square(frames - block_mean).sum(axis=0)
        self.count, self.mean, self.m2 = _combine(
            self.count, self.mean, self.m2, frames.shape[0], block_mean, block_m2
        )

    def merge(self, other: RunningStats) -> RunningStats:
        """The statistics of both frame sets together, as a new object."""
        if other.n_mels != self.n_mels:
            raise ValueError(f"cannot merge stats of {self.n_mels} and {other.n_mels} mel bins")
        return RunningStats(*_combine(self.count, self.mean, self.m2, other.count, other.mean, other.m2))

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof=0) per bin."""
        if self.count == 0:
            raise ValueError("std of no frames is undefined")
        return np.sqrt(self.m2 / self.count)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form; Python floats round-trip float64 exactly through json."""
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunningStats:
        return cls(int(d["count"]), np.asarray(d["mean"], dtype=np.float64), np.asarray(d["m2"], dtype=np.float64))

    def normalizer(self, clip: float = 3.0) -> Normalizer:
        return Normalizer(self.mean, self.std, clip)


@dataclass(frozen=True, eq=False)
class Normalizer:
    """z-normalise over the last axis with per-bin mean/std; std == 0 counts as 1; NaN -> 0; clip."""

    mean: np.ndarray
    std: np.ndarray
    clip: float = 3.0
    _scale: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        mean = np.array(self.mean, dtype=np.float32)
        std = np.array(self.std, dtype=np.float32)
        if mean.ndim != 1 or mean.shape != std.shape:
            raise ValueError(f"mean and std must be 1-D of one shape, got {mean.shape}, {std.shape}")
        if not self.clip > 0:
            raise ValueError(f"clip must be positive, got {self.clip}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "_scale", np.where(std > 0, std, np.float32(1.0)))

    def _check_bins(self, n: int) -> None:
        if n != self.mean.shape[0]:
            raise ValueError(f"last axis has {n} bins, the normaliser {self.mean.shape[0]}")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        self._check_bins(x.shape[-1])
        z = (x - self.mean) / self._scale
        z[np.isnan(z)] = 0.0
        return np.clip(z, -self.clip, self.clip, out=z)

    def torch(self, x: torch.Tensor) -> torch.Tensor:
        """Same as __call__ for a torch tensor; float32 result on x's device."""
        import torch

        self._check_bins(x.shape[-1])
        mean = torch.as_tensor(self.mean, device=x.device)
        scale = torch.as_tensor(self._scale, device=x.device)
        z = (x.to(torch.float32) - mean) / scale
        return torch.nan_to_num(z, nan=0.0).clamp_(-self.clip, self.clip)
