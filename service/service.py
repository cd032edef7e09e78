"""The adaptserve BentoML service — ONNX Runtime, no torch anywhere on this path.

    ADAPTSERVE_MODEL=adaptserve-dann:latest bentoml serve service.service:AdaptService

    client = bentoml.SyncHTTPClient("http://127.0.0.1:3000")
    client.predict(images=x)                        # x: uint8 (N, H, W, C) in the model's input spec
    client.classify(files=[Path("a.png")])          # image files, any size: decoded and resized
    client.request("GET", "/drift").json(), client.request("GET", "/model").json()

Typed BentoML APIs (the OpenAPI schema at ``/docs.json``, the client's methods, ``bentoml.depends``):

- ``POST /predict`` ``{"images": [...], "resize": false}`` — an (N,H,W,C) array of uint8 (or floats in
  [0, 1]), or one (H,W,C)/(H,W) image. H×W must be the model's (``/model``'s ``input_spec``); 1 ↔ 3
  channels are converted; other sizes are a 400 unless ``resize`` is true. The same URL takes the raw bytes
  of a ``.npy`` file (``Content-Type: application/x-npy``; ``?resize=true``), the fastest binary path.
- ``POST /classify`` — ``multipart/form-data`` image files in the field ``files`` (PNG, JPEG, ...), each
  decoded and resized; a file over ``ADAPTSERVE_MAX_PIXELS`` (read from its header) or a request over
  ``ADAPTSERVE_MAX_REQUEST_PIXELS`` is a 413 before anything is decoded.

GET routes (of the mounted app, in ``/docs.json``; BentoML's client reaches them with ``client.request``):

- ``GET /drift`` — the last drift check and the current window's fill.
- ``GET /model`` — the manifest, tag and ONNX Runtime providers.

Also: ``/raw/predict`` and ``/raw/classify`` (the hand-parsed fast routes: orjson/``.npy`` straight into
numpy, any multipart field name — docs/benchmarks.md has what they save), the Open Inference Protocol
under ``/v2`` (:mod:`service.oip`: KServe v2 / Triton clients, binary tensors), BentoML's ``/livez``,
``/readyz``, ``/metrics`` (with ``adaptserve_drift_*``). Errors: ``{"error": "...", "status": code}``.

Every path feeds one drift monitor (:mod:`service.monitor`). Settings: :mod:`service.settings`. With
adaptive batching on (a GPU), inference goes through :class:`Batcher`, a ``batchable`` API in a
``bentoml.depends`` service that merges concurrent calls into one ONNX Runtime call.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import anyio
import numpy as np

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import bentoml  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from pydantic import BaseModel  # noqa: E402
from starlette.routing import Route  # noqa: E402

from adaptserve.service import bentoml_patches, http, oip  # noqa: E402
from adaptserve.service.auth import ApiKeyMiddleware  # noqa: E402
from adaptserve.service.http import (NPY_TYPES, BodyLimit, HTTPError, as_batch, decode_uploads, error_response,  # noqa: E402
                          guarded, json_response, parse_images, parse_uploads, query_flag, read_body, tune_gc)
from adaptserve.service.monitor import DriftMonitor  # noqa: E402
from adaptserve.service.preprocess import ImageError, conform  # noqa: E402
from adaptserve.service.runtime import Model  # noqa: E402
from adaptserve.service.settings import Settings, bundled_model_tag  # noqa: E402

log = logging.getLogger("adaptserve.service")

SETTINGS = Settings.from_env(bundled=bundled_model_tag(__file__))
# Below this many images a request runs on the event loop: less time than the hop to a worker thread.
INLINE_MAX_IMAGES = 4
BATCHER_RETRIES = 2
BATCHER_TIMEOUT_S = 20.0


def refuse_a_tampered_model(source: str) -> None:
    """``bentoml serve`` and ``bentoml build`` import this module before any worker starts: a model whose files
    do not match its manifest stops them here with the IntegrityError (a sha256 of a few MB), instead of
    workers that fail and are restarted forever. A model that is not in the store is left to BentoML."""
    from adaptserve.service.runtime import resolve, verify

    try:
        folder, _ = resolve(source)
    except (FileNotFoundError, ValueError):
        return
    verify(folder)


refuse_a_tampered_model(SETTINGS.model)
bentoml_patches.apply()


class Prediction(BaseModel):
    """N predictions: class names, class indices, softmax rows; the model tag; the file names (classify)."""

    labels: list[str]
    class_indices: list[int]
    probabilities: list[list[float]]
    model: str
    filenames: list[str] | None = None


def open_model(bento_model=None) -> tuple[Model, str]:
    """The model of ``ADAPTSERVE_MODEL`` (a folder, or the service's BentoModel) and its tag."""
    s = SETTINGS
    if s.model_is_folder:
        return Model.open(s.model, device=s.device, threads=s.threads), str(Path(s.model).resolve())
    return Model.open(bento_model.path, device=s.device, threads=s.threads), str(bento_model.tag)


def pack(probabilities: np.ndarray, logits: np.ndarray, features: np.ndarray, p_target: np.ndarray) -> np.ndarray:
    """One float32 (N, 2K + D + 1) array — the batchable API's output must be one array split on axis 0."""
    return np.concatenate([probabilities, logits, features, p_target[:, None]], axis=1, dtype=np.float32)


def unpack(out: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    k = n_classes
    return {"probabilities": np.ascontiguousarray(out[:, :k]), "logits": np.ascontiguousarray(out[:, k:2 * k]),
            "features": np.ascontiguousarray(out[:, 2 * k:-1]), "p_target": np.ascontiguousarray(out[:, -1])}


@bentoml.service(name="adaptserve-batcher", traffic={"timeout": 120})
class Batcher:
    """The model behind BentoML's adaptive batching (only when ``ADAPTSERVE_BATCHING`` is on).

    A dependency of :class:`AdaptService`, so ``bentoml serve`` runs it as its own process; every route
    validates its request, brings it to the input spec and calls :meth:`infer` with the uint8 array;
    BentoML merges concurrent calls (up to ``ADAPTSERVE_BATCH_MAX_SIZE`` images, waiting at most
    ``ADAPTSERVE_BATCH_MAX_LATENCY_MS``) into one ONNX Runtime call and splits the result back.
    """

    if not SETTINGS.model_is_folder:
        bento_model = bentoml.models.BentoModel(SETTINGS.model)

    def __init__(self) -> None:
        self.model, self.tag = open_model(None if SETTINGS.model_is_folder else self.bento_model)

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=SETTINGS.batch_max_size,
                 max_latency_ms=SETTINGS.batch_max_latency_ms)
    def infer(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N,H,W,C) in the input spec → float32 (N, 2K + D + 1): probabilities, logits, features, P(target)."""
        p = self.model.predict(images)
        return pack(p.probabilities, p.logits, p.features, p.p_target)


# The hand-parsed routes, the GET views of /drift and /model, and the Open Inference Protocol: a FastAPI app
# mounted on the service. Its routes are module functions, not class views: BentoML gives a class view's
# ``self`` a sync dependency that FastAPI runs in a worker thread — a thread hop per request.
api = FastAPI(title="adaptserve", docs_url=None, redoc_url=None, openapi_url=None)

# No OpenTelemetry span for the inference routes: BentoML has no trace exporter configured by default, and
# its span bookkeeping was ~0.6 of the ~1.5 ms CPU of a one-image request (benchmarks/serve_cpu.py). To trace
# them, override with e.g. BENTOML_CONFIG_OPTIONS="services.adaptserve.tracing.excluded_urls=^$".
UNTRACED_ROUTES = ["/predict", "/classify", "/raw/predict", "/raw/classify", "/v2/models"]


@bentoml.service(name="adaptserve", traffic={"timeout": 120}, tracing={"excluded_urls": UNTRACED_ROUTES})
@bentoml.asgi_app(api, path="/")
class AdaptService:
    """A DANN-adapted classifier (ONNX Runtime) with drift monitoring on every prediction."""

    if not SETTINGS.model_is_folder:
        bento_model = bentoml.models.BentoModel(SETTINGS.model)  # `bentoml build` bundles it
    if SETTINGS.batching:
        batcher = bentoml.depends(Batcher)

    def __init__(self) -> None:
        t0 = time.perf_counter()
        self.settings = s = SETTINGS
        self.runtime, self.tag = open_model(None if s.model_is_folder else self.bento_model)
        ref = self.runtime.drift_reference
        self.monitor = DriftMonitor(ref, self.tag, budget=s.drift_budget) if s.drift else None
        self.classes = np.array(self.runtime.classes, dtype=object)
        self.spec = self.runtime.input_spec
        name, _, version = self.tag.partition(":")
        self.oip_info = oip.ModelInfo(name=Path(name).name if s.model_is_folder else name, version=version or "1",
                                      spec=self.spec, n_classes=len(self.classes), n_features=self._feature_dim())
        # Work off the event loop (decoding, inference of > INLINE_MAX_IMAGES) runs in at most
        # ADAPTSERVE_CONCURRENCY threads at once, not in every thread of the pool (40): more gains nothing
        # on s.concurrency cores, and ORT's and malloc's arenas keep the high-water mark of what ran at once.
        self.work = anyio.CapacityLimiter(s.concurrency)
        tune_gc()
        log.info("adaptserve: model %s (%s) on %s, drift checks %s, adaptive batching %s, work off the event "
                 "loop %d at once, opened in %.2f s",
                 self.tag, self.spec, self.runtime.providers, f"on (window {ref.window})" if self.monitor else "off",
                 f"on (max {s.batch_max_size} images, {s.batch_max_latency_ms} ms)" if s.batching else "off",
                 s.concurrency, time.perf_counter() - t0)

    def _feature_dim(self) -> int:
        """D of the ``features`` output (one zero image through the classifier, which also warms it up)."""
        return int(self.runtime.predict(np.zeros((1, self.spec.height, self.spec.width, self.spec.channels),
                                                 np.uint8), discriminator=False).features.shape[1])

    # -- one inference path for every route

    def conform(self, images, resize: bool = False) -> np.ndarray:
        """A raw (N,H,W,C) array → the input spec (H×W must match unless ``resize``); HTTPError 400 if not."""
        try:
            return conform(as_batch(images, self.settings.max_images), self.spec, resize=resize)
        except ImageError as e:
            raise HTTPError(400, str(e)) from None

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 images in the input spec → the model's outputs; feeds the drift monitor."""
        p = self.runtime.predict(x)
        out = {"probabilities": p.probabilities, "logits": p.logits, "features": p.features, "p_target": p.p_target}
        self.observe(out)
        return out

    def observe(self, out: dict[str, np.ndarray]) -> None:
        if self.monitor is not None:
            self.monitor.add(out["p_target"], out["probabilities"], out["features"])

    async def off_loop(self, fn, *args):
        """``fn(*args)`` in a worker thread, at most ``ADAPTSERVE_CONCURRENCY`` at once."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.work)

    async def infer_async(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if self.settings.batching:
            out = await self._batched(x)
            self.observe(out)
            return out
        return self.infer(x) if len(x) <= INLINE_MAX_IMAGES else await self.off_loop(self.infer, x)

    def body(self, out: dict[str, np.ndarray], filenames: list[str] | None = None) -> dict:
        """The response of N predictions (the fields of :class:`Prediction`)."""
        idx = out["probabilities"].argmax(1)
        body = {"labels": self.classes[idx].tolist(), "class_indices": idx, "probabilities": out["probabilities"],
                "model": self.tag}
        if filenames is not None:
            body["filenames"] = filenames
        return body

    async def _batched(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Batching on: hand the input-spec array to the Batcher service, which merges concurrent calls.

        BentoML 1.4.39's inter-service client closes its shared aiohttp session every 100 requests (or
        300 s) while other calls are still in flight on it (``SessionManager`` in
        ``_bentoml_impl/client/proxy2.py``); those calls fail with a connection error before the Batcher
        ran them, so they are retried (inference is idempotent). A call that hangs (seen once in ~3,700 at
        32 clients) is abandoned after ``BATCHER_TIMEOUT_S`` and retried too.
        """
        import asyncio

        import aiohttp
        from bentoml.exceptions import BentoMLException

        for attempt in range(BATCHER_RETRIES + 1):
            try:
                out = await asyncio.wait_for(self.batcher.to_async.infer(x), BATCHER_TIMEOUT_S)
                break
            except BentoMLException as e:
                if getattr(e, "error_code", None) == 503:  # the dispatcher predicted a miss of max_latency_ms
                    raise HTTPError(503, "overloaded: the batch queue would exceed ADAPTSERVE_BATCH_MAX_LATENCY_MS; "
                                         "retry later") from None
                raise
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError, RuntimeError) as e:
                # RuntimeError: aiohttp's "Connection closed." when the pool is recycled mid-read
                if attempt == BATCHER_RETRIES or (isinstance(e, RuntimeError) and "Connection closed" not in str(e)):
                    raise
                log.debug("batcher call failed (%s), retrying (attempt %d)", e.__class__.__name__, attempt + 1)
        return unpack(out, len(self.classes))

    def files(self, files: list[tuple[str, bytes]]) -> np.ndarray:
        s = self.settings
        return decode_uploads(files, self.spec, s.max_pixels, s.max_request_pixels)

    # -- typed BentoML APIs: the schema and the client's methods

    @bentoml.api(route="/predict")
    @guarded
    async def predict(self, images: np.ndarray, resize: bool = False) -> Prediction:
        """Classify raw images: uint8 (N,H,W,C) (or floats in [0,1]) at the model's H×W (``resize`` to resize)."""
        x = self.conform(images, resize)
        return json_response(self.body(await self.infer_async(x)))

    @bentoml.api(route="/classify")
    @guarded
    async def classify(self, files: list[Path]) -> Prediction:
        """Classify image files (PNG, JPEG, ...): each decoded and resized to the model's input."""
        if len(files) > self.settings.max_images:
            raise HTTPError(413, f"{len(files)} files in one request; the limit is {self.settings.max_images} "
                                 "(ADAPTSERVE_MAX_IMAGES)")
        named = [(bentoml_patches.upload_filename(f), f.read_bytes()) for f in files]
        x = await self.off_loop(self.files, named)
        return json_response(self.body(await self.infer_async(x), [n for n, _ in named]))

    # -- GET /drift and GET /model (routes of the mounted app: BentoML's client reaches them with
    #    client.request("GET", "/drift"))

    def drift_status(self) -> dict:
        """The last completed drift check (a window of exactly W predicted images) and the current window's fill."""
        if self.monitor is None:
            return {"status": "disabled", "model": self.tag, "tests": [], "is_drift": False}
        return self.monitor.status()

    def manifest(self) -> dict:
        """The model's manifest, its tag and the ONNX Runtime providers it runs on."""
        return {**self.runtime.manifest, "tag": self.tag, "providers": self.runtime.providers}

    # -- the hand-parsed fast routes

    @guarded
    async def raw_predict(self, request: Request):
        body = await read_body(request)
        ctype = request.headers.get("content-type", "")

        def prepare():
            images, resize = parse_images(body, ctype, self.settings.max_images)
            return self.conform(images, resize or query_flag(request.url.query, "resize"))

        x = prepare() if len(body) <= 64 << 10 else await self.off_loop(prepare)
        return json_response(self.body(await self.infer_async(x)))

    @guarded
    async def raw_classify(self, request: Request):
        body = await read_body(request)
        named = await parse_uploads(request.headers, body, self.settings.max_images)
        x = await self.off_loop(self.files, named)
        return json_response(self.body(await self.infer_async(x), [n for n, _ in named]))


