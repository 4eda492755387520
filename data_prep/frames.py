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

    def column(self, mels: list[np.ndarray]) -> pa.BinaryArray:
        """(T_i, n_mels) arrays -> one Arrow binary array, a row each."""
        lengths = np.array([len(mel) for mel in mels], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]) * self.frame_bytes
        if offsets[-1] > np.iinfo(np.int32).max:
            raise ValueError(f"{offsets[-1]} bytes of frames do not fit one Arrow binary array; use a smaller shard_size")
        data = b"".join(np.ascontiguousarray(mel, dtype=self.dtype).tobytes() for mel in mels)
        return pa.BinaryArray.from_buffers(pa.binary(), len(mels), [None, pa.py_buffer(offsets.astype(np.int32)),
                                                                    pa.py_buffer(data)])

    def frames_of(self, column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        """A `frames` column of B rows -> (their frames end to end (sum T, n_mels), lengths (B,)),
        a view of Arrow's buffer where the column is in one piece."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
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
