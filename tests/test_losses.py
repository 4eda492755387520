"""losses.py: CCC against a direct formula and its invariances, NaN masking; DeepEmoCluster's joint
loss as its model kind computes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cluster_train.model.blocks import ModelConfig
from cluster_train.model.kinds import LossWeights, build_model, get_kind
from cluster_train.model.losses import (
    UNKNOWN_LABEL,
    ccc,
    ccc_loss,
    cluster_ce,
    reconstruction_loss,
    sentence_mean,
    vae_kl,
)

DEEPEMOCLUSTER = get_kind("deepemocluster")
LABELLED_STAGE = next(stage for stage in DEEPEMOCLUSTER.stages if stage.number == 2)


def numpy_ccc(p: np.ndarray, t: np.ndarray) -> float:
    """Lin (1989), population statistics, written out directly."""
    covariance = np.mean((p - p.mean()) * (t - t.mean()))
    return 2 * covariance / (p.var() + t.var() + (p.mean() - t.mean()) ** 2)


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_ccc_matches_numpy_formula_per_column(rng: np.random.Generator) -> None:
    target = rng.normal(size=(200, 3))
    pred = 0.6 * target + rng.normal(0.3, 0.8, size=(200, 3))
    values = ccc(pred, target)  # numpy in, float64 tensor out
    assert values.dtype == torch.float64 and values.shape == (3,)
    expected = [numpy_ccc(pred[:, a], target[:, a]) for a in range(3)]
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-12)
    rows = ccc(pred.T, target.T, dim=1)  # attributes as rows
    np.testing.assert_allclose(rows.numpy(), expected, rtol=1e-12)


def test_ccc_identity_negation_and_affine_invariance(rng: np.random.Generator) -> None:
    x = torch.from_numpy(rng.normal(size=(100, 3))).float()
    x = x - x.mean(dim=0)
    torch.testing.assert_close(ccc(x, x), torch.ones(3))
    torch.testing.assert_close(ccc(x, -x), -torch.ones(3))
    pred = x + torch.from_numpy(rng.normal(size=(100, 3))).float()
    scale, shift = torch.tensor([0.936, 0.746, 0.883]), torch.tensor([4.394, 4.530, 4.046])
    torch.testing.assert_close(ccc(pred * scale + shift, x * scale + shift), ccc(pred, x))


def test_ccc_of_constant_prediction_is_zero() -> None:
    target = torch.tensor([1.0, 2.0, 3.0])
    assert ccc(torch.zeros(3), target).item() == 0.0
    assert ccc(torch.ones(3), torch.ones(3)).item() == 0.0  # 0 / 0 -> 0, not NaN


def test_ccc_and_loss_leave_out_nan_targets(rng: np.random.Generator) -> None:
    pred = torch.from_numpy(rng.normal(size=(50, 3))).requires_grad_()
    target = torch.from_numpy(rng.normal(size=(50, 3)))
    masked = target.clone()
    masked[:20, 0] = torch.nan  # rows 0-19 unlabelled for arousal only
    masked[:, 2] = torch.nan  # no valence labels at all
    values = ccc(pred, masked)
    torch.testing.assert_close(values[0], ccc(pred[20:, 0], target[20:, 0]))
    torch.testing.assert_close(values[1], ccc(pred[:, 1], target[:, 1]))
    assert torch.isnan(values[2])
    loss = ccc_loss(pred, masked)
    expected = (1 - ccc(pred[20:, 0], target[20:, 0])) + (1 - ccc(pred[:, 1], target[:, 1]))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert torch.all(pred.grad[:20, 0] == 0) and torch.all(pred.grad[:, 2] == 0)


def test_cluster_ce_ignores_unassigned() -> None:
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, UNKNOWN_LABEL, 3, UNKNOWN_LABEL, 2])
    keep = labels != UNKNOWN_LABEL
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(cluster_ce(logits, labels), expected)
    assert cluster_ce(logits, torch.full((6,), UNKNOWN_LABEL)).item() == 0.0


def test_deepemocluster_labelled_loss_adds_weighted_ce() -> None:
    """Paper Eq. 3, (1 - CCC) + lambda * CE, on the sentence means of the chunk predictions."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(8, 3, generator=g), torch.randn(4, 3, generator=g)  # 4 sentences x 2 chunks
    logits = torch.randn(8, 5, generator=g)
    labels = torch.randint(0, 5, (8,), generator=g)
    outputs = {"prediction": pred, "cluster_logits": logits}
    kind = get_kind("deepemocluster", LossWeights(cluster=0.5))
    expected = ccc_loss(sentence_mean(pred, 2), target) + 0.5 * cluster_ce(logits, labels)
    torch.testing.assert_close(kind.loss(LABELLED_STAGE, outputs, None, target, 2, labels), expected)


