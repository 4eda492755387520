"""Per-epoch cluster diagnostics from a label table (pure: no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from cluster_train.clustering.diagnostics import ClusterDiagnostics
from cluster_train.clustering.labelers import LabelTable
from cluster_train.data.batches import utterance_key

C = 3


def diagnostics() -> tuple[ClusterDiagnostics, np.ndarray]:
    ids = [f"utt{i}" for i in range(6)]
    keys = np.array([utterance_key(i, C) for i in ids], dtype=np.int64)
    order = np.argsort(keys)
    categories = np.array(["angry", "angry", "calm", "calm", None, "sad"], dtype=object)
    arousal = np.array([6.5, 6.0, 2.0, 2.5, np.nan, 3.0], dtype=np.float32)
    return ClusterDiagnostics(keys[order], categories[order], arousal[order], C), keys


def table(keys: np.ndarray, per_utterance: list[int]) -> LabelTable:
    chunk_keys = (keys[:, None] * C + np.arange(C)).ravel()
    return LabelTable.build(chunk_keys, np.repeat(per_utterance, C), C, num_clusters=3)


def test_diagnostics_against_categories_arousal_and_the_previous_epoch() -> None:
    diag, keys = diagnostics()
    metrics, figure = diag.epoch(table(keys, [0, 0, 1, 1, 2, 2]), np.array([6, 6, 6]))
    assert "cluster/nmi_previous" not in metrics  # no earlier epoch
    # clusters: {angry, angry}, {calm, calm}, {sad} (+ one utterance without a category)
    assert metrics["cluster/purity_category"] == pytest.approx(1.0)
    assert metrics["cluster/nmi_category"] == pytest.approx(1.0)
    assert metrics["cluster/arousal_mean_high"] == pytest.approx(6.25)  # cluster 0
    assert metrics["cluster/arousal_mean_low"] == pytest.approx(2.25)  # cluster 1
    assert metrics["cluster/size_entropy"] == pytest.approx(np.log(3))
    assert figure is not None and len(figure.axes[0].patches) > 0
    same, _ = diag.epoch(table(keys, [2, 2, 0, 0, 1, 1]), None)  # renamed clusters: no change
    assert same["cluster/nmi_previous"] == pytest.approx(1.0)
    mixed, _ = diag.epoch(table(keys, [0, 1, 0, 1, 0, 1]), None)
    assert mixed["cluster/nmi_previous"] < 0.5 and mixed["cluster/purity_category"] < 1.0
