"""The paper's baselines: CNN-regressor, CNN-AE and CNN-VAE (Sec. 5.1).

All three share DeepEmoCluster's encoder and regressor. The AE and VAE add a decoder that mirrors
the encoder with transposed convolutions and reconstructs the input chunk from the 256-d
bottleneck (AE: the pre-ReLU feature; VAE: a sample of the latent, its mean in eval mode).

`forward(x)` returns a dict with the keys that apply: features, prediction, reconstruction (the
input's own shape), mu, logvar.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cluster_train.model.blocks import Encoder, ModelConfig, Regressor, conv_sizes


class Decoder(nn.Module):
    """feature_dim -> Linear, ReLU -> conv-output shape -> transposed convs -> (B, 1, frames, mels).

    Block i of the encoder maps sizes[i] -> sizes[i + 1]; its mirror maps back with
    output_padding = sizes[i] - 1 - (sizes[i + 1] - 1) * stride (always in [0, stride)), so the
    output has exactly the input's size with no cropping. The last block is a plain linear
    transposed conv to one channel (the input is z-normalised, not non-negative).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        sizes = conv_sizes(config)
        self.conv_shape = (config.channels[-1], *sizes[-1])
        self.expand = nn.Sequential(
            nn.Linear(config.feature_dim, math.prod(self.conv_shape)), nn.ReLU()
        )
        in_channels = [1, *config.channels[:-1]]
        blocks = []
        for i in reversed(range(len(config.channels))):
            stride = config.strides[i]
            padding = tuple(n_in - 1 - (n_out - 1) * stride for n_in, n_out in zip(sizes[i], sizes[i + 1]))
            last = i == 0
            deconv = nn.ConvTranspose2d(
                config.channels[i], in_channels[i], 3, stride,
                padding=1, output_padding=padding, bias=last,
            )  # fmt: skip
            layers = [deconv] if last else [deconv, nn.BatchNorm2d(in_channels[i]), nn.ReLU(inplace=True)]
            blocks.append(nn.Sequential(*layers))
        self.deconv = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.expand(z).view(-1, *self.conv_shape))


class CNNRegressor(nn.Module):
    """Encoder + regressor, supervised only."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.regressor = Regressor(config.feature_dim, len(config.attributes))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.encoder.embed(x)
        return {"features": features, "prediction": self.regressor(self.encoder.activate(features))}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed(x)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "encoder": list(self.encoder.parameters()),
            "regressor": list(self.regressor.parameters()),
        }


class CNNAutoencoder(CNNRegressor):
    """CNN-regressor + a decoder reconstructing the chunk from the pre-ReLU bottleneck."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.decoder = Decoder(config)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = super().forward(x)
        outputs["reconstruction"] = self.decoder(outputs["features"]).view_as(x)
        return outputs

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {**super().param_groups(), "decoder": list(self.decoder.parameters())}


class CNNVAE(CNNAutoencoder):
    """The encoder's Linear gives mu, a second Linear logvar; decode a sample, regress on mu."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.logvar = nn.Linear(self.encoder.flat_dim, config.feature_dim)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = self.encoder.conv_features(x)
        mu, logvar = self.encoder.project(flat), self.logvar(flat)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return {
            "features": mu,
            "mu": mu,
            "logvar": logvar,
            "prediction": self.regressor(self.encoder.activate(mu)),
            "reconstruction": self.decoder(z).view_as(x),
        }

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = super().param_groups()
        groups["encoder"] += list(self.logvar.parameters())
        return groups
