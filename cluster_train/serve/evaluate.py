"""Sentence-level prediction and CCC scoring of a model bundle, and the paper's statistics.

A sentence's prediction is the mean of its C chunk predictions (REFERENCE "Features"; the chunks cut
from its frames as the model's bundle says, `Bundle.chunks`), mapped back
to the raw 1-7 label scale; CCC comes from `losses.ccc`, the one implementation. The paper splits the
test set at random into 4 subsets and trains 5 seeds: 20 CCCs per model and attribute, compared with
a two-tailed t-test (p < 0.05).

Scoring runs in this process (`predict_split`), or on a Ray Data actor pool of model replicas
(`score_splits(..., on_ray=True)`, what `jobs/evaluate.py` and the training driver use on a
cluster): the splits' shards are read as Ray Data (`PreparedDataset.ray_dataset`; Ray Data may fuse
the reads into the actors), each actor predicts batches of rows, and only the per-utterance
predictions and labels come back to the driver, which computes the CCC and the statistics with the
same code as the in-process path (`summarize`). `ActorPool` sizes the pool for
prediction from raw audio too (`serve/predict.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch
from torch import nn

from cluster_train.data.labels import LabelScaler, label_matrix
from cluster_train.model.losses import ccc, sentence_mean
from cluster_train.serve.bundle import Bundle, bundle_from_bytes, bundle_to_bytes
from data_prep.config import ChunkConfig, require, require_choice
from data_prep.dataset import PreparedDataset
from data_prep.frames import FrameFormat
from data_prep.manifest import ATTRIBUTES
from data_prep.stats import Normalizer

DEVICES = ("auto", "cpu", "gpu")
log = logging.getLogger(__name__)


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


def check_split(bundle: Bundle, dataset: PreparedDataset, split: str) -> None:
    """EvaluationError unless the dataset has utterances in `split` and frames the model takes."""
    known = {name: n for name, n in dataset.info["counts"]["utterances"].items() if n}
    if split not in known:
        raise EvaluationError(f"{dataset.location}: no utterances in split {split!r}; it has {', '.join(known)}")
    n_mels = dataset.settings["features"]["n_mels"]
    if n_mels != bundle.model_config.n_mels:
        raise EvaluationError(f"{dataset.location}: frames of {n_mels} mel bands, the model takes "
                              f"{bundle.model_config.n_mels}")


def predict_split(bundle: Bundle, dataset: PreparedDataset, split: str, batch_size: int = 64) -> SplitPredictions:
    """Predictions for one split in this process, streamed shard by shard, `batch_size` rows of the
    split at a time; in the order of the dataset's shards and rows."""
    check_split(bundle, dataset, split)
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


def summarize(split: str, result: SplitPredictions) -> dict:
    """{"split", "utterances", "labelled": {attribute: n}, "ccc": {attribute: CCC}} of one split's predictions."""
    labelled = (~np.isnan(result.labels)).sum(axis=0)
    return {
        "split": split,
        "utterances": len(result.ids),
        "labelled": {name: int(n) for name, n in zip(result.attributes, labelled)},
        "ccc": score(result.prediction, result.labels, result.attributes),
    }


def evaluate_split(bundle: Bundle, dataset: PreparedDataset, split: str, batch_size: int = 64) -> dict:
    """`summarize` of one split scored in this process."""
    return summarize(split, predict_split(bundle, dataset, split, batch_size))


# --- on a Ray Data actor pool -------------------------------------------------------------------


@dataclass
class ActorPool:
    """A Ray Data actor pool of model replicas: `min_actors` at the start, more while work waits, up
    to `max_actors`. A maximum above what the cluster holds now lets an autoscaling cluster add nodes
    for the pool (Ray Data asks the autoscaler for the actors it wants). Each actor reserves
    `cpus_per_actor` CPUs (its torch threads: that number, at least 1) and, as a GPU actor,
    `gpus_per_actor` of a GPU."""

    device: str = "auto"  # auto: GPU actors when the cluster has GPUs; cpu; gpu
    min_actors: int = 1
    max_actors: int | None = None  # None: as many as the cluster's GPUs (or CPUs) hold now, at least min_actors
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 1.0

    def __post_init__(self) -> None:
        require_choice(self.device, "device", DEVICES)
        require(self.min_actors >= 1, "min_actors", "must be at least 1")
        require(self.max_actors is None or self.max_actors >= self.min_actors, "max_actors",
                f"{self.max_actors} is below min_actors ({self.min_actors})")
        require(self.cpus_per_actor >= 0, "cpus_per_actor", "must not be negative")
        require(0 < self.gpus_per_actor <= 1, "gpus_per_actor", "must be in (0, 1]: a fraction of one GPU")

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_actor))

    def gpu_actors(self) -> bool:
        """Whether the actors take GPUs: device gpu, or auto on a cluster that has GPUs now."""
        import ray

        return self.device == "gpu" or (self.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)

    def layout(self, cpu_share: float = 1.0) -> tuple[bool, int, int]:
        """(GPU actors, least actors, most actors) on the cluster Ray is connected to; `cpu_share`:
        the fraction of its CPUs the actors may take when `max_actors` is None."""
        import ray

        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        use_gpu = self.gpu_actors()
        if use_gpu and gpus == 0:
            log.warning("device=gpu but the cluster has no GPU now: the model actors wait for one (autoscaler)")
        if use_gpu:
            fits = int(gpus / self.gpus_per_actor)
        else:
            fits = int(resources.get("CPU", 1.0) * cpu_share / max(self.cpus_per_actor, 1.0))
        return use_gpu, self.min_actors, self.max_actors or max(self.min_actors, fits, 1)

    def map_options(self, use_gpu: bool, least: int, most: int) -> dict:
        """The `map_batches` arguments that place the actors."""
        import ray.data

        return {"compute": ray.data.ActorPoolStrategy(min_size=least, max_size=most),
                "num_cpus": self.cpus_per_actor, "num_gpus": self.gpus_per_actor if use_gpu else None}


