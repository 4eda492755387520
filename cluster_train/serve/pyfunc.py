"""The MLflow model that takes audio: a pyfunc around the model bundle, and what logs it.

    model = mlflow.pyfunc.load_model("models:/emotion@champion")
    model.predict(pd.DataFrame({"audio": [open("a.wav", "rb").read()]}))      # file bytes
    model.predict(pd.DataFrame({"uri": ["s3://bucket/a.wav"]}))               # a path or URI
    model.predict(frame, params={"window_seconds": 10.0})                    # one row per 10 s window

Input: a DataFrame with an `audio` column (the bytes of any file libsndfile reads; base64 in JSON)
or a `uri` column (a path or URI the model's host can read), one of the two per row. Output: one row
per input (or per window): `input` (its row), `start` and `end` (seconds), then one column per
attribute on the 1-7 label scale, clipped to the range of the training labels unless `raw`. The
bundle's own chunking, normaliser and label scaler are applied (the same code as `jobs/predict.py`:
`predict.frames_table` -> `evaluate.predict_table`). A file that cannot be scored fails the request
with `AudioInputError` (an MlflowException: HTTP 400 in `mlflow models serve`) naming the row and why.

Logged (`log_audio_model`) as a "model from code": MLflow stores a three-line script that builds
`AudioEmotionModel`, not a pickle; the project's `cluster_train` and `data_prep` go in as code
paths, the bundle (weights-only `model.pt`) as the artifact `bundle` (`artifacts/model.pt`), with a
signature, an input example and pinned requirements (local versions such as `+cpu` dropped: pip
cannot install them from an index). The network alone (`log_network`, MLflow's pytorch flavour) is
saved as a torch.export program, not a pickle: mel chunks in, per-chunk predictions out.
"""

from __future__ import annotations

import io
import logging
import math
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from cluster_train.serve.bundle import BUNDLE_FILE, Bundle, load_bundle
from cluster_train.serve.evaluate import predict_table
from cluster_train.serve.predict import (LONG_AUDIO_FACTOR, chunk_recipe, covered_seconds, frames_table,
                                         long_audio_warning)
from data_prep.audio import AudioRejected, load_audio
from data_prep.shards import AudioFrames, mel_extractor, to_storage_dtype
from data_prep.storage import read_bytes

log = logging.getLogger(__name__)

BUNDLE_ARTIFACT = "bundle"  # the pyfunc's artifact key; the file is artifacts/model.pt
AUDIO_COLUMN, URI_COLUMN = "audio", "uri"
PARAM_DEFAULTS = {"raw": False, "window_seconds": 0.0}
# Distributions the model's code imports (cluster_train and data_prep, transitively), pinned to the
# versions installed where it is logged.
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pyarrow", "soundfile", "soxr", "librosa", "omegaconf",
                "PyYAML")
MODEL_SCRIPT = """\
import mlflow
from cluster_train.serve.pyfunc import AudioEmotionModel
mlflow.models.set_model(AudioEmotionModel())
"""


class AudioInputError(ValueError):
    """Audio that cannot be scored; `row` is its place in the request, `reason` why."""

    def __init__(self, row: int, name: str, reason: str):
        super().__init__(f"row {row} ({name}): {reason}")
        self.row, self.name, self.reason = row, name, reason


@dataclass
class Scored:
    """One prediction: of a whole file, or of one window of it."""

    input: int
    start: float
    end: float
    values: np.ndarray  # (A,) on the label scale


