"""Every shipped recipe (configs/recipes/*.yaml) is found, and trains with its settings in effect."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from omegaconf import OmegaConf
from test_train import TINY_MODEL, prepared  # noqa: F401 - `prepared`: the module's Ray and prepared sample

from cluster_train.train.checkpointer import STATE_FILE
from cluster_train.train.config import DEFAULT_RECIPE, dotted_keys, load_train_config, recipe_names
from cluster_train.train.launch import run_training
from data_prep.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
RECIPE_FILES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))


def test_every_recipe_file_is_a_recipe_and_a_missing_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    assert RECIPE_FILES, "configs/recipes holds no recipe"
    assert recipe_names() == [DEFAULT_RECIPE, *(p.stem for p in RECIPE_FILES)]
    for path in RECIPE_FILES:
        assert load_train_config(REPO / "configs/train/ravdess_sample.yaml", [f"recipe={path.stem}"]).recipe == path.stem
    missing = tmp_path / "no-recipes"
    with pytest.raises(ConfigError, match=f"'recipe'.*{missing}"):
        recipe_names(missing)


def _same(logged: str, value: object) -> bool:
    """Whether an MLflow param (a string) holds the recipe's value."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(logged) == float(value)
    return logged == str(value)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [p.stem for p in RECIPE_FILES])
def test_a_shipped_recipe_trains_one_epoch_with_its_settings(prepared: Path, tmp_path: Path, recipe: str) -> None:
    """`recipe=<name>` end to end in one process: the run's params and tag hold the recipe's values,
    and the optimizers the run stepped (in its checkpoint) are the ones the recipe names."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_train_config(REPO / "configs/train/ravdess_sample.yaml", [
        f"recipe={recipe}", f"data.dataset={prepared / 'prepared'}", "data.batch_size=4", "epochs=1", "clustering.num_clusters=4",
        "scaling.num_workers=0", "precise_bn.utterances=0", f"storage_path={tmp_path / 'runs'}", f"name={recipe}",
        f"tracking.tracking_uri={store}", *TINY_MODEL])
    result = run_training(config)
    assert result.epochs_run == 1

    run = MlflowClient(store).get_run(result.mlflow_run_id)
    assert run.data.tags["recipe"] == recipe
    settings = OmegaConf.load(REPO / "configs" / "recipes" / f"{recipe}.yaml")
    for key in dotted_keys(settings):
        value = OmegaConf.select(settings, key)
        assert _same(run.data.params[key], value), (key, run.data.params[key], value)

    saved = torch.load(tmp_path / "runs" / recipe / "checkpoint_000000" / STATE_FILE, weights_only=True)
    for group, optimizer in saved["optimizers"].items():
        wanted = getattr(config.optim, group)
        hyper = optimizer["param_groups"][0]
        assert ("betas" in hyper) == (wanted.name == "adam") and ("momentum" in hyper) == (wanted.name == "sgd"), group
        assert hyper["lr"] == pytest.approx(wanted.lr), group
        recipe_optimizer = OmegaConf.select(settings, f"optim.{group}")
        if recipe_optimizer is not None:
            assert wanted.name == recipe_optimizer.name and wanted.lr == pytest.approx(recipe_optimizer.lr), group
