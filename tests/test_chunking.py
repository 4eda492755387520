from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster_train.clustering.labelers import LabelTable
from cluster_train.data.batches import chunk_keys
from data_prep.chunking import chunk_starts, cut_chunks
from data_prep.config import ChunkConfig, ConfigError
from data_prep.frames import FrameFormat

C, W, N_MELS = 11, 62, 8


def ramp(n_frames: int) -> np.ndarray:
    """(T, N_MELS) whose row t is all t, so a frame's value says where it came from."""
    return np.repeat(np.arange(n_frames, dtype=np.float32)[:, None], N_MELS, axis=1)


def cut_one(mel: np.ndarray, num_chunks: int, chunk_frames: int) -> np.ndarray:
    """(T, n_mels) -> (C, w_c, n_mels): `cut_chunks` of one utterance."""
    return cut_chunks(mel, np.array([len(mel)]), num_chunks, chunk_frames)[0]


@pytest.mark.parametrize("n_frames", [W - 1, W, W + 1, 100, 219, 700])
def test_starts_follow_eq2(n_frames):
    starts = chunk_starts(n_frames, C, W)
    assert starts.dtype == np.int64 and starts.shape == (C,)
    assert np.all(np.diff(starts) >= 0)
    span = max(n_frames - W, 0)
    assert starts[0] == 0 and starts[-1] == span
    step = span / (C - 1)
    assert np.all(np.abs(starts - np.arange(C) * step) <= 0.5)