class AudioScorer:
    """A bundle that scores audio: bytes or a location -> frames -> the bundle's chunks -> A/D/V."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.recipe = chunk_recipe(bundle)  # PredictError for a bundle without feature settings
        self.attributes = tuple(bundle.label_scaler.attributes)
        self._mel = mel_extractor(self.recipe.features)

    @property
    def seconds_per_frame(self) -> float:
        return self.recipe.features.hop_length / self.recipe.features.sample_rate

    @property
    def covered_seconds(self) -> float:
        """Audio the C chunks of one prediction cover at most."""
        return covered_seconds(self.recipe)

    def frames(self, data: bytes, name: str) -> AudioFrames:
        """The bytes of one file -> its frames, as `data_prep.shards.load_frames` makes them from a
        path (that function reads the file itself); AudioRejected names a bad file."""
        features = self.recipe.features
        wave = load_audio(data, name, features.sample_rate)
        duration = len(wave) / features.sample_rate
        if duration < self.recipe.min_seconds:
            raise AudioRejected(f"too short: {duration:.3f} s is below min_seconds = {self.recipe.min_seconds} s")
        mel = self._mel(wave)
        largest = float(np.abs(mel).max())
        if largest > np.finfo(self.recipe.storage_dtype).max:
            raise AudioRejected(f"overflow: mel value {largest:.4g} exceeds {self.recipe.storage_dtype}")
        return AudioFrames(duration, mel, to_storage_dtype(mel, self.recipe.storage_dtype))

    def load(self, row: int, data: bytes | None = None, uri: str | None = None) -> AudioFrames:
        """Frames of one request row (bytes or a location); AudioInputError says which row and why."""
        name = uri or "uploaded audio"
        try:
            if data is None:
                if not uri:
                    raise AudioRejected("no audio: give the file's bytes (audio) or its location (uri)")
                try:
                    data = read_bytes(uri)
                except OSError as error:
                    raise AudioRejected(f"unreadable: {error}") from error
            return self.frames(bytes(data), name)
        except AudioRejected as rejected:
            raise AudioInputError(row, name, rejected.reason) from rejected

    def window_spans(self, audio: AudioFrames, window_seconds: float) -> list[tuple[int, int]]:
        """Frame ranges of consecutive windows; a tail shorter than min_seconds joins the window before."""
        total = len(audio.stored)
        size = max(1, round(window_seconds / self.seconds_per_frame))
        starts = list(range(0, total, size))
        if len(starts) > 1 and (total - starts[-1]) * self.seconds_per_frame < self.recipe.min_seconds:
            starts.pop()
        return [(s, starts[i + 1] if i + 1 < len(starts) else total) for i, s in enumerate(starts)]

    def score(self, audios: Sequence[AudioFrames], raw: bool = False, window_seconds: float = 0.0,
              names: Sequence[str] | None = None) -> list[Scored]:
        """One prediction per file, or per window of `window_seconds` (> 0), all in one batch."""
        if not math.isfinite(window_seconds) or window_seconds < 0:
            raise ValueError(f"window_seconds must be 0 (whole files) or a positive number of seconds, "
                             f"got {window_seconds}")
        pieces: list[tuple[int, int, int]] = []  # (input, first frame, end frame)
        for i, audio in enumerate(audios):
            if window_seconds > 0:
                pieces += [(i, a, b) for a, b in self.window_spans(audio, window_seconds)]
            else:
                pieces.append((i, 0, len(audio.stored)))
                if audio.duration > LONG_AUDIO_FACTOR * self.covered_seconds:
                    log.warning(long_audio_warning(names[i] if names else f"row {i}", audio.duration,
                                                   self.covered_seconds))
        if not pieces:
            return []
        table = frames_table([audios[i].stored[a:b] for i, a, b in pieces], self.recipe.frame_format)
        values = predict_table(self.bundle, table, batch_size=len(pieces))
        values = values if raw else self.bundle.label_scaler.clip(values)
        step = self.seconds_per_frame
        return [Scored(i, a * step if window_seconds > 0 else 0.0,
                       min(b * step, audios[i].duration) if window_seconds > 0 else audios[i].duration, v)
                for (i, a, b), v in zip(pieces, values)]


def read_params(params: dict[str, Any] | None) -> tuple[bool, float]:
    params = {**PARAM_DEFAULTS, **(params or {})}
    unknown = sorted(set(params) - set(PARAM_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown params {unknown}; this model takes {sorted(PARAM_DEFAULTS)}")
    return bool(params["raw"]), float(params["window_seconds"])


def _cell(value: Any) -> Any:
    """A DataFrame cell with NaN / None as None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


