"""Precise BatchNorm: running statistics recomputed for the current weights before the model is used
in eval mode (the K-means embedding pass, validation, every saved model).

Why: BatchNorm's running averages (momentum 0.1) mix statistics of many past weights. With few steps
per epoch (a small corpus, scarce labels, the first epochs of any run) they lag far behind the
weights: a CNN-regressor on RAVDESS scored development CCC .09 in eval mode while the same weights
with recomputed statistics scored .62 (REFERENCE.md; issue "training you can trust").

How: every BatchNorm layer's input is summed over a fixed set of training chunks in one forward pass
with BatchNorm in training mode (each layer sees what it sees in training: the layers before it
normalise with batch statistics) and everything else in eval mode (no dropout, the VAE's mean). The
running mean and (unbiased) variance become the exact mean and variance of those inputs over all
batches (`torch.optim.swa_utils.update_bn` gives the same for one batch; it averages per-batch
statistics for several). `reduce` sums the per-rank sums over DDP ranks, so every rank ends with the
same statistics, those one process would get from all the ranks' batches.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute_batchnorm(
    model: nn.Module, batches: Iterable[torch.Tensor],
    reduce: Callable[[np.ndarray], np.ndarray] | None = None,
) -> int:  # fmt: skip
    """Set each BatchNorm layer's running statistics to those of its inputs over `batches`.

    `batches`: model inputs (chunks). `reduce`: sums a float64 array over ranks (None: one rank).
    Returns the number of inputs (chunks) the statistics saw, over all ranks; with none, the layers
    keep their statistics. The model's modes and the layers' momentum are left as they were.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    sums = {layer: [torch.zeros(layer.num_features, dtype=torch.float64, device=layer.running_mean.device)
                    for _ in range(2)] + [0] for layer in layers}

    def accumulate(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach()
        dims = [d for d in range(x.dim()) if d != 1]  # every axis but the channels
        # One fused float32 pass per batch (float64 over the whole input took 2.4x the embedding
        # pass); the batches' moments are summed in float64.
        variance, mean = torch.var_mean(x.float(), dim=dims, correction=0)
        n = x.numel() // x.shape[1]
        total, squares, count = sums[layer]
        total += n * mean.double()
        squares += n * (variance.double() + mean.double() ** 2)
        sums[layer][2] = count + n

    modes = {module: module.training for module in model.modules()}
    kept = {layer: (layer.momentum, layer.num_batches_tracked.clone()) for layer in layers}
    hooks = [layer.register_forward_pre_hook(accumulate) for layer in layers]
    chunks = 0
    try:
        model.eval()
        for layer in layers:
            layer.train()
            layer.momentum = 0.0  # the running statistics stay as they are during the pass
        for x in batches:
            model(x)
            chunks += len(x)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.train(training)
        for layer, (momentum, tracked) in kept.items():
            layer.momentum = momentum
            layer.num_batches_tracked.copy_(tracked)
    packed = np.concatenate([np.concatenate([[sums[layer][2]], sums[layer][0].cpu().numpy(), sums[layer][1].cpu().numpy()])
                             for layer in layers] + [[chunks]])
    if reduce is not None:
        packed = reduce(packed)
    offset = 0
    for layer in layers:
        size = layer.num_features
        count = packed[offset]
        total, squares = packed[offset + 1 : offset + 1 + size], packed[offset + 1 + size : offset + 1 + 2 * size]
        offset += 1 + 2 * size
        if count < 2:
            continue
        mean = total / count
        variance = np.maximum(squares - count * mean**2, 0.0) / (count - 1)
        layer.running_mean.copy_(torch.from_numpy(mean))
        layer.running_var.copy_(torch.from_numpy(variance))
    return int(packed[-1])
