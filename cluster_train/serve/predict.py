"""Arousal / dominance / valence from raw audio with a model bundle: a batch job on Ray Data, or one file.

Batch (`run_prediction`):

    input (folder, .txt listing, manifest CSV, ...) -> manifest (data_prep.importers)
      -> read, decode, mel frames (data_prep.shards.load_frames: prep's own code)
      -> Ray Data actor pool: the model, batched; chunks cut as in training (the bundle's chunk
         settings, data_prep.chunking.cut_chunks); sentence = mean of its chunk predictions on the
         raw label scale (evaluation.predict_table), clipped to the range of the training labels
         (the bundle's; `raw=True` keeps the model's values)
      -> one Parquet or CSV file (by the output's extension): id, audio, duration, one column per
         attribute, sorted by id; and `<name>.rejects.<ext>` beside it: id, audio, reason of every
         file that gave no prediction (unreadable, empty, silent, too short, ...).

On a cluster with GPUs, Ray Data tasks decode on the CPUs and each model actor holds one GPU. On
CPUs only, the model costs far more than the decoding (one thread here: 930 ms against 15 ms per
RAVDESS file, 11 chunks of 0.3 GFLOP each), so each actor decodes its own files: one actor per
`cpus_per_actor` CPUs, and no frames cross the object store.

One file (`predict_file`): the same frames, chunks and model in this process, no Ray.

The bundle must carry the feature settings of the dataset it was trained on (`Bundle.features`):
the chunks are computed with them, and its normaliser and label scaler are applied as in training.
"""

from __future__ import annotations

import logging
import math
import posixpath
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from cluster_train.serve.bundle import (
    Bundle,
    BundleError,
    bundle_to_bytes,
    is_mlflow_uri,
    resolve_bundle,
)
from cluster_train.serve.evaluate import DEVICES, ActorPool, ModelActor, predict_table
from data_prep.config import require, require_choice
from data_prep.frames import FrameFormat
from data_prep.importers import SourceSpec, build_manifest
from data_prep.manifest import Utterance
from data_prep.shards import ChunkRecipe, reject_reason
from data_prep.storage import open_filesystem

OUTPUT_FORMATS = {".parquet": "parquet", ".csv": "csv"}
INPUT_KINDS = ("folder", "csv", "ravdess", "msp_podcast")
REGISTERED_ARTIFACT = "best_model"  # where the training job logs the best model of a run
log = logging.getLogger(__name__)


class PredictError(ValueError):
    """A model or a request that prediction cannot serve; the message names what and why."""


@dataclass
class PredictConfig:
    model: str  # bundle directory, runs:/<run_id>/<name> or models:/<name>/<version>
    input: str  # folder of audio, .txt listing, or manifest CSV (id, audio, split[, duration, ...]); path or URI
    output: str  # .parquet or .csv path or URI; the rejects go beside it
    input_kind: str | None = None  # folder | csv | ravdess | msp_podcast; None: csv for *.csv, else folder
    batch_size: int = 64  # sentences per forward pass
    files_per_task: int = 16  # files each decoding task takes at a time
    cpus_per_task: float = 1.0  # CPUs each decoding task reserves
    device: str = "auto"  # auto: GPU actors when the cluster has GPUs; cpu; gpu
    actors: int | None = None  # most model replicas; None: one per GPU, else one per cpus_per_actor CPUs
    min_actors: int = 1  # model replicas at the start; the pool grows to `actors` while files wait
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 1.0  # of one GPU, for GPU actors
    decode_in_actors: bool | None = None  # None: on CPU actors, not on GPU actors (there tasks decode)
    raw: bool = False  # the model's values, not clipped to the range of the training labels

    def __post_init__(self) -> None:
        require(output_format(self.output) is not None, "output",
                f"{self.output!r} must end in {' or '.join(OUTPUT_FORMATS)}")
        require(self.input_kind is None or self.input_kind in INPUT_KINDS, "input_kind",
                f"{self.input_kind!r} is not one of {', '.join(INPUT_KINDS)}")
        require_choice(self.device, "device", DEVICES)
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(self.files_per_task >= 1, "files_per_task", "must be at least 1")
        require(self.cpus_per_task > 0, "cpus_per_task", "must be positive")
        require(self.actors is None or self.actors >= 1, "actors", "must be at least 1")
        require(self.actors is None or self.actors >= self.min_actors, "actors",
                f"{self.actors} is below min_actors ({self.min_actors})")
        self.pool()  # its own checks: min_actors, cpus_per_actor, gpus_per_actor

    def pool(self) -> ActorPool:
        return ActorPool(device=self.device, min_actors=self.min_actors, max_actors=self.actors,
                         cpus_per_actor=self.cpus_per_actor, gpus_per_actor=self.gpus_per_actor)


