from __future__ import annotations

import json
from functools import reduce
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data_prep.mel import MelSpectrogram
from data_prep.stats import Normalizer, RunningStats

N_MELS = 128


@pytest.fixture(scope="module")
def frames(sample_files: list[Path]) -> np.ndarray:
    """Real mel frames (power scale, as the paper) from a dozen sample files, concatenated."""
    extract = MelSpectrogram()
    return np.concatenate([extract(sf.read(path, dtype="float32")[0]) for path in sample_files[::30]])


def blocks(frames: np.ndarray, seed: int) -> list[np.ndarray]:
    """Random-sized consecutive blocks, some of them empty."""
    cuts = np.random.default_rng(seed).integers(0, len(frames), size=40)
    cuts = np.sort(np.concatenate([cuts, cuts[:2]]))  # repeated cuts give empty blocks
    return np.split(frames, cuts)


def stats_of(block: np.ndarray) -> RunningStats:
    stats = RunningStats.empty(N_MELS)
    stats.update(block)
    return stats


def assert_matches_numpy(stats: RunningStats, frames: np.ndarray) -> None:
    reference = frames.astype(np.float64)
    assert stats.count == len(frames)
    np.testing.assert_allclose(stats.mean, reference.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(stats.std, reference.std(axis=0), rtol=1e-10)


def test_streaming_update_matches_numpy(frames):
    stats = RunningStats.empty(N_MELS)
    for block in blocks(frames, seed=0):
        stats.update(block)
    assert_matches_numpy(stats, frames)


def test_merge_in_any_order_matches_numpy(frames):
    parts = [stats_of(block) for block in blocks(frames, seed=1)]
    assert any(part.count == 0 for part in parts)
    left_to_right = reduce(RunningStats.merge, parts)
    shuffled = [parts[i] for i in np.random.default_rng(2).permutation(len(parts))]
    right_to_left = reduce(lambda acc, part: part.merge(acc), reversed(shuffled))
    while len(parts) > 1:  # tree reduction, as parallel workers would do
        parts = [reduce(RunningStats.merge, parts[i : i + 2]) for i in range(0, len(parts), 2)]
    for merged in (left_to_right, right_to_left, parts[0]):
        assert_matches_numpy(merged, frames)


def test_log_mel_frames(sample_files):
    extract = MelSpectrogram(scale="log")
    waves = [sf.read(path, dtype="float32")[0] for path in sample_files[1::60]]
    log_frames = np.concatenate([extract(w) for w in waves])
    merged = reduce(RunningStats.merge, [stats_of(extract(w)) for w in waves])
    assert_matches_numpy(merged, log_frames)


def test_merge_returns_new_and_handles_empty(frames):
    full = stats_of(frames)
    empty = RunningStats.empty(N_MELS)
    for merged in (full.merge(empty), empty.merge(full)):
        assert merged is not full and merged.count == full.count
        np.testing.assert_array_equal(merged.mean, full.mean)
        np.testing.assert_array_equal(merged.m2, full.m2)
    merged.mean[0] = -1.0
    assert full.mean[0] != -1.0
    nothing = empty.merge(RunningStats.empty(N_MELS))
    assert nothing.count == 0 and not nothing.mean.any()
    with pytest.raises(ValueError, match="std of no frames is undefined"):
        nothing.std  # noqa: B018


def test_update_with_empty_block_and_float16(frames):
    stats = RunningStats.empty(N_MELS)
    stats.update(np.zeros((0, N_MELS), dtype=np.float32))
    assert stats.count == 0
    half = frames[:200].astype(np.float16)
    stats.update(half)
    assert_matches_numpy(stats, half)


def test_shape_mismatch_rejected():
    stats = RunningStats.empty(N_MELS)
    with pytest.raises(ValueError, match=r"frames must have shape \(T, 128\), got \(5, 64\)"):
        stats.update(np.zeros((5, 64)))
    with pytest.raises(ValueError, match="cannot merge stats of 128 and 64 mel bins"):
        stats.merge(RunningStats.empty(64))


def test_dict_round_trip_is_bit_exact(frames):
    stats = stats_of(frames)
    restored = RunningStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert restored.count == stats.count
    assert restored.mean.dtype == np.float64
    assert restored.mean.tobytes() == stats.mean.tobytes()
    assert restored.m2.tobytes() == stats.m2.tobytes()


def test_normalizer_z_scores(frames):
    stats = stats_of(frames)
    normalize = stats.normalizer(clip=1e6)
    z = normalize(frames)
    assert z.dtype == np.float32 and z.shape == frames.shape
    np.testing.assert_allclose(z.mean(axis=0, dtype=np.float64), 0, atol=1e-3)
    np.testing.assert_allclose(z.std(axis=0, dtype=np.float64), 1, atol=1e-3)


def test_normalizer_nan_clip_and_zero_std():
    normalize = Normalizer(mean=np.array([1.0, 2.0, 3.0]), std=np.array([2.0, 0.0, 1.0]))
    x = np.array([[3.0, 2.5, np.nan], [-100.0, 2.0, 4.0], [np.inf, -np.inf, 3.0]])
    expected = np.array([[1.0, 0.5, 0.0], [-3.0, 0.0, 1.0], [3.0, -3.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(normalize(x), expected)
    np.testing.assert_array_equal(normalize(x[None])[0], expected)  # any leading axes
    np.testing.assert_array_equal(normalize.std, [2.0, 0.0, 1.0])  # the stored std is unchanged


def test_normalizer_torch_matches_numpy(frames):
    normalize = stats_of(frames).normalizer()
    x = frames[:300].copy()
    x[::7, ::5] = np.nan
    out = normalize.torch(torch.from_numpy(x).to(torch.bfloat16))
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    expected = normalize(torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert out.abs().max().item() <= 3.0 and not torch.isnan(out).any()


def test_normalizer_validation():
    with pytest.raises(ValueError, match=r"mean and std must be 1-D of one shape, got \(3,\), \(4,\)"):
        Normalizer(mean=np.zeros(3), std=np.ones(4))
    with pytest.raises(ValueError, match="clip must be positive, got 0.0"):
        Normalizer(mean=np.zeros(3), std=np.ones(3), clip=0.0)
    with pytest.raises(ValueError, match="last axis has 4 bins, the normaliser 3"):
        Normalizer(mean=np.zeros(3), std=np.ones(3))(np.zeros((2, 4)))
