"""The adaptserve BentoML 1.4 service — ONNX Runtime, no torch anywhere on this path.

    ADAPTSERVE_MODEL=adaptserve-dann:latest bentoml serve service.service:AdaptService

Endpoints (all JSON out; errors are ``{"error": "<what is wrong>", "status": <code>}``, never a traceback):

- ``POST /predict`` — body ``{"images": [...]}`` (``application/json``): an (N,H,W,C) nested list of uint8
  (or floats in [0, 1]), or one (H,W,C) / (H,W) image; or the raw bytes of a ``.npy`` file
  (``application/x-npy`` or ``application/octet-stream``), the fast binary path. Any size/channel count is
  brought to the model's input spec by :func:`service.preprocess.to_input_spec`.
  → ``{"labels", "class_indices", "probabilities", "model"}``.
- ``POST /classify`` — ``multipart/form-data`` with one or more image files (PNG, JPEG, ... any field name)
  → the same response plus ``filenames``.
- ``GET /drift`` — the last completed drift check (:meth:`service.drift.DriftReference.check` on a window of
  exactly W predicted images) and how full the current window is.
- ``GET /model`` — the model's manifest (plus its tag and ONNX Runtime providers).
- BentoML's own ``/livez``, ``/readyz``, ``/metrics`` (with the ``adaptserve_drift_*`` metrics) and
  ``/docs.json`` (which lists the endpoints above).

Body parsing and batching. The endpoints are a FastAPI router mounted on the service
(``@bentoml.asgi_app``) whose handlers take the raw Starlette request: the body is read with a byte limit,
parsed with orjson straight into numpy (no pydantic model of a nested list, which is most of the CPU of a
typed ``np.ndarray`` endpoint) and validated here, so every problem is a 4xx naming it. FastAPI only
contributes routing and the OpenAPI description (merged by BentoML into ``/docs.json``). By default each
request's array is one ONNX Runtime call (a request is already a batch of up to ``ADAPTSERVE_MAX_IMAGES``
images): small bodies are handled on the event loop, larger ones in a worker thread.

Adaptive batching (``ADAPTSERVE_BATCHING``: ``auto`` by default — on when the model runs on a GPU, off on the
CPU; ``on``/``off`` force it; see :func:`batching_enabled`) is BentoML's own: the router still parses and
validates, then hands the input-spec uint8 array to :class:`Batcher`, a ``batchable=True`` API in a
``bentoml.depends`` service, which merges concurrent calls into one ORT call. It runs in its own process, so
every request pays an extra inter-process HTTP call; on CPU that costs more than merging saves
(docs/benchmarks.md §5, docs/serving.md), so it is meant for GPU workers, where one large call beats many
small ones.

Drift. Each predicted image appends its discriminator score, softmax and features to a buffer; every full
window of W images (W = the window the model's thresholds were calibrated for) is checked on a single
background thread, off the request path, within a time budget (``ADAPTSERVE_DRIFT_BUDGET``, see
:class:`DriftMonitor`). At most ``MAX_PENDING_WINDOWS`` windows wait for a check; windows beyond that, or
arriving during the budget's cool-down, are dropped and counted (``windows_skipped``), so a flood of traffic
cannot queue unbounded work. State is per worker process (one worker by default).

Environment: ``ADAPTSERVE_MODEL`` (store tag or exported folder; default: in a built bento the model it
bundles, else ``adaptserve-dann:latest``),
``ADAPTSERVE_DEVICE`` (auto/cpu/cuda), ``ADAPTSERVE_THREADS`` (ORT intra-op threads, 0 = ORT's choice),
``ADAPTSERVE_MAX_IMAGES`` (default 1024 per request), ``ADAPTSERVE_MAX_BYTES`` (default 64 MiB per body),
``ADAPTSERVE_DRIFT_WINDOW`` (must equal the model's W if set: the thresholds are calibrated for that W, so
another value is refused at start-up rather than silently mis-calibrated), ``ADAPTSERVE_API_KEY`` (when
set, every route except the health, metrics and docs routes needs ``Authorization: Bearer <key>``),
``ADAPTSERVE_DRIFT`` (on/off, default on), ``ADAPTSERVE_DRIFT_BUDGET`` (default 0.05), ``ADAPTSERVE_BATCHING``
(on/off/auto, default auto: on with a GPU), ``ADAPTSERVE_BATCH_MAX_SIZE`` (images per merged call, default 256),
``ADAPTSERVE_BATCH_MAX_LATENCY_MS`` (default 60000: generous, since BentoML answers 503 to requests it
predicts will miss it). The batching variables are read at import, as they decide the service graph.
"""

from __future__ import annotations

import functools
import hmac
import io
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import bentoml  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from starlette.responses import Response  # noqa: E402

from service.preprocess import ImageError, decode_image, to_input_spec  # noqa: E402
from service.runtime import Model  # noqa: E402

