"""Bundles, label scaling, sentence-level prediction and scoring on a real prepared sample."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
from scipy import stats
from torch import nn

from cluster_train.data.labels import LabelScaler, label_matrix
from cluster_train.model.blocks import ModelConfig
from cluster_train.model.kinds import build_model
from cluster_train.serve.bundle import BUNDLE_FORMAT, BundleError, load_bundle, log_bundle, resolve_bundle, save_bundle
from cluster_train.serve.evaluate import (
    EvaluationError,
    SplitPredictions,
    compare_models,
    evaluate_split,
    format_comparison,
    paired_t_test,
    predict_split,
    predict_table,
    score,
    score_splits,
    split_into_subsets,
    subset_scores,
    welch_t_test,
)
from data_prep.config import ChunkConfig, PrepConfig, load_config
from data_prep.dataset import PreparedDataset
from data_prep.importers import import_ravdess
from data_prep.pipeline import run_prep

REPO = Path(__file__).resolve().parents[1]
ATTRS = ("arousal", "dominance", "valence")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> PreparedDataset:
    """12 sample utterances, 4 per split; one test utterance has no valence label."""
    folder = tmp_path_factory.mktemp("prepared")
    utterances = import_ravdess(str(REPO / "data" / "ravdess_sample"))
    by_split = {s: [u for u in utterances if u.split == s][::20][:4] for s in ("train", "development", "test")}
    rows = [u for split_rows in by_split.values() for u in split_rows]
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "audio", "split", *ATTRS])
        for i, u in enumerate(rows):
            writer.writerow([u.id, u.audio, u.split, u.arousal, u.dominance, "" if i == 8 else u.valence])
    config = load_config(PrepConfig, None, [f"sources=[{{kind: csv, path: {manifest}}}]",
                                            f"output={folder / 'out'}", "progress=false", "shard_size=5"])
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        run_prep(config)
    finally:
        if started:
            ray.shutdown()
    return PreparedDataset(config.output)


@pytest.fixture(scope="module")
def bundle_dir(dataset, tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = build_model("deepemocluster", ModelConfig())
    scaler = LabelScaler.fit(dataset.read_table(columns=["split", *ATTRS]))
    path = str(tmp_path_factory.mktemp("bundle"))
    save_bundle(path, nn.DataParallel(model), "deepemocluster", ModelConfig(), dataset.normalizer(), scaler,
                extra={"epoch": 3, "metrics": {"ccc": np.float32(0.5)}, "dataset_hash": dataset.dataset_hash})
    return path


def numpy_ccc(x: np.ndarray, y: np.ndarray) -> float:
    return 2 * np.cov(x, y, bias=True)[0, 1] / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)


def test_bundle_round_trip(bundle_dir, dataset):
    bundle = load_bundle(bundle_dir)
    payload = torch.load(Path(bundle_dir) / "model.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in payload["state_dict"])  # DataParallel unwrapped
    assert bundle.model_kind == "deepemocluster" and not bundle.model.training
    assert bundle.extra == {"epoch": 3, "metrics": {"ccc": 0.5}, "dataset_hash": dataset.dataset_hash}
    assert bundle.model_config == ModelConfig()
    np.testing.assert_array_equal(bundle.normalizer.mean, dataset.normalizer().mean)
    again = load_bundle(bundle_dir + "/model.pt")
    x = torch.randn(5, 62, 128)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x)["prediction"], again.model(x)["prediction"], rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"extra\.bad"):
        save_bundle(bundle_dir + "-x", bundle.model, "deepemocluster", ModelConfig(), bundle.normalizer,
                    bundle.label_scaler, extra={"bad": object()})


class Sneaky:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (str(self.marker), "w"))


def test_bad_bundles_are_refused_with_their_path(tmp_path, bundle_dir):
    with pytest.raises(BundleError, match=str(tmp_path / "missing")):
        load_bundle(str(tmp_path / "missing"))
    payload = torch.load(Path(bundle_dir) / "model.pt", weights_only=True)
    marker = tmp_path / "pwned"
    (tmp_path / "tampered").mkdir()
    torch.save({**payload, "extra": {"x": Sneaky(marker)}}, tmp_path / "tampered" / "model.pt")
    with pytest.raises(BundleError, match="weights-only load refused"):
        load_bundle(str(tmp_path / "tampered"))
    assert not marker.exists()
    (tmp_path / "other").mkdir()
    torch.save({"format": "something-else"}, tmp_path / "other" / "model.pt")
    with pytest.raises(BundleError, match=r"other/model.pt: not a model bundle"):
        load_bundle(str(tmp_path / "other"))
    torch.save({**payload, "format": BUNDLE_FORMAT, "model_kind": "cnn_regressor"}, tmp_path / "other" / "model.pt")
    with pytest.raises(BundleError, match="broken model bundle"):
        load_bundle(str(tmp_path / "other"))


def test_label_scaler_round_trip_and_missing_labels():
    table = pa.table({"split": ["train", "train", "train", "test"], "arousal": [1.0, 3.0, None, 7.0],
                      "dominance": [2.0, 2.0, 5.0, 1.0], "valence": [float("nan"), 4.0, 6.0, 1.0]})
    scaler = LabelScaler.fit(table)
    np.testing.assert_allclose(scaler.mean, [2.0, 3.0, 5.0])
    np.testing.assert_allclose(scaler.std, [1.0, np.sqrt(2.0), 1.0])
    y = label_matrix(table)
    assert np.isnan(y[2, 0]) and np.isnan(y[0, 2])
    z = scaler.to_z(y)
    np.testing.assert_allclose(z[1], [1.0, -1 / np.sqrt(2.0), -1.0])
    np.testing.assert_allclose(scaler.from_z(z), y)  # NaN stays NaN (assert_allclose: equal_nan)
    z_torch = scaler.to_z(torch.tensor(y, dtype=torch.float32))
    assert z_torch.dtype == torch.float32
    torch.testing.assert_close(scaler.from_z(z_torch), torch.tensor(y, dtype=torch.float32), equal_nan=True)
    again = LabelScaler.from_dict(json.loads(json.dumps(scaler.to_dict())))
    assert again.attributes == ATTRS and np.array_equal(again.std, scaler.std)
    assert again.low.tolist() == [1.0, 2.0, 4.0] and again.high.tolist() == [3.0, 5.0, 6.0]  # the train range
    np.testing.assert_array_equal(again.clip(np.array([[0.0, 9.0, 5.0]])), [[1.0, 5.0, 5.0]])
    with pytest.raises(ValueError, match="no train labels for dominance"):
        LabelScaler.fit({"arousal": [1.0], "dominance": [np.nan], "valence": [2.0]}, split="train")


def test_sentence_prediction_is_mean_of_chunk_predictions(bundle_dir, dataset):
    bundle = load_bundle(bundle_dir)
    table = dataset.read_table(["development", "test"])
    chunks = dataset.frame_format.chunks_of(table["frames"], ChunkConfig())
    assert chunks.dtype == np.float16 and chunks.shape[1:] == (11, 62, 128)
    with torch.no_grad():
        per_chunk = [bundle.model(torch.from_numpy(bundle.normalizer(s)))["prediction"].numpy() for s in chunks]
    expected = bundle.label_scaler.from_z(np.stack([p.mean(axis=0) for p in per_chunk]))
    bundle.model.train()
    pred = predict_table(bundle.model, table, batch_size=3, normalizer=bundle.normalizer,
                         label_scaler=bundle.label_scaler, chunks=ChunkConfig(), frames=dataset.frame_format)
    assert bundle.model.training  # put back as it was
    assert pred.shape == (8, 3)
    np.testing.assert_allclose(pred, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="normalizer"):
        predict_table(bundle.model, table)


def test_score_matches_numpy_ccc(dataset):
    table = dataset.read_table(["development", "test"], columns=list(ATTRS))
    labels = label_matrix(table)
    pred = labels * 0.5 + np.random.default_rng(0).normal(size=labels.shape)
    result = score(pred, table)
    for i, name in enumerate(ATTRS):
        keep = ~np.isnan(labels[:, i])
        assert result[name] == pytest.approx(numpy_ccc(pred[keep, i], labels[keep, i]), rel=1e-9)
    assert (~np.isnan(labels[:, 2])).sum() == 7  # the unlabelled valence row was left out


def test_evaluate_split_reads_only_that_split(bundle_dir, dataset):
    bundle = load_bundle(bundle_dir)
    result = evaluate_split(bundle, dataset, "test", batch_size=2)
    table = dataset.read_table(["test"])
    assert result["utterances"] == 4 and result["labelled"] == {"arousal": 4, "dominance": 4, "valence": 3}
    expected = score(predict_table(bundle, table), table)
    assert result["ccc"] == pytest.approx(expected, abs=1e-4)  # batches of 2 vs 64: float32 rounding
    predictions = predict_split(bundle, dataset, "test")
    assert sorted(predictions.ids) == sorted(table["id"].to_pylist())
    halves = split_into_subsets(4, k=2, seed=0)
    per_subset = subset_scores(predictions, halves)
    assert per_subset["arousal"].shape == (2,)
    assert per_subset["arousal"][1] == pytest.approx(score(predictions.prediction[halves[1]],
                                                           predictions.labels[halves[1]])["arousal"])
    with pytest.raises(EvaluationError, match="no utterances in split 'unlabeled'"):
        evaluate_split(bundle, dataset, "unlabeled")
    assert score_splits(bundle, dataset, ["test"], on_ray=False, batch_size=2) == {"test": result}
    with pytest.raises(EvaluationError, match="no utterances in split 'unlabeled'"):
        score_splits(bundle, dataset, ["test", "unlabeled"], on_ray=True)  # before Ray is started or a split scored
    assert not ray.is_initialized()


def test_bundle_from_mlflow_uris(tmp_path, bundle_dir):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("evaluation", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            log_bundle(bundle_dir, name="model")  # a logged model: runs:/ and models:/ both work
            mlflow.log_artifact(str(Path(bundle_dir) / "model.pt"), artifact_path="plain/bundle")
        version = mlflow.register_model(f"runs:/{run.info.run_id}/model", "emotion")
        local = load_bundle(bundle_dir)
        x = torch.randn(3, 62, 128)
        for uri in (f"runs:/{run.info.run_id}/model", f"models:/emotion/{version.version}",
                    f"runs:/{run.info.run_id}/plain"):
            bundle = resolve_bundle(uri)
            assert bundle.source == uri and bundle.extra == local.extra
            with torch.no_grad():
                torch.testing.assert_close(bundle.model(x)["prediction"], local.model(x)["prediction"])
        with pytest.raises(BundleError, match="cannot download"):
            resolve_bundle(f"runs:/{run.info.run_id}/nothing")
    finally:
        mlflow.set_tracking_uri(previous)


def test_evaluate_job(tmp_path, bundle_dir, dataset, capsys):
    missing = tmp_path / "no-such-checkpoint"
    command = [sys.executable, "jobs/evaluate.py", "--model", str(missing), "--data", dataset.location]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and str(missing) in result.stderr, result.stderr
    spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)  # the same script, in-process
    out = tmp_path / "out.json"
    argv = ["--model", bundle_dir, "--data", dataset.location, "--split", "development", "--split", "test"]
    assert job.main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "development" in printed and "valence" in printed
    report = json.loads(out.read_text())
    assert [r["split"] for r in report["results"]] == ["development", "test"]
    assert report["trained_on"] == report["dataset_hash"] == dataset.dataset_hash


def test_subsets_and_t_tests():
    parts = split_into_subsets(20, k=4, seed=1)
    assert [len(p) for p in parts] == [5] * 4
    assert sorted(np.concatenate(parts).tolist()) == list(range(20))
    assert all(np.array_equal(a, b) for a, b in zip(parts, split_into_subsets(20, k=4, seed=1)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, split_into_subsets(20, k=4, seed=2)))
    assert sorted(len(p) for p in split_into_subsets(10, k=4)) == [2, 2, 3, 3]
    rng = np.random.default_rng(0)
    a = rng.normal(0.60, 0.01, 20)
    b = a - 0.02 + rng.normal(0, 0.005, 20)
    d = a - b
    t = d.mean() / (d.std(ddof=1) / np.sqrt(20))
    assert paired_t_test(a, b) == pytest.approx(2 * stats.t.sf(abs(t), 19))
    assert welch_t_test(a, b) < 0.05 and welch_t_test(a, a + rng.normal(0, 0.01, 20)) > 0.05
    with pytest.raises(ValueError, match="samples of one length, got 20 and 10"):
        paired_t_test(a, b[:10])


def _predictions(ids, labels, noise, seed):
    rng = np.random.default_rng(seed)
    return SplitPredictions(list(ids), labels + rng.normal(0, noise, labels.shape), labels, ("arousal", "valence"))


def test_compare_models_pairs_subsets_by_utterance_and_flags_a_better_model():
    rng = np.random.default_rng(0)
    ids = [f"u{i:03d}" for i in range(80)]
    labels = rng.uniform(1, 7, (80, 2))
    good = [_predictions(ids, labels, 0.5, seed) for seed in range(3)]
    # the same utterances in another order: subsets must follow the ids, not the row positions
    order = rng.permutation(80)
    bad = []
    for seed in range(3):
        p = _predictions(ids, labels, 2.5, 10 + seed)
        bad.append(SplitPredictions([ids[i] for i in order], p.prediction[order], labels[order], p.attributes))
    table = compare_models({"cnn_regressor": bad, "deepemocluster": good}, reference="cnn_regressor", k=4)

    ours, reference = table["models"]["deepemocluster"]["ccc"], table["models"]["cnn_regressor"]["ccc"]
    assert ours["arousal"]["n"] == 12 and reference["arousal"]["p_vs_reference"] is None
    assert ours["arousal"]["mean"] > reference["arousal"]["mean"] and ours["arousal"]["significant"]
    subsets = split_into_subsets(80, 4, 0)
    expected = np.mean([score(good[0].prediction[s], labels[s], ("arousal", "valence"))["arousal"] for s in subsets])
    per_run0 = compare_models({"cnn_regressor": bad[:1], "deepemocluster": good[:1]}, "cnn_regressor")
    assert per_run0["models"]["deepemocluster"]["ccc"]["arousal"]["mean"] == pytest.approx(expected)
    # unpaired when the run counts differ; the same model against itself is not significant
    welch = compare_models({"cnn_regressor": bad[:2], "deepemocluster": good}, "cnn_regressor")
    assert welch["models"]["deepemocluster"]["ccc"]["valence"]["p_vs_reference"] < 0.05
    same = compare_models({"cnn_regressor": good, "copy": good}, "cnn_regressor")
    assert same["models"]["copy"]["ccc"]["arousal"] | {"mean": 0, "std": 0} == {
        "mean": 0, "std": 0, "n": 12, "p_vs_reference": 1.0, "significant": False, "test": "paired, 3 run(s) x 4 subsets"}
    assert "deepemocluster" in format_comparison(table) and "*" in format_comparison(table)
    with pytest.raises(ValueError, match="utterances differ"):
        compare_models({"cnn_regressor": bad, "x": [_predictions(ids[:40], labels[:40], 0.5, 0)]}, "cnn_regressor")
    with pytest.raises(ValueError, match="reference"):
        compare_models({"x": good}, "cnn_regressor")


def test_a_point_with_fewer_seeds_is_paired_with_the_reference_on_the_seeds_they_share():
    """A control of 3 seeds against a reference of 5: paired by seed and subset on seeds 0-2 (the
    control's runs listed out of order), checked against scipy on CCCs computed here; no common seed:
    Welch's test on all values."""
    from scipy import stats

    rng = np.random.default_rng(1)
    ids = [f"u{i:03d}" for i in range(80)]
    labels = rng.uniform(1, 7, (80, 2))
    reference = [_predictions(ids, labels, 1.0 + 0.3 * seed, seed) for seed in range(5)]
    control = [_predictions(ids, labels, 0.9 + 0.3 * seed, 20 + seed) for seed in (2, 0, 1)]
    runs = {"reference": reference, "control": control}
    table = compare_models(runs, "reference", k=4, seeds={"reference": range(5), "control": [2, 0, 1]})

    subsets = split_into_subsets(80, 4, 0)
    ccc = {name: [[score(run.prediction[s], labels[s], ("arousal", "valence"))["valence"] for s in subsets]
                  for run in group] for name, group in runs.items()}
    row = table["models"]["control"]["ccc"]["valence"]
    expected = stats.ttest_rel(np.concatenate([ccc["control"][1], ccc["control"][2], ccc["control"][0]]),
                               np.concatenate(ccc["reference"][:3])).pvalue
    assert row["p_vs_reference"] == pytest.approx(expected) and row["test"] == "paired, 3 run(s) x 4 subsets"
    assert row["mean"] == pytest.approx(np.mean(ccc["control"])) and row["n"] == 12
    assert table["models"]["reference"]["ccc"]["valence"]["n"] == 20
    assert table["models"]["control"]["seeds"] == [2, 0, 1]

    apart = compare_models(runs, "reference", k=4, seeds={"reference": range(5), "control": [5, 6, 7]})
    welch = stats.ttest_ind(np.concatenate(ccc["control"]), np.concatenate(ccc["reference"]), equal_var=False).pvalue
    assert apart["models"]["control"]["ccc"]["valence"]["p_vs_reference"] == pytest.approx(welch)
    assert apart["models"]["control"]["ccc"]["valence"]["test"] == "Welch"
    with pytest.raises(ValueError, match=r"control: seeds \[0, 0, 1\] do not name its 3 runs"):
        compare_models(runs, "reference", seeds={"reference": range(5), "control": [0, 0, 1]})


def test_recheck_script_recomputes_a_sweeps_means_and_paired_p_as_compare_models_does(tmp_path):
    """scripts/recheck_table.py, RESULTS's second path (numpy CCC, scipy test), reads predictions from
    trial records as the sweep writes them and prints what compare_models puts in the table: the point's means and
    its paired p on the seeds both points have (the reference has 3 more, and the rows in another order)."""
    rng = np.random.default_rng(2)
    ids = [f"u{i:03d}" for i in range(80)]
    labels = rng.uniform(1, 7, (80, 2))
    runs = {"cnn_regressor": [_predictions(ids, labels, 1.5, seed) for seed in range(5)],
            "deepemocluster": [_predictions(ids, labels, 1.2, 10 + seed) for seed in range(2)]}
    for point, group in runs.items():
        for seed, run in enumerate(group):
            order = rng.permutation(80)
            saved = {"attributes": list(run.attributes), "ids": [ids[i] for i in order],
                     "labels": labels[order].tolist(), "prediction": run.prediction[order].tolist()}
            (tmp_path / f"sweep-{point}-seed{seed}.json").write_text(json.dumps({"predictions": {"test": saved}}))
    table = compare_models(runs, "cnn_regressor", seeds={"cnn_regressor": range(5), "deepemocluster": range(2)})
    printed = subprocess.run([sys.executable, str(REPO / "scripts" / "recheck_table.py"), str(tmp_path),
                              "cnn_regressor", "deepemocluster"], capture_output=True, text=True, check=True).stdout
    assert "seeds [0, 1] x 4 subsets" in printed, printed
    for attribute in ("arousal", "valence"):
        row = table["models"]["deepemocluster"]["ccc"][attribute]
        found = re.search(rf"{attribute}: (\S+) vs \S+, paired p = (\S+)", printed)
        assert found, printed
        assert float(found.group(1)) == pytest.approx(row["mean"], abs=1e-4)
        assert float(found.group(2)) == pytest.approx(row["p_vs_reference"], rel=1e-2)


def test_paper_table_job_scores_runs_and_tests_them_against_the_reference(dataset, bundle_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("paper_table_job", REPO / "jobs" / "paper_table.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    torch.manual_seed(1)
    other = str(tmp_path / "other")
    save_bundle(other, build_model("cnn_regressor", ModelConfig()), "cnn_regressor", ModelConfig(),
                dataset.normalizer(), load_bundle(bundle_dir).label_scaler)
    output = tmp_path / "table.json"
    argv = ["--data", dataset.location, "--model", f"dec={bundle_dir}", "--model", f"dec={bundle_dir}",
            "--model", f"cnn={other}", "--model", f"cnn={other}", "--reference", "cnn", "--subsets", "2",
            "--json", str(output)]
    assert job.main(argv) == 0

    table = json.loads(output.read_text())
    dec = table["models"]["dec"]["ccc"]["arousal"]
    assert table["models"]["dec"]["runs"] == 2 and dec["n"] == 4 and 0 <= dec["p_vs_reference"] <= 1
    test = predict_split(load_bundle(bundle_dir), dataset, "test")
    order = sorted(test.ids)
    halves = [[test.ids.index(order[i]) for i in part] for part in split_into_subsets(len(order), 2, 0)]
    expected = np.mean([score(test.prediction[h], test.labels[h], ATTRS)["arousal"] for h in halves])
    assert dec["mean"] == pytest.approx(expected, abs=1e-6)
    assert "dec" in capsys.readouterr().out
    assert job.main([*argv[:-4], "--reference", "transformer"]) == 2
    assert "--reference 'transformer' names no --model" in capsys.readouterr().err
