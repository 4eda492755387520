"""One seed drives every random stream of a run.

Each stream (model initialisation, dropout, shuffles, K-means, ...) takes its own integer seed from
`numpy.random.SeedSequence(seed, spawn_key=(stream, epoch, rank))`, so no two (stream, seed, epoch,
rank) share a seed: seed 1's epoch 0 never repeats seed 0's epoch 1, as `seed + epoch` did. The
spawn key has a fixed length, because SeedSequence pads short entropy with zeros ([s, 2] and
[s, 2, 0] give one state). A resumed run derives the same seeds as an uninterrupted one.

The test split's random subsets (`evaluation.split_into_subsets`) stay fixed per dataset on purpose:
every run of a comparison is scored on the same subsets.
"""

from __future__ import annotations

import numpy as np

STREAMS = (
    "model_init",  # the weights (every rank draws the same; DDP broadcasts rank 0's anyway)
    "dropout",  # per epoch and rank: the global torch generator during training
    "shuffle_stage1",  # per epoch: the order of stage-1 batches
    "shuffle_stage2",  # per epoch: the order of stage-2 batches
    "label_subset",  # which labels `data.label_fraction` keeps
    "kmeans",  # per epoch: faiss's initialisation, or the all-reduce mode's first centroids
    "kmeans_sample",  # per epoch and rank: the rows a rank sends to the K-means fit
    "kmeans_init",  # per epoch and rank: a rank's candidate first centroids (mode "allreduce")
    "cluster_top",  # per epoch: the re-created cluster head's top layer (the same on every rank)
    "stage1_sampler",  # per epoch and rank: the uniform-over-clusters redraw of stage-1 batches
    "precise_bn",  # which training utterances the BatchNorm statistics are recomputed on
    # new streams go last: a stream's index is part of every seed it derives
    "unlabeled_subset",  # which audio-only utterances `data.unlabeled_fraction` keeps
    "shuffled_labels",  # per epoch: the permutation of clustering.pseudo_labels = "shuffled"
    "shard_order",  # streamed data, per pass (from the pass's shuffle seed): the order of the shards
    "row_order",  # streamed data, per pass: the shuffle buffer's draws
)


def derive(seed: int, stream: str, epoch: int = 0, rank: int = 0) -> int:
    """The seed of `stream` for (`seed`, `epoch`, `rank`): an int in [0, 2**31), which numpy,
    torch, faiss (a C int) and Ray Data all take."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; one of {', '.join(STREAMS)}")
    if min(seed, epoch, rank) < 0:
        raise ValueError(f"seed, epoch and rank must be >= 0, got {seed}, {epoch}, {rank}")
    sequence = np.random.SeedSequence(seed, spawn_key=(STREAMS.index(stream), epoch, rank))
    return int(sequence.generate_state(1, np.uint32)[0] >> 1)
