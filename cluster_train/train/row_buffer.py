"""Rows collected batch by batch into large blocks, one array at the end: how the K-means embedding
pass keeps millions of rows without leaving the heap fragmented.

Kept as one small array a batch (a 704 x 64 float32 batch is 180 KB), the rows sit in glibc's heap
between the batch tensors freed after every step, and each one pins memory that the allocator can
then neither reuse for the next batch nor give back: at 100% of the scale rehearsal a training
worker held 7.5-8.5 GB after the embedding pass for 0.7 GB of embeddings (bench/embedding_memory.py
measures both ways). A block of `BLOCK_BYTES` is above glibc's largest mmap threshold (32 MiB), so it
is mapped on its own and returned to the system when freed.
"""

from __future__ import annotations

import numpy as np

BLOCK_BYTES = 64 << 20


class RowBuffer:
    """Append arrays of the same row shape and dtype; `array()` is all their rows, in order."""

    def __init__(self, block_bytes: int = BLOCK_BYTES) -> None:
        self.block_bytes = block_bytes
        self._blocks: list[np.ndarray] = []
        self._filled = 0  # rows used in the last block

    def __len__(self) -> int:
        return sum(len(b) for b in self._blocks[:-1]) + self._filled if self._blocks else 0

    def append(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if self._blocks and (rows.shape[1:] != self._blocks[0].shape[1:] or rows.dtype != self._blocks[0].dtype):
            raise ValueError(f"rows of shape {rows.shape[1:]} {rows.dtype} appended to rows of shape "
                             f"{self._blocks[0].shape[1:]} {self._blocks[0].dtype}")
        done = 0
        while done < len(rows):
            if not self._blocks or self._filled == len(self._blocks[-1]):
                row_bytes = max(1, rows.itemsize * int(np.prod(rows.shape[1:])))
                self._blocks.append(np.empty((max(1, self.block_bytes // row_bytes), *rows.shape[1:]), rows.dtype))
                self._filled = 0
            block = self._blocks[-1]
            take = min(len(block) - self._filled, len(rows) - done)
            block[self._filled : self._filled + take] = rows[done : done + take]
            self._filled += take
            done += take

    def array(self) -> np.ndarray | None:
        """All rows appended, C-contiguous (None before any); the buffer is emptied."""
        if not self._blocks:
            return None
        parts = [*self._blocks[:-1], self._blocks[-1][: self._filled]]
        self._blocks, self._filled = [], 0
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
