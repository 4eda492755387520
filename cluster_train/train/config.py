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

from omegaconf import DictConfig, OmegaConf

from cluster_train.clustering.kmeans import ClusteringConfig
from cluster_train.data.config import DataConfig
from cluster_train.model.blocks import ModelConfig
from cluster_train.model.kinds import KIND_SETTINGS, KINDS, MODEL_KINDS, LossWeights, ModelKind, get_kind
from cluster_train.tracking import TrackingConfig
from data_prep.config import load_config, require, require_choice

OPTIMIZERS = ("sgd", "adam")
PRECISIONS = ("auto", "fp32", "bf16")
# The checkout's configs/ (the package is installed editable, `pip install -e`, or run from the checkout).
RECIPES_DIR = Path(__file__).resolve().parents[2] / "configs" / "recipes"
DEFAULT_RECIPE = "default"  # this file's defaults; other recipes are files in RECIPES_DIR


def recipe_names(folder: Path = RECIPES_DIR) -> list[str]:
    """`default` and the recipe files in `folder`; a missing folder is an error naming it."""
    require(folder.is_dir(), "recipe", f"no recipe folder {folder}: install the project editable from its "
                                       "checkout (pip install -e .), where configs/recipes lies")
    return [DEFAULT_RECIPE, *sorted(p.stem for p in folder.glob("*.yaml"))]


