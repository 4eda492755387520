"""The model bundle: everything evaluation, prediction and resuming need, in one `model.pt`.

A bundle directory holds one file, `model.pt`, written by `torch.save` with plain types only
(tensors, dicts, lists, str, int, float, bool, None), so `torch.load(..., weights_only=True)` reads
it and no pickled object is ever executed on load:

    format        BUNDLE_FORMAT
    model_kind    a name in models.MODEL_KINDS
    model_config  ModelConfig as a dict
    state_dict    the weights (CPU tensors; a DDP / DataParallel / torch.compile wrapper unwrapped)
    normalizer    {"mean": [...], "std": [...], "clip": float}: the features' z-normalisation
    label_scaler  LabelScaler.to_dict(): the model predicts z-scored labels
    extra         free plain values: epoch, metrics, dataset hash, ...
    features      the settings that made the model's input chunks (`data_prep.shards.CHUNK_SETTINGS`:
                  the dataset's features, storage_dtype and min_seconds, the run's data.chunks), so
                  that prediction on raw audio computes the same chunks; absent in older bundles

MLflow convention. A run logs the bundle under a model name `<name>` (e.g. "model") so that the
run's artifact `<name>/bundle/model.pt` is the bundle file: `log_bundle` attaches it to an MLflow
logged model `<name>` (made here, or one from `mlflow.pytorch.log_model(...).model_id`) at
`bundle/model.pt`. Then `runs:/<run_id>/<name>`, `models:/<registered name>/<version>` and
`models:/<model_id>` all resolve to it; a plain `mlflow.log_artifact(file, "<name>/bundle")` also
works for `runs:/` URIs (MLflow 3 registers only logged models, so not for `models:/`). The audio
pyfunc (`serve/pyfunc.py`) keeps the bundle as its `artifacts/model.pt`; `resolve_bundle` reads that
layout too, so `models:/<name>@<alias>` of a registered pyfunc loads as a bundle.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from cluster_train.data.labels import LabelScaler
from cluster_train.model.blocks import ModelConfig
from cluster_train.model.kinds import build_model
from data_prep.config import ChunkConfig
from data_prep.frames import FrameFormat
from data_prep.shards import ChunkRecipe
from data_prep.stats import Normalizer
from data_prep.storage import read_bytes

BUNDLE_FILE = "model.pt"
BUNDLE_FORMAT = "deepemocluster-bundle/1"
MLFLOW_BUNDLE_DIR = "bundle"  # inside the logged model `<name>`: `<name>/bundle/model.pt`
MLFLOW_SCHEMES = ("runs:/", "models:/")
PYFUNC_BUNDLE = f"artifacts/{BUNDLE_FILE}"  # inside the audio pyfunc model (serve/pyfunc.py)


class BundleError(ValueError):
    """A bundle that is missing, unreadable, or not one written by `save_bundle`."""


@dataclass
class Bundle:
    model: nn.Module
    model_kind: str
    model_config: ModelConfig
    normalizer: Normalizer
    label_scaler: LabelScaler
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    features: dict[str, Any] | None = None  # the chunk settings (CHUNK_SETTINGS); None in older bundles

    @property
    def chunks(self) -> ChunkConfig:
        """How the model's inputs are cut (Eq. 1-2); a bundle older than its feature settings gets the
        paper's C = 11 chunks of the model's own chunk length."""
        if self.features is None:
            return ChunkConfig(chunk_frames=self.model_config.chunk_frames)
        return ChunkRecipe.from_settings(self.features).chunks

    @property
    def frame_format(self) -> FrameFormat:
        """How the frames of the model's training data were stored (what prediction decodes audio to)."""
        if self.features is None:
            return FrameFormat("float16", self.model_config.n_mels)
        return ChunkRecipe.from_settings(self.features).frame_format


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def plain(value: Any, where: str = "extra") -> Any:
    """`value` with numpy values and tuples made plain; anything else not plain is a TypeError."""
    if value is None or isinstance(value, (str, bool, int, float, torch.Tensor)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: plain(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"{where}: {type(value).__name__} is not a plain value a weights-only load can read")


def chunk_features(settings: dict, model_config: ModelConfig) -> dict:
    """The CHUNK_SETTINGS (`ChunkRecipe.settings()`), checked against the model's input."""
    recipe = ChunkRecipe.from_settings(settings)
    shape = (recipe.chunks.chunk_frames, recipe.features.n_mels)
    if shape != (model_config.chunk_frames, model_config.n_mels):
        raise ValueError(f"features make chunks of {shape} (frames, mels), the model takes "
                         f"{(model_config.chunk_frames, model_config.n_mels)}")
    return plain(recipe.settings(), "features")


def _payload(model: nn.Module, model_kind: str, model_config: ModelConfig, normalizer: Normalizer,
             label_scaler: LabelScaler, extra: dict | None, features: dict | None) -> dict:
    if tuple(label_scaler.attributes) != tuple(model_config.attributes):
        raise ValueError(f"label scaler {label_scaler.attributes} != model attributes {model_config.attributes}")
    payload = {
        "format": BUNDLE_FORMAT,
        "model_kind": model_kind,
        "model_config": plain(dataclasses.asdict(model_config), "model_config"),
        "state_dict": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "normalizer": {
            "mean": normalizer.mean.tolist(), "std": normalizer.std.tolist(), "clip": float(normalizer.clip)
        },
        "label_scaler": label_scaler.to_dict(),
        "extra": plain(extra or {}),
    }
    if features is not None:
        payload["features"] = chunk_features(features, model_config)
    return payload


def save_bundle(
    path: str,
    model: nn.Module,
    model_kind: str,
    model_config: ModelConfig,
    normalizer: Normalizer,
    label_scaler: LabelScaler,
    extra: dict | None = None,
    features: dict | None = None,
) -> str:
    """Write `<path>/model.pt` (atomically: a reader never sees half a file); returns its path.

    `features`: the chunk settings (`ChunkRecipe.for_dataset(dataset.settings, data.chunks).settings()`),
    which prediction on raw audio needs; None leaves them out.
    """
    payload = _payload(model, model_kind, model_config, normalizer, label_scaler, extra, features)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, folder / BUNDLE_FILE)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return str(folder / BUNDLE_FILE)