class AudioEmotionModel(PythonModel):
    """mlflow.pyfunc model: audio rows in, arousal / dominance / valence rows out (module docstring)."""

    scorer: AudioScorer | None = None

    def load_context(self, context) -> None:
        self.scorer = AudioScorer(load_bundle(context.artifacts[BUNDLE_ARTIFACT]))

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            raw, window_seconds = read_params(params)
            frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
            if AUDIO_COLUMN not in frame and URI_COLUMN not in frame:
                raise ValueError(f"the input needs a column {AUDIO_COLUMN!r} (file bytes) or {URI_COLUMN!r} "
                                 f"(a path or URI); it has {list(frame.columns)}")
            data = frame[AUDIO_COLUMN].map(_cell).tolist() if AUDIO_COLUMN in frame else [None] * len(frame)
            uris = frame[URI_COLUMN].map(_cell).tolist() if URI_COLUMN in frame else [None] * len(frame)
            audios = [self.scorer.load(row, d, u) for row, (d, u) in enumerate(zip(data, uris))]
            scored = self.scorer.score(audios, raw, window_seconds,
                                       [u or f"row {row}" for row, u in enumerate(uris)])
        except ValueError as error:  # AudioInputError included: the request's fault, a 400
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from error
        columns = {"input": [s.input for s in scored], "start": [s.start for s in scored],
                   "end": [s.end for s in scored]}
        for k, name in enumerate(self.scorer.attributes):
            columns[name] = [float(s.values[k]) for s in scored]
        return pd.DataFrame(columns)


# --- logging it -----------------------------------------------------------------------------------


def pinned_requirements(names: Sequence[str] = REQUIREMENTS) -> list[str]:
    """`name==version` of each installed distribution, without a local version (`2.13.0+cpu` ->
    `2.13.0`: pip cannot install a local version from an index)."""
    return [f"{name}=={metadata.version(name).split('+', 1)[0]}" for name in names]


def example_audio(seconds: float = 1.0, sample_rate: int = 16000) -> bytes:
    """A short WAV (a chirp, deterministic) for the model's input example."""
    import soundfile as sf

    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)
    buffer = io.BytesIO()
    sf.write(buffer, wave.astype(np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def signature(attributes: Sequence[str]):
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("binary", AUDIO_COLUMN, required=False), ColSpec("string", URI_COLUMN, required=False)])
    outputs = Schema([ColSpec("long", "input"), ColSpec("double", "start"), ColSpec("double", "end"),
                      *(ColSpec("double", name) for name in attributes)])
    params = ParamSchema([ParamSpec("raw", "boolean", PARAM_DEFAULTS["raw"]),
                          ParamSpec("window_seconds", "double", PARAM_DEFAULTS["window_seconds"])])
    return ModelSignature(inputs, outputs, params)


def project_code_paths() -> list[str]:
    """The packages the model's script imports, copied into the logged model."""
    root = Path(__file__).resolve().parents[2]
    return [str(root / "cluster_train"), str(root / "data_prep")]


