"""Losses, and the CCC metric they share.

`ccc` is the one implementation of Lin's concordance correlation coefficient: the training loss
(`ccc_loss`) and evaluation (numpy arrays are accepted) both call it. A NaN target means "no label
for this attribute" and that row is left out of that attribute's statistics.

Predictions and targets are (N, A): rows are samples (chunks or sentences), columns attributes.
Chunk rows are grouped by sentence, C consecutive rows per sentence (`sentence_mean`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# A chunk with no pseudo-label this epoch (`LabelTable.lookup` gives it): cross-entropy's default
# ignore_index, so `cluster_ce` leaves it out.
UNKNOWN_LABEL = -100


def ccc(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, dim: int = 0) -> torch.Tensor:
    """Concordance correlation coefficient along `dim`, population statistics (divide by n).

    ccc = 2 cov(p, t) / (var(p) + var(t) + (mean(p) - mean(t))^2), per column with dim=0.
    Rows whose target is NaN are left out (per column). A column with no labelled row gives NaN
    (with finite gradients); a zero denominator (both constant and equal) gives 0.
    """
    pred = torch.as_tensor(pred)
    pred = pred if pred.is_floating_point() else pred.double()
    target = torch.as_tensor(target, dtype=pred.dtype, device=pred.device)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    labelled = ~torch.isnan(target)
    weight = labelled.to(pred.dtype)
    count = weight.sum(dim, keepdim=True)
    pred, target = torch.where(labelled, pred, 0.0), torch.where(labelled, target, 0.0)

    def mean(values: torch.Tensor) -> torch.Tensor:
        return (values * weight).sum(dim, keepdim=True) / count.clamp_min(1.0)

    pred_mean, target_mean = mean(pred), mean(target)
    pred_dev, target_dev = pred - pred_mean, target - target_mean
    covariance = mean(pred_dev * target_dev)
    denominator = mean(pred_dev**2) + mean(target_dev**2) + (pred_mean - target_mean) ** 2
    value = 2.0 * covariance / denominator.clamp_min(torch.finfo(pred.dtype).tiny)
    value = torch.where(count > 0, value, torch.nan)
    return value.squeeze(dim)


class CCCSums:
    """`ccc` over rows that arrive in parts (a split shared out over ranks), from six float64 sums
    per attribute: the count, the sums of p, t, p^2, t^2 and p t over labelled rows. Added up over
    ranks (`reduce`), they give the CCC of all the rows, as `ccc` on them at once gives it."""

    def __init__(self, attributes: int):
        self.sums = np.zeros((6, attributes), dtype=np.float64)

    def add(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """(N, A) predictions and targets, NaN where a target has no label."""
        p, t = (torch.as_tensor(v).detach().double().cpu().numpy() for v in (pred, target))
        labelled = ~np.isnan(t)
        p, t = np.where(labelled, p, 0.0), np.where(labelled, t, 0.0)
        self.sums += np.stack([labelled.sum(0), p.sum(0), t.sum(0), (p * p).sum(0), (t * t).sum(0), (p * t).sum(0)])

    def ccc(self, reduce=None) -> np.ndarray:
        """(A,) CCC of every row added here (and on every rank, with `reduce`: a float64 sum over
        ranks); NaN for an attribute with no labelled row, 0 where both sides are constant and equal."""
        count, sp, st, spp, stt, spt = reduce(self.sums) if reduce is not None else self.sums
        n = np.maximum(count, 1.0)
        mp, mt = sp / n, st / n
        covariance = spt / n - mp * mt
        denominator = (spp / n - mp**2) + (stt / n - mt**2) + (mp - mt) ** 2
        value = 2.0 * covariance / np.maximum(denominator, np.finfo(np.float64).tiny)
        return np.where(count > 0, value, np.nan)


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over attributes (columns) of 1 - CCC; attributes with no label in the batch add 0.

    Per-attribute values for logging: `1 - ccc(pred, target)`.
    """
    if pred.dim() == 1:
        pred, target = pred.unsqueeze(1), target.unsqueeze(1)
    per_attribute = 1.0 - ccc(pred, target, dim=0)
    has_label = ~torch.isnan(target).all(dim=0)
    return torch.where(has_label, per_attribute, 0.0).sum()  # no boolean indexing: no host sync


def cluster_ce(logits: torch.Tensor, pseudo_labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on pseudo-labels, mean over labelled rows; UNKNOWN_LABEL rows are left out.

    A batch with no pseudo-label gives 0 (not NaN), with no host sync.
    """
    labels = pseudo_labels.long()
    total = F.cross_entropy(logits, labels, ignore_index=UNKNOWN_LABEL, reduction="sum")
    return total / (labels != UNKNOWN_LABEL).sum().clamp_min(1)


def reconstruction_loss(reconstruction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element."""
    if reconstruction.shape != x.shape:
        raise ValueError(f"reconstruction {tuple(reconstruction.shape)} != input {tuple(x.shape)}")
    return F.mse_loss(reconstruction, x)


def vae_kl(mu: torch.Tensor, logvar: torch.Tensor, elements: int = 1) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over latent dimensions, mean over the batch, per
    reconstructed element: divided by `elements`, the values one row reconstructs.

    `reconstruction_loss` is a mean over elements; beside it, the KL summed over the latent weighed
    62 x 128 = 7,936 times what the ELBO gives it, and the latent (which the VAE regresses on)
    collapsed to the prior: test CCC near 0 (bench/results/accuracy_ravdess.json, 2026-11-27).
    """
    return (-0.5 * (1.0 + logvar - mu**2 - logvar.exp())).sum(dim=1).mean() / elements


def sentence_mean(chunk_pred: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """(B * C, ...) chunk predictions, C consecutive rows per sentence -> (B, ...) their mean."""
    if num_chunks < 1 or chunk_pred.shape[0] % num_chunks:
        raise ValueError(f"{chunk_pred.shape[0]} chunk rows do not split into sentences of {num_chunks}")
    return chunk_pred.reshape(-1, num_chunks, *chunk_pred.shape[1:]).mean(dim=1)