def load_bundle(path: str, map_location: str | torch.device = "cpu") -> Bundle:
    """Read a bundle directory (or its `model.pt`), a local path or a URI (s3://, gs://, file://);
    the model is rebuilt and put in eval mode."""
    if "://" in path:
        file = path if path.endswith(".pt") else f"{path.rstrip('/')}/{BUNDLE_FILE}"
        try:
            data = read_bytes(file)
        except (OSError, pa.ArrowException) as error:
            raise BundleError(f"{path}: no model bundle here ({error})") from error
        return bundle_from_bytes(data, path, map_location)
    file = Path(path)
    file = file / BUNDLE_FILE if file.is_dir() else file
    if not file.is_file():
        raise BundleError(f"{path}: no model bundle here (expected a directory with {BUNDLE_FILE} from save_bundle)")
    return _load(file, str(file), str(path), map_location)


def bundle_to_bytes(bundle: Bundle) -> bytes:
    """The bundle as the bytes of its `model.pt`: to ship it to workers that cannot read its path."""
    payload = _payload(bundle.model, bundle.model_kind, bundle.model_config, bundle.normalizer,
                       bundle.label_scaler, bundle.extra, bundle.features)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def bundle_from_bytes(data: bytes, source: str, map_location: str | torch.device = "cpu") -> Bundle:
    """A bundle from `bundle_to_bytes`; `source` names it in messages and in `Bundle.source`."""
    return _load(io.BytesIO(data), source, source, map_location)


def _load(file: Any, where: str, source: str, map_location: str | torch.device) -> Bundle:
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several kinds for a bad file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BundleError(f"{where}: not a readable model bundle (weights-only load refused it: {reason})") from error
    if not isinstance(payload, dict) or payload.get("format") != BUNDLE_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise BundleError(f"{where}: not a model bundle (format {found!r}, expected {BUNDLE_FORMAT!r})")
    try:
        config_dict = dict(payload["model_config"])
        config_dict["attributes"] = tuple(config_dict["attributes"])
        config = ModelConfig(**config_dict)
        model = build_model(payload["model_kind"], config)
        model.load_state_dict(payload["state_dict"])
        normalizer = Normalizer(**payload["normalizer"])
        scaler = LabelScaler.from_dict(payload["label_scaler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise BundleError(f"{where}: broken model bundle: {error}") from error
    model.to(map_location).eval()
    return Bundle(model, payload["model_kind"], config, normalizer, scaler, payload.get("extra", {}), source,
                  payload.get("features"))


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(MLFLOW_SCHEMES)


def load_bundle_from_mlflow(uri: str, map_location: str | torch.device = "cpu") -> Bundle:
    """`runs:/<run_id>/<name>`, `models:/<name>/<version>` or `models:/<name>@<alias>`: download,
    then `load_bundle`."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="bundle-") as folder:
        try:  # dst_path: always a copy, never the artifact store's own files
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder))
        except Exception as error:  # noqa: BLE001 - MlflowException, OSError, ...
            raise BundleError(f"{uri}: cannot download from MLflow: {error}") from error
        for candidate in (local / MLFLOW_BUNDLE_DIR / BUNDLE_FILE, local / BUNDLE_FILE, local / PYFUNC_BUNDLE):
            if candidate.is_file():
                bundle = load_bundle(str(candidate), map_location)
                bundle.source = uri
                return bundle
    raise BundleError(f"{uri}: no {MLFLOW_BUNDLE_DIR}/{BUNDLE_FILE} in these artifacts (log it with log_bundle)")


def resolve_bundle(source: str, map_location: str | torch.device = "cpu") -> Bundle:
    """A bundle directory, or an MLflow model URI (runs:/..., models:/...)."""
    if is_mlflow_uri(source):
        return load_bundle_from_mlflow(source, map_location)
    return load_bundle(source, map_location)


def log_bundle(path: str, name: str = "model", model_id: str | None = None, tracking_uri: str | None = None) -> str:
    """Attach the bundle in `path` to the active run as `<name>/bundle/model.pt`; returns the model id.

    `model_id`: an existing logged model (e.g. `mlflow.pytorch.log_model(...).model_id`) to add it
    to; None makes a logged model `name` in the active run for it.
    """
    import mlflow

    file = Path(path) / BUNDLE_FILE
    if not file.is_file():
        raise BundleError(f"{path}: no {BUNDLE_FILE} to log")
    created = model_id is None
    if created:
        run = mlflow.active_run()
        model_id = mlflow.initialize_logged_model(name=name, source_run_id=run and run.info.run_id).model_id
    mlflow.MlflowClient(tracking_uri).log_model_artifact(model_id, str(file), MLFLOW_BUNDLE_DIR)
    if created:
        mlflow.finalize_logged_model(model_id, "READY")
    return model_id
