"""Final scoring on a Ray Data actor pool (`score_splits(..., on_ray=True)`, `jobs/evaluate.py`)
against scoring in one process: the same bundle and splits of a real prepared sample.

The model is untrained (seeded weights, He-initialised so that utterances get different
predictions, with the normaliser and label scaler of the sample): the two paths must agree on
whatever model they score, which needs no training.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from conftest import local_ray
from torch import nn

from cluster_train.data.labels import LabelScaler
from cluster_train.model.blocks import ModelConfig
from cluster_train.model.kinds import build_model
from cluster_train.serve import evaluate
from cluster_train.serve.bundle import Bundle, load_bundle, save_bundle
from cluster_train.serve.evaluate import ActorPool, predict_split, predict_splits_on_ray, score_splits
from data_prep.config import ConfigError, PrepConfig, load_config
from data_prep.dataset import PreparedDataset
from data_prep.importers import import_ravdess
from data_prep.pipeline import run_prep

REPO = Path(__file__).resolve().parents[1]
ATTRS = ("arousal", "dominance", "valence")
SCORED = ("development", "test")


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray():
        yield


@pytest.fixture(scope="module")
def dataset(ray_cluster, tmp_path_factory) -> PreparedDataset:
    """15 sample utterances, 5 per split, in shards of 3 (a split's rows in several read tasks); one
    test utterance has no valence label."""
    folder = tmp_path_factory.mktemp("prepared")
    found = import_ravdess(str(REPO / "data" / "ravdess_sample"))
    rows = [u for split in ("train", *SCORED) for u in [u for u in found if u.split == split][::17][:5]]
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "audio", "split", *ATTRS])
        for i, u in enumerate(rows):
            writer.writerow([u.id, u.audio, u.split, u.arousal, u.dominance, "" if i == 12 else u.valence])
    config = load_config(PrepConfig, None, [f"sources=[{{kind: csv, path: {manifest}}}]",
                                            f"output={folder / 'out'}", "progress=false", "shard_size=3"])
    run_prep(config)
    return PreparedDataset(config.output)


@pytest.fixture(scope="module")
def bundle(dataset, tmp_path_factory) -> Bundle:
    torch.manual_seed(0)
    model = build_model("deepemocluster", ModelConfig())
    for layer in model.modules():  # PyTorch's default init shrinks the signal ~6x per layer: outputs ~constant
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    path = str(tmp_path_factory.mktemp("bundle"))
    save_bundle(path, model, "deepemocluster", ModelConfig(), dataset.normalizer(),
                LabelScaler.fit(dataset.read_table(columns=["split", *ATTRS])))
    return load_bundle(path)


@pytest.mark.slow
def test_the_actor_pool_predicts_and_scores_as_one_process(bundle, dataset, monkeypatch):
    pool = ActorPool(device="cpu", min_actors=1, max_actors=2)
    on_pool = predict_splits_on_ray(bundle, dataset, SCORED, pool, batch_size=2)  # batches unlike the 64 here
    for split in SCORED:
        here = predict_split(bundle, dataset, split)
        there = on_pool[split]
        assert there.ids == sorted(here.ids) and len(here.ids) == 5
        order = [here.ids.index(i) for i in there.ids]
        np.testing.assert_allclose(there.prediction, here.prediction[order], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(there.labels, here.labels[order])  # NaN where unlabelled, in both
        assert np.ptp(here.prediction, axis=0).min() > 0.01  # utterances differ: the comparison is not trivial

    in_process = score_splits(bundle, dataset, SCORED, on_ray=False)
    monkeypatch.setattr(evaluate, "evaluate_split", None)  # Ray is up: the pool, by default, not this process
    on_ray = score_splits(bundle, dataset, SCORED, pool=pool)
    assert list(on_ray) == list(in_process) == list(SCORED)
    for split in SCORED:
        a, b = in_process[split], on_ray[split]
        assert set(a) == set(b) == {"split", "utterances", "labelled", "ccc"}
        assert (a["split"], a["utterances"], a["labelled"]) == (b["split"], b["utterances"], b["labelled"])
        assert b["ccc"] == pytest.approx(a["ccc"], abs=1e-5)
    assert on_ray["test"]["labelled"] == {"arousal": 5, "dominance": 5, "valence": 4}


@pytest.mark.slow
def test_pool_size_may_exceed_the_cluster_and_is_checked(ray_cluster):
    assert ActorPool(device="cpu").layout() == (False, 1, 2)  # 2 CPUs, one each
    assert ActorPool(device="cpu", cpus_per_actor=2).layout() == (False, 1, 1)
    assert ActorPool(device="cpu", min_actors=2, max_actors=16).layout() == (False, 2, 16)  # for an autoscaler
    assert ActorPool().layout()[0] is False  # auto on a cluster without GPUs: CPU actors
    options = ActorPool(device="gpu", gpus_per_actor=0.5, max_actors=4).map_options(True, 1, 4)
    assert (options["compute"].min_size, options["compute"].max_size, options["num_gpus"]) == (1, 4, 0.5)
    with pytest.raises(ConfigError, match=r"'max_actors': 2 is below min_actors \(3\)"):
        ActorPool(min_actors=3, max_actors=2)
    with pytest.raises(ConfigError, match="'gpus_per_actor'"):
        ActorPool(gpus_per_actor=2)


@pytest.mark.slow
def test_evaluate_job_on_the_pool_reports_what_it_reports_in_process(bundle, dataset, tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    argv = ["--model", bundle.source, "--data", dataset.location, "--split", "test", "--split", "development"]
    assert job.main([*argv, "--ray", "no", "--json", str(tmp_path / "here.json")]) == 0
    assert job.main([*argv, "--ray", "yes", "--max-actors", "2", "--json", str(tmp_path / "pool.json")]) == 0
    here, pool = (json.loads((tmp_path / name).read_text()) for name in ("here.json", "pool.json"))
    assert [r["split"] for r in pool["results"]] == ["test", "development"]
    for a, b in zip(here["results"], pool["results"]):
        assert (a["utterances"], a["labelled"]) == (b["utterances"], b["labelled"])
        assert b["ccc"] == pytest.approx(a["ccc"], abs=1e-5)
    printed = capsys.readouterr().out
    assert printed.count("CCC per attribute") == 2 and printed.count("\ntest ") == 2

    assert job.main([*argv, "--min-actors", "3", "--max-actors", "2"]) == 2
    assert "'max_actors': 2 is below min_actors (3)" in capsys.readouterr().err
    assert job.on_ray("auto") and not job.on_ray("no")  # Ray is up here
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert not job.on_ray("auto")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # as `ray job submit` gives its driver
    assert job.on_ray("auto")