class ModelActor:
    """Ray Data actor base: one copy of a bundle's model, on the actor's GPU when it has one.

    `bundle`: `bundle_to_bytes` output (a worker node may not see the driver's files or MLflow).
    """

    def __init__(self, bundle: bytes, source: str, use_gpu: bool, threads: int):
        torch.set_num_threads(threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.bundle = bundle_from_bytes(bundle, source, map_location=device)
        self.threads = threads


PREDICTED = "predicted_"  # the actors' output column of an attribute's prediction: predicted_<attribute>


class RowScorer(ModelActor):
    """Ray Data actor: a batch of a prepared dataset's rows (id, split, labels, frames in
    `frames`' format) -> the same rows without their frames, with the model's sentence predictions
    on the raw label scale (`predicted_<attribute>`)."""

    def __init__(self, bundle: bytes, source: str, use_gpu: bool, threads: int, frames: FrameFormat,
                 batch_size: int):
        super().__init__(bundle, source, use_gpu, threads)
        self.frames, self.batch_size = frames, batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        prediction = predict_table(self.bundle, batch, self.batch_size, frames=self.frames)
        batch = batch.drop_columns(["frames"])
        for i, name in enumerate(self.bundle.label_scaler.attributes):
            batch = batch.append_column(PREDICTED + name, pa.array(prediction[:, i], pa.float64()))
        return batch


def predict_splits_on_ray(bundle: Bundle, dataset: PreparedDataset, splits: Sequence[str],
                          pool: ActorPool | None = None, batch_size: int = 64,
                          read_cpus: float = 1.0) -> dict[str, SplitPredictions]:
    """Predictions for the splits on a Ray Data actor pool, one pass over the shards for all of
    them; each split's rows sorted by id. Ray must be initialised."""
    pool = pool or ActorPool()
    for split in splits:
        check_split(bundle, dataset, split)
    attributes = bundle.label_scaler.attributes
    use_gpu, least, most = pool.layout()
    rows = dataset.ray_dataset(splits=list(splits), columns=["id", "split", *attributes, "frames"],
                               read_cpus=read_cpus)
    actor = {"bundle": bundle_to_bytes(bundle), "source": bundle.source, "use_gpu": use_gpu,
             "threads": pool.threads, "frames": dataset.frame_format, "batch_size": batch_size}
    scored = rows.map_batches(RowScorer, batch_size=batch_size, batch_format="pyarrow",
                              fn_constructor_kwargs=actor, udf_modifying_row_count=False,
                              **pool.map_options(use_gpu, least, most))
    table = pa.concat_tables(scored.iter_batches(batch_format="pyarrow", batch_size=None))
    results = {}
    for split in splits:
        part = table.filter(pc.equal(table["split"], split)).sort_by("id")
        prediction = np.stack([part[PREDICTED + name].to_numpy() for name in attributes], axis=1)
        results[split] = SplitPredictions(part["id"].to_pylist(), prediction.astype(np.float64),
                                          label_matrix(part, attributes), attributes)
    return results


def score_splits(bundle: Bundle, dataset: PreparedDataset, splits: Sequence[str], on_ray: bool | None = None,
                 pool: ActorPool | None = None, batch_size: int = 64, read_cpus: float = 1.0) -> dict[str, dict]:
    """{split: `summarize` of its predictions} for each of `splits`, in their order.

    `on_ray`: True scores on a Ray Data actor pool (`pool`; Ray started or joined first when it is
    not initialised: `ray.init()`); False in this process (`evaluate_split`); None on the pool when
    Ray is initialised. Both give the same predictions to float32 rounding, and the same statistics.
    A split the dataset lacks is an EvaluationError before any of them is scored.
    """
    for split in splits:
        check_split(bundle, dataset, split)
    if on_ray is None:
        import ray

        on_ray = ray.is_initialized()
    if not on_ray:
        return {split: evaluate_split(bundle, dataset, split, batch_size) for split in splits}
    import ray.data

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    ray.data.DataContext.get_current().print_on_execution_start = False
    predicted = predict_splits_on_ray(bundle, dataset, splits, pool, batch_size, read_cpus)
    return {split: summarize(split, predicted[split]) for split in splits}


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
