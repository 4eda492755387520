"""Streamed epochs (`cluster_train/data/streaming.py`): a seeded order over shards and rows every
pass, equal shares per rank, batches drawn from many shards, validation scored in parts and summed.

The Ray tests prepare real audio (the shipped RAVDESS sample) under MSP-Podcast-style ids, one
podcast a shard as MSP-Podcast's sorted ids give, and stream it through Ray Data on a local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import ray

from cluster_train.data.batches import ROW_COLUMNS, InMemoryRows, RankSlice, plan_streams, precise_bn_table
from cluster_train.data.config import DataConfig
from cluster_train.data.streaming import StreamedShard, deal
from cluster_train.model.losses import CCCSums, ccc
from data_prep.dataset import PreparedDataset

SEGMENTS, PODCASTS = 12, 20  # 240 utterances, a podcast a shard
SPLIT_OF_PODCAST = {14: "train", 15: "train", 16: "train", 17: "development", 18: "development", 19: "test"}


# --- without Ray ----------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_a_pass_deals_every_row_once_in_equal_shares_in_its_seeds_order(world_size):
    rows = np.random.default_rng(0).integers(1, 300, size=37)
    for seed in (None, 11):
        shares = deal(rows, world_size, seed)
        taken = [(p, r) for share in shares for p, a, b in share for r in range(a, b)]
        assert sorted(taken) == [(p, r) for p in range(len(rows)) for r in range(rows[p])]  # every row once
        sizes = [sum(b - a for _, a, b in share) for share in shares]
        assert max(sizes) - min(sizes) <= 1
    assert deal(rows, world_size, 11) == deal(rows, world_size, 11)
    order = [p for share in deal(rows, world_size, 11) for p, _, _ in share]
    assert order != sorted(order) and order != [p for share in deal(rows, world_size, 12) for p, _, _ in share]
    assert [p for share in deal(rows, world_size, None) for p, _, _ in share] == sorted(
        p for share in deal(rows, world_size, None) for p, _, _ in share)  # no seed: as planned


def test_ccc_from_summed_parts_equals_ccc_of_all_rows():
    """Validation shared out over ranks: each rank's sums, added (what all_reduce does), give the
    CCC of every row at once, NaN targets (no label) left out as `ccc` leaves them out."""
    rng = np.random.default_rng(3)
    target = rng.normal(size=(101, 3))
    pred = 0.6 * target + rng.normal(scale=0.7, size=target.shape) + 0.2
    target[rng.random(target.shape) < 0.1] = np.nan
    parts = [CCCSums(3) for _ in range(3)]
    for part, rows in zip(parts, np.array_split(rng.permutation(101), 3)):
        for start in range(0, len(rows), 16):  # in batches, as a rank scores them
            part.add(pred[rows[start:start + 16]], target[rows[start:start + 16]])
    total = sum(part.sums for part in parts)
    summed = parts[0].ccc(reduce=lambda mine: total)
    np.testing.assert_allclose(summed, ccc(pred, target).numpy(), atol=1e-10)
    assert not np.allclose(parts[0].ccc(), summed, atol=1e-3)  # one rank's part alone is another figure


def test_ranks_take_disjoint_batches_of_rows_they_all_hold():
    import pyarrow as pa

    rows = InMemoryRows.from_arrow(pa.table({"id": [f"u{i:03d}" for i in range(23)]}))
    parts = [[b["id"].to_pylist() for b in RankSlice(rows, rank, 3).iter_batches(4)] for rank in range(3)]
    assert [len(p) for p in parts] == [2, 2, 2]
    seen = [i for part in parts for batch in part for i in batch]
    assert sorted(seen) == rows.table["id"].to_pylist()


# --- streamed on a local Ray ----------------------------------------------------------------------


def podcast_manifest(folder: Path, sample_files: list[Path]) -> Path:
    """MSP-Podcast-style ids over the sample's files: podcast p's segments are its speaker's."""
    from data_prep.importers import import_ravdess

    by_actor: dict[str, list] = {}
    for u in import_ravdess(str(sample_files[0].parents[1])):
        by_actor.setdefault(u.speaker, []).append(u)
    actors = sorted(by_actor)
    lines = ["id,audio,split,arousal,dominance,valence"]
    for podcast in range(PODCASTS):
        split = SPLIT_OF_PODCAST.get(podcast, "unlabeled")
        files = by_actor[actors[podcast % len(actors)]]
        for segment in range(SEGMENTS):
            u = files[(podcast * SEGMENTS + segment) % len(files)]
            labels = "" if split == "unlabeled" else f"{u.arousal},{u.dominance},{u.valence}"
            lines.append(f"MSP-PODCAST_{podcast:04d}_{segment:04d},{u.audio},{split},{labels or ',,'}")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="module")