log = logging.getLogger("adaptserve.service")

DEFAULT_MODEL = "adaptserve-dann:latest"


def bundled_model_tag(module_file: str | os.PathLike = __file__) -> str | None:
    """The exact model tag ``bentoml build`` bundled, when this module runs from a built bento
    (``<bento>/src/service/service.py`` beside ``<bento>/bento.yaml``); None elsewhere.

    Without it a bento served with no ``ADAPTSERVE_MODEL`` (``bentoml serve adaptserve:latest``, ``docker run``)
    would look up ``adaptserve-dann:latest`` — in a container a model that is not there, and on a machine
    with a store the newest local model rather than the one that was built in."""
    src = Path(module_file).resolve().parents[1]
    bento_yaml = src.parent / "bento.yaml"
    if src.name != "src" or not bento_yaml.is_file():
        return None
    import yaml

    info = yaml.safe_load(bento_yaml.read_text()) or {}
    tags = [m["tag"] for s in info.get("services") or [] for m in s.get("models") or []]
    return tags[0] if len(set(tags)) == 1 else None


MODEL_SOURCE = os.environ.get("ADAPTSERVE_MODEL") or bundled_model_tag() or DEFAULT_MODEL
MODEL_IS_FOLDER = Path(MODEL_SOURCE).is_dir()


def _refuse_a_tampered_model() -> None:
    """``bentoml serve`` and ``bentoml build`` import this module before any worker starts: a model whose files
    do not match its manifest stops them here with the IntegrityError, instead of workers that fail and are
    restarted forever. A model that is not in the store is left to BentoML's own error."""
    from service.runtime import resolve, verify

    try:
        folder, _ = resolve(MODEL_SOURCE)
    except (FileNotFoundError, ValueError):
        return
    verify(folder)


_refuse_a_tampered_model()
DEFAULT_MAX_IMAGES = 1024
DEFAULT_MAX_BYTES = 64 << 20
MAX_PENDING_WINDOWS = 4
DEFAULT_DRIFT_BUDGET = 0.05
# Bodies up to this size (a few images) are parsed and run on the event loop: that takes less time than the
# hop to a worker thread. Larger ones (a 64-image JSON body parses for tens of ms) go to the thread pool.
INLINE_MAX_BYTES = 64 << 10
DEFAULT_BATCH_MAX_SIZE = 256
DEFAULT_BATCH_MAX_LATENCY_MS = 60_000
NPY_TYPES = ("application/x-npy", "application/npy", "application/octet-stream")
# Routes that stay open when ADAPTSERVE_API_KEY is set (health, metrics, API description, BentoML's UI).
OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics", "/docs", "/docs.json", "/schema.json", "/")
OPEN_PREFIXES = ("/static_content/", "/assets/")