@dataclass
class PredictSummary:
    output: str
    rejects: str
    predicted: int
    rejected_by_kind: dict[str, int]
    audio_seconds: float
    device: str
    actors: int
    wall_seconds: float

    def text(self) -> str:
        rejected = sum(self.rejected_by_kind.values())
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.rejected_by_kind.items()))
        return "\n".join([
            f"predict: {self.predicted} files ({self.audio_seconds / 3600:.2f} audio-hours) -> {self.output}",
            f"predict: rejected {rejected}" + (f" ({kinds})" if rejected else "") + f" -> {self.rejects}",
            f"predict: up to {self.actors} {self.device} model actor(s); {self.wall_seconds:.1f} s",
        ])


# --- the model and its chunks -------------------------------------------------------------------


def load_model(source: str, map_location: str | torch.device = "cpu", tracking_uri: str | None = None) -> Bundle:
    """A bundle directory, or an MLflow URI read from `tracking_uri` ($MLFLOW_TRACKING_URI, else ./mlflow.db)."""
    if not is_mlflow_uri(source):
        return resolve_bundle(source, map_location)
    from cluster_train.tracking import TrackingConfig, mlflow_globals

    with mlflow_globals(tracking_uri or TrackingConfig().resolved_uri()):
        return resolve_bundle(source, map_location)


def chunk_recipe(bundle: Bundle) -> ChunkRecipe:
    """How the bundle's model wants audio cut into chunks; PredictError for a bundle that does not say."""
    if bundle.features is None:
        raise PredictError(
            f"model bundle {bundle.source}: it has no feature settings (saved before bundles kept them), so "
            "the sample rate, mel and chunk settings of its inputs are unknown and raw audio cannot be "
            "predicted. Save it again with save_bundle(..., features=PreparedDataset(<its dataset>).settings), "
            "or score prepared data with jobs/evaluate.py"
        )
    try:
        return ChunkRecipe.from_settings(bundle.features)
    except ValueError as error:
        raise PredictError(f"model bundle {bundle.source}: unusable feature settings: {error}") from error


def frames_table(frames: list[np.ndarray], frame_format: FrameFormat) -> pa.Table:
    """Decoded files' (T_i, mels) frames -> the one-column table `evaluation.predict_table` reads."""
    return pa.table({"frames": frame_format.column(frames)})


# A file longer than this many times what its chunks cover gets a warning when scored as one number.
LONG_AUDIO_FACTOR = 2.0


def covered_seconds(recipe: ChunkRecipe) -> float:
    """Audio the C chunks of one prediction cover at most."""
    chunks, features = recipe.chunks, recipe.features
    return chunks.num_chunks * chunks.chunk_frames * features.hop_length / features.sample_rate


def long_audio_warning(name: str, duration: float, covered: float) -> str:
    return (f"{name}: {duration:.1f} s of audio scored as one number from chunks covering {covered:.1f} s "
            f"({100 * covered / duration:.0f}%); score windows with window_seconds for the whole file")


def predict_file(bundle: Bundle, location: str, raw: bool = False) -> dict[str, float]:
    """{attribute: value} on the label scale for one audio file, clipped to the range of the training
    labels unless `raw`; AudioRejected names a bad file. A file much longer than its chunks cover
    (`LONG_AUDIO_FACTOR`) warns: its one number stands for audio the chunks skip."""
    recipe = chunk_recipe(bundle)
    audio = recipe.load_frames(location)
    if audio.duration > LONG_AUDIO_FACTOR * covered_seconds(recipe):
        warnings.warn(long_audio_warning(location, audio.duration, covered_seconds(recipe)), RuntimeWarning,
                      stacklevel=2)
    prediction = predict_table(bundle, frames_table([audio.stored], recipe.frame_format))[0]
    prediction = prediction if raw else bundle.label_scaler.clip(prediction)
    return {name: float(value) for name, value in zip(bundle.label_scaler.attributes, prediction)}


