"""DDP among two real processes (torch.distributed, gloo, a file store: no Ray, no port), the way
Ray Train wraps the model: the weight-spread check and the DDP flag each model kind gets."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from cluster_train.distributed import Collective, weight_spread
from cluster_train.model.blocks import ModelConfig
from cluster_train.model.kinds import get_kind

SMALL = ModelConfig(channels=[4, 8], strides=[2, 2], feature_dim=16, chunk_frames=16, n_mels=16, num_clusters=3)


CASES = (("cnn_regressor", False), ("deepemocluster", False), ("cnn_regressor", True))


def _cases(rank: int, store: str, results: dict) -> None:
    """Every case in one process group: spawning two processes costs seconds of imports."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        for case in CASES:
            results[case, rank] = _steps(rank, *case)
    finally:
        dist.destroy_process_group()


def _steps(rank: int, kind_name: str, other_optimizer_state: bool) -> tuple[float, float]:
    torch.manual_seed(0)  # the same initial weights on both ranks, as the trainer seeds them
    kind = get_kind(kind_name)
    module = kind.build(SMALL)
    model = DistributedDataParallel(module, find_unused_parameters=kind.skips_parameters(module))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    if other_optimizer_state and rank == 1:  # as if rank 1 resumed from another run's optimizer state
        module(torch.randn(6, 16, 16))["prediction"].sum().backward()  # outside DDP: no all-reduce
        optimizer.step()  # moments (and one step) that rank 0 does not have...
        with torch.no_grad():  # ...but the same weights again
            module.load_state_dict(_initial(kind))
    collective = Collective()
    before = weight_spread(module, collective)
    generator = torch.Generator().manual_seed(rank)  # each rank its own batch, as DDP shards data
    for stage in kind.stages:
        chunks, targets = torch.randn(6, 16, 16, generator=generator), torch.randn(2, 3, generator=generator)
        labels = torch.randint(0, 3, (6,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        kind.loss(stage, model(chunks), chunks, targets, 3, labels).backward()
        optimizer.step()
    return before, weight_spread(module, collective)


def _initial(kind) -> dict:
    torch.manual_seed(0)
    return kind.build(SMALL).state_dict()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    shared = mp.Manager().dict()
    mp.spawn(_cases, args=(str(tmp_path_factory.mktemp("ddp") / "store"), shared), nprocs=2, join=True)
    return {case: (shared[case, 0], shared[case, 1]) for case in CASES}


@pytest.mark.parametrize("kind", ["cnn_regressor", "deepemocluster"])
def test_ddp_keeps_the_ranks_equal_with_the_flag_each_kind_gets(results: dict, kind: str) -> None:
    """The CNN-regressor trains without DDP's unused-parameter search (all its parameters are in every
    loss); DeepEmoCluster's stage 1 leaves the regressor out and gets the search. Either way the ranks
    end every step with equal weights, and the check reads 0."""
    assert results[kind, False] == ((0.0, 0.0), (0.0, 0.0))


def test_the_weight_spread_check_catches_a_rank_resumed_with_other_optimizer_state(results: dict) -> None:
    """Equal weights, equal averaged gradients, but rank 1's Adam moments differ: its update differs,
    the ranks drift apart, and `weight_spread` (train/rank_weight_spread each epoch) shows it."""
    (before, after), (before_1, after_1) = results["cnn_regressor", True]
    assert before == before_1 == 0.0  # the same weights when training goes on...
    assert after == after_1 > 1e-4  # ...and different ones after a step