class HTTPError(Exception):
    """A client error: answered as ``{"error": message, "status": status}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"${name} must be at least {minimum}, got {value}")
    return value


ON, OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def _env_flag(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ON or raw in OFF:
        return raw in ON
    raise ValueError(f"${name} must be on or off, got {raw!r}")


def batching_enabled(raw: str, device: str, gpu: bool) -> bool:
    """``ADAPTSERVE_BATCHING``: ``on``, ``off`` or ``auto`` (the default) = on exactly when inference runs on
    a GPU (``ADAPTSERVE_DEVICE`` is not ``cpu`` and a CUDA device is usable). On the CPU BentoML's batching
    costs an extra inter-process hop per request that merging does not win back (docs/benchmarks.md §5);
    on a GPU one large call is much cheaper than many small ones."""
    mode = (raw or "").strip().lower()
    if mode in ("", "auto"):
        return gpu and device.strip().lower() != "cpu"
    if mode in ON or mode in OFF:
        return mode in ON
    raise ValueError(f"$ADAPTSERVE_BATCHING must be on, off or auto, got {raw!r}")


def _batching_from_env() -> bool:
    raw, device = os.environ.get("ADAPTSERVE_BATCHING", ""), os.environ.get("ADAPTSERVE_DEVICE", "auto")
    gpu = False
    if raw.strip().lower() in ("", "auto") and device.strip().lower() != "cpu":
        from service.runtime import providers

        gpu = "CUDAExecutionProvider" in providers("auto")  # only when onnxruntime *and* a CUDA device are usable
    return batching_enabled(raw, device, gpu)


# Read at import: they decide the service graph (with batching, a second BentoML service holds the model).
BATCHING = _batching_from_env()
BATCHER_RETRIES = 2
BATCHER_TIMEOUT_S = 20.0
BATCH_MAX_SIZE = _env_int("ADAPTSERVE_BATCH_MAX_SIZE", DEFAULT_BATCH_MAX_SIZE, minimum=2)
BATCH_MAX_LATENCY_MS = _env_int("ADAPTSERVE_BATCH_MAX_LATENCY_MS", DEFAULT_BATCH_MAX_LATENCY_MS)


# ---------------------------------------------------------------- JSON out

try:
    import orjson

    def dumps(obj) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)

    def loads(data: bytes):
        return orjson.loads(data)

    JSONDecodeError = orjson.JSONDecodeError
except ImportError:  # pragma: no cover - orjson is a dependency; the stdlib is the fallback
    def dumps(obj) -> bytes:
        return json.dumps(obj, default=lambda o: o.tolist()).encode()

    def loads(data: bytes):
        return json.loads(data)

    JSONDecodeError = json.JSONDecodeError


def json_response(obj, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


def error_response(status: int, message: str) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return json_response({"error": message, "status": status}, status, headers)


# ---------------------------------------------------------------- request bodies (pure, unit-testable)

_NPY_HEADER = re.compile(r"\{'descr': '([<>|=][a-z]\d{1,2})', 'fortran_order': False, "
                         r"'shape': \(((?:\d+, ?)*\d*)\), \} *\n")


def read_npy(body: bytes) -> np.ndarray:
    """A ``.npy`` body → array, like ``np.load(io.BytesIO(body), allow_pickle=False)``.

    The header numpy writes for plain C-ordered numeric arrays is parsed with one regular expression and the
    data is viewed in place (read-only); anything else — Fortran order, structured or object dtypes, another
    header layout, a size mismatch — goes to ``np.load``, which raises its usual errors. ``np.load`` parses
    the header with ``ast.literal_eval`` (Python's compiler), ≈ 0.1 ms of the ≈ 1 ms a one-image request costs.
    """
    if body[:6] == b"\x93NUMPY" and len(body) >= 10:
        major = body[6]
        size, start = ((int.from_bytes(body[8:10], "little"), 10) if major == 1 else
                       (int.from_bytes(body[8:12], "little"), 12) if major in (2, 3) else (-1, 0))
        m = _NPY_HEADER.fullmatch(body[start:start + size].decode("latin-1")) if size > 0 else None
        if m:
            dtype = np.dtype(m.group(1))
            shape = tuple(int(d) for d in m.group(2).replace(" ", "").split(",") if d)
            count = int(np.prod(shape, dtype=np.int64))
            if dtype.kind in "biuf" and len(body) - start - size == count * dtype.itemsize:
                return np.frombuffer(body, dtype, count=count, offset=start + size).reshape(shape)
    return np.load(io.BytesIO(body), allow_pickle=False)


def parse_images(body: bytes, content_type: str, max_images: int) -> np.ndarray:
    """A /predict body → an array of rank 4 (N,H,W,C) (rank 2/3 inputs are one image); HTTPError if bad."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if not body:
        raise HTTPError(400, "empty request body: send {\"images\": [...]} as JSON or a .npy file")
    if ctype in NPY_TYPES:
        try:
            a = read_npy(body)
        except Exception as e:  # ValueError / OSError / EOFError / UnpicklingError on a bad file
            raise HTTPError(400, f"body is not a readable .npy array ({e.__class__.__name__}: {e})") from None
        if not isinstance(a, np.ndarray):
            raise HTTPError(400, "body must be a single .npy array, not an .npz archive")
    elif ctype in ("application/json", "") or ctype.endswith("+json"):
        try:
            obj = loads(body)
        except (JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            raise HTTPError(400, f"body is not valid JSON: {e}") from None
        if not isinstance(obj, dict) or "images" not in obj:
            raise HTTPError(400, 'body must be a JSON object {"images": [...]}')
        images = obj["images"]
        if not isinstance(images, list):
            raise HTTPError(400, f'"images" must be a nested list (N,H,W,C) or (H,W,C), got {type(images).__name__}')
        if not images:
            raise HTTPError(400, "no images: the batch is empty")
        try:
            a = np.asarray(images)
        except (ValueError, TypeError, OverflowError) as e:
            raise HTTPError(400, f'"images" must be a rectangular nested list (all images of the same H×W×C): {e}') from None
    else:
        raise HTTPError(415, f"unsupported Content-Type {ctype!r}: use application/json or application/x-npy")
    if a.dtype == object or a.dtype.kind in "USV":
        raise HTTPError(400, f"images must hold numbers (uint8 0-255 or floats in [0, 1]), got dtype {a.dtype}")
    if a.dtype == bool:
        raise HTTPError(400, "images must hold numbers (uint8 0-255 or floats in [0, 1]), got booleans")
    if a.ndim in (2, 3):  # one (H,W) or (H,W,C) image
        a = a[None] if a.ndim == 3 else a[None, ..., None]
    if a.ndim != 4:
        raise HTTPError(400, f"images must be (N,H,W,C), or (H,W,C) / (H,W) for one image; got shape {a.shape}")
    if a.shape[0] == 0 or a.size == 0:
        raise HTTPError(400, f"no images: the batch is empty (shape {a.shape})")
    if a.shape[0] > max_images:
        raise HTTPError(413, f"{a.shape[0]} images in one request; the limit is {max_images} (ADAPTSERVE_MAX_IMAGES)")
    return a


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing (413) more than ``max_bytes`` — by Content-Length, or while streaming."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise HTTPError(400, f"invalid Content-Length {declared!r}") from None
        if n > max_bytes:
            raise HTTPError(413, f"request body of {n} bytes; the limit is {max_bytes} (ADAPTSERVE_MAX_BYTES)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise HTTPError(413, f"request body over {max_bytes} bytes (ADAPTSERVE_MAX_BYTES)")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_uploads(headers, body: bytes, max_images: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every file part of a multipart/form-data body; HTTPError if bad."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    ctype = headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "multipart/form-data":
        raise HTTPError(415, f"unsupported Content-Type {ctype.split(';')[0]!r}: upload image files as multipart/form-data")
    if not body:
        raise HTTPError(400, "empty request body: upload one or more image files")

    async def stream():
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=max_images, max_fields=100).parse()
    except MultiPartException as e:
        if "Too many files" in e.message:
            raise HTTPError(413, f"more than {max_images} files in one request (ADAPTSERVE_MAX_IMAGES)") from None
        raise HTTPError(400, f"malformed multipart body: {e.message}") from None
    except Exception as e:  # python-multipart raises its own errors on broken framing
        raise HTTPError(400, f"malformed multipart body: {e}") from None
    files = []
    try:
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((value.filename or f"file{len(files)}", await value.read()))
    finally:
        await form.close()
    if not files:
        raise HTTPError(400, "no image files in the upload: send one or more file fields (multipart/form-data)")
    return files


def decode_uploads(files: list[tuple[str, bytes]], spec) -> np.ndarray:
    """Decode uploaded files and bring each to the input spec; HTTPError naming the first bad file."""
    out = []
    for name, data in files:
        if not data:
            raise HTTPError(400, f"file {name!r} is empty")
        try:
            out.append(to_input_spec(decode_image(data), spec)[0])
        except ImageError as e:
            raise HTTPError(400, f"file {name!r}: {e}") from None
    return np.stack(out)


def format_drift(result: dict, ref) -> list[dict]:
    """One entry per test of a :meth:`DriftReference.check` result, with its threshold."""
    from service.score import drift_tests

    return drift_tests(result, ref)


# ---------------------------------------------------------------- metrics (prometheus_client)

_METRICS: dict | None = None
_METRICS_LOCK = threading.Lock()


def metrics() -> dict:
    """The adaptserve_drift_* metrics, created once per process (BentoML sets PROMETHEUS_MULTIPROC_DIR for
    its workers, so they appear on BentoML's /metrics)."""
    global _METRICS
    with _METRICS_LOCK:
        if _METRICS is None:
            from prometheus_client import Counter, Gauge, Histogram

            _METRICS = {
                "p_value": Gauge("adaptserve_drift_p_value", "p-value of the last drift check, per test",
                                 ["test"], multiprocess_mode="mostrecent"),
                "is_drift": Gauge("adaptserve_drift_is_drift", "1 if the last checked window alarmed, else 0",
                                  multiprocess_mode="mostrecent"),
                "checks": Counter("adaptserve_drift_checks_total", "drift checks run (windows of W images)"),
                "alarms": Counter("adaptserve_drift_alarms_total", "drift checks that alarmed"),
                "skipped": Counter("adaptserve_drift_windows_skipped_total",
                                   "full windows not checked: too many checks pending, or within the check budget"),
                "fill": Gauge("adaptserve_drift_window_fill", "images in the current, not yet full window",
                              multiprocess_mode="mostrecent"),
                "seconds": Histogram("adaptserve_drift_check_seconds", "time of one drift check",
                                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)),
            }
    return _METRICS


# ---------------------------------------------------------------- drift monitor

class DriftMonitor:
    """Buffers model outputs and checks full windows of W images on one background thread.

    ``budget`` caps the checks' share of time: after a check that took t seconds, the next check starts no
    sooner than t·(1/budget − 1) seconds later, so at most ~``budget`` of one core goes to drift checks
    however heavy the traffic. Windows that fill up during that cool-down are not all dropped: the most
    recent one is kept and checked when the cool-down ends (older ones are counted in ``windows_skipped``),
    so the status after a burst always reflects the burst's last window. At the default 5 % and a check of
    ≈ 3.5 ms (W = 200, docs/benchmarks.md §6), every window is checked up to ≈ 2,800 images/s; above that,
    windows are sampled.
    """

    def __init__(self, reference, model_tag: str, max_pending: int = MAX_PENDING_WINDOWS,
                 budget: float = DEFAULT_DRIFT_BUDGET):
        if not 0 < budget <= 1:
            raise ValueError(f"the drift check budget must be in (0, 1], got {budget}")
        self.ref, self.model_tag, self.window = reference, model_tag, reference.window
        self.max_pending, self.budget = max_pending, budget
        self._next_check_at = 0.0  # time.monotonic() before which new windows are skipped
        self._lock = threading.Lock()
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._n = 0
        self._pending = 0
        self._deferred = None  # the latest window that filled during the cool-down, checked when it ends
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="adaptserve-drift")
        self.windows_checked = self.windows_skipped = self.alarms = 0
        self.last: dict | None = None
        self.last_checked_at: float | None = None
        self.errors = 0
        self.m = metrics()
        self.m["fill"].set(0)
        self._executor.submit(self._warm)

    def _warm(self) -> None:
        try:  # the reference's own MMD term (n×n kernel) is computed once, here, not on the first window
            self.ref.mmd2(self.ref.pca_mean[None].repeat(2, 0))
        except Exception:  # pragma: no cover
            log.exception("drift reference warm-up failed")

    def add(self, p_target: np.ndarray, probabilities: np.ndarray, features: np.ndarray) -> None:
        windows = []
        with self._lock:
            self._parts.append((np.asarray(p_target, np.float32), np.asarray(probabilities, np.float32),
                                np.asarray(features, np.float32)))
            self._n += len(p_target)
            if self._n >= self.window:
                cols = [np.concatenate(c) for c in zip(*self._parts)]
                full = self._n // self.window * self.window
                windows = [tuple(c[i:i + self.window] for c in cols) for i in range(0, full, self.window)]
                rest = tuple(c[full:] for c in cols)
                self._parts, self._n = ([rest] if len(rest[0]) else []), self._n - full
            submit, defer = [], False
            cooling = time.monotonic() < self._next_check_at
            for w in windows:
                if cooling and self._pending < self.max_pending or self._deferred is not None:
                    if self._deferred is not None:  # a newer window replaces the one waiting
                        self.windows_skipped += 1
                        self.m["skipped"].inc()
                    else:
                        self._pending += 1
                        defer = True
                    self._deferred = w
                elif self._pending >= self.max_pending:
                    self.windows_skipped += 1
                    self.m["skipped"].inc()
                else:
                    self._pending += 1
                    submit.append(w)
            self.m["fill"].set(self._n)
        for w in submit:
            self._executor.submit(self._check, w)
        if defer:
            self._executor.submit(self._check_deferred)

    def _check_deferred(self) -> None:
        """Wait out the cool-down, then check the most recent window that filled during it."""
        with self._lock:
            wait = self._next_check_at - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        with self._lock:
            window, self._deferred = self._deferred, None
        self._check(window)

    def _check(self, window) -> None:
        t0 = time.perf_counter()
        try:
            result = self.ref.check(*window)
        except Exception:  # a bug, not the client's: log it, keep serving
            log.exception("drift check failed")
            with self._lock:
                self.errors += 1
                self._pending -= 1
            return
        seconds = time.perf_counter() - t0
        tests = format_drift(result, self.ref)
        with self._lock:
            self._next_check_at = time.monotonic() + seconds * (1 / self.budget - 1)
            self._pending -= 1
            self.windows_checked += 1
            self.alarms += bool(result["drift"])
            self.last = {"tests": tests, "is_drift": bool(result["drift"]), "check_seconds": seconds}
            self.last_checked_at = time.time()
        self.m["checks"].inc()
        if result["drift"]:
            self.m["alarms"].inc()
        self.m["is_drift"].set(1 if result["drift"] else 0)
        for t in tests:
            self.m["p_value"].labels(test=t["name"]).set(t["p_value"])
        self.m["seconds"].observe(seconds)

    def status(self) -> dict:
        with self._lock:
            last = self.last
            out = {"status": "warming_up" if last is None else ("drift" if last["is_drift"] else "ok"),
                   "model": self.model_tag, "window_size": self.window, "n_in_window": self._n,
                   "alpha": self.ref.alpha, "tests": last["tests"] if last else [],
                   "is_drift": bool(last and last["is_drift"]), "windows_checked": self.windows_checked,
                   "windows_pending": self._pending, "windows_skipped": self.windows_skipped,
                   "alarms": self.alarms, "last_checked_at": self.last_checked_at}
        return out

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until no check is pending (tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._pending == 0:
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- API key

class ApiKeyMiddleware:
    """When ``ADAPTSERVE_API_KEY`` is set, require ``Authorization: Bearer <key>`` on every route but the
    open ones (health, metrics, API docs); answer 401 otherwise. Pure ASGI, so the body is not touched."""

    def __init__(self, app, key: str | None = None):
        self.app = app
        self.key = (key if key is not None else os.environ.get("ADAPTSERVE_API_KEY", "")).encode()

    @staticmethod
    def is_open(path: str) -> bool:
        return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)

    async def __call__(self, scope, receive, send):
        if not self.key or scope["type"] != "http" or self.is_open(scope.get("path", "")):
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        message = "missing API key: send Authorization: Bearer <key>" if not auth else "invalid API key"
        await error_response(401, message)(scope, receive, send)