def service() -> AdaptService:
    return bentoml.get_current_service()


@api.post("/raw/predict", **http.RAW_PREDICT_DOC)
async def raw_predict_route(request: Request):
    return await service().raw_predict(request)


@api.post("/raw/classify", **http.RAW_CLASSIFY_DOC)
async def raw_classify_route(request: Request):
    return await service().raw_classify(request)


@api.get("/drift", **http.DRIFT_DOC)
async def drift_route(request: Request):
    return json_response(service().drift_status())


@api.get("/model", **http.MODEL_DOC)
async def model_route(request: Request):
    return json_response(service().manifest())


@api.get("/docs", include_in_schema=False)
async def docs_route(request: Request):
    """BentoML serves its Swagger UI at ``/`` (from ``/docs.json``); ``/docs`` is where users look for it."""
    from starlette.responses import RedirectResponse

    return RedirectResponse("/")


api.router.routes.extend(oip.routes(info=lambda: service().oip_info, infer=lambda x: service().infer_async(x),
                                    ready=lambda: True, max_images=lambda: SETTINGS.max_images))
# The inference routes first: a request is matched against the routes in order — twice, by BentoML's mount and
# then by this router — and the regex matches before the OIP infer route cost ≈ 50 µs of a ≈ 330 µs request.
api.router.routes.sort(key=lambda r: "POST" not in (getattr(r, "methods", None) or ()))
# FastAPI documents the two raw routes above in /docs.json; plain Starlette routes in front of them serve the
# requests, without FastAPI's per-request dependency solving and response handling.
api.router.routes[:0] = [Route(r.path, r.endpoint, methods=sorted(r.methods)) for r in api.routes
                         if r.path.startswith("/raw/")]