def test_adam_on_the_regressor_trains_it() -> None:
    """The original froze the regressor for good; here Adam steps on it must lower the loss."""
    torch.manual_seed(0)
    # A narrow encoder: the regressor is what is tested, and the paper's encoder takes a minute here.
    model = build_model("deepemocluster", ModelConfig(dropout=0.0, channels=[8, 16], strides=[2, 2], feature_dim=64))
    chunks, target = torch.randn(8, 62, 128), torch.randn(8, 3)
    pseudo = torch.randint(0, 10, (8,))
    optimizer = torch.optim.Adam(model.param_groups()["regressor"], lr=2e-2)
    encoder_before = [p.detach().clone() for p in model.param_groups()["encoder"]]
    regressor_before = [p.detach().clone() for p in model.regressor.parameters()]

    def loss() -> torch.Tensor:
        out = model(chunks)
        return DEEPEMOCLUSTER.loss(LABELLED_STAGE, out, chunks, target, 1, pseudo)

    first = loss()
    for _ in range(8):
        optimizer.zero_grad()
        step_loss = loss()
        step_loss.backward()
        grads = [p.grad for p in model.regressor.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
        optimizer.step()
    assert loss().item() < first.item() - 1.0  # about 5.4 -> 2.6
    assert all(not torch.equal(a, b) for a, b in zip(regressor_before, model.regressor.parameters()))
    encoder_after = model.param_groups()["encoder"]
    assert all(torch.equal(a, b) for a, b in zip(encoder_before, encoder_after))


def test_reconstruction_and_kl() -> None:
    x = torch.randn(4, 62, 128)
    assert reconstruction_loss(x, x).item() == 0.0
    torch.testing.assert_close(reconstruction_loss(x + 2.0, x), torch.tensor(4.0))
    with pytest.raises(ValueError, match=r"reconstruction \(4, 1, 62, 128\) != input \(4, 62, 128\)"):
        reconstruction_loss(x.unsqueeze(1), x)
    assert vae_kl(torch.zeros(4, 8), torch.zeros(4, 8)).item() == 0.0
    # KL(N(1, 1) || N(0, 1)) = 0.5 per dimension
    torch.testing.assert_close(vae_kl(torch.ones(4, 8), torch.zeros(4, 8)), torch.tensor(4.0))
    # per reconstructed element, on the scale of the mean-squared reconstruction error
    torch.testing.assert_close(vae_kl(torch.ones(4, 8), torch.zeros(4, 8), elements=62 * 128), torch.tensor(4.0 / 7936))


def test_sentence_mean() -> None:
    chunk_pred = torch.arange(12.0).reshape(6, 2)  # 2 sentences x 3 chunks, 2 attributes
    torch.testing.assert_close(sentence_mean(chunk_pred, 3), torch.tensor([[2.0, 3.0], [8.0, 9.0]]))
    torch.testing.assert_close(sentence_mean(torch.arange(6.0), 3), torch.tensor([1.0, 4.0]))
    with pytest.raises(ValueError, match="6 chunk rows do not split into sentences of 4"):
        sentence_mean(chunk_pred, 4)

