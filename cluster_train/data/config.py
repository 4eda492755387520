"""What training reads from a prepared dataset: splits, label fraction, chunking, batch size, caching."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from data_prep.config import ChunkConfig, require


@dataclass(kw_only=True)
class DataConfig:
    dataset: str = MISSING  # a prepared dataset (python -m data_prep): local folder or URI
    labeled_splits: list[str] = field(default_factory=lambda: ["train"])  # the splits whose labels train the regressor
    unlabeled_splits: list[str] = field(default_factory=lambda: ["unlabeled"])  # audio only: stage 1 and the clustering
    # Labelled training utterances also join the clustering and stage 1 (the paper clusters all
    # training chunks).
    labeled_as_unlabeled: bool = True
    development_split: str = "development"  # chooses the best epoch and stops early
    test_splits: list[str] = field(default_factory=lambda: ["test"])  # scored once, with the best model, after training
    # Keep the labels of this fraction of labelled utterances (a fixed choice per seed); the rest
    # train as unlabeled audio: the scarce-label setting the method is for.
    label_fraction: float = 1.0
    # Use this fraction of the audio-only utterances (the unlabeled splits and the labelled ones whose
    # labels `label_fraction` hides) in stage 1 and the clustering: a fixed choice per seed, nested
    # (a smaller fraction's utterances are part of a larger one's). The paper's Table 4 varies it.
    unlabeled_fraction: float = 1.0
    batch_size: int = 64  # sentences per step (each C chunks)
    # How each utterance's frames are cut when read (Eq. 1-2): C chunks of w_c frames. The model's
    # input and its bundle follow it; another chunking needs no new prep.
    chunks: ChunkConfig = field(default_factory=ChunkConfig)
    # When the prepared dataset's chunks take at most this many MB (all splits), the driver reads
    # them and hands Ray Data tables (no file listing per dataset), and workers keep their rows in
    # memory after the first read (a worker then holds up to ~3x its share plus the development
    # split): later passes skip Ray Data's per-pass start-up, several seconds each, which dominates
    # an epoch on small data. 0: stream from the shards every pass (what MSP-Podcast scale needs).
    cache_max_mb: float = 512
    # Streamed data (beyond cache_max_mb), `data/streaming.py`: Ray Data read tasks at once per
    # training worker, so reading grows with scaling.num_workers. Each reads a shard with pyarrow and
    # delivers ~30K chunks per CPU-second here (bench/results/read_path.json): two keep one H100
    # (23K chunks/s) fed. Changes the speed, never the rows or their order.
    read_tasks: int = 2
    # Streamed data: rows each worker mixes before it draws a batch (Ray's local shuffle buffer), on
    # top of the shards read in a new order every epoch. A shard holds 256 utterances of one or two
    # podcasts, so 4,096 rows mix ~16 shards into every batch; at MSP-Podcast's ~6 s a segment they
    # take ~0.4 GB of a worker's memory (float16 frames).
    shuffle_buffer_rows: int = 4096

    def __post_init__(self) -> None:
        require(0 < self.label_fraction <= 1, "data.label_fraction", "must be in (0, 1]")
        require(0 <= self.unlabeled_fraction <= 1, "data.unlabeled_fraction", "must be in [0, 1]")
        require(self.cache_max_mb >= 0, "data.cache_max_mb", "must be >= 0")
        require(self.read_tasks >= 1, "data.read_tasks", "must be >= 1")
        require(self.shuffle_buffer_rows >= 1, "data.shuffle_buffer_rows", "must be >= 1")
        require(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        require(len(self.labeled_splits) > 0, "data.labeled_splits", "name at least one split")
