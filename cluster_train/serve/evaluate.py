"""Sentence-level prediction and CCC scoring of a model bundle, and the paper's statistics.

A sentence's prediction is the mean of its C chunk predictions (REFERENCE "Features"; the chunks cut
from its frames as the model's bundle says, `Bundle.chunks`), mapped back
to the raw 1-7 label scale; CCC comes from `losses.ccc`, the one implementation. The paper splits the
test set at random into 4 subsets and trains 5 seeds: 20 CCCs per model and attribute, compared with
a two-tailed t-test (p < 0.05).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch
from torch import nn

from cluster_train.data.labels import LabelScaler, label_matrix
from cluster_train.model.losses import ccc, sentence_mean
from cluster_train.serve.bundle import Bundle
from data_prep.config import ChunkConfig
from data_prep.dataset import PreparedDataset
from data_prep.frames import FrameFormat
from data_prep.manifest import ATTRIBUTES
from data_prep.stats import Normalizer


class EvaluationError(ValueError):
    """A split or a dataset that cannot be evaluated with this model."""


@dataclass
class SplitPredictions:
    ids: list[str]
    prediction: np.ndarray  # (N, A), raw label scale
    labels: np.ndarray  # (N, A), NaN where unlabelled
    attributes: tuple[str, ...]


def _parts(
    source: Bundle | nn.Module, normalizer: Normalizer | None, scaler: LabelScaler | None, chunks: ChunkConfig | None,
    frames: FrameFormat | None,
) -> tuple[nn.Module, Normalizer, LabelScaler, ChunkConfig, FrameFormat]:
    if isinstance(source, Bundle):
        return (source.model, normalizer or source.normalizer, scaler or source.label_scaler, chunks or source.chunks,
                frames or source.frame_format)
    if normalizer is None or scaler is None or chunks is None or frames is None:
        raise ValueError("predict_table with a bare model needs its normalizer, label_scaler, chunks and the "
                         "table's frame format (frames=)")
    return source, normalizer, scaler, chunks, frames


def _chunk_batches(table: pa.Table, batch_size: int, frames: FrameFormat, chunks: ChunkConfig) -> Iterator[np.ndarray]:
    for batch in table.select(["frames"]).to_batches(max_chunksize=batch_size):
        if batch.num_rows:
            yield frames.chunks_of(batch.column(0), chunks)  # (B, C, frames, mels), storage dtype


def predict_table(
    source: Bundle | nn.Module,
    table: pa.Table,
    batch_size: int = 64,
    normalizer: Normalizer | None = None,
    label_scaler: LabelScaler | None = None,
    chunks: ChunkConfig | None = None,
    frames: FrameFormat | None = None,
) -> np.ndarray:
    """(N, A) float64 sentence predictions on the raw label scale for the rows of `table`: its
    `frames` column (`frames`: how it holds them; a prepared dataset's `frame_format`, by default the
    bundle's own, which decoded audio has: `predict.frames_table`).

    `source`: a Bundle, or a model with its `normalizer`, `label_scaler`, `chunks` and `frames`. The
    model runs in eval mode on its own device (a model in training mode is put back in it afterwards).
    """
    model, normalizer, scaler, chunking, frames = _parts(source, normalizer, label_scaler, chunks, frames)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    try:
        with torch.inference_mode():
            for batch in _chunk_batches(table, batch_size, frames, chunking):
                x = torch.tensor(batch, device=device).flatten(0, 1)  # (B * C, frames, mels)
                z = sentence_mean(model(normalizer.torch(x))["prediction"], chunking.num_chunks)
                outputs.append(scaler.from_z(z.double()).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(outputs) if outputs else np.empty((0, len(scaler.attributes)))


def score(
    pred: np.ndarray, table_or_labels: pa.Table | np.ndarray, attributes: Sequence[str] | None = None
) -> dict[str, float]:
    """CCC per attribute of predictions (N, A) against the labels; unlabelled rows left out.

    `attributes` name pred's columns (default: arousal, dominance, valence); an attribute with no
    label gives NaN.
    """
    attributes = tuple(attributes or ATTRIBUTES)
    if isinstance(table_or_labels, pa.Table):
        labels = label_matrix(table_or_labels, attributes)
    else:
        labels = np.asarray(table_or_labels, dtype=np.float64).reshape(len(table_or_labels), -1)
    pred = np.asarray(pred, dtype=np.float64).reshape(len(labels), -1)
    if pred.shape[1] != len(attributes):
        raise ValueError(f"pred has {pred.shape[1]} columns for {len(attributes)} attributes {attributes}")
    values = ccc(torch.from_numpy(pred), torch.as_tensor(labels, dtype=torch.float64))
    return {name: float(v) for name, v in zip(attributes, values.reshape(-1))}


def predict_split(bundle: Bundle, dataset: PreparedDataset, split: str, batch_size: int = 64) -> SplitPredictions:
    """Predictions for one split, streamed shard by shard, `batch_size` rows of the split at a time."""
    known = {name: n for name, n in dataset.info["counts"]["utterances"].items() if n}
    if split not in known:
        raise EvaluationError(f"{dataset.location}: no utterances in split {split!r}; it has {', '.join(known)}")
    n_mels = dataset.settings["features"]["n_mels"]
    if n_mels != bundle.model_config.n_mels:
        raise EvaluationError(f"{dataset.location}: frames of {n_mels} mel bands, the model takes "
                              f"{bundle.model_config.n_mels}")
    attributes = bundle.label_scaler.attributes
    ids, preds, labels = [], [], []
    for shard in dataset.info["shards"]:
        part = pads.dataset(dataset.folder.path(shard["file"]), format="parquet", filesystem=dataset.folder.fs)
        columns, where = ["id", *attributes, "frames"], pads.field("split") == split
        for batch in part.to_batches(columns=columns, filter=where, batch_size=batch_size):
            table = pa.Table.from_batches([batch])
            ids.extend(table["id"].to_pylist())
            preds.append(predict_table(bundle, table, batch_size, frames=dataset.frame_format))
            labels.append(label_matrix(table, attributes))
    return SplitPredictions(ids, np.concatenate(preds), np.concatenate(labels), attributes)


def evaluate_split(bundle: Bundle, dataset: PreparedDataset, split: str, batch_size: int = 64) -> dict:
    """{"split", "utterances", "labelled": {attribute: n}, "ccc": {attribute: CCC}} for one split."""
    result = predict_split(bundle, dataset, split, batch_size)
    labelled = (~np.isnan(result.labels)).sum(axis=0)
    return {
        "split": split,
        "utterances": len(result.ids),
        "labelled": {name: int(n) for name, n in zip(result.attributes, labelled)},
        "ccc": score(result.prediction, result.labels, result.attributes),
    }


def split_into_subsets(n: int, k: int = 4, seed: int = 0) -> list[np.ndarray]:
    """A random partition of range(n) into k disjoint index sets of equal size (+-1 when k does not divide n)."""
    if k < 1 or n < k:
        raise ValueError(f"cannot split {n} items into {k} non-empty subsets")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, k)]


def subset_scores(result: SplitPredictions, subsets: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """CCC per attribute on each subset: {attribute: (k,)}; one model-seed's share of the 20 results."""
    rows = [score(result.prediction[s], result.labels[s], result.attributes) for s in subsets]
    return {name: np.array([row[name] for row in rows]) for name in result.attributes}


def _samples(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1 or len(a) < 2 or len(b) < 2:
        raise ValueError(f"t-tests need two 1-D samples of at least 2 values, got shapes {a.shape}, {b.shape}")
    return a, b


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-tailed p-value of a paired t-test: result i of a and of b share subset and seed."""
    a, b = _samples(a, b)
    if len(a) != len(b):
        raise ValueError(f"a paired t-test needs samples of one length, got {len(a)} and {len(b)}")
    from scipy import stats  # imported here: 2 s of start-up a job that scores no statistics saves

    return float(stats.ttest_rel(a, b).pvalue)


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-tailed p-value of Welch's t-test (unequal variances, unpaired samples)."""
    a, b = _samples(a, b)
    from scipy import stats

    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def compare_models(
    runs: dict[str, Sequence[SplitPredictions]], reference: str, k: int = 4, seed: int = 0, alpha: float = 0.05,
    seeds: dict[str, Sequence[int]] | None = None,
) -> dict:
    """The paper's table: each model's CCC on k random subsets of the split for each of its runs (seeds),
    mean and standard deviation of those k x runs values per attribute, and a two-tailed t-test against
    `reference`. With `seeds` (model -> the training seed of each run) the test is paired by subset
    and seed over the seeds both models have (runs of one seed share its label choice), Welch's where
    they share none; without, paired when both have the same number of runs, Welch's otherwise.

    Every run must cover the same utterances; all share one partition into subsets, by utterance id.
    """
    if reference not in runs:
        raise ValueError(f"reference model {reference!r} is not among {sorted(runs)}")
    for model, model_seeds in (seeds or {}).items():
        if len(model_seeds) != len(runs[model]) or len(set(model_seeds)) != len(model_seeds):
            raise ValueError(f"{model}: seeds {list(model_seeds)} do not name its {len(runs[model])} runs once each")
    first = next(iter(runs.values()))[0]
    order = sorted(first.ids)
    subsets_of_sorted = split_into_subsets(len(order), k, seed)
    per_run: dict[str, list[dict[str, np.ndarray]]] = {}
    for model, predictions in runs.items():
        per_run[model] = []
        for run, result in enumerate(predictions):
            if sorted(result.ids) != order:
                raise ValueError(f"{model} run {run}: its utterances differ from those of the other runs")
            position = {utterance: i for i, utterance in enumerate(result.ids)}
            subsets = [np.array([position[order[i]] for i in subset]) for subset in subsets_of_sorted]
            per_run[model].append(subset_scores(result, subsets))
    table: dict = {"reference": reference, "subsets": k, "alpha": alpha, "models": {}}
    for model, scores in per_run.items():
        pairs = _paired_runs(model, reference, runs, seeds)
        rows = {}
        for attribute in first.attributes:
            sample = np.concatenate([run[attribute] for run in scores])
            row = {"mean": float(sample.mean()), "std": float(sample.std(ddof=1)) if len(sample) > 1 else 0.0,
                   "n": int(len(sample)), "p_vs_reference": None, "significant": None, "test": None}
            if pairs:  # the mean above is over every run; the test compares paired runs only
                tested = np.concatenate([scores[i][attribute] for i, _ in pairs])
                against = np.concatenate([per_run[reference][j][attribute] for _, j in pairs])
            else:
                tested, against = sample, np.concatenate([run[attribute] for run in per_run[reference]])
            if model != reference and len(tested) >= 2 and len(against) >= 2:
                p = (paired_t_test if pairs else welch_t_test)(tested, against)
                row["p_vs_reference"] = 1.0 if np.isnan(p) else p  # NaN: the samples do not differ at all
                row["significant"] = bool(row["p_vs_reference"] < alpha)
                row["test"] = f"paired, {len(pairs)} run(s) x {k} subsets" if pairs else "Welch"
            rows[attribute] = row
        table["models"][model] = {"runs": len(runs[model]), "ccc": rows}
        if seeds is not None:
            table["models"][model]["seeds"] = [int(s) for s in seeds[model]]
    return table


def _paired_runs(model: str, reference: str, runs: dict, seeds: dict | None) -> list[tuple[int, int]]:
    """(run of model, run of reference) pairs a paired test compares; [] for Welch's test."""
    if seeds is None:
        n = len(runs[model])
        return [(i, i) for i in range(n)] if n == len(runs[reference]) else []
    of_reference = {s: j for j, s in enumerate(seeds[reference])}
    return [(i, of_reference[s]) for i, s in enumerate(seeds[model]) if s in of_reference]


def format_comparison(table: dict) -> str:
    """The comparison as text: mean CCC per attribute, * where it differs from the reference (p < alpha)."""
    models = table["models"]
    attributes = list(next(iter(models.values()))["ccc"])
    lines = [f"{'model':<18}{'runs':>5}" + "".join(f"{a:>13}" for a in attributes)]
    for model, entry in models.items():
        cells = []
        for attribute in attributes:
            row = entry["ccc"][attribute]
            cells.append(f"{row['mean']:>12.4f}{'*' if row['significant'] else ' '}")
        lines.append(f"{model:<18}{entry['runs']:>5}" + "".join(cells))
    lines.append(f"* differs from {table['reference']} (two-tailed t-test, p < {table['alpha']}); "
                 f"{table['subsets']} random subsets per run")
    return "\n".join(lines)
