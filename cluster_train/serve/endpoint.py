"""Online prediction on Ray Serve: audio over HTTP in, arousal / dominance / valence as JSON out.

    POST /predict   multipart/form-data with a file field `file`       (curl -F file=@a.wav URL/predict)
                    or the file's bytes as the body (Content-Type audio/* or application/octet-stream)
                    or JSON {"uri": "s3://bucket/a.wav"} when the URI is under an allowed prefix
                    query: window_seconds=10 (one answer per 10 s window), raw=true (not clipped)
    GET  /healthz   the model being served and its settings

A replica holds one model: a bundle folder, or an MLflow model (`models:/<name>@<alias>`,
`models:/<name>/<version>`, `runs:/<run>/<name>`) read from `tracking_uri`; the pyfunc that training
logs keeps the same bundle (`serve/pyfunc.py`), so the answers are those of `mlflow.pyfunc` and
`jobs/predict.py`. Requests are decoded in the replica's thread pool, then scored together with
`@serve.batch` (one forward pass for up to `max_batch_size` requests); Ray Serve's autoscaler keeps
`target_ongoing_requests` per replica between `min_replicas` and `max_replicas`.

Errors are 4xx with JSON {"error": ...}: 400 audio that cannot be scored (the reason and the file),
a bad query value or a missing file; 403 a URI outside `uri_prefixes` (none by default: reading any
location the replica can reach on a client's say-so is not a default); 413 a body over
`max_upload_mb`; 415 an unsupported Content-Type.
"""

import asyncio  # no `from __future__ import annotations`: FastAPI must see `Request` itself in the
# signatures Serve's class ingress rewrites (a string annotation there turned into a query field)
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from email import policy
from email.parser import BytesParser
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from cluster_train.serve.predict import PredictError, load_model
from cluster_train.serve.predict import LONG_AUDIO_FACTOR, long_audio_warning
from cluster_train.serve.pyfunc import AudioInputError, AudioScorer
from data_prep.config import require

log = logging.getLogger(__name__)
AUDIO_TYPES = ("audio/", "application/octet-stream")