class ContentTypes:
    """Route the typed APIs' bodies by Content-Type before BentoML parses them (pure ASGI).

    ``POST /predict``: JSON goes to the typed API; a ``.npy`` body to ``/raw/predict`` (BentoML's typed APIs
    read JSON, multipart and pickle only; this keeps the binary path on the URL users know); anything else is
    a 415. ``POST /classify``: ``multipart/form-data`` with a boundary, else 415 (400 without a boundary)
    — BentoML would answer those with a 500 or parse them as JSON."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path")
        if scope["type"] == "http" and scope.get("method") == "POST" and path in ("/predict", "/classify"):
            raw = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
            ctype = raw.split(";")[0].strip().lower()
            if path == "/predict" and ctype in NPY_TYPES:
                scope = {**scope, "path": "/raw/predict", "raw_path": b"/raw/predict"}
            elif path == "/predict" and not (ctype in ("", "application/json") or ctype.endswith("+json")):
                return await error_response(415, f"unsupported Content-Type {ctype!r}: use application/json or "
                                                 "application/x-npy")(scope, receive, send)
            elif path == "/classify" and ctype != "multipart/form-data":
                return await error_response(415, f"unsupported Content-Type {ctype!r}: upload image files as "
                                                 "multipart/form-data")(scope, receive, send)
            elif path == "/classify" and "boundary=" not in raw.lower():
                return await error_response(400, "multipart/form-data without a boundary")(scope, receive, send)
        return await self.app(scope, receive, send)


AdaptService.add_asgi_middleware(ApiKeyMiddleware)
AdaptService.add_asgi_middleware(BodyLimit, max_bytes=SETTINGS.max_bytes)
AdaptService.add_asgi_middleware(ContentTypes)