@dataclass(kw_only=True)
class OptimizerConfig:
    name: str = "sgd"  # one of OPTIMIZERS
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
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
    # Ray Train workers (DDP); 0 runs the same loop in this process without Ray (smoke tests, benchmarks).
    num_workers: int = 1
    use_gpu: bool = False  # a GPU per worker (NCCL between them)
    cpus_per_worker: float = 1.0  # Ray CPUs each worker reserves (and torch threads it uses)
    max_failures: int = 0  # restarts of the worker group from the last checkpoint

    def __post_init__(self) -> None:
        require(self.num_workers >= 0, "scaling.num_workers", "must be >= 0 (0: one local process, no Ray)")
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
    recipe: str = DEFAULT_RECIPE  # a named set of settings (configs/recipes/<name>.yaml) under the file's and the overrides
    model_kind: str = "deepemocluster"  # or the paper's baselines: cnn_regressor, cnn_ae, cnn_vae
    model: ModelConfig = field(default_factory=ModelConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    precise_bn: PreciseBNConfig = field(default_factory=PreciseBNConfig)
    # bf16 autocast or fp32; auto: bf16 on CUDA and on CPUs with bf16 matrix units (AMX), where it
    # trains 1.75x faster; fp32 elsewhere (bf16 without them was 7x slower here). See train/precision.py.
    precision: str = "auto"
    epochs: int = 50  # at most: early stopping (patience) usually ends a run first
    patience: int = 5  # epochs without a better development loss before stopping
    # The stage numbers to train (model/kinds.py); None: all of the kind's. For DeepEmoCluster, [2] is
    # the "stage 1 off" control (unlabeled audio then only shapes the clustering) and [1] the paper's
    # unsupervised-only model of its Fig. 3 (no regressor training: its CCC means nothing).
    stages: list[int] | None = None
    # Passes over the labelled rows per epoch (the labelled stage repeated, each pass reshuffled): the
    # control that gives the CNN-regressor as many steps as DeepEmoCluster takes (docs/RESULTS.md).
    labeled_passes: int = 1
    cluster_weight: float = 1.0  # lambda of (1 - CCC) + lambda * CE
    reconstruction_weight: float = 1.0  # CNN-AE / CNN-VAE
    kl_weight: float = 1.0  # CNN-VAE: on the KL per reconstructed element (losses.vae_kl)
    seed: int = 0  # every random stream of the run derives from it (cluster_train/seeding.py)
    name: str | None = None  # run name; None: <model_kind>-<time>
    storage_path: str = "outputs/runs"  # checkpoints; shared storage (s3://...) on a multi-node cluster

    def __post_init__(self) -> None:
        if self.recipe != DEFAULT_RECIPE:  # the defaults need no recipe folder
            require_choice(self.recipe, "recipe", recipe_names())
        require_choice(self.model_kind, "model_kind", MODEL_KINDS)
        require(self.seed >= 0, "seed", "must be >= 0")
        require(self.epochs >= 1, "epochs", "must be >= 1")
        require(self.patience >= 1, "patience", "must be >= 1")
        require_choice(self.precision, "precision", PRECISIONS)
        require(self.labeled_passes >= 1, "labeled_passes", "must be >= 1")
        if self.stages is not None:
            own = [stage.number for stage in get_kind(self.model_kind).stages]
            wrong = sorted(set(self.stages) - set(own))
            require(not wrong, "stages", f"model_kind {self.model_kind} has stages {own}, not {wrong}")
            require(len(self.stages) > 0, "stages", f"name at least one of {own} (null: all)")
        self.model.num_clusters = self.clustering.num_clusters  # one source: the clustering's K

    @property
    def kind(self) -> ModelKind:
        weights = LossWeights(self.cluster_weight, self.reconstruction_weight, self.kl_weight)
        return get_kind(self.model_kind, weights, None if self.stages is None else tuple(self.stages))

    @property
    def clusters(self) -> bool:
        return self.kind.clusters

    @property
    def run_dir(self) -> str:
        """The folder of this run's checkpoints and best model: `<storage_path>/<name>`."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"


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


# Set from elsewhere, never by hand: each value has one source.
DERIVED_KEYS = {
    "model.num_clusters": "the number of clusters is clustering.num_clusters",
    "model.chunk_frames": "the chunk length is data.chunks.chunk_frames",
    "model.n_mels": "the mel bands come from the prepared dataset (data.dataset)",
}


def dotted_keys(layer: DictConfig) -> list[str]:
    """The leaf keys a config layer sets, dotted (`optim.decoder.lr`)."""
    def walk(prefix: str, node) -> list[str]:
        if isinstance(node, DictConfig) and len(node) > 0:
            return [k for key in node for k in walk(f"{prefix}{key}.", node._get_node(key))]
        return [prefix.rstrip(".")]
    return walk("", layer)


def _override_keys(overrides: Sequence[str]) -> list[str]:
    return [o.partition("=")[0].strip() for o in overrides]


def inapplicable(keys: Sequence[str], model_kind: str) -> dict[str, str]:
    """Key -> why, for the keys that only other model kinds read."""
    owned = get_kind(model_kind).settings
    found = {}
    for key in keys:
        for setting in KIND_SETTINGS:
            if (key == setting or key.startswith(setting + ".")) and setting not in owned:
                readers = [name for name, kind in KINDS.items() if setting in kind.settings]
                found[key] = f"does not apply to model_kind {model_kind} (only {', '.join(readers)} reads it)"
    return found


def load_train_config(path: str | Path | None, overrides: Sequence[str] = (), *,
                      shared_overrides: Sequence[str] | None = None) -> TrainConfig:
    """Defaults <- recipe <- the file at `path` <- `overrides`, validated (ConfigError names the key).

    A key the file or the overrides set that the chosen model kind does not read is an error, as is
    a derived key (`DERIVED_KEYS`). A sweep passes `shared_overrides` (applied before `overrides`):
    its file and shared overrides serve trials of several kinds, so each trial keeps only the keys
    its kind reads from those two; its own `overrides` stay strict."""
    shared = list(shared_overrides or [])
    recipe = chosen_recipe(path, [*shared, *overrides])
    layers = []
    if recipe != DEFAULT_RECIPE:
        require_choice(recipe, "recipe", recipe_names())
        layers = [RECIPES_DIR / f"{recipe}.yaml"]
    config = load_config(TrainConfig, path, [*shared, *overrides], base_files=layers)
    file_layer = OmegaConf.load(path) if path is not None and Path(path).is_file() else OmegaConf.create()
    given = {str(path): dotted_keys(file_layer), "shared overrides": _override_keys(shared),
             "command-line overrides": _override_keys(overrides)}
    for where, keys in given.items():
        for key in keys:
            require(key not in DERIVED_KEYS, key, f"({where}) is not set by hand: {DERIVED_KEYS.get(key)}")
    wrong = {where: inapplicable(keys, config.model_kind) for where, keys in given.items()}
    if shared_overrides is not None and (wrong[str(path)] or wrong["shared overrides"]):
        for key in wrong[str(path)]:
            parent, _, leaf = key.rpartition(".")
            (OmegaConf.select(file_layer, parent) if parent else file_layer).pop(leaf)
        shared = [o for o in shared if o.partition("=")[0].strip() not in wrong["shared overrides"]]
        config = load_config(TrainConfig, file_layer, [*shared, *overrides], base_files=layers)
        wrong[str(path)], wrong["shared overrides"] = {}, {}
    for where, keys in wrong.items():
        for key, why in keys.items():
            require(False, key, f"({where}) {why}")
    return config