def log_audio_model(bundle_dir: str, name: str = "best_model", *, run_id: str | None = None,
                    tracking_uri: str | None = None, registered_model_name: str | None = None,
                    step: int = 0, tags: dict[str, str] | None = None, params: dict[str, Any] | None = None):
    """Log the bundle in `bundle_dir` as the pyfunc `name` (to run `run_id`, else the active run);
    returns MLflow's ModelInfo. The bundle file is the model's `artifacts/model.pt`, which
    `bundle.resolve_bundle` finds too: every loader of the project reads the same logged model.

    `step`: the epoch the weights come from (the Models view shows it). `tracking_uri`: MLflow's
    process-wide URIs point there during the call and are restored after (None: left as they are).
    """
    import mlflow
    import pandas as pd

    from cluster_train.tracking import mlflow_globals

    bundle = load_bundle(bundle_dir)
    AudioScorer(bundle)  # refuses a bundle that cannot score audio before anything is logged
    with mlflow_globals(tracking_uri), tempfile.TemporaryDirectory(prefix="pyfunc-") as folder:
        script = Path(folder) / "audio_emotion_model.py"
        script.write_text(MODEL_SCRIPT)
        run = mlflow.MlflowClient().get_run(run_id) if run_id else mlflow.active_run()
        if run is None:
            raise ValueError("log_audio_model: no run_id and no active MLflow run to log the model to")
        # Made here so that it lands in the run's experiment (Model.log would use the active one).
        model = mlflow.initialize_logged_model(name=name, source_run_id=run.info.run_id, tags=tags,
                                               params={k: str(v) for k, v in (params or {}).items()},
                                               experiment_id=run.info.experiment_id)
        info = mlflow.models.Model.log(
            artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run.info.run_id, model_id=model.model_id,
            python_model=str(script), artifacts={BUNDLE_ARTIFACT: str(Path(bundle_dir) / BUNDLE_FILE)},
            code_paths=project_code_paths(), signature=signature(bundle.label_scaler.attributes),
            input_example=pd.DataFrame({AUDIO_COLUMN: [example_audio()]}), pip_requirements=pinned_requirements(),
            registered_model_name=registered_model_name, step=step,
        )
    return info


class ChunkNetwork(torch.nn.Module):
    """The network alone, for those who want it: mel chunks (N, frames, mels), un-normalised as
    `data_prep` stores them -> (N, A) per-chunk predictions on the label scale (the bundle's
    normaliser and label scaler inside, unclipped). A sentence's value is the mean of its C chunks,
    cut as the bundle's `features.chunks` says: what the audio pyfunc does for you."""

    def __init__(self, bundle: Bundle):
        super().__init__()
        self.model = bundle.model
        self.clip = float(bundle.normalizer.clip)
        self.register_buffer("mel_mean", torch.as_tensor(bundle.normalizer.mean, dtype=torch.float32))
        self.register_buffer("mel_scale", torch.as_tensor(bundle.normalizer._scale, dtype=torch.float32))
        self.register_buffer("label_mean", torch.as_tensor(bundle.label_scaler.mean, dtype=torch.float32))
        self.register_buffer("label_std", torch.as_tensor(bundle.label_scaler.std, dtype=torch.float32))

    def forward(self, chunks: torch.Tensor) -> torch.Tensor:
        z = torch.nan_to_num((chunks - self.mel_mean) / self.mel_scale, nan=0.0).clamp(-self.clip, self.clip)
        return self.model(z)["prediction"] * self.label_std + self.label_mean


def log_network(bundle_dir: str, name: str = "best_network", *, run_id: str, tracking_uri: str | None = None,
                step: int = 0):
    """Log `ChunkNetwork` with MLflow's pytorch flavour as a torch.export program (`pt2`: no pickle,
    any batch size); returns MLflow's ModelInfo."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from cluster_train.tracking import mlflow_globals

    bundle = load_bundle(bundle_dir)
    network = ChunkNetwork(bundle).eval()
    config = bundle.model_config
    example = np.random.default_rng(0).random((2, config.chunk_frames, config.n_mels), dtype=np.float32)
    signature = ModelSignature(Schema([TensorSpec(np.dtype("float32"), (-1, config.chunk_frames, config.n_mels))]),
                               Schema([TensorSpec(np.dtype("float32"), (-1, len(config.attributes)))]))
    with mlflow_globals(tracking_uri):
        run = mlflow.MlflowClient().get_run(run_id)
        model = mlflow.initialize_logged_model(name=name, source_run_id=run_id, experiment_id=run.info.experiment_id)
        return mlflow.models.Model.log(
            artifact_path=None, name=name, flavor=mlflow.pytorch, run_id=run_id, model_id=model.model_id,
            pytorch_model=network, serialization_format="pt2", input_example=example, signature=signature,
            pip_requirements=pinned_requirements(("torch", "numpy")), step=step,
        )