# ---------------------------------------------------------------- the service

def guarded(handler):
    """HTTPError → its 4xx; anything unexpected → a logged 500 with no traceback in the response."""

    @functools.wraps(handler)
    async def wrapper(self, request: Request):
        try:
            return await handler(self, request)
        except HTTPError as e:
            return error_response(e.status, e.message)
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(500, "internal error (logged on the server)")

    return wrapper


_PIXEL = {"type": "number", "minimum": 0, "maximum": 255}


def _nested(rank: int) -> dict:
    """A non-empty nested list of ``rank`` levels with numeric leaves (JSON Schema cannot say rectangular)."""
    return _PIXEL if rank == 0 else {"type": "array", "minItems": 1, "items": _nested(rank - 1)}


_IMAGES_SCHEMA = {"description": "(N,H,W,C) uint8 0-255 (or all floats in [0,1]), or (H,W,C) / (H,W) for one image; "
                                 "rectangular, C in 1, 3, 4", "anyOf": [_nested(4), _nested(3), _nested(2)]}
_PREDICTION_SCHEMA = {
    "type": "object", "required": ["labels", "class_indices", "probabilities", "model"],
    "properties": {"labels": {"type": "array", "items": {"type": "string"}},
                   "class_indices": {"type": "array", "items": {"type": "integer"}},
                   "probabilities": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                   "model": {"type": "string"}}}
