"""The checks of a run against its prepared dataset before any cluster resource is taken
(`train/preflight.py`), on the real prepared sample (splits train, development, test; 8 utterances each)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
from test_train import REPO, _small_run, prepared  # noqa: F401 - `prepared` is a fixture

from cluster_train.clustering.service import actor_options
from cluster_train.train.config import load_train_config
from cluster_train.train.launch import run_training
from cluster_train.train.preflight import check_run_against_dataset, gather_bytes
from data_prep.config import ConfigError
from data_prep.dataset import PreparedDataset
from data_prep.importers import MSP_SPLITS

SAMPLE_SPLITS = r"\['development', 'test', 'train'\]"


def _check(prepared: Path, tmp_path: Path, *overrides: str) -> None:
    config = _small_run(prepared, tmp_path / "runs", "preflight", *overrides)
    check_run_against_dataset(config, PreparedDataset(config.data.dataset))


def test_the_sample_run_passes(prepared, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check(prepared, tmp_path)


@pytest.mark.parametrize(("override", "key", "split"), [
    ("data.test_splits=[test1,test2]", "data.test_splits", "test1"),
    ("data.development_split=dev", "data.development_split", "dev"),
    ("data.labeled_splits=[train,extra]", "data.labeled_splits", "extra"),
    ("data.unlabeled_splits=[podcasts]", "data.unlabeled_splits", "podcasts"),
])
def test_a_split_the_dataset_lacks_is_a_config_error(prepared, tmp_path, override, key, split):
    with pytest.raises(ConfigError, match=rf"config key '{key}'.*'{split}'.*{SAMPLE_SPLITS}"):
        _check(prepared, tmp_path, override)


def test_the_default_unlabeled_split_may_be_absent(prepared, tmp_path):
    """`unlabeled` (the default) is what MSP-Podcast's importer names the audio its CSV does not list,
    present only when prepared with include_unlabeled, and RAVDESS has none: absent, the run has no
    unlabeled audio. A split named otherwise must exist (above)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check(prepared, tmp_path, "data.unlabeled_splits=[unlabeled]")


def test_gather_beyond_its_memory_limit_is_a_config_error(prepared, tmp_path):
    """8 train utterances x 11 chunks = 88 chunks of 256 float32."""
    with pytest.raises(ConfigError, match=r"config key 'clustering\.mode'.*gather.*88 chunks.*'sample'.*'allreduce'"):
        _check(prepared, tmp_path, "clustering.mode=gather", "clustering.gather_max_gb=0.0001")
    _check(prepared, tmp_path, "clustering.mode=sample", "clustering.gather_max_gb=0.0001")
    _check(prepared, tmp_path, "clustering.mode=allreduce", "clustering.gather_max_gb=0.0001")


def test_gather_estimate_at_msp_podcast_scale():
    """500K segments x 11 chunks of 256 float32: 5.6 GB sent, about three copies on the actor."""
    assert gather_bytes(500_000 * 11, 256) / 1e9 == pytest.approx(3 * 5.632, rel=1e-3)


def test_run_training_checks_before_starting_anything(prepared, tmp_path):
    """The wrong test split fails at once, before any checkpoint folder or K-means actor exists."""
    import ray

    config = _small_run(prepared, tmp_path / "runs", "preflight-run", "data.test_splits=[test1]")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"config key 'data\.test_splits'.*'test1'"):
        run_training(config)
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError):
        ray.get_actor("kmeans-preflight-run")


MSP_PODCAST = REPO / "configs" / "train" / "msp_podcast.yaml"
MSP_PLACES = {"data.dataset": "/data/msp/prepared", "storage_path": "s3://bucket/runs",
              "tracking.tracking_uri": "http://mlflow:5000"}
MSP_VARIABLES = {"data.dataset": "MSP_PODCAST_DATASET", "storage_path": "RUNS_STORAGE_PATH",
                 "tracking.tracking_uri": "MLFLOW_TRACKING_URI"}


def test_msp_podcast_config_holds_at_scale():
    config = load_train_config(MSP_PODCAST, [f"{k}={v}" for k, v in MSP_PLACES.items()])
    assert (config.scaling.use_gpu, config.scaling.num_workers) == (True, 8)
    assert config.clustering.mode == "sample" and config.data.cache_max_mb == 0
    assert actor_options(config.clustering, config.scaling.use_gpu)["num_gpus"] == 0
    assert set(config.data.test_splits) <= set(MSP_SPLITS.values())
    assert {config.data.development_split, *config.data.labeled_splits} <= set(MSP_SPLITS.values())


@pytest.mark.parametrize("unset", sorted(MSP_PLACES))
def test_msp_podcast_config_left_unset_fails_naming_the_key(unset, monkeypatch):
    """Each place comes from its environment variable or the command line, and has no default."""
    for variable in MSP_VARIABLES.values():
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ConfigError, match=rf"config key '{unset}'.*'{MSP_VARIABLES[unset]}' not found"):
        load_train_config(MSP_PODCAST, [f"{k}={v}" for k, v in MSP_PLACES.items() if k != unset])
    monkeypatch.setenv(MSP_VARIABLES[unset], MSP_PLACES[unset])
    config = load_train_config(MSP_PODCAST, [f"{k}={v}" for k, v in MSP_PLACES.items() if k != unset])
    assert (config.data.dataset, config.storage_path, config.tracking.tracking_uri) == tuple(MSP_PLACES.values())


def test_msp_podcast_config_against_the_sample_fails_before_training(prepared):
    """The sample has splits train/development/test; MSP-Podcast's test splits are test1, test2."""
    places = MSP_PLACES | {"data.dataset": str(prepared / "prepared")}
    config = load_train_config(MSP_PODCAST, [f"{k}={v}" for k, v in places.items()])
    with pytest.raises(ConfigError, match=rf"config key 'data\.test_splits'.*'test1', 'test2'.*{SAMPLE_SPLITS}"):
        check_run_against_dataset(config, PreparedDataset(config.data.dataset))
