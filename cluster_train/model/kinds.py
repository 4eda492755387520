"""The model kinds, registered by name: each owns its network, its training stages and its losses.

    kind = build_kind(config)  # from TrainConfig: model_kind and the kind's loss weights
    model = kind.build(config.model)
    for stage in kind.stages: ... kind.loss(stage, outputs, batch, pseudo_labels) ...

The training loop asks a kind what to do and never which kind it is. A kind also names the
TrainConfig keys only it reads (`settings`): any such key set for another kind is a config error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from cluster_train.model.baselines import CNNVAE, CNNAutoencoder, CNNRegressor
from cluster_train.model.blocks import ModelConfig, count_parameters
from cluster_train.model.deepemocluster import DeepEmoCluster
from cluster_train.model.losses import ccc_loss, cluster_ce, reconstruction_loss, sentence_mean, vae_kl
from data_prep.config import require_choice


@dataclass(frozen=True)
class Stage:
    """One pass of an epoch: the rows it reads and the optimizer groups it steps."""

    number: int  # 1: on unlabeled audio, 2: on labelled rows (the paper's stages)
    shard: str  # "unlabeled" | "labeled"
    groups: tuple[str, ...]


@dataclass(frozen=True)
class LossWeights:
    cluster: float = 1.0  # lambda of (1 - CCC) + lambda * CE
    reconstruction: float = 1.0
    kl: float = 1.0


class ModelKind:
    name: ClassVar[str]
    network: ClassVar[type[nn.Module]]
    stages: ClassVar[tuple[Stage, ...]]
    clusters: ClassVar[bool] = False  # trains on K-means pseudo-labels of its embeddings
    settings: ClassVar[tuple[str, ...]] = ()  # TrainConfig keys (or key prefixes) only this kind reads

    def __init__(self, weights: LossWeights = LossWeights(), stages: tuple[int, ...] | None = None) -> None:
        self.weights = weights
        if stages is not None:  # a subset of the kind's stages, e.g. DeepEmoCluster without stage 1 (a control)
            self.stages = tuple(stage for stage in type(self).stages if stage.number in stages)

    @property
    def trains_regressor(self) -> bool:
        """Whether some stage learns from labels; without one (the paper's "unsupervised",
        `stages=[1]`) the development CCC measures an untrained regressor, not the run."""
        return any(stage.shard == "labeled" for stage in self.stages)

    def build(self, config: ModelConfig) -> nn.Module:
        return self.network(config)

    def loss(self, stage: Stage, outputs: dict[str, torch.Tensor], chunks: torch.Tensor, targets: torch.Tensor,
             num_chunks: int, pseudo_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one batch: `outputs` of the model on `chunks` (B * C rows), `targets` (B, A)."""
        return ccc_loss(sentence_mean(outputs["prediction"], num_chunks), targets)

    def skips_parameters(self, model: nn.Module) -> bool:
        """Whether some stage leaves parameters out of its loss (DeepEmoCluster's and the AE's stage 1
        never touch the regressor): DDP must then look for unused parameters after every backward,
        a cost the CNN-regressor, whose one stage trains every parameter, does not pay."""
        groups = set(model.param_groups())
        return any(set(stage.groups) != groups for stage in self.stages)

    def relabelled(self, model: nn.Module, num_clusters: int, generator: torch.Generator) -> dict[str, list]:
        """After a new clustering: parameter groups re-initialised (their optimizers start anew)."""
        return {}


KINDS: dict[str, type[ModelKind]] = {}


def register(kind: type[ModelKind]) -> type[ModelKind]:
    KINDS[kind.name] = kind
    return kind


@register
class DeepEmoClusterKind(ModelKind):
    """Stage 1: cluster CE on every chunk; stage 2: (1 - CCC) + lambda CE on labelled rows."""

    name = "deepemocluster"
    clusters = True
    stages = (Stage(1, "unlabeled", ("encoder", "cluster_top")),
              Stage(2, "labeled", ("encoder", "cluster_top", "regressor")))
    settings = ("clustering", "cluster_weight", "optim.cluster_top")

    network = DeepEmoCluster

    def loss(self, stage, outputs, chunks, targets, num_chunks, pseudo_labels=None):
        cross_entropy = cluster_ce(outputs["cluster_logits"], pseudo_labels)
        if stage.number == 1:
            return cross_entropy
        return super().loss(stage, outputs, chunks, targets, num_chunks) + self.weights.cluster * cross_entropy

    def relabelled(self, model, num_clusters, generator):
        return {"cluster_top": list(model.cluster_head.reset_top(num_clusters, generator=generator).parameters())}


@register
class CNNRegressorKind(ModelKind):
    """Supervised only: stage 2."""

    name = "cnn_regressor"
    stages = (Stage(2, "labeled", ("encoder", "regressor")),)

    network = CNNRegressor


@register
class CNNAutoencoderKind(ModelKind):
    """Stage 1: reconstruction; stage 2: (1 - CCC) + reconstruction."""

    name = "cnn_ae"
    stages = (Stage(1, "unlabeled", ("encoder", "decoder")), Stage(2, "labeled", ("encoder", "regressor", "decoder")))
    settings = ("optim.decoder", "reconstruction_weight")

    network = CNNAutoencoder

    def loss(self, stage, outputs, chunks, targets, num_chunks, pseudo_labels=None):
        loss = self.weights.reconstruction * reconstruction_loss(outputs["reconstruction"], chunks)
        if stage.number == 2:
            loss = loss + super().loss(stage, outputs, chunks, targets, num_chunks)
        return loss


@register
class CNNVAEKind(CNNAutoencoderKind):
    """The CNN-AE's losses + the KL of the latent (per reconstructed element, `losses.vae_kl`)."""

    name = "cnn_vae"
    settings = (*CNNAutoencoderKind.settings, "kl_weight")

    network = CNNVAE

    def loss(self, stage, outputs, chunks, targets, num_chunks, pseudo_labels=None):
        kl = vae_kl(outputs["mu"], outputs["logvar"], elements=chunks[0].numel())
        return super().loss(stage, outputs, chunks, targets, num_chunks) + self.weights.kl * kl


MODEL_KINDS = tuple(KINDS)
KIND_SETTINGS = sorted({key for kind in KINDS.values() for key in kind.settings})


def get_kind(name: str, weights: LossWeights = LossWeights(), stages: tuple[int, ...] | None = None) -> ModelKind:
    """The kind `name`; `stages`: the stage numbers it trains (None: all of its stages)."""
    require_choice(name, "model_kind", MODEL_KINDS)
    return KINDS[name](weights, stages)


def build_model(kind: str, config: ModelConfig) -> nn.Module:
    """One of MODEL_KINDS' networks: the proposed model or a paper baseline."""
    return get_kind(kind).build(config)


if __name__ == "__main__":  # python -m cluster_train.model.kinds: parameter counts with the defaults
    for name in MODEL_KINDS:
        print(f"{name:>15}: {count_parameters(build_model(name, ModelConfig())):,} parameters")