_ERROR = {"description": "what is wrong with the request",
          "content": {"application/json": {"schema": {"type": "object", "properties": {
              "error": {"type": "string"}, "status": {"type": "integer"}}}}}}
_ERRORS = {400: _ERROR, 401: _ERROR, 413: _ERROR, 415: _ERROR}


def _ok(schema: dict) -> dict:
    return {200: {"description": "OK", "content": {"application/json": {"schema": schema}}}}


api = FastAPI(title="adaptserve", docs_url=None, redoc_url=None, openapi_url=None)


def cancel_bentoml_timeout_timers() -> None:
    """Make BentoML's ``TimeoutMiddleware`` cancel its per-request timer when the request is done.

    BentoML 1.4.39 (``bentoml/_internal/server/http/traffic.py``) schedules ``loop.call_later(timeout, ...)``
    for every request and never cancels it, so each request leaves a timer, its future and a copied context
    on the event loop for ``traffic.timeout`` seconds (120 s here): 12,000 one-image requests left 32k
    GC-tracked objects instead of 2k (in-process), and in a 160-s soak the worker grew by 164 MiB without
    this fix against 84 MiB with it (docs/benchmarks.md §8). This replaces the
    middleware's ``__call__`` with the same logic plus ``timer.cancel()``: a request still gets BentoML's 504
    after ``traffic.timeout``. Applied at import, before BentoML builds the app; a BentoML whose middleware
    differs from the one this was written for is left alone (and logged).
    """
    import asyncio
    import inspect

    from bentoml._internal.server.http import traffic

    cls = traffic.TimeoutMiddleware
    if getattr(cls.__call__, "_adaptserve", False):
        return
    try:
        source = inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        source = ""
    if "call_later" not in source or ".cancel()" in source.replace("fut.cancel()", ""):
        log.info("BentoML's TimeoutMiddleware is not the one patched here; leaving it as it is")
        return

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message):
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            await waiter
        except asyncio.TimeoutError:
            if fut.cancel():
                from starlette.responses import JSONResponse

                await JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                   status_code=504)(scope, receive, send)
        else:
            await fut
        finally:
            timer.cancel()

    __call__._adaptserve = True
    cls.__call__ = __call__