# --- batch on Ray Data --------------------------------------------------------------------------


def output_format(location: str) -> str | None:
    return OUTPUT_FORMATS.get(posixpath.splitext(location.lower())[1])


def rejects_location(output: str) -> str:
    """`preds.parquet` -> `preds.rejects.parquet`, in the same folder or prefix."""
    stem, extension = posixpath.splitext(output)
    return f"{stem}.rejects{extension}"


def read_inputs(location: str, kind: str | None = None) -> list[Utterance]:
    """The files to predict: a folder, a .txt listing or a manifest CSV (`kind` None guesses by name)."""
    kind = kind or ("csv" if location.lower().endswith(".csv") else "folder")
    return build_manifest([SourceSpec(kind, location)])


def decode_batch(batch: dict[str, np.ndarray], recipe: ChunkRecipe, threads: int) -> dict[str, np.ndarray]:
    """Ray Data task: files -> mel frames; a file that fails keeps one zero frame and gets its reason."""
    torch.set_num_threads(threads)
    count = len(batch["audio"])
    frames = np.empty(count, dtype=object)
    durations = np.full(count, np.nan)
    reasons = np.full(count, "", dtype=object)
    for i, (location, expected) in enumerate(zip(batch["audio"], batch["duration"])):
        frames[i] = np.zeros((1, recipe.features.n_mels), dtype=recipe.storage_dtype)
        try:
            audio = recipe.load_frames(str(location), None if math.isnan(expected) else float(expected))
        except Exception as error:  # noqa: BLE001 - one bad file must never stop the job
            reasons[i] = reject_reason(error)
            continue
        frames[i], durations[i] = audio.stored, audio.duration
    return {"id": batch["id"], "audio": batch["audio"], "duration": durations, "reason": reasons, "frames": frames}


class ChunkPredictor(ModelActor):
    """Ray Data actor: one copy of the model; a batch of decoded files -> their sentence predictions.
    With a `recipe` the actor decodes the files itself."""

    def __init__(self, bundle: bytes, source: str, use_gpu: bool, threads: int, recipe: ChunkRecipe | None = None,
                 raw: bool = False):
        super().__init__(bundle, source, use_gpu, threads)
        self.recipe, self.raw = recipe, raw

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.recipe is not None:
            batch = decode_batch(batch, self.recipe, self.threads)
        attributes = self.bundle.label_scaler.attributes
        good = batch["reason"] == ""
        prediction = np.full((len(good), len(attributes)), np.nan)
        if good.any():
            table = frames_table(list(batch["frames"][good]), self.bundle.frame_format)
            values = predict_table(self.bundle, table, batch_size=table.num_rows)
            prediction[good] = values if self.raw else self.bundle.label_scaler.clip(values)
        out = {key: batch[key] for key in ("id", "audio", "duration", "reason")}
        return out | {name: prediction[:, i] for i, name in enumerate(attributes)}


def _actor_pool(config: PredictConfig) -> tuple[bool, bool, int, int]:
    """(a GPU per actor, actors decode their own files, least actors, most actors) for this cluster."""
    pool = config.pool()
    decode_in_actors = not pool.gpu_actors() if config.decode_in_actors is None else config.decode_in_actors
    # All CPUs to CPU actors when they decode too; else half, the other half for the decoding tasks.
    use_gpu, least, most = pool.layout(cpu_share=1.0 if decode_in_actors else 0.5)
    return use_gpu, decode_in_actors, least, most


