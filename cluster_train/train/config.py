"""The training job's typed configuration: defaults here <- a recipe <- a YAML file in
configs/train/ <- command-line overrides.

A recipe (`recipe=...`) is a named set of settings in `configs/recipes/<name>.yaml`, e.g. `paper`
(the paper's optimisers exactly); `default` is this file's defaults, chosen by measurement (see the
README's "Recipes"). `load_train_config` fails on a wrong key or value before any Ray worker starts,
naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from cluster_train.clustering.kmeans import ClusteringConfig
from cluster_train.data.config import DataConfig
from cluster_train.model.blocks import ModelConfig
from cluster_train.model.kinds import MODEL_KINDS
from cluster_train.tracking import TrackingConfig
from data_prep.config import load_config, require, require_choice

OPTIMIZERS = ("sgd", "adam")
RECIPES_DIR = Path(__file__).resolve().parents[1] / "configs" / "recipes"
DEFAULT_RECIPE = "default"  # this file's defaults; other recipes are files in RECIPES_DIR


def recipe_names() -> list[str]:
    return [DEFAULT_RECIPE, *sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))]


@dataclass(kw_only=True)
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-5

    def __post_init__(self) -> None:
        require_choice(self.name, "optim.*.name", OPTIMIZERS)
        require(self.lr > 0, "optim.*.lr", "must be > 0")


@dataclass(kw_only=True)
class OptimConfig:
    """One optimizer per parameter group; each parameter in exactly one group.

    The defaults: Adam 5e-4 for the encoder (+ the cluster head's body), where the paper has SGD 1e-3
    (`recipe=paper`): on small corpora SGD leaves the model near its start after the few hundred steps
    it gets (README "Recipes" has the figures)."""

    encoder: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="adam", lr=5e-4, weight_decay=0))
    cluster_top: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=0.05))
    regressor: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="adam", lr=5e-4, weight_decay=0))
    decoder: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="adam", lr=5e-4, weight_decay=0))


@dataclass(kw_only=True)
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0  # restarts of the worker group from the last checkpoint

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "scaling.num_workers", "must be >= 1")
        require(self.cpus_per_worker > 0, "scaling.cpus_per_worker", "must be > 0")
        require(self.max_failures >= -1, "scaling.max_failures", "must be >= -1 (-1: no limit)")


@dataclass(kw_only=True)
class PreciseBNConfig:
    """BatchNorm statistics recomputed for the current weights (`train/precise_bn.py`) before every K-means
    embedding pass, validation and saved model, over this many training utterances (a fixed choice
    per seed, labelled and unlabeled alike). 0 keeps BatchNorm's running averages, which lag far
    behind the weights when an epoch has few steps (dev CCC .09 instead of .62, REFERENCE.md)."""

    # 64: the demo's saved model scored dev CCC within .001 of its weights with the statistics of all
    # 120 train utterances (32: .024 below), for 10 s a recompute at 1 thread (README "Precise BatchNorm").
    utterances: int = 64

    def __post_init__(self) -> None:
        require(self.utterances >= 0, "precise_bn.utterances", "must be >= 0 (0: off)")


@dataclass(kw_only=True)
class TrainConfig:
    recipe: str = DEFAULT_RECIPE  # a named set of settings (configs/recipes/<name>.yaml), under the file's
    model_kind: str = "deepemocluster"  # or the paper's baselines: cnn_regressor, cnn_ae, cnn_vae
    model: ModelConfig = field(default_factory=ModelConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    precise_bn: PreciseBNConfig = field(default_factory=PreciseBNConfig)
    epochs: int = 50
    patience: int = 5  # epochs without a better development loss before stopping
    cluster_weight: float = 1.0  # lambda of (1 - CCC) + lambda * CE
    reconstruction_weight: float = 1.0  # CNN-AE / CNN-VAE
    kl_weight: float = 1.0  # CNN-VAE: on the KL per reconstructed element (losses.vae_kl)
    seed: int = 0  # every random stream of the run derives from it (cluster_train/seeding.py)
    name: str | None = None  # run name; None: <model_kind>-<time>
    storage_path: str = "outputs/runs"  # checkpoints; shared storage (s3://...) on a multi-node cluster

    def __post_init__(self) -> None:
        require_choice(self.recipe, "recipe", recipe_names())
        require_choice(self.model_kind, "model_kind", MODEL_KINDS)
        require(self.seed >= 0, "seed", "must be >= 0")
        require(self.epochs >= 1, "epochs", "must be >= 1")
        require(self.patience >= 1, "patience", "must be >= 1")
        require(
            self.model.num_clusters == self.clustering.num_clusters,
            "clustering.num_clusters",
            f"{self.clustering.num_clusters} differs from model.num_clusters {self.model.num_clusters}",
        )

    @property
    def clusters(self) -> bool:
        return self.model_kind == "deepemocluster"


def chosen_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> str:
    """The recipe named by the last `recipe=` override, else by the file, else the default."""
    for override in reversed(overrides):
        key, _, value = override.partition("=")
        if key.strip() == "recipe":
            return value.strip()
    if path is not None and Path(path).is_file():
        named = OmegaConf.load(path).get("recipe")
        if named is not None:
            return str(named)
    return DEFAULT_RECIPE


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults <- recipe <- the file at `path` <- `overrides`, validated (ConfigError names the key)."""
    recipe = chosen_recipe(path, overrides)
    require_choice(recipe, "recipe", recipe_names())
    layers = [] if recipe == DEFAULT_RECIPE else [RECIPES_DIR / f"{recipe}.yaml"]
    return load_config(TrainConfig, path, overrides, base_files=layers)