cancel_bentoml_timeout_timers()


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the JSON path (once the service is loaded).

    Parsing a 64-image JSON body allocates ~70k lists; with Python's default thresholds each of them
    triggers collections that walk every object the worker has loaded (BentoML, FastAPI, OpenTelemetry,
    ...). Freezing the start-up objects and collecting the youngest generation every 50k allocations
    instead of 700 made :func:`parse_images` ≈ 3× cheaper in CPU (78 → 24 ms per 64-image body, measured
    in-process; benchmarks/serve_throughput.py has the end-to-end numbers). Parsed bodies are freed by
    reference counting, so memory does not grow.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def open_model(bento_model=None) -> tuple[Model, str]:
    """The model named by ``ADAPTSERVE_MODEL`` (a folder, or the service's BentoModel) and its tag."""
    device = os.environ.get("ADAPTSERVE_DEVICE", "auto")
    threads = _env_int("ADAPTSERVE_THREADS", 0, minimum=0)
    if MODEL_IS_FOLDER:
        return Model.open(MODEL_SOURCE, device=device, threads=threads), str(Path(MODEL_SOURCE).resolve())
    return Model.open(bento_model.path, device=device, threads=threads), str(bento_model.tag)


def pack(probabilities: np.ndarray, features: np.ndarray, p_target: np.ndarray) -> np.ndarray:
    """One float32 (N, K + D + 1) array — the batchable API's output must be one array split on axis 0."""
    return np.concatenate([probabilities, features, p_target[:, None]], axis=1, dtype=np.float32)