def podcasts(tmp_path_factory, sample_files) -> PreparedDataset:
    from data_prep.config import PrepConfig, load_config
    from data_prep.pipeline import run_prep

    folder = tmp_path_factory.mktemp("podcasts")
    with pytest.MonkeyPatch.context() as environment:
        if "RAY_agent_register_timeout_ms" not in os.environ:
            environment.setenv("RAY_agent_register_timeout_ms", "120000")
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
        try:
            manifest = podcast_manifest(folder, sample_files)
            run_prep(load_config(PrepConfig, None, [f"sources=[{{kind: csv, path: {manifest}}}]",
                                                    f"output={folder / 'prepared'}", "progress=false",
                                                    f"shard_size={SEGMENTS}"]))
            yield PreparedDataset(str(folder / "prepared"))
        finally:
            ray.shutdown()


def _config(dataset: PreparedDataset, **overrides) -> DataConfig:
    return DataConfig(dataset=dataset.location, test_splits=["test"], cache_max_mb=0, **overrides)


def _shard_of(dataset: PreparedDataset) -> dict[str, int]:
    index = dataset.row_index(None, ["id"])
    return dict(zip(index["id"].to_pylist(), index["shard"].to_pylist()))


@pytest.mark.slow
def test_streamed_batches_mix_many_shards_in_a_new_order_every_epoch(podcasts):
    """Stage 1's rows (unlabeled + train: 17 podcasts, 17 shards) on 2 ranks: each batch of 16
    draws from many shards, the order differs between epochs and repeats for a seed, the ranks'
    rows are disjoint and as many batches each, and every row comes once an epoch but for the few
    `drop_last` leaves over. Read in the planned order, unshuffled, a batch holds one or two."""
    plan = plan_streams(podcasts, _config(podcasts), seed=0)["unlabeled"]
    assert len(plan.shards) == 17 and plan.rows.sum() == 17 * SEGMENTS
    shard_of = _shard_of(podcasts)

    def epoch(seed: int | None, rank: int, buffer: int = 64) -> list[list[str]]:
        shard = StreamedShard(plan, rank, 2, read_tasks=2, shuffle_rows=buffer, columns=ROW_COLUMNS)
        return [b["id"].to_pylist() for b in shard.iter_batches(16, drop_last=True, local_shuffle_seed=seed)]

    first = [epoch(101, rank) for rank in range(2)]
    assert len(first[0]) == len(first[1]) == (17 * SEGMENTS // 2) // 16  # equal DDP steps
    ids = [i for rank in first for batch in rank for i in batch]
    assert len(ids) == len(set(ids)) and len(ids) >= 17 * SEGMENTS - 2 * 16
    shards_per_batch = [len({shard_of[i] for i in batch}) for rank in first for batch in rank]
    assert np.mean(shards_per_batch) >= 4, shards_per_batch  # a 64-row buffer spans 5-6 shards
    assert [epoch(101, rank) for rank in range(2)] == first  # the same seed, the same epoch
    second = [epoch(102, rank) for rank in range(2)]
    assert second != first and [b for r in second for b in r] != [b for r in first for b in r]
    unshuffled = [len({shard_of[i] for i in batch}) for batch in epoch(None, 0)]
    assert max(unshuffled) <= 2  # what a batch held before: one podcast, two at a boundary


@pytest.mark.slow
def test_ranks_validate_disjoint_parts_of_the_development_split_that_cover_it(podcasts):
    plan = plan_streams(podcasts, _config(podcasts), seed=0)["development"]
    parts = [[i for b in StreamedShard(plan, rank, 3, 1, 64, ROW_COLUMNS).iter_batches(5) for i in b["id"].to_pylist()]
             for rank in range(3)]
    assert sorted(i for part in parts for i in part) == sorted(i for ids in plan.ids for i in ids)
    assert [len(part) for part in parts] == [8, 8, 8]


@pytest.mark.slow
def test_id_filters_reach_each_read_task_as_its_own_shards_ids(podcasts):
    """With `label_fraction` and `unlabeled_fraction` < 1 the plan holds the kept ids per shard: a
    read task gets its shard's, never the run's list; the rows read are exactly the kept ones."""
    config = _config(podcasts, label_fraction=0.5, unlabeled_fraction=0.25)
    plans = plan_streams(podcasts, config, seed=4)
    shard_of = _shard_of(podcasts)
    for plan in plans.values():
        assert all({shard_of[i] for i in ids} == {shard} for shard, ids in zip(plan.shards, plan.ids))
    labeled = sorted(i for ids in plans["labeled"].ids for i in ids)
    assert len(labeled) == 18  # half of the 36 train utterances
    read = [i for b in StreamedShard(plans["labeled"], 0, 1, 2, 64, ROW_COLUMNS).iter_batches(7)
            for i in b["id"].to_pylist()]
    assert sorted(read) == labeled


@pytest.mark.slow
def test_precise_batchnorm_rows_come_from_many_shards(podcasts):
    table = precise_bn_table(podcasts, ["train", "unlabeled"], 16, seed=0)
    shard_of = _shard_of(podcasts)
    assert table.num_rows == 16 and table["id"].to_pylist() == sorted(table["id"].to_pylist())
    assert len({shard_of[i] for i in table["id"].to_pylist()}) >= 8  # of 17 shards; one shard held 12 rows
    assert table.equals(precise_bn_table(podcasts, ["train", "unlabeled"], 16, seed=0))
