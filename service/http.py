"""HTTP plumbing of the service: bodies in (size-limited), ``.npy`` / JSON / multipart parsed into numpy,
JSON out, and every client error as ``{"error": "<what is wrong>", "status": <code>}``.

Pure functions of bytes and headers (unit-testable without a server), one ASGI middleware
(:class:`BodyLimit`) and one decorator (:func:`guarded`). No model here: callers bring images to the
model's input spec with :mod:`service.preprocess`.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import re

import numpy as np

from adaptserve.service.preprocess import ImageError, ImageTooLarge, decode_image, image_pixels, to_input_spec

log = logging.getLogger("adaptserve.service")

NPY_TYPES = ("application/x-npy", "application/npy", "application/octet-stream")


class HTTPError(Exception):
    """A client error: answered as ``{"error": message, "status": status}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


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


def json_response(obj, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response

    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


def error_response(status: int, message: str):
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return json_response({"error": message, "status": status}, status, headers)


def guarded(handler):
    """HTTPError → its 4xx; anything unexpected → a logged 500 with no traceback in the response."""

    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except HTTPError as e:
            return error_response(e.status, e.message)
        except Exception:
            log.exception("%s failed", handler.__name__)
            return error_response(500, "internal error (logged on the server)")

    return wrapper


# ---------------------------------------------------------------- bodies in

class BodyLimit:
    """Refuse (413) request bodies over ``max_bytes`` before any route reads them: by Content-Length, or —
    for a chunked body without one — by buffering at most ``max_bytes`` and replaying it. Pure ASGI."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                return await error_response(400, f"invalid Content-Length {declared.decode('latin-1')!r}")(
                    scope, receive, send)
            if n > self.max_bytes:
                return await error_response(413, f"request body of {n} bytes; the limit is {self.max_bytes} "
                                                 "(ADAPTSERVE_MAX_BYTES)")(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await error_response(413, f"request body over {self.max_bytes} bytes "
                                                 "(ADAPTSERVE_MAX_BYTES)")(scope, receive, send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def read_body(request) -> bytes:
    """The whole body (its size is bounded by :class:`BodyLimit`)."""
    return b"".join([chunk async for chunk in request.stream()])


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


def npy_array(body: bytes) -> np.ndarray:
    """A ``.npy`` body → array; HTTPError 400 naming what is wrong with it."""
    try:
        a = read_npy(body)
    except Exception as e:  # ValueError / OSError / EOFError / UnpicklingError on a bad file
        raise HTTPError(400, f"body is not a readable .npy array ({e.__class__.__name__}: {e})") from None
    if not isinstance(a, np.ndarray):
        raise HTTPError(400, "body must be a single .npy array, not an .npz archive")
    return a


def as_batch(a, max_images: int, what: str = "images") -> np.ndarray:
    """A numeric array of rank 2–4 → (N,H,W,C) (rank 2/3 = one image); HTTPError 400/413 naming the problem."""
    if not isinstance(a, np.ndarray):
        try:
            a = np.asarray(a)
        except (ValueError, TypeError, OverflowError) as e:
            raise HTTPError(400, f'"{what}" must be a rectangular nested list (all images of the same H×W×C): {e}') from None
    if a.dtype == object or a.dtype.kind in "USV":
        raise HTTPError(400, f"{what} must hold numbers (uint8 0-255 or floats in [0, 1]), got dtype {a.dtype}")
    if a.dtype == bool:
        raise HTTPError(400, f"{what} must hold numbers (uint8 0-255 or floats in [0, 1]), got booleans")
    if a.ndim in (2, 3):  # one (H,W) or (H,W,C) image
        a = a[None] if a.ndim == 3 else a[None, ..., None]
    if a.ndim != 4:
        raise HTTPError(400, f"{what} must be (N,H,W,C), or (H,W,C) / (H,W) for one image; got shape {a.shape}")
    if a.shape[0] == 0 or a.size == 0:
        raise HTTPError(400, f"no images: the batch is empty (shape {a.shape})")
    if a.shape[0] > max_images:
        raise HTTPError(413, f"{a.shape[0]} images in one request; the limit is {max_images} (ADAPTSERVE_MAX_IMAGES)")
    return a


def parse_images(body: bytes, content_type: str, max_images: int) -> tuple[np.ndarray, bool]:
    """A /predict body → ((N,H,W,C) array, resize?); HTTPError if bad.

    JSON: ``{"images": [...], "resize": false}``; ``.npy``: the array (``resize`` comes from the query)."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if not body:
        raise HTTPError(400, "empty request body: send {\"images\": [...]} as JSON or a .npy file")
    resize = False
    if ctype in NPY_TYPES:
        a = npy_array(body)
    elif ctype in ("application/json", "") or ctype.endswith("+json"):
        try:
            obj = loads(body)
        except (JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            raise HTTPError(400, f"body is not valid JSON: {e}") from None
        if not isinstance(obj, dict) or "images" not in obj:
            raise HTTPError(400, 'body must be a JSON object {"images": [...]}')
        images, resize = obj["images"], obj.get("resize", False)
        if not isinstance(resize, bool):
            raise HTTPError(400, f'"resize" must be true or false, got {resize!r}')
        if not isinstance(images, list):
            raise HTTPError(400, f'"images" must be a nested list (N,H,W,C) or (H,W,C), got {type(images).__name__}')
        if not images:
            raise HTTPError(400, "no images: the batch is empty")
        a = images
    else:
        raise HTTPError(415, f"unsupported Content-Type {ctype!r}: use application/json or application/x-npy")
    return as_batch(a, max_images), resize


def query_flag(query: str, name: str) -> bool:
    """``name=true|false|1|0`` from a query string (absent = false); HTTPError 400 on another value."""
    from urllib.parse import parse_qs

    values = parse_qs(query or "").get(name)
    if not values:
        return False
    v = values[-1].strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise HTTPError(400, f"query parameter {name} must be true or false, got {values[-1]!r}")


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


def decode_uploads(files: list[tuple[str, bytes]], spec, max_pixels: int, max_request_pixels: int) -> np.ndarray:
    """Decode image files and bring each to the input spec; HTTPError naming the first bad file.

    Pixel counts are read from every file's header first: a file over ``max_pixels`` or a request over
    ``max_request_pixels`` in all is refused (413) before anything is decoded."""
    if len(files) == 0:
        raise HTTPError(400, "no image files in the upload")
    total = 0
    for name, data in files:
        if not data:
            raise HTTPError(400, f"file {name!r} is empty")
        n = image_pixels(data)
        if n > max_pixels:
            raise HTTPError(413, f"file {name!r}: {n:,} pixels; the limit is {max_pixels:,} per image "
                                 "(ADAPTSERVE_MAX_PIXELS)")
        total += n
    if total > max_request_pixels:
        raise HTTPError(413, f"{total:,} pixels in {len(files)} files; the limit is {max_request_pixels:,} per request "
                             "(ADAPTSERVE_MAX_REQUEST_PIXELS)")
    out = []
    for name, data in files:
        try:
            out.append(to_input_spec(decode_image(data, max_pixels), spec)[0])
        except ImageTooLarge as e:
            raise HTTPError(413, f"file {name!r}: {e}") from None
        except ImageError as e:
            raise HTTPError(400, f"file {name!r}: {e}") from None
    return np.stack(out)


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


# ---------------------------------------------------------------- OpenAPI of the hand-parsed routes

_PIXEL = {"type": "number", "minimum": 0, "maximum": 255}


def _nested(rank: int) -> dict:
    """A non-empty nested list of ``rank`` levels with numeric leaves (JSON Schema cannot say rectangular)."""
    return _PIXEL if rank == 0 else {"type": "array", "minItems": 1, "items": _nested(rank - 1)}


IMAGES_SCHEMA = {"description": "(N,H,W,C) uint8 0-255 (or all floats in [0,1]), or (H,W,C) / (H,W) for one image; "
                                "rectangular, H×W the model's (GET /model: input_spec), C in 1, 3, 4",
                 "anyOf": [_nested(4), _nested(3), _nested(2)]}
PREDICTION_SCHEMA = {
    "type": "object", "required": ["labels", "class_indices", "probabilities", "model"],
    "properties": {"labels": {"type": "array", "items": {"type": "string"}},
                   "class_indices": {"type": "array", "items": {"type": "integer"}},
                   "probabilities": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                   "model": {"type": "string"}, "filenames": {"type": "array", "items": {"type": "string"}}}}
ERROR = {"description": "what is wrong with the request",
         "content": {"application/json": {"schema": {"type": "object", "properties": {
             "error": {"type": "string"}, "status": {"type": "integer"}}}}}}
ERRORS = {400: ERROR, 401: ERROR, 413: ERROR, 415: ERROR}


def ok(schema: dict) -> dict:
    return {200: {"description": "OK", "content": {"application/json": {"schema": schema}}}}


RAW_PREDICT_DOC = dict(
    summary="classify images sent as JSON or .npy (hand-parsed: orjson / .npy straight into numpy)",
    responses={**ok(PREDICTION_SCHEMA), **ERRORS},
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["images"],
                                        "properties": {"images": IMAGES_SCHEMA, "resize": {"type": "boolean"}}}},
        "application/x-npy": {"schema": {"type": "string", "format": "binary"}}}},
        "parameters": [{"name": "resize", "in": "query", "required": False, "schema": {"type": "boolean"}}]})
RAW_CLASSIFY_DOC = dict(
    summary="classify uploaded image files, any field names (hand-parsed)",
    responses={**ok(PREDICTION_SCHEMA), **ERRORS},
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"], "properties": {"files": {
            "type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}}}}}}})
DRIFT_DOC = dict(
    summary="result of the last drift check and the current window's fill",
    responses={**ok({"type": "object", "properties": {
        "status": {"type": "string", "enum": ["warming_up", "ok", "drift", "disabled"]}, "model": {"type": "string"},
        "window_size": {"type": "integer"}, "n_in_window": {"type": "integer"}, "alpha": {"type": "number"},
        "tests": {"type": "array", "items": {"type": "object"}}, "is_drift": {"type": "boolean"}}}), 401: ERROR})
MODEL_DOC = dict(summary="the model's manifest, tag and ONNX Runtime providers",
                 responses={**ok({"type": "object"}), 401: ERROR})
