"""Precise BatchNorm: the statistics it sets are those of the layers' inputs, whatever the batching
and however the batches are shared among ranks; checked against torch's own `update_bn`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import update_bn

from cluster_train.model.blocks import ModelConfig
from cluster_train.model.kinds import build_model
from cluster_train.train.precise_bn import batchnorm_layers, recompute_batchnorm


def _model(kind: str = "deepemocluster") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(kind, ModelConfig(channels=[4, 8, 8], strides=[1, 2, 2], feature_dim=16, num_clusters=3,
                                         chunk_frames=16, n_mels=20))


def _statistics(model: torch.nn.Module) -> list[torch.Tensor]:
    return [s for layer in batchnorm_layers(model) for s in (layer.running_mean, layer.running_var)]


def test_statistics_match_torch_update_bn() -> None:
    chunks = torch.randn(48, 16, 20) * 2 + 1
    reference = _model()
    update_bn([chunks], reference)  # one batch: its mean and unbiased variance, layer by layer

    model = _model()
    model.train()
    assert recompute_batchnorm(model, [chunks]) == 48
    for ours, theirs in zip(_statistics(model), _statistics(reference), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert model.training and all(m.training for m in model.modules())  # modes left as they were
    assert all(layer.momentum == 0.1 for layer in batchnorm_layers(model))

    # Smaller batches: the first layer's inputs are the same values, so its statistics are too;
    # deeper layers see inputs normalised with each batch's own statistics, as in training.
    batched = _model()
    assert recompute_batchnorm(batched, [chunks[:20], chunks[20:40], chunks[40:]]) == 48
    first = batchnorm_layers(batched)[0], batchnorm_layers(reference)[0]
    torch.testing.assert_close(first[0].running_mean, first[1].running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first[0].running_var, first[1].running_var, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(_statistics(batched), _statistics(reference), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-3)


def test_two_ranks_end_with_the_statistics_of_all_batches() -> None:
    chunks = torch.randn(40, 16, 20)
    single = _model()
    recompute_batchnorm(single, [chunks[i : i + 8] for i in range(0, 40, 8)])

    # Rank 0 takes batches 0, 2, 4 and rank 1 batches 1, 3 (as the trainer shares them). First each
    # rank's own sums, then the all-reduce: `reduce` hands every rank the sum of both.
    shares = [[chunks[i : i + 8] for i in range(0, 40, 16)], [chunks[i : i + 8] for i in range(8, 40, 16)]]
    own: list[np.ndarray] = []
    for share in shares:
        recompute_batchnorm(_model(), share, reduce=lambda packed: own.append(packed) or packed)
    summed = own[0] + own[1]
    ranks = [_model(), _model()]
    for model, share in zip(ranks, shares):
        assert recompute_batchnorm(model, share, reduce=lambda _: summed) == 40
        for ours, theirs in zip(_statistics(model), _statistics(single), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_eval_outputs_follow_the_new_statistics_and_nothing_else_changes() -> None:
    model = _model("cnn_vae")  # BatchNorm in the encoder and the decoder; dropout and sampling off
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    chunks = torch.randn(32, 16, 20) * 3 + 2  # far from the initial statistics (mean 0, var 1)
    model.eval()
    with torch.no_grad():
        before = model(chunks)["prediction"]
    generator_state = torch.random.get_rng_state()
    recompute_batchnorm(model, [chunks])
    assert torch.equal(torch.random.get_rng_state(), generator_state)  # dropout and the VAE drew nothing
    with torch.no_grad():
        after = model(chunks)["prediction"]
    assert not torch.allclose(before, after)
    for key, value in model.state_dict().items():
        if key in weights:
            assert torch.equal(value, weights[key]), key


def test_no_batches_leave_the_statistics_alone() -> None:
    model = _model()
    before = [s.clone() for s in _statistics(model)]
    assert recompute_batchnorm(model, []) == 0
    for now, then in zip(_statistics(model), before):
        assert torch.equal(now, then)
    with pytest.raises(ValueError, match="expected chunks of shape"):  # an input of the wrong shape fails as the model itself would
        recompute_batchnorm(model, [torch.randn(2, 3, 3)])
