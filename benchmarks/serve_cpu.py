"""CPU per /predict request, in-process: BentoML's whole app vs the mounted raw router alone vs the handler.

    ADAPTSERVE_DATA=../shared/data .venv/bin/python benchmarks/serve_cpu.py MODEL_FOLDER

Drives the ASGI apps directly (no sockets, no client in the process's CPU time) with a 1-image ``.npy``
body and a 64-image JSON body (MNIST-M test images) and prints wall and process CPU time per request for
``AdaptService.to_asgi()`` at ``/predict`` (BentoML's middleware: OpenTelemetry, metrics, access log,
timeout, concurrency, context, adaptserve's three, then the typed API for JSON or the raw route for
``.npy``), the mounted FastAPI router ``service.service.api`` alone at ``/raw/predict``, and the raw
handler's work without ASGI (parse, validate, ORT, drift buffer, JSON out). CPU time is robust to other jobs
on the machine; wall time is not.
"""

from __future__ import annotations

import asyncio
import io
import lzma
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


async def call(app, path: str, body: bytes, ctype: bytes) -> None:
    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    k = 0

    async def receive():
        nonlocal k
        k += 1
        return {"type": "http.request", "body": chunks[k - 1], "more_body": k < len(chunks)}

    out = []

    async def send(message):
        out.append(message)

    scope = {"type": "http", "http_version": "1.1", "method": "POST", "path": path, "raw_path": path.encode(),
             "root_path": "", "scheme": "http", "query_string": b"", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 3000), "state": {},
             "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), (b"host", b"x")]}
    await app(scope, receive, send)
    assert out[0]["status"] == 200, out


async def main(model: str, data_root: str) -> None:
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp())  # before bentoml is imported
    os.environ.update(ADAPTSERVE_MODEL=model, ADAPTSERVE_THREADS="1", BENTOML_DO_NOT_TRACK="True")
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import orjson

    import adaptserve.service.service as S

    app = S.AdaptService.to_asgi()
    started = asyncio.Event()

    async def lifespan_receive():
        if not started.is_set():
            return {"type": "lifespan.startup"}
        await asyncio.sleep(3600)

    async def lifespan_send(message):
        if message["type"] == "lifespan.startup.complete":
            started.set()

    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                   lifespan_receive, lifespan_send))
    await started.wait()
    svc = S.bentoml.get_current_service()
    from adaptserve.service.http import dumps, parse_images
    from adaptserve.service.preprocess import to_input_spec

    with lzma.open(Path(data_root) / "mnist_m" / "mnist_m_test_images.npy.xz") as f:
        x = to_input_spec(np.load(f)[:64], svc.spec)

    def handler(body: bytes, ctype: str) -> bytes:
        images, resize = parse_images(body, ctype, svc.settings.max_images)
        return dumps(svc.body(svc.infer(svc.conform(images, resize))))

    buf = io.BytesIO()
    np.save(buf, x[:1])
    cases = [("1 image, .npy", buf.getvalue(), b"application/x-npy", 300),
             ("64 images, JSON", orjson.dumps({"images": x.tolist()}), b"application/json", 20)]
    for name, body, ctype, n in cases:
        runs = [("BentoML app", lambda: call(app, "/predict", body, ctype)),
                ("router only", lambda: call(S.api, "/raw/predict", body, ctype)), ("handler only", None)]
        for label, make in runs:
            for _ in range(3):
                await make() if make else handler(body, ctype.decode())
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                await make() if make else handler(body, ctype.decode())
            print(f"{name:16s} {label:13s} wall {(time.perf_counter() - wall) / n * 1e3:8.2f} ms   "
                  f"cpu {(time.process_time() - cpu) / n * 1e3:8.2f} ms per request", flush=True)
    svc.monitor and svc.monitor.close()
    task.cancel()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1], os.environ.get("ADAPTSERVE_DATA", str(ROOT.parent / "shared" / "data"))))