def run_prediction(config: PredictConfig) -> PredictSummary:
    """Predict every file of `config.input`; writes the output and the rejects beside it."""
    import ray

    started = time.perf_counter()
    manifest = read_inputs(config.input, config.input_kind)  # a listing mistake stops here, before Ray
    bundle = load_model(config.model)
    recipe = chunk_recipe(bundle)  # an old bundle without feature settings stops here too
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    ray.data.DataContext.get_current().print_on_execution_start = False
    use_gpu, decode_in_actors, least, actors = _actor_pool(config)
    items = [{"id": u.id, "audio": u.audio, "duration": math.nan if u.duration is None else u.duration}
             for u in manifest]
    dataset = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / config.files_per_task))
    actor_kwargs = {"bundle": bundle_to_bytes(bundle), "source": bundle.source, "use_gpu": use_gpu,
                    "threads": config.pool().threads, "raw": config.raw}
    if not decode_in_actors:
        dataset = dataset.map_batches(
            decode_batch, batch_size=config.files_per_task, udf_modifying_row_count=False,
            fn_kwargs={"recipe": recipe, "threads": max(1, int(config.cpus_per_task))}, num_cpus=config.cpus_per_task,
        )
    else:
        actor_kwargs["recipe"] = recipe
    predicted = dataset.map_batches(
        ChunkPredictor, batch_size=config.batch_size, fn_constructor_kwargs=actor_kwargs,
        udf_modifying_row_count=False, **config.pool().map_options(use_gpu, least, actors),
    )
    parts = list(predicted.iter_batches(batch_format="pyarrow", batch_size=None))
    rows = pa.concat_tables(parts) if parts else None
    attributes = list(bundle.label_scaler.attributes)
    results, rejects = split_results(rows, attributes)
    write_table(results, config.output)
    write_table(rejects, rejects_location(config.output))
    kinds = Counter(reason.split(":", 1)[0] for reason in rejects["reason"].to_pylist())
    return PredictSummary(config.output, rejects_location(config.output), results.num_rows, dict(kinds),
                          float(pc.sum(results["duration"]).as_py() or 0.0), "GPU" if use_gpu else "CPU", actors,
                          time.perf_counter() - started)


def split_results(rows: pa.Table | None, attributes: list[str]) -> tuple[pa.Table, pa.Table]:
    """The actor pool's rows -> (predictions, rejects), each sorted by id."""
    prediction_schema = pa.schema([("id", pa.string()), ("audio", pa.string()), ("duration", pa.float64()),
                                   *((name, pa.float64()) for name in attributes)])
    reject_schema = pa.schema([("id", pa.string()), ("audio", pa.string()), ("reason", pa.string())])
    if rows is None:
        return prediction_schema.empty_table(), reject_schema.empty_table()
    rows = rows.sort_by("id")
    good = pc.equal(rows["reason"], "")
    results = rows.filter(good).select(prediction_schema.names).cast(prediction_schema)
    rejects = rows.filter(pc.invert(good)).select(reject_schema.names).cast(reject_schema)
    return results, rejects


def write_table(table: pa.Table, location: str) -> None:
    """Parquet or CSV by the extension, to a path or URI; written under a temporary name, then moved."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, path = open_filesystem(location)
    folder, name = posixpath.split(path)
    fs.create_dir(folder, recursive=True)
    temporary = f"{folder}/.tmp-{uuid.uuid4().hex}-{name}"
    if output_format(location) == "parquet":
        pq.write_table(table, temporary, filesystem=fs, compression="zstd")
    else:
        with fs.open_output_stream(temporary) as handle:
            pacsv.write_csv(table, handle)
    fs.move(temporary, path)


# --- the model registry -------------------------------------------------------------------------


def register_model(run_id: str, name: str, artifact: str = REGISTERED_ARTIFACT,
                   tracking_uri: str | None = None) -> str:
    """Register the bundle of `runs:/<run_id>/<artifact>` as a new version of `name`; its models:/ URI.

    The run's model is loaded first, so what gets registered is known to be a usable bundle.
    """
    import mlflow

    from cluster_train.tracking import TrackingConfig, mlflow_globals

    source = f"runs:/{run_id}/{artifact}"
    with mlflow_globals(tracking_uri or TrackingConfig().resolved_uri()):
        resolve_bundle(source)
        try:
            version = mlflow.register_model(source, name)
        except Exception as error:  # noqa: BLE001 - MlflowException and store errors alike
            raise BundleError(f"{source}: cannot register it as {name!r}: {error}") from error
    return f"models:/{name}/{version.version}"