def test_known_positions():
    np.testing.assert_array_equal(chunk_starts(W - 10, C, W), np.zeros(C))
    np.testing.assert_array_equal(chunk_starts(W, C, W), np.zeros(C))
    # T = w_c + 1: step 0.1, round half up -> the second half of the chunks moves by one frame.
    np.testing.assert_array_equal(chunk_starts(W + 1, C, W), [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    # T = 219: step 15.7.
    np.testing.assert_array_equal(
        chunk_starts(219, C, W), [0, 16, 31, 47, 63, 79, 94, 110, 126, 141, 157]
    )
    # T = 700: step 63.8, chunks no longer overlap.
    np.testing.assert_array_equal(
        chunk_starts(700, C, W), [0, 64, 128, 191, 255, 319, 383, 447, 510, 574, 638]
    )


def test_single_chunk_starts_at_zero():
    np.testing.assert_array_equal(chunk_starts(219, 1, W), [0])


@pytest.mark.parametrize("n_frames", [W, W + 1, 219, 700])
def test_chunks_are_slices(n_frames):
    mel = np.random.default_rng(n_frames).normal(size=(n_frames, N_MELS)).astype(np.float32)
    chunks = cut_one(mel, C, W)
    assert chunks.shape == (C, W, N_MELS) and chunks.dtype == np.float32
    for chunk, start in zip(chunks, chunk_starts(n_frames, C, W)):
        np.testing.assert_array_equal(chunk, mel[start : start + W])
    np.testing.assert_array_equal(chunks[-1][-1], mel[-1])  # the last chunk ends at T


def test_short_input_is_repeated_cyclically():
    mel = ramp(25)
    chunks = cut_one(mel, C, W)
    assert chunks.shape == (C, W, N_MELS)
    expected = np.concatenate([mel, mel, mel[:12]])  # 25 + 25 + 12 = 62 frames, no zeros
    for chunk in chunks:
        np.testing.assert_array_equal(chunk, expected)
    np.testing.assert_array_equal(chunks[0], np.resize(mel, (W, N_MELS)))


def test_single_frame_input():
    chunks = cut_one(ramp(1) + 5, 3, 4)
    np.testing.assert_array_equal(chunks, np.full((3, 4, N_MELS), 5, dtype=np.float32))


def test_invalid_input():
    with pytest.raises(ValueError, match="2-D"):
        cut_one(np.zeros(100), C, W)
    with pytest.raises(ValueError, match="n_frames"):
        cut_one(np.zeros((0, N_MELS)), C, W)
    with pytest.raises(ValueError, match="num_chunks"):
        chunk_starts(100, 0, W)
    with pytest.raises(ValueError, match="chunk_frames"):
        chunk_starts(100, C, 0)


def test_cut_chunks_of_a_batch_is_each_utterance_cut_alone():
    """The readers' one vectorised cut (any lengths, shorter than a chunk included) gives what
    Eq. 1-2 gives each utterance on its own."""
    rng = np.random.default_rng(1)
    mels = [rng.standard_normal((n, 5)).astype(np.float32) for n in (1, 7, 62, 63, 300)]
    lengths = np.array([len(m) for m in mels])
    for num_chunks, chunk_frames in ((11, 62), (1, 62), (4, 31), (3, 1)):
        batch = cut_chunks(np.concatenate(mels), lengths, num_chunks, chunk_frames)
        assert batch.shape == (5, num_chunks, chunk_frames, 5)
        for row, mel in zip(batch, mels):
            np.testing.assert_array_equal(row, cut_one(mel, num_chunks, chunk_frames))
    with pytest.raises(ValueError, match="add up to 9 frames, the array has 8"):
        cut_chunks(np.zeros((8, 5)), np.array([4, 5]), 2, 3)


def test_frames_column_round_trips_through_parquet_and_is_read_in_slices(tmp_path):
    frames = FrameFormat("float16", 6)
    rng = np.random.default_rng(2)
    mels = [rng.random((n, 6)).astype(np.float16) for n in (3, 70, 200)]
    pq.write_table(pa.table({"frames": frames.column(mels)}), tmp_path / "x.parquet")
    column = pq.read_table(tmp_path / "x.parquet")["frames"]
    values, lengths = frames.frames_of(column.slice(1, 2))
    assert lengths.tolist() == [70, 200]
    np.testing.assert_array_equal(values, np.concatenate(mels[1:]))
    chunks = frames.chunks_of(column, ChunkConfig(num_chunks=4, chunk_frames=31))
    assert chunks.shape == (3, 4, 31, 6) and chunks.dtype == np.float16
    np.testing.assert_array_equal(chunks[2], cut_one(mels[2], 4, 31))
    with pytest.raises(ValueError, match="not a whole number .* of 6-band float32 frames"):
        FrameFormat("float32", 6).frames_of(column)


@pytest.mark.parametrize("num_chunks", [1, 11, 128, 129, 200, 1000, 4096])
def test_chunk_keys_are_unique_non_negative_and_decode_at_every_allowed_chunk_count(num_chunks):
    """key = utterance key * C + chunk index stays inside int64 for any C the config allows, and
    decodes back: key // C is the utterance (one value a row, a different one each row), key % C the chunk."""
    ids = [f"utt{i}" for i in range(max(100, 300_000 // num_chunks))]  # at C = 129, 17 of 2,325 overflowed int64
    keys = chunk_keys(np.array(ids), num_chunks)
    assert keys.dtype == np.int64 and keys.shape == (len(ids) * num_chunks,)
    assert (keys >= 0).all() and len(np.unique(keys)) == len(keys)
    utterances, chunks = np.divmod(keys.reshape(len(ids), num_chunks), num_chunks)
    assert (utterances == utterances[:, :1]).all() and len(np.unique(utterances[:, 0])) == len(ids)
    np.testing.assert_array_equal(chunks, np.broadcast_to(np.arange(num_chunks), chunks.shape))
    np.testing.assert_array_equal(keys, chunk_keys(np.array(ids), num_chunks))  # stable
    labels = np.arange(len(keys)) % 7
    table = LabelTable.build(keys[::-1], labels[::-1], num_chunks, num_clusters=7)
    assert table.num_chunks == num_chunks and len(table.group_keys) == len(ids)
    np.testing.assert_array_equal(table.group_keys, np.sort(utterances[:, 0]))
    np.testing.assert_array_equal(table.lookup(keys), labels)


def test_a_chunk_count_beyond_what_chunk_keys_hold_is_a_config_error():
    assert ChunkConfig(num_chunks=4096).num_chunks == 4096
    with pytest.raises(ConfigError, match="'data.chunks.num_chunks'.*at most 4096"):
        ChunkConfig(num_chunks=4097)
    with pytest.raises(ValueError, match="4097 chunks"):
        chunk_keys(np.array(["a"]), 4097)