@dataclass(kw_only=True)
class EndpointConfig:
    model: str  # bundle folder, or models:/<name>@<alias>, models:/<name>/<version>, runs:/<run>/<name>
    tracking_uri: str | None = None  # for MLflow URIs; None: $MLFLOW_TRACKING_URI, else ./mlflow.db
    name: str = "emotion"  # the Serve application
    route_prefix: str = "/"
    max_batch_size: int = 8  # requests scored in one forward pass
    batch_wait_timeout_s: float = 0.02  # how long a batch waits to fill
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0  # per replica; more in flight adds replicas
    max_ongoing_requests: int = 16  # per replica; beyond, requests queue in the proxy
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0
    threads: int = 1  # torch threads per replica
    max_upload_mb: float = 64.0
    uri_prefixes: list[str] = field(default_factory=list)  # locations a request may name; [] refuses URIs

    def __post_init__(self) -> None:
        require(bool(self.model), "model", "name a bundle folder or an MLflow model URI")
        require(self.max_batch_size >= 1, "max_batch_size", "must be at least 1")
        require(self.batch_wait_timeout_s >= 0, "batch_wait_timeout_s", "must not be negative")
        require(self.max_replicas >= 1, "max_replicas", "must be at least 1")
        require(0 <= self.min_replicas <= self.max_replicas, "min_replicas",
                f"must be 0 or more and at most max_replicas = {self.max_replicas}")
        require(self.target_ongoing_requests > 0, "target_ongoing_requests", "must be positive")
        require(self.max_ongoing_requests >= 1, "max_ongoing_requests", "must be at least 1")
        require(self.max_upload_mb > 0, "max_upload_mb", "must be positive")
        require(self.threads >= 1, "threads", "must be at least 1")


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def form_file(body: bytes, content_type: str, field: str = "file") -> bytes:
    """The file field `field` of a multipart/form-data body (the standard library's MIME parser: no
    python-multipart needed); RequestError when there is none."""
    message = BytesParser(policy=policy.HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    names = []
    for part in message.iter_parts() if message.is_multipart() else []:
        name = part.get_param("name", header="content-disposition")
        if name == field:
            return part.get_payload(decode=True) or b""
        names.append(name)
    raise RequestError(400, f"the form has no file field {field!r} (fields: {sorted(map(str, names))})")


# Serve pickles the FastAPI app when the class below is decorated: what its routes call must be defined above it.
def query_options(request: Request) -> tuple[bool, float]:
    """(raw, window_seconds) from the query string; RequestError for a bad value."""
    query = request.query_params
    unknown = sorted(set(query) - {"raw", "window_seconds"})
    if unknown:
        raise RequestError(400, f"unknown query parameters {unknown}; this endpoint takes raw, window_seconds")
    raw_text = query.get("raw", "false").lower()
    if raw_text not in ("true", "false", "1", "0"):
        raise RequestError(400, f"raw={query.get('raw')!r}: use true or false")
    try:
        window_seconds = float(query.get("window_seconds", "0"))
    except ValueError:
        window_seconds = float("nan")
    if not window_seconds >= 0 or window_seconds == float("inf"):
        raise RequestError(400, f"window_seconds={query.get('window_seconds')!r}: use 0 (the whole file) or a "
                                "positive number of seconds")
    return raw_text in ("true", "1"), window_seconds


app = FastAPI(title="DeepEmoCluster", description=__doc__.splitlines()[0])


@serve.ingress(app)
class EmotionEndpoint:
    """One replica: the model, its decoding and batched scoring (module docstring)."""

    def __init__(self, config: dict[str, Any]):
        import torch

        self.config = EndpointConfig(**config)
        torch.set_num_threads(self.config.threads)
        started = time.perf_counter()
        device = "cuda" if self.config.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        bundle = load_model(self.config.model, device, tracking_uri=self.config.tracking_uri)
        self.scorer = AudioScorer(bundle)  # PredictError: a bundle that cannot score audio
        self.score_batch.set_max_batch_size(self.config.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        log.info("serving %s (%s) loaded in %.1f s", self.config.model, bundle.model_kind, time.perf_counter() - started)

    @app.get("/healthz")
    async def health(self) -> dict:
        bundle = self.scorer.bundle
        return {"model": self.config.model, "model_kind": bundle.model_kind,
                "attributes": list(self.scorer.attributes), "chunks": asdict(self.scorer.recipe.chunks),
                "sample_rate": self.scorer.recipe.features.sample_rate, "extra": bundle.extra}

    @app.post("/predict")
    async def predict(self, request: Request):
        try:
            raw, window_seconds = query_options(request)
            data, uri = await self.read_request(request)
            name = uri or "uploaded audio"
            audio = await asyncio.get_running_loop().run_in_executor(None, self.scorer.load, 0, data, uri)
        except RequestError as error:
            return JSONResponse({"error": str(error)}, status_code=error.status)
        except AudioInputError as error:
            return JSONResponse({"error": f"{error.name}: {error.reason}", "reason": error.reason}, status_code=400)
        scored, batch_size = await self.score_batch((audio, raw, window_seconds))
        attributes = self.scorer.attributes
        answer: dict[str, Any] = {"duration": audio.duration, "batch_size": batch_size, "warnings": []}
        if window_seconds > 0:
            answer["windows"] = [{"start": s.start, "end": s.end, **dict(zip(attributes, map(float, s.values)))}
                                 for s in scored]
        else:
            answer.update(zip(attributes, map(float, scored[0].values)))
            if audio.duration > LONG_AUDIO_FACTOR * self.scorer.covered_seconds:
                answer["warnings"].append(long_audio_warning(name, audio.duration, self.scorer.covered_seconds))
        return answer

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def score_batch(self, requests: list[tuple]) -> list[tuple[list, int]]:
        """Requests with the same options scored in one forward pass each; (their Scored, batch size)."""
        results: list[Any] = [None] * len(requests)
        groups: dict[tuple[bool, float], list[int]] = {}
        for i, (_, raw, window_seconds) in enumerate(requests):
            groups.setdefault((raw, window_seconds), []).append(i)
        loop = asyncio.get_running_loop()
        for (raw, window_seconds), members in groups.items():
            audios = [requests[i][0] for i in members]
            scored = await loop.run_in_executor(None, self.scorer.score, audios, raw, window_seconds)
            for k, i in enumerate(members):
                results[i] = ([s for s in scored if s.input == k], len(requests))
        return results

    async def read_request(self, request: Request) -> tuple[bytes | None, str | None]:
        """(file bytes, None) or (None, uri) from the request; RequestError says what is wrong."""
        limit = int(self.config.max_upload_mb * 1024 * 1024)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"the body is {int(declared) / 2**20:.1f} MB, over max_upload_mb = "
                                    f"{self.config.max_upload_mb:g}")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            body = await request.body()
            if len(body) > limit:
                raise RequestError(413, f"the body is over max_upload_mb = {self.config.max_upload_mb:g}")
            return form_file(body, request.headers["content-type"]), None
        if kind.startswith(AUDIO_TYPES):
            data = await request.body()
            if len(data) > limit:
                raise RequestError(413, f"the body is over max_upload_mb = {self.config.max_upload_mb:g}")
            return data, None
        if kind == "application/json":
            try:
                body = await request.json()
            except ValueError as error:
                raise RequestError(400, f"the JSON body does not parse: {error}") from error
            uri = body.get("uri") if isinstance(body, dict) else None
            if not isinstance(uri, str) or not uri:
                raise RequestError(400, 'a JSON body must be {"uri": "<location of the audio>"}')
            if not any(uri.startswith(prefix) for prefix in self.config.uri_prefixes):
                allowed = ", ".join(self.config.uri_prefixes) or "none: this endpoint takes uploads only"
                raise RequestError(403, f"{uri}: not under an allowed URI prefix ({allowed})")
            if ".." in uri.split("/"):
                raise RequestError(403, f"{uri}: '..' is not allowed in a URI")
            return None, uri
        raise RequestError(415, f"Content-Type {kind or '(none)'} is not one of multipart/form-data (field 'file'), "
                                "audio/*, application/octet-stream, application/json ({\"uri\": ...})")


def build_app(config: EndpointConfig):
    """The Serve application for `config` (not yet running: `serve.run` it)."""
    deployment = serve.deployment(
        EmotionEndpoint, name="EmotionEndpoint",
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        max_ongoing_requests=config.max_ongoing_requests, max_constructor_retry_count=3,
        autoscaling_config={"min_replicas": config.min_replicas, "initial_replicas": max(1, config.min_replicas),
                            "max_replicas": config.max_replicas,
                            "target_ongoing_requests": config.target_ongoing_requests},
    )
    return deployment.bind(asdict(config))


def app_builder(args: dict[str, Any]):
    """Serve's application builder (`import_path: cluster_train.serve.endpoint:app_builder` in a serve
    config file; its `args` are EndpointConfig's fields)."""
    return build_app(EndpointConfig(**args))


def run_endpoint(config: EndpointConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False):
    """Check that `config.model` loads, start Serve's HTTP proxy on host:port (a Ray is started when
    none is running) and deploy; a DeploymentHandle (never returns when `blocking`)."""
    import ray

    from cluster_train.tracking import TrackingConfig

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    # ./mlflow.db is this directory's: a replica may start in another (a cluster's head, for one)
    config = replace(config, tracking_uri=TrackingConfig(tracking_uri=config.tracking_uri).resolved_uri())
    AudioScorer(load_model(config.model, tracking_uri=config.tracking_uri))  # a wrong model fails here, by name
    serve.start(http_options={"host": host, "port": port})
    try:
        return serve.run(build_app(config), name=config.name, route_prefix=config.route_prefix, blocking=blocking)
    except RuntimeError as error:  # the replica's constructor failed: its error is inside
        raise PredictError(f"serving {config.model} failed to start: {error}") from error
