"""The training config: one source per value, and keys that only another model kind reads refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster_train.experiments.sweep import SweepConfig, load_sweep_config, plan_trials
from cluster_train.train.config import load_train_config
from data_prep.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "configs/train/ravdess_sample.yaml"


@pytest.mark.parametrize("override, kind", [
    ("clustering.mode=sample", "cnn_regressor"), ("cluster_weight=2", "cnn_ae"),
    ("optim.cluster_top.lr=0.1", "cnn_vae"), ("optim.decoder.lr=0.1", "deepemocluster"),
    ("reconstruction_weight=2", "cnn_regressor"), ("kl_weight=2", "cnn_ae"),
])
def test_a_key_the_chosen_kind_does_not_read_is_an_error_naming_it(override: str, kind: str) -> None:
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"'{key}'.*does not apply to model_kind {kind}"):
        load_train_config(SAMPLE, [f"model_kind={kind}", override])


def test_the_keys_a_kind_reads_are_accepted() -> None:
    assert load_train_config(SAMPLE, ["model_kind=cnn_vae", "kl_weight=2", "optim.decoder.lr=0.1"]).kl_weight == 2
    assert load_train_config(SAMPLE, ["clustering.mode=sample", "cluster_weight=2"]).clustering.mode == "sample"


def test_a_kind_key_in_the_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    config_file = tmp_path / "train.yaml"
    config_file.write_text("model_kind: cnn_regressor\ndata: {dataset: somewhere}\nclustering:\n  num_clusters: 20\n")
    with pytest.raises(ConfigError, match=rf"'clustering.num_clusters'.*\({config_file}\).*only deepemocluster"):
        load_train_config(config_file)


@pytest.mark.parametrize("override, source", [
    ("model.num_clusters=4", "clustering.num_clusters"), ("model.chunk_frames=30", "data.chunks.chunk_frames"),
    ("model.n_mels=40", "prepared dataset"),
])
def test_a_derived_value_has_one_source(override: str, source: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{override.partition('=')[0]}'.*not set by hand.*{source}"):
        load_train_config(SAMPLE, [override])
    assert load_train_config(SAMPLE, ["clustering.num_clusters=7"]).model.num_clusters == 7


def test_precision_is_auto_fp32_or_bf16() -> None:
    assert load_train_config(SAMPLE).precision == "auto"
    with pytest.raises(ConfigError, match="'precision'"):
        load_train_config(SAMPLE, ["precision=fp16"])


def test_a_sweep_gives_each_trial_only_the_shared_keys_its_kind_reads(tmp_path: Path) -> None:
    """The sweep's file and overrides serve every kind: a baseline trial drops the clustering keys,
    DeepEmoCluster's keeps them; a grid key that does not apply stays an error."""
    sweep = SweepConfig(name="kinds", train_config=str(SAMPLE), overrides=["clustering.num_clusters=4"],
                        grid={"model_kind": ["cnn_regressor", "deepemocluster"]})
    regressor, deepemocluster = plan_trials(sweep)
    assert regressor.config.model_kind == "cnn_regressor" and regressor.config.clustering.num_clusters == 10
    assert deepemocluster.config.clustering.num_clusters == 4
    wrong = SweepConfig(name="kinds", train_config=str(SAMPLE), grid={"model_kind": ["cnn_ae"], "kl_weight": [2.0]})
    with pytest.raises(ConfigError, match="trial model_kind=cnn_ae,kl_weight=2.0 seed 0: .*'kl_weight'"):
        plan_trials(wrong)


def test_a_sweep_can_train_some_points_first_with_the_reference_kept() -> None:
    """`jobs/sweep.py --only`: the named points and the reference (the table compares against it),
    in the config's order; a name that is no point fails before anything trains."""
    sweep = load_sweep_config(REPO / "configs/sweep/ravdess_quarter.yaml")
    trials = plan_trials(sweep, ["dec_k20", "dec_shuffled_labels"])
    assert [(t.point, t.seed) for t in trials] == (
        [("cnn_regressor", s) for s in range(5)] + [("dec_shuffled_labels", s) for s in range(2)]
        + [("dec_k20", s) for s in range(2)])
    assert trials[-1].config.clustering.num_clusters == 20
    assert len(plan_trials(sweep)) == 27
    with pytest.raises(ConfigError, match=r"--only: 'dec_k40' is none of the grid points \['cnn_regressor'"):
        plan_trials(sweep, ["dec_k40"])
