"""The blocks every model kind is built from (paper Table 1): the conv encoder, the cluster head,
the regressor, and the model configuration they share.

Input: chunks of a z-normalised mel spectrogram, (B, frames, mels) or (B, 1, frames, mels);
(B, 62, 128) with the defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from data_prep.config import require


@dataclass(kw_only=True)
class ModelConfig:
    # One conv block per entry: 3x3 conv (padding 1), BatchNorm, ReLU; stride 2 halves the size.
    channels: list[int] = field(default_factory=lambda: [32, 32, 64, 64, 128, 128, 128])
    strides: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 2, 2, 2])  # one per block
    feature_dim: int = 256  # the embedding K-means clusters
    dropout: float = 0.5  # on the embedding (after its ReLU) that the heads are trained on
    num_clusters: int = 10  # K
    # One output per attribute; ("arousal",) etc. is the paper's one-model-per-attribute mode.
    attributes: tuple[str, ...] = ("arousal", "dominance", "valence")
    chunk_frames: int = 62
    n_mels: int = 128

    def __post_init__(self) -> None:
        require(len(self.channels) >= 1, "model.channels", "needs at least one conv block")
        require(len(self.channels) == len(self.strides), "model.strides", "needs one per channel")
        require(all(c >= 1 for c in self.channels), "model.channels", "must all be >= 1")
        require(all(s >= 1 for s in self.strides), "model.strides", "must all be >= 1")
        require(self.feature_dim >= 1, "model.feature_dim", "must be >= 1")
        require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        require(self.num_clusters >= 1, "model.num_clusters", "must be >= 1")
        require(len(self.attributes) >= 1, "model.attributes", "needs at least one attribute")
        require(len(set(self.attributes)) == len(self.attributes), "model.attributes", "repeats one")
        require(self.chunk_frames >= 1, "model.chunk_frames", "must be >= 1")
        require(self.n_mels >= 1, "model.n_mels", "must be >= 1")


def conv_sizes(config: ModelConfig) -> list[tuple[int, int]]:
    """(frames, mels) of the input and after each conv block: (62, 128), ..., (2, 4) by default."""
    sizes = [(config.chunk_frames, config.n_mels)]
    for stride in config.strides:  # 3x3 kernel, padding 1: out = floor((in - 1) / stride) + 1
        sizes.append(tuple((n - 1) // stride + 1 for n in sizes[-1]))
    return sizes


def as_image(x: torch.Tensor, frames: int, mels: int) -> torch.Tensor:
    """(B, frames, mels) or (B, 1, frames, mels) -> (B, 1, frames, mels); anything else is an error."""
    image = x.unsqueeze(1) if x.dim() == 3 else x
    if image.dim() != 4 or tuple(image.shape[1:]) != (1, frames, mels):
        raise ValueError(f"expected chunks of shape (B, {frames}, {mels}), got {tuple(x.shape)}")
    return image


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Encoder(nn.Module):
    """Conv blocks -> flatten -> Linear `feature_dim` (`embed`), then ReLU + Dropout (`activate`).

    `embed(x)` is the pre-ReLU feature that K-means clusters (as in the original code);
    `forward(x) = activate(embed(x))` is what the heads are trained on.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.frames, self.mels = config.chunk_frames, config.n_mels
        blocks, in_channels = [], 1
        for out_channels, stride in zip(config.channels, config.strides):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),  # has the bias the conv leaves out
                    nn.ReLU(inplace=True),
                )
            )
            in_channels = out_channels
        self.conv = nn.Sequential(*blocks)
        self.flat_dim = in_channels * math.prod(conv_sizes(config)[-1])  # 128 * 2 * 4 = 1024
        self.project = nn.Linear(self.flat_dim, config.feature_dim)
        self.activate = nn.Sequential(nn.ReLU(), nn.Dropout(config.dropout))

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, frames, mels) -> flattened conv output (B, flat_dim)."""
        return self.conv(as_image(x, self.frames, self.mels)).flatten(1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.conv_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.embed(x))


class ClusterHead(nn.Module):
    """Linear, ReLU (`body`), then Linear -> K pseudo-label logits (`top`)."""

    def __init__(self, feature_dim: int, num_clusters: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU())
        self.top = nn.Linear(feature_dim, num_clusters)
        self.reset_top(num_clusters)

    def reset_top(self, num_clusters: int, generator: torch.Generator | None = None) -> nn.Linear:
        """Re-initialise the top layer (pseudo-labels permute after every re-clustering); returns it.

        Weights ~ N(0, 0.01), bias 0 (DeepCluster's init). The same K re-initialises the existing
        parameters in place, so a DDP wrapper and the model's parameter list stay valid; a new K
        replaces the layer. Under DDP give every rank a generator with the same seed. The trainer
        should build a fresh optimizer for the returned layer (old momentum is meaningless).
        """
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
        if num_clusters != self.top.out_features:
            old = self.top.weight
            self.top = nn.Linear(old.shape[1], num_clusters, device=old.device, dtype=old.dtype)
        weight = self.top.weight
        with torch.no_grad():  # draw on the generator's device, then copy to the layer's
            device = generator.device if generator is not None else weight.device
            noise = torch.randn(weight.shape, generator=generator, device=device, dtype=weight.dtype)
            weight.copy_(noise * 0.01)
            self.top.bias.zero_()
        return self.top

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.top(self.body(hidden))


class Regressor(nn.Sequential):
    """Linear, ReLU, Linear -> one output per emotional attribute."""

    def __init__(self, feature_dim: int, num_attributes: int) -> None:
        super().__init__(
            nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, num_attributes)
        )
