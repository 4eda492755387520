"""RowBuffer: what the embedding pass collects its rows in (its memory is measured by
bench/embedding_memory.py, not here)."""

from __future__ import annotations

import numpy as np
import pytest

from cluster_train.train.row_buffer import RowBuffer


def test_rows_come_back_in_order_across_block_boundaries() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 3), dtype=np.float32) for n in (5, 1, 7, 0, 4, 9)]
    buffer = RowBuffer(block_bytes=4 * 3 * 4)  # 4 rows a block: most batches span two or three blocks
    for batch in batches:
        buffer.append(batch)
    assert len(buffer) == 26
    rows = buffer.array()
    np.testing.assert_array_equal(rows, np.concatenate(batches))
    assert rows.dtype == np.float32 and rows.flags.c_contiguous
    assert buffer.array() is None and len(buffer) == 0  # emptied


def test_one_block_keys() -> None:
    buffer = RowBuffer()
    buffer.append(np.arange(3, dtype=np.int64))
    buffer.append(np.arange(10, 12, dtype=np.int64))
    np.testing.assert_array_equal(buffer.array(), [0, 1, 2, 10, 11])


def test_nothing_appended_is_none() -> None:
    buffer = RowBuffer()
    buffer.append(np.empty((0, 8), np.float32))
    assert len(buffer) == 0 and buffer.array() is None


def test_rows_of_another_shape_or_dtype_are_refused() -> None:
    buffer = RowBuffer()
    buffer.append(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"\(3,\) float32 appended to rows of shape \(4,\) float32"):
        buffer.append(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="float64"):
        buffer.append(np.zeros((2, 4), np.float64))
