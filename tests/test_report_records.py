"""A sweep's report from its trials' records alone, as a reader of docs/results/ has them: in another
checkout (the records name the paths of the machine that trained them), with no model, no MLflow store
and no prepared dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cluster_train.experiments.report import learning_curves, table_markdown, trained_trials, write_report
from cluster_train.experiments.sweep import load_sweep_config

REPO = Path(__file__).resolve().parent.parent
SWEEP = "ravdess-table2"


def test_committed_records_give_back_their_reports_table_and_curves(tmp_path):
    config = load_sweep_config(REPO / "configs/sweep/ravdess_table2.yaml")
    records = sorted((REPO / "docs/results" / SWEEP / "trials").glob("*.json"))
    trained, planned = trained_trials(config)
    assert planned == len(config.points) * len(config.seeds)
    assert sorted(item.trial.config.name for item in trained) == [f.stem for f in records]
    assert not any(item.has_model() for item in trained)  # trained on another machine: records only

    tables = json.loads((REPO / "docs/results" / SWEEP / "tables.json").read_text())
    markdown = table_markdown(tables, trained)
    assert "| cnn_regressor |" in markdown
    assert markdown in (REPO / "docs/results" / SWEEP / "report.md").read_text()

    assert learning_curves(trained, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_a_record_without_predictions_needs_the_data_and_says_so(tmp_path, monkeypatch):
    records = tmp_path / "trials"
    shutil.copytree(REPO / "docs/results" / SWEEP / "trials", records)
    stripped = records / "ravdess-table2-cnn_ae-seed0.json"
    record = json.loads(stripped.read_text())
    del record["predictions"]
    stripped.write_text(json.dumps(record))
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)  # a checkout with no outputs/ravdess_full/prepared
    config = load_sweep_config(REPO / "configs/sweep/ravdess_table2.yaml", [f"records={records}"])
    with pytest.raises(ValueError, match=r"trial ravdess-table2-cnn_ae-seed0: its record .* holds no test predictions"
                                         r".*not prepared here"):
        write_report(config, tmp_path / "report")
    assert not (tmp_path / "report" / "report.md").exists()
