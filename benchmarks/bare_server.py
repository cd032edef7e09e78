"""The baseline for benchmarks/serve_throughput.py: the least a server can do with the same model.onnx.

    python benchmarks/bare_server.py MODEL_FOLDER --port 38500 [--threads 1]

Starlette + uvicorn (one process, 127.0.0.1 only) and one ONNX Runtime session of ``model.onnx``.
``POST /predict`` takes ``{"images": [...]}`` (uint8 (N,H,W,C) or one (H,W,C), parsed with orjson) or a
``.npy`` body, runs the classifier inline on the event loop and answers
``{"class_indices": [...], "probabilities": [[...]]}``. No validation beyond what numpy does, no
resizing, no discriminator, no drift, no metrics — so it bounds what the service could reach.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def make_app(model_path: str, threads: int) -> Starlette:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model_path, sess_options=so, providers=["CPUExecutionProvider"])

    async def predict(request: Request) -> Response:
        body = await request.body()
        if request.headers.get("content-type", "").startswith("application/json"):
            x = np.asarray(orjson.loads(body)["images"], dtype=np.uint8)
        else:
            x = np.load(io.BytesIO(body), allow_pickle=False)
        if x.ndim == 3:
            x = x[None]
        (probs,) = sess.run(["probabilities"], {"images": x})
        out = {"class_indices": probs.argmax(1), "probabilities": probs}
        return Response(orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    async def readyz(request: Request) -> Response:
        return Response(b"ok")

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/readyz", readyz)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="an exported model folder (holds model.onnx)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (0 = ORT's choice)")
    args = ap.parse_args()
    app = make_app(f"{args.model}/model.onnx", args.threads)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
