"""The model kinds by name."""

from __future__ import annotations

from torch import nn

from cluster_train.model.blocks import ModelConfig, count_parameters
from data_prep.config import require_choice

MODEL_KINDS = ("deepemocluster", "cnn_regressor", "cnn_ae", "cnn_vae")


def build_model(kind: str, config: ModelConfig) -> nn.Module:
    """One of MODEL_KINDS: the proposed model or a paper baseline."""
    from cluster_train.model import baselines, deepemocluster

    require_choice(kind, "kind", MODEL_KINDS)
    builders = {
        "deepemocluster": deepemocluster.DeepEmoCluster,
        "cnn_regressor": baselines.CNNRegressor,
        "cnn_ae": baselines.CNNAutoencoder,
        "cnn_vae": baselines.CNNVAE,
    }
    return builders[kind](config)


if __name__ == "__main__":  # python -m cluster_train.model.kinds: parameter counts with the defaults
    for name in MODEL_KINDS:
        print(f"{name:>15}: {count_parameters(build_model(name, ModelConfig())):,} parameters")
