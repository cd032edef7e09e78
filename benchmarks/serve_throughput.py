"""Serving throughput and latency by route: the adaptserve service vs a bare Starlette + ORT server, side by side.

    ADAPTSERVE_DATA=../shared/data .venv/bin/python benchmarks/serve_throughput.py MODEL_FOLDER \\
        [--seconds 4] [--rounds 2] [--cold-starts 3] [--out results.json]

MODEL_FOLDER is an exported model (``adaptserve export RUN_DIR --out MODEL_FOLDER``). The servers run at
once on 127.0.0.1 (free ports), each with one process and one ONNX Runtime thread:

- ``bare``      — benchmarks/bare_server.py: Starlette + uvicorn + one session of the same model.onnx;
- ``service``   — ``bentoml serve adaptserve.service.service:AdaptService`` as shipped (drift checks on, batching off);
- ``no-drift``  — the same with ``ADAPTSERVE_DRIFT=off``;
- ``batching``  — the same with ``ADAPTSERVE_BATCHING=on`` (BentoML adaptive batching in a Batcher service);
- ``no-access-log`` — the shipped service with BentoML's per-request access log switched off;
- ``batching-1s`` — batching with ``max_latency_ms`` 1000 instead of BentoML's default 60000;
- ``bentoml-bare`` — the bare server's app and handler mounted in a minimal BentoML service
  (benchmarks/bentoml_bare.py): BentoML's floor, the fastest any service under ``bentoml serve`` can be.

The first four run by default; ``--kinds`` picks others.

For every payload (one image / 64 images; MNIST-M test images at the model's input size, uint8) sent by each route of
``--routes`` — the typed BentoML API (``/predict``, JSON), the hand-parsed route (``/raw/predict``, JSON),
``.npy`` to ``/predict``, and the Open Inference Protocol with JSON or binary tensors (``/v2/models/NAME/infer``,
binary output) — while the bare server gets the same images as JSON or ``.npy`` — and
concurrency (1, 32), each server gets ``--seconds`` of closed-loop load from a minimal keep-alive HTTP/1.1
client (asyncio streams, one connection per simulated client); servers take turns, in a rotated order,
``--rounds`` times, and the rounds are pooled. Reported: requests/s, images/s, p50/p99 latency, non-200
answers, the ratios to ``bare`` and the drift cost (1 − service / no-drift throughput). Cold start: seconds
from process start to ``/readyz`` 200, ``--cold-starts`` launches of each kind, alternating. Every server is
killed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import lzma
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptserve.service.launch import ServeProcess, free_port  # noqa: E402
KINDS = {
    "bare": {},
    "service": {},
    "no-drift": {"ADAPTSERVE_DRIFT": "off"},
    "batching": {"ADAPTSERVE_BATCHING": "on"},
    "no-access-log": {"BENTOML_CONFIG_OPTIONS": "services.adaptserve.logging.access.enabled=false"},
    "batching-1s": {"ADAPTSERVE_BATCHING": "on", "ADAPTSERVE_BATCH_MAX_LATENCY_MS": "1000"},
    "bentoml-bare": {},
}
BARE_BODIES = ("bare", "bentoml-bare")  # the kinds that get the bare server's requests
DEFAULT_KINDS = ["bare", "service", "no-drift", "batching"]


class Server(ServeProcess):
    """One server of ``kind`` (its own process tree, reaped on stop); ``ready_s`` = start → /readyz 200."""

    def __init__(self, kind: str, model: Path, logdir: Path):
        self.kind = kind
        port = free_port()
        argv = None
        if kind == "bare":
            argv = [sys.executable, str(ROOT / "benchmarks" / "bare_server.py"), str(model), "--port", "{port}",
                    "--threads", "1"]
        elif kind == "bentoml-bare":
            argv = [str(Path(sys.executable).parent / "bentoml"), "serve", "bentoml_bare:BentoBare", "--working-dir",
                    str(ROOT / "benchmarks"), "--host", "127.0.0.1", "--port", "{port}"]
        super().__init__(model, logdir / f"{kind}-{port}.log", port=port, argv=argv, ADAPTSERVE_THREADS=1,
                         OMP_NUM_THREADS=1, **KINDS[kind])

    def wait_ready(self, timeout: float = 90.0) -> float:
        return super().wait_ready(timeout)


# ---------------------------------------------------------------- load generator

def request_bytes(port: int, path: str, body: bytes, headers: dict) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n")
    return head.encode() + body


async def _client(port: int, requests: list[bytes], deadline: float, max_requests: int, out: list, offset: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = offset
    try:
        while time.perf_counter() < deadline and len(out) < max_requests:
            t0 = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = None
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length is None:
                raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
            await reader.readexactly(length)
            out.append((time.perf_counter() - t0, status))
    finally:
        writer.close()


async def _load(port, requests, concurrency, seconds, max_requests):
    out: list[tuple[float, int]] = []
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(port, requests, deadline, max_requests, out, k * 7) for k in range(concurrency)))
    return out, time.perf_counter() - t0


def load(port: int, requests: list[bytes], concurrency: int, seconds: float, max_requests: int = 200_000):
    """Closed-loop load for ``seconds``: [(latency s, status)] and the wall time."""
    return asyncio.run(_load(port, requests, concurrency, seconds, max_requests))


# ---------------------------------------------------------------- payloads

def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def oip_body(a: np.ndarray, binary: bool) -> tuple[bytes, dict]:
    """An Open Inference Protocol infer request for uint8 images ``a``: JSON data, or the binary extension."""
    import orjson

    outputs = [{"name": "probabilities", "parameters": {"binary_data": binary}}]
    tensor = {"name": "images", "shape": list(a.shape), "datatype": "UINT8"}
    if not binary:
        return orjson.dumps({"inputs": [{**tensor, "data": a.ravel().tolist()}], "outputs": outputs}), \
            {"Content-Type": "application/json"}
    head = orjson.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": a.nbytes}}], "outputs": outputs})
    return head + a.tobytes(), {"Content-Type": "application/octet-stream",
                                "Inference-Header-Content-Length": str(len(head))}


# payload route → (service path, body kind); the bare server always gets the JSON or .npy equivalent
ROUTES = {"JSON": ("/predict", "json"), "raw JSON": ("/raw/predict", "json"), ".npy": ("/predict", "npy"),
          "OIP JSON": ("/v2/models/{name}/infer", "oip-json"), "OIP binary": ("/v2/models/{name}/infer", "oip-bin")}
DEFAULT_ROUTES = ["JSON", "raw JSON", ".npy", "OIP JSON", "OIP binary"]


def payloads(images: np.ndarray, model_name: str, routes: list[str]) -> dict:
    """name → (images per request, {"service": [(path, body, headers)], "bare": [...]}), a few bodies each."""
    import orjson

    def bodies(a: np.ndarray, kind: str) -> tuple[bytes, dict]:
        if kind == "json":
            return orjson.dumps({"images": a.tolist()}), {"Content-Type": "application/json"}
        if kind == "npy":
            return npy(a), {"Content-Type": "application/x-npy"}
        return oip_body(a, binary=kind == "oip-bin")

    singles, batches = images[:256, None], [images[256 + 64 * k:256 + 64 * (k + 1)] for k in range(8)]
    out = {}
    for n, arrays in ((1, singles), (64, batches)):
        for route in routes:
            path, kind = ROUTES[route]
            bare_kind = "json" if kind in ("json", "oip-json") else "npy"
            out[f"{n} image{'s' if n > 1 else ''}, {route}"] = (n, {
                "service": [(path.format(name=model_name), *bodies(a, kind)) for a in arrays],
                "bare": [("/predict", *bodies(a, bare_kind)) for a in arrays]})
    return out


def mnist_m_test(data_root: str) -> np.ndarray:
    path = Path(data_root) / "mnist_m" / "mnist_m_test_images.npy.xz"
    with lzma.open(path) as f:
        a = np.load(f)
    return a[np.random.default_rng(0).permutation(len(a))[:768]]  # shuffled: drift windows stay in-distribution


def in_input_spec(images: np.ndarray, model: Path) -> np.ndarray:
    """The images at the model's input size (raw arrays of another size are a 400 by the service's contract)."""
    from adaptserve.service.preprocess import InputSpec, to_input_spec

    spec = InputSpec.from_dict(json.loads((model / "manifest.json").read_text())["input_spec"])
    return to_input_spec(images, spec)


# ---------------------------------------------------------------- report

def summarise(samples: list[tuple[float, int]], wall: float, per_request: int) -> dict:
    lat = np.array([s[0] for s in samples if s[1] == 200]) * 1000
    statuses: dict[str, int] = {}
    for _, st in samples:
        if st != 200:
            statuses[str(st)] = statuses.get(str(st), 0) + 1
    n_ok = len(lat)
    return {"requests": len(samples), "ok": n_ok, "errors": statuses, "seconds": wall,
            "req_per_s": n_ok / wall if wall else 0.0, "images_per_s": n_ok * per_request / wall if wall else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) if n_ok else None,
            "p99_ms": float(np.percentile(lat, 99)) if n_ok else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="an exported model folder")
    ap.add_argument("--seconds", type=float, default=4.0, help="load per server, cell and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--kinds", nargs="+", default=DEFAULT_KINDS, choices=list(KINDS))
    ap.add_argument("--routes", nargs="+", default=DEFAULT_ROUTES, choices=list(ROUTES),
                    help="how the service is called: typed JSON, raw JSON, .npy, OIP JSON, OIP binary")
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 64], choices=[1, 64], help="images per request")
    ap.add_argument("--cold-starts", type=int, default=3)
    ap.add_argument("--data-dir", default=os.environ.get("ADAPTSERVE_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--logs", type=Path, default=Path("/tmp/adaptserve-serve-bench"))
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    model = args.model.resolve()
    loads = {k: v for k, v in payloads(in_input_spec(mnist_m_test(args.data_dir), model), model.name, args.routes).items()
             if v[0] in args.sizes}
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_start": os.getloadavg(),
                     "args": {k: str(v) for k, v in vars(args).items()}, "cold_start_s": {}, "cells": []}

    running: list[Server] = []
    try:
        # cold start: one launch of each kind at a time, alternating
        for _ in range(args.cold_starts):
            for kind in args.kinds:
                s = Server(kind, model, args.logs)
                running.append(s)
                results["cold_start_s"].setdefault(kind, []).append(round(s.wait_ready(), 3))
                s.stop()
                running.remove(s)
        for kind, xs in results["cold_start_s"].items():
            print(f"cold start {kind:9s}: " + ", ".join(f"{x:.2f}" for x in xs) + " s", flush=True)

        servers = {kind: Server(kind, model, args.logs) for kind in args.kinds}
        running.extend(servers.values())
        for s in servers.values():
            s.wait_ready()
        for name, (per_request, bodies) in loads.items():
            for c in args.concurrency:
                pooled = {k: ([], 0.0) for k in servers}
                for r in range(args.rounds):
                    order = list(servers)[r % len(servers):] + list(servers)[:r % len(servers)]
                    for kind in order:
                        s = servers[kind]
                        reqs = [request_bytes(s.port, *r) for r in bodies["bare" if kind in BARE_BODIES else "service"]]
                        load(s.port, reqs[:2], 1, 0.3)  # warm-up: connection, first ORT run
                        samples, wall = load(s.port, reqs, c, args.seconds)
                        pooled[kind][0].extend(samples)
                        pooled[kind] = (pooled[kind][0], pooled[kind][1] + wall)
                cell = {"payload": name, "concurrency": c,
                        "servers": {k: summarise(v[0], v[1], per_request) for k, v in pooled.items()}}
                results["cells"].append(cell)
                base = cell["servers"].get("bare")
                for k, m in cell["servers"].items():
                    ratio = f"{m['req_per_s'] / base['req_per_s']:.2f}× bare" if base and base["req_per_s"] else ""
                    print(f"{name:16s} c={c:<3d} {k:9s} {m['req_per_s']:8.1f} req/s {m['images_per_s']:8.1f} img/s "
                          f"p50 {m['p50_ms'] or float('nan'):7.2f} ms p99 {m['p99_ms'] or float('nan'):7.2f} ms "
                          f"errors {m['errors'] or 0} {ratio}", flush=True)
    finally:
        for s in running:
            s.stop()
    results["loadavg_end"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print(markdown(results))


def markdown(results: dict) -> str:
    """The table for docs/benchmarks.md."""
    lines = ["| payload | clients | server | req/s | images/s | p50 ms | p99 ms | non-200 | × bare |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for cell in results["cells"]:
        base = cell["servers"].get("bare", {}).get("req_per_s")
        for k, m in cell["servers"].items():
            ratio = f"{m['req_per_s'] / base:.2f}" if base else ""
            err = ", ".join(f"{n}× {st}" for st, n in m["errors"].items()) or "0"
            lines.append(f"| {cell['payload']} | {cell['concurrency']} | {k} | {m['req_per_s']:.0f} | "
                         f"{m['images_per_s']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {err} | {ratio} |")
    drift = []
    for cell in results["cells"]:
        sv, nd = cell["servers"].get("service"), cell["servers"].get("no-drift")
        if sv and nd and nd["req_per_s"]:
            drift.append(f"{cell['payload']}, c={cell['concurrency']}: {100 * (1 - sv['req_per_s'] / nd['req_per_s']):+.1f} %")
    if drift:
        lines.append("\ndrift-check cost (1 − service / no-drift req/s): " + "; ".join(drift))
    cold = results.get("cold_start_s", {})
    if cold:
        lines.append("\ncold start to /readyz (s): " + "; ".join(
            f"{k} median {np.median(v):.2f} ({', '.join(f'{x:.2f}' for x in v)})" for k, v in cold.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
