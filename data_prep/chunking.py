"""Fixed number of fixed-length chunks per sentence (Lin & Busso 2020; DeepEmoCluster Eq. 1-2).

Prep stores each utterance's frames once; chunks are cut when rows are read (training, evaluation)
and when audio is predicted, always by `cut_chunks`, so C and w_c are options of the run that reads.

Every spectrogram of T frames becomes exactly C chunks of w_c frames, without zero padding:
C = ceil(T_max / w_c) (Eq. 1) and chunk k starts at round(k * (T - w_c) / (C - 1)) (Eq. 2), so the
first chunk starts at frame 0, the last ends at frame T, and the chunks overlap as much as needed.

Choices the paper leaves open:
- C == 1: the single chunk starts at frame 0 (not centred), like chunk 0 for any C.
- Rounding is half up, computed in integers, so the last start is exactly T - w_c.
- T < w_c: the spectrogram is first extended to w_c frames by repeating it cyclically in time
  (frames 0, 1, ..., T-1, 0, 1, ...; the same as np.resize along time), never with zeros; every
  chunk is then that extended spectrogram. Rejecting input that is too short is the caller's job.
"""

from __future__ import annotations

import numpy as np


def _check(n_frames: int, num_chunks: int, chunk_frames: int) -> None:
    if n_frames < 1:
        raise ValueError(f"n_frames must be at least 1, got {n_frames}")
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be at least 1, got {num_chunks}")
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be at least 1, got {chunk_frames}")


def chunk_starts(n_frames, num_chunks: int, chunk_frames: int) -> np.ndarray:
    """Eq. 2: start frame of each of the C chunks, int64, non-decreasing; shape (C,) for one
    utterance of `n_frames`, (B, C) for an array of B lengths."""
    lengths = np.asarray(n_frames, dtype=np.int64)
    _check(int(lengths.min()) if lengths.size else 1, num_chunks, chunk_frames)
    span = np.maximum(lengths - chunk_frames, 0)[..., None]
    if num_chunks == 1:
        return np.zeros((*lengths.shape, 1), dtype=np.int64)
    k = np.arange(num_chunks, dtype=np.int64)
    gaps = num_chunks - 1
    return (2 * k * span + gaps) // (2 * gaps)  # round(k * span / gaps), halves up


def chunk_frame_index(lengths: np.ndarray, num_chunks: int, chunk_frames: int) -> np.ndarray:
    """(B, C, w_c) int64 indices into B spectrograms of `lengths` frames laid end to end: Eq. 2's
    chunk k of utterance b covers frames start_k .. start_k + w_c - 1 of it, cyclically repeated
    when the utterance is shorter than w_c (then every start is 0)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    starts = chunk_starts(lengths, num_chunks, chunk_frames)  # (B, C)
    within = starts[:, :, None] + np.arange(chunk_frames, dtype=np.int64)[None, None, :]  # (B, C, w_c)
    return offsets[:, None, None] + within % lengths[:, None, None]


def cut_chunks(frames: np.ndarray, lengths: np.ndarray, num_chunks: int, chunk_frames: int) -> np.ndarray:
    """B spectrograms laid end to end, frames (sum(lengths), n_mels) -> chunks (B, C, w_c, n_mels),
    same dtype: the one implementation of Eq. 1-2 that every reader calls."""
    frames = np.asarray(frames)
    if frames.ndim != 2:
        raise ValueError(f"frames must be 2-D (frames, n_mels), got shape {frames.shape}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.sum() != frames.shape[0]:
        raise ValueError(f"lengths add up to {int(lengths.sum())} frames, the array has {frames.shape[0]}")
    return frames[chunk_frame_index(lengths, num_chunks, chunk_frames)]
