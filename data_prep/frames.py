"""The layout of a prepared dataset's rows: each utterance's mel frames stored once (`FrameFormat`),
chunks cut from them when rows are read. Light (numpy and pyarrow only): Ray Data's read tasks
import it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from data_prep.chunking import cut_chunks
from data_prep.config import ChunkConfig

FORMAT = "deepemocluster-mel-frames/1"
OLD_FORMATS = ("deepemocluster-mel-chunks/1",)  # chunks cut by prep: refused with what to run

# The most bytes of frames one Arrow binary array holds, and so one utterance: int32 offsets address
# 2 GiB - 1, and Parquet stores a value under 2 GiB in a page whose sizes are int32 too; 1 MiB less
# leaves room for the page's header and the value's length prefix.
MAX_ARRAY_BYTES = 2**31 - 2**20


@dataclass(frozen=True)
class FrameFormat:
    """How the `frames` column holds each utterance's (T, n_mels) mel frames: one binary value per
    row, the frames' bytes end to end in `dtype` (frame after frame). Writing is one join and reading
    one view of Arrow's buffer; Parquet stores the bytes as they are (a nested list of floats costs
    2x the time to write and 5x to read, at the same size: measured on the RAVDESS sample)."""

    dtype: str  # the storage dtype: float16 | float32
    n_mels: int

    @classmethod
    def from_settings(cls, settings: dict) -> "FrameFormat":
        """From a dataset's settings (`dataset.json`) or a bundle's `features`."""
        return cls(str(settings["storage_dtype"]), int(settings["features"]["n_mels"]))

    @property
    def frame_bytes(self) -> int:
        return self.n_mels * np.dtype(self.dtype).itemsize

    @property
    def max_frames(self) -> int:
        """The most frames one row may hold (`MAX_ARRAY_BYTES`)."""
        return MAX_ARRAY_BYTES // self.frame_bytes

    def column(self, mels: list[np.ndarray]) -> pa.ChunkedArray:
        """(T_i, n_mels) arrays -> a `frames` column, a row each: one Arrow binary array, or (a shard
        of long audio) several, each of at most `MAX_ARRAY_BYTES`, in the rows' order."""
        sizes = np.array([len(mel) for mel in mels], dtype=np.int64) * self.frame_bytes
        if len(sizes) and sizes.max() > MAX_ARRAY_BYTES:
            row = int(sizes.argmax())
            raise ValueError(f"frames of row {row}: {sizes[row]:,} bytes, above the {MAX_ARRAY_BYTES:,} bytes "
                             "one stored value may hold")
        pieces, start = [], 0
        while start < len(mels) or not pieces:
            stop = start + int(np.searchsorted(np.cumsum(sizes[start:]), MAX_ARRAY_BYTES, side="right"))
            pieces.append(self._array(mels[start:stop], sizes[start:stop]))
            start = stop
        return pa.chunked_array(pieces, pa.binary())

    def _array(self, mels: list[np.ndarray], sizes: np.ndarray) -> pa.BinaryArray:
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
        data = b"".join(np.ascontiguousarray(mel, dtype=self.dtype).tobytes() for mel in mels)
        return pa.BinaryArray.from_buffers(pa.binary(), len(mels), [None, pa.py_buffer(offsets), pa.py_buffer(data)])

    def frames_of(self, column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        """A `frames` column of B rows -> (their frames end to end (sum T, n_mels), lengths (B,)),
        a view of Arrow's buffer where the column is in one piece. A column in several pieces (a
        shard of long audio) is joined by numpy, never by Arrow, whose binary arrays stop at 2 GiB."""
        if not isinstance(column, pa.ChunkedArray):
            return self._frames_of_array(column)
        if column.num_chunks == 1:
            return self._frames_of_array(column.chunk(0))
        if column.num_chunks == 0:
            return np.empty((0, self.n_mels), self.dtype), np.empty(0, np.int64)
        pieces = [self._frames_of_array(chunk) for chunk in column.chunks]
        return np.concatenate([frames for frames, _ in pieces]), np.concatenate([lengths for _, lengths in pieces])

    def _frames_of_array(self, column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        if column.null_count:
            raise ValueError(f"frames column has {column.null_count} null rows")
        offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
        _, offsets_buffer, data_buffer = column.buffers()
        offsets = np.frombuffer(offsets_buffer, offset_type)[column.offset : column.offset + len(column) + 1]
        sizes = np.diff(offsets).astype(np.int64)
        if (sizes % self.frame_bytes).any() or (len(sizes) and sizes.min() == 0):
            raise ValueError(f"frames column: a row is not a whole number (>= 1) of {self.n_mels}-band {self.dtype} "
                             f"frames ({self.frame_bytes} bytes each)")
        if not len(sizes):
            return np.empty((0, self.n_mels), self.dtype), sizes
        data = np.frombuffer(data_buffer, np.uint8, count=int(offsets[-1] - offsets[0]), offset=int(offsets[0]))
        return data.view(self.dtype).reshape(-1, self.n_mels), sizes // self.frame_bytes

    def chunks_of(self, column: pa.Array | pa.ChunkedArray, chunks: ChunkConfig) -> np.ndarray:
        """A `frames` column of B rows -> their chunks (B, C, w_c, n_mels) in `dtype` (Eq. 1-2)."""
        frames, lengths = self.frames_of(column)
        return cut_chunks(frames, lengths, chunks.num_chunks, chunks.chunk_frames)