def unpack(out: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.ascontiguousarray(a) for a in (out[:, :n_classes], out[:, n_classes:-1], out[:, -1]))


@bentoml.service(name="adaptserve-batcher", traffic={"timeout": 120})
class Batcher:
    """The model behind BentoML's adaptive batching (only when batching is on: :func:`batching_enabled`).

    A dependency of :class:`AdaptService`, so ``bentoml serve`` runs it as its own process; the router
    parses and validates each request, brings it to the input spec and calls :meth:`infer` with the uint8
    array; BentoML merges concurrent calls (up to ``ADAPTSERVE_BATCH_MAX_SIZE`` images, waiting at most
    ``ADAPTSERVE_BATCH_MAX_LATENCY_MS``) into one ONNX Runtime call and splits the result back.
    """

    if not MODEL_IS_FOLDER:
        bento_model = bentoml.models.BentoModel(MODEL_SOURCE)

    def __init__(self) -> None:
        self.model, self.tag = open_model(None if MODEL_IS_FOLDER else self.bento_model)

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=BATCH_MAX_SIZE, max_latency_ms=BATCH_MAX_LATENCY_MS)
    def infer(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N,H,W,C) in the input spec → float32 (N, K + D + 1): probabilities, features, P(target)."""
        pred = self.model.predict(images)
        return pack(pred.probabilities, pred.features, pred.p_target)


# No OpenTelemetry span for the two inference routes: BentoML has no trace exporter configured by default, and
# its span bookkeeping was ~0.6 of the ~1.5 ms CPU of a one-image request (benchmarks/serve_cpu.py). To trace
# them, override with e.g. BENTOML_CONFIG_OPTIONS="services.adaptserve.tracing.excluded_urls=^$".
UNTRACED_ROUTES = ["/predict", "/classify"]


@bentoml.service(name="adaptserve", traffic={"timeout": 120}, tracing={"excluded_urls": UNTRACED_ROUTES})
@bentoml.asgi_app(api, path="/")
class AdaptService:
    """DANN-adapted classifier (ONNX Runtime) with drift monitoring."""

    if not MODEL_IS_FOLDER:
        bento_model = bentoml.models.BentoModel(MODEL_SOURCE)  # `bentoml build` bundles it
    if BATCHING:
        batcher = bentoml.depends(Batcher)

    def __init__(self) -> None:
        t0 = time.perf_counter()
        self.max_images = _env_int("ADAPTSERVE_MAX_IMAGES", DEFAULT_MAX_IMAGES)
        self.max_bytes = _env_int("ADAPTSERVE_MAX_BYTES", DEFAULT_MAX_BYTES)
        self.model, self.tag = open_model(None if MODEL_IS_FOLDER else self.bento_model)
        ref = self.model.drift_reference
        window = _env_int("ADAPTSERVE_DRIFT_WINDOW", ref.window)
        if window != ref.window:
            raise ValueError(f"ADAPTSERVE_DRIFT_WINDOW={window}, but the drift thresholds of {self.tag} are calibrated "
                             f"for windows of {ref.window} images; re-export with another window instead")
        budget = float(os.environ.get("ADAPTSERVE_DRIFT_BUDGET", "").strip() or DEFAULT_DRIFT_BUDGET)
        self.monitor = DriftMonitor(ref, self.tag, budget=budget) if _env_flag("ADAPTSERVE_DRIFT", True) else None
        tune_gc()
        self.classes = np.array(self.model.classes, dtype=object)
        log.info("adaptserve: model %s (%s) on %s, drift checks %s, adaptive batching %s, opened in %.2f s",
                 self.tag, self.model.input_spec, self.model.providers,
                 f"on (window {ref.window})" if self.monitor else "off",
                 f"on (max {BATCH_MAX_SIZE} images, {BATCH_MAX_LATENCY_MS} ms)" if BATCHING else "off",
                 time.perf_counter() - t0)

    # -- shared

    def _prepare(self, images: np.ndarray) -> np.ndarray:
        try:
            return self.model.prepare(images)
        except ImageError as e:
            raise HTTPError(400, str(e)) from None

    def _result(self, probabilities: np.ndarray, features: np.ndarray, p_target: np.ndarray) -> dict:
        """Feed the drift monitor; the response body of N predictions."""
        if self.monitor is not None:
            self.monitor.add(p_target, probabilities, features)
        idx = probabilities.argmax(1)
        return {"labels": self.classes[idx].tolist(), "class_indices": idx, "probabilities": probabilities,
                "model": self.tag}

    def _run(self, images: np.ndarray) -> dict:
        pred = self.model.predict(self._prepare(images))
        return self._result(pred.probabilities, pred.features, pred.p_target)

    async def _infer(self, prepared: np.ndarray) -> dict:
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
                out = await asyncio.wait_for(self.batcher.to_async.infer(prepared), BATCHER_TIMEOUT_S)
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
        return self._result(*unpack(out, len(self.classes)))

    def _predict_body(self, body: bytes, content_type: str) -> bytes:
        return dumps(self._run(parse_images(body, content_type, self.max_images)))

    def _classify_files(self, files: list[tuple[str, bytes]]) -> bytes:
        out = self._run(decode_uploads(files, self.model.input_spec))
        out["filenames"] = [name for name, _ in files]
        return dumps(out)

    # -- endpoints

    @guarded
    async def predict(self, request: Request):
        from starlette.concurrency import run_in_threadpool

        body = await read_body(request, self.max_bytes)
        ctype = request.headers.get("content-type", "")
        small = len(body) <= INLINE_MAX_BYTES
        if BATCHING:
            prepare = lambda: self._prepare(parse_images(body, ctype, self.max_images))  # noqa: E731
            x = prepare() if small else await run_in_threadpool(prepare)
            return json_response(await self._infer(x))
        data = self._predict_body(body, ctype) if small else await run_in_threadpool(self._predict_body, body, ctype)
        return Response(data, media_type="application/json")

    @guarded
    async def classify(self, request: Request):
        from starlette.concurrency import run_in_threadpool

        body = await read_body(request, self.max_bytes)
        files = await parse_uploads(request.headers, body, self.max_images)
        if BATCHING:
            x = await run_in_threadpool(decode_uploads, files, self.model.input_spec)
            return json_response({**await self._infer(x), "filenames": [name for name, _ in files]})
        data = await run_in_threadpool(self._classify_files, files)
        return Response(data, media_type="application/json")

    @guarded
    async def drift(self, request: Request):
        if self.monitor is None:
            return json_response({"status": "disabled", "model": self.tag, "tests": [], "is_drift": False})
        return json_response(self.monitor.status())

    @guarded
    async def model_info(self, request: Request):
        return json_response({**self.model.manifest, "tag": self.tag, "providers": self.model.providers})


# The routes are module functions, not FastAPI class views: BentoML gives a class view's ``self`` a sync
# dependency (``get_current_service``), which FastAPI runs in a worker thread — a thread hop per request.

@api.post("/predict", summary="classify images sent as JSON or .npy", responses={**_ok(_PREDICTION_SCHEMA), **_ERRORS},
          openapi_extra={"requestBody": {"required": True, "content": {
              "application/json": {"schema": {"type": "object", "required": ["images"],
                                              "properties": {"images": _IMAGES_SCHEMA}}},
              "application/x-npy": {"schema": {"type": "string", "format": "binary"}}}}})
async def predict_route(request: Request):
    return await bentoml.get_current_service().predict(request)


@api.post("/classify", summary="classify uploaded image files (PNG, JPEG, ...)",
          responses={**_ok({**_PREDICTION_SCHEMA, "properties": {**_PREDICTION_SCHEMA["properties"],
                                                                 "filenames": {"type": "array", "items": {"type": "string"}}}}),
                     **_ERRORS},
          openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
              "type": "object", "required": ["files"], "properties": {"files": {
                  "type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}}}}}}})
async def classify_route(request: Request):
    return await bentoml.get_current_service().classify(request)


@api.get("/drift", summary="result of the last drift check and the current window's fill",
         responses={**_ok({"type": "object", "properties": {
             "status": {"type": "string", "enum": ["warming_up", "ok", "drift", "disabled"]}, "model": {"type": "string"},
             "window_size": {"type": "integer"}, "n_in_window": {"type": "integer"}, "alpha": {"type": "number"},
             "tests": {"type": "array", "items": {"type": "object"}}, "is_drift": {"type": "boolean"}}}),
             401: _ERROR})
async def drift_route(request: Request):
    return await bentoml.get_current_service().drift(request)


@api.get("/model", summary="the model's manifest", responses={**_ok({"type": "object"}), 401: _ERROR})
async def model_info_route(request: Request):
    return await bentoml.get_current_service().model_info(request)



@api.get("/docs", include_in_schema=False)
async def docs_route(request: Request):
    """BentoML serves its Swagger UI at ``/`` (from ``/docs.json``); ``/docs`` is where users look for it."""
    from starlette.responses import RedirectResponse

    return RedirectResponse("/")


AdaptService.add_asgi_middleware(ApiKeyMiddleware)
