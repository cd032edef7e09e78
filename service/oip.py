"""The Open Inference Protocol (KServe v2 / Triton HTTP) in front of one adaptserve model.

Routes (``routes(...)``, mounted on the service):

- ``GET /v2`` — server metadata; ``GET /v2/health/live``, ``GET /v2/health/ready`` — 200 when live/ready.
- ``GET /v2/models/{name}[/versions/{version}]`` — model metadata: input ``images`` UINT8 ``[-1, H, W, C]``;
  outputs ``probabilities`` and ``logits`` FP32 ``[-1, K]``, ``features`` FP32 ``[-1, D]``, ``p_target``
  FP32 ``[-1]`` (the domain discriminator's P(target), what drift monitoring reads).
- ``GET /v2/models/{name}[/versions/{version}]/ready``.
- ``POST /v2/models/{name}[/versions/{version}]/infer`` — JSON tensors (``data`` flat in row-major order,
  or nested) and the **binary tensor extension**: a body whose first ``Inference-Header-Content-Length``
  bytes are the JSON header and the rest the raw little-endian tensors, each input with
  ``parameters.binary_data_size``; outputs come back binary when the request says
  ``parameters.binary_data_output`` or an output's ``parameters.binary_data`` (then the response carries
  ``Inference-Header-Content-Length`` too). Request parameter ``resize: true`` resizes images whose H×W
  is not the model's (otherwise such a request is a 400, like every raw-array path of the service).

Errors are ``{"error": "..."}``: 400 for a bad request, 404 for another model name. ``name`` is the model
name of the store tag (``adaptserve-dann`` for ``adaptserve-dann:abc123``), ``version`` its version.
Spec: https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np

from adaptserve.service.http import HTTPError, dumps, loads, read_body
from adaptserve.service.preprocess import ImageError, InputSpec, conform

HEADER = "inference-header-content-length"
DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64}
OUTPUTS = ("probabilities", "logits", "features", "p_target")


def oip_error(status: int, message: str):
    from starlette.responses import Response

    return Response(dumps({"error": message}), status_code=status, media_type="application/json")


@dataclass
class ModelInfo:
    name: str
    version: str
    spec: InputSpec
    n_classes: int
    n_features: int

    def metadata(self) -> dict:
        s = self.spec
        return {"name": self.name, "versions": [self.version], "platform": "onnxruntime_onnx",
                "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, s.height, s.width, s.channels]}],
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, self.n_classes]},
                            {"name": "logits", "datatype": "FP32", "shape": [-1, self.n_classes]},
                            {"name": "features", "datatype": "FP32", "shape": [-1, self.n_features]},
                            {"name": "p_target", "datatype": "FP32", "shape": [-1]}]}


def parse_request(body: bytes, header_length: str | None, max_images: int) -> tuple[dict, np.ndarray]:
    """An infer body → (the JSON request, the ``images`` tensor as given); HTTPError 400 naming the problem."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise HTTPError(400, f"invalid Inference-Header-Content-Length {header_length!r}") from None
        if not 0 < n <= len(body):
            raise HTTPError(400, f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
        head, blob = body[:n], memoryview(body)[n:]
    else:
        head, blob = body, memoryview(b"")
    try:
        req = loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"the inference request header is not valid JSON: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise HTTPError(400, 'the request must be a JSON object with a non-empty "inputs" list')
    offset, images = 0, None
    for t in req["inputs"]:
        if not isinstance(t, dict) or not {"name", "shape", "datatype"} <= t.keys():
            raise HTTPError(400, 'each input needs "name", "shape" and "datatype"')
        shape, dtype, size = t["shape"], t["datatype"], (t.get("parameters") or {}).get("binary_data_size")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise HTTPError(400, f"input {t['name']!r}: shape must be a list of non-negative integers, got {shape!r}")
        if dtype not in DTYPES:
            raise HTTPError(400, f"input {t['name']!r}: unknown datatype {dtype!r}")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(blob):
                raise HTTPError(400, f"input {t['name']!r}: binary_data_size {size!r} runs past the body's "
                                     f"{len(blob)} bytes of binary data")
            raw, offset = blob[offset:offset + size], offset + size
        if t["name"] != "images":
            continue
        if dtype != "UINT8":
            raise HTTPError(400, f"input 'images' must be UINT8 (pixels 0-255), got {dtype}")
        if len(shape) != 4:
            raise HTTPError(400, f"input 'images' must have shape [N, H, W, C], got {shape}")
        if shape[0] > max_images:
            raise HTTPError(400, f"{shape[0]} images in one request; the limit is {max_images} (ADAPTSERVE_MAX_IMAGES)")
        count = int(np.prod(shape))
        if size is not None:
            if size != count:
                raise HTTPError(400, f"input 'images': binary_data_size {size} is not the {count} bytes of shape {shape}")
            images = np.frombuffer(raw, np.uint8).reshape(shape)
        else:
            data = t.get("data")
            if data is None:
                raise HTTPError(400, "input 'images' has neither \"data\" nor parameters.binary_data_size")
            try:
                a = np.asarray(data)
            except (ValueError, TypeError) as e:
                raise HTTPError(400, f"input 'images': data is not a rectangular list of numbers: {e}") from None
            if a.dtype.kind not in "iu" or a.size != count or (a.size and (a.min() < 0 or a.max() > 255)):
                raise HTTPError(400, f"input 'images': data must hold {count} integers 0-255 for shape {shape}, got "
                                     f"{a.size} of dtype {a.dtype}")
            images = a.astype(np.uint8).reshape(shape)
    if images is None:
        raise HTTPError(400, "no input named 'images' in the request")
    if offset != len(blob):
        raise HTTPError(400, f"{len(blob) - offset} bytes of binary data after the last input")
    return req, images


def encode_response(req: dict, info: ModelInfo, outputs: dict[str, np.ndarray]) -> tuple[bytes, dict]:
    """(body, headers) of an infer response: the requested outputs (all by default), JSON or binary."""
    params = req.get("parameters") or {}
    binary_all = bool(params.get("binary_data_output", False))
    wanted = req.get("outputs")
    if wanted is None:
        wanted = [{"name": n} for n in OUTPUTS]
    if not isinstance(wanted, list) or not all(isinstance(o, dict) and "name" in o for o in wanted):
        raise HTTPError(400, '"outputs" must be a list of {"name": ...}')
    unknown = [o["name"] for o in wanted if o["name"] not in outputs]
    if unknown:
        raise HTTPError(400, f"unknown output(s) {unknown}; this model has {list(OUTPUTS)}")
    tensors, blobs = [], []
    for o in wanted:
        a = np.ascontiguousarray(outputs[o["name"]], np.float32)
        t = {"name": o["name"], "datatype": "FP32", "shape": list(a.shape)}
        if (o.get("parameters") or {}).get("binary_data", binary_all):
            raw = a.astype("<f4", copy=False).tobytes()
            t["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            t["data"] = a.ravel()
        tensors.append(t)
    out = {"model_name": info.name, "model_version": info.version, "outputs": tensors}
    if "id" in req:
        out["id"] = req["id"]
    head = dumps(out)
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER: str(len(head))}


def routes(info: Callable[[], ModelInfo], infer: Callable[[np.ndarray], Awaitable[dict]],
           ready: Callable[[], bool], max_images: Callable[[], int]):
    """Starlette routes of the protocol. ``info()`` → the served model; ``await infer(uint8 images in the
    spec)`` → the four outputs (and feeds the drift monitor); ``ready()``; ``max_images()``. Called per
    request, so the routes can be built before the service instance exists."""
    from starlette.responses import Response
    from starlette.routing import Route

    def check_name(request) -> ModelInfo:
        m = info()
        name, version = request.path_params["name"], request.path_params.get("version")
        if name != m.name or version not in (None, "", m.version):
            asked = name + (f" version {version}" if version else "")
            raise HTTPError(404, f"model {asked!r} not found; this server serves {m.name!r} version {m.version!r}")
        return m

    def answer(handler):
        async def endpoint(request):
            try:
                return await handler(request)
            except HTTPError as e:
                return oip_error(e.status, e.message)
        return endpoint

    async def server_metadata(request):
        return Response(dumps({"name": "adaptserve", "version": "1", "extensions": ["binary_tensor_data"]}),
                        media_type="application/json")

    async def live(request):
        return Response(b"", status_code=200)

    async def server_ready(request):
        return Response(b"", status_code=200 if ready() else 503)

    async def metadata(request):
        return Response(dumps(check_name(request).metadata()), media_type="application/json")

    async def model_ready(request):
        check_name(request)
        return Response(b"", status_code=200 if ready() else 503)

    async def infer_route(request):
        m = check_name(request)
        body = await read_body(request)
        req, images = parse_request(body, request.headers.get(HEADER), max_images())
        resize = (req.get("parameters") or {}).get("resize", False)
        if not isinstance(resize, bool):
            raise HTTPError(400, f'parameter "resize" must be true or false, got {json.dumps(resize)}')
        try:
            x = conform(images, m.spec, resize=resize)
        except ImageError as e:
            raise HTTPError(400, str(e)) from None
        outputs = await infer(x)
        data, headers = encode_response(req, m, outputs)
        return Response(data, headers=headers)

    paths = [("/v2", server_metadata, "GET"), ("/v2/health/live", live, "GET"),
             ("/v2/health/ready", server_ready, "GET")]
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        paths += [(base, metadata, "GET"), (base + "/ready", model_ready, "GET"), (base + "/infer", infer_route, "POST")]
    return [Route(p, answer(h), methods=[m]) for p, h, m in paths]
