"""Soak test: a bounded run of mixed valid and invalid requests against ``bentoml serve`` on 127.0.0.1.

    # a model in the store (or an exported folder), e.g. from a trained run:
    .venv/bin/adaptserve export benchmarks/runs/accuracy/mnist-mnist_m/dann-s0 --name soak-dann
    .venv/bin/python benchmarks/soak.py --model soak-dann:latest --duration 300 --concurrency 64 --json soak.json

Starts the service (:class:`service.launch.ServeProcess`, its own process group, always stopped), then
``--concurrency`` clients send requests back to back for ``--duration`` seconds, each drawn at random from
``KINDS``: valid ones (JSON with 1 and 8 images, ``.npy`` with 32, multipart with 2 PNGs, GET /drift and
/model) and invalid ones (malformed JSON, ragged or out-of-range arrays, a wrong Content-Type, a corrupt
``.npy``, an empty body, a body over ``ADAPTSERVE_MAX_BYTES``, more than ``ADAPTSERVE_MAX_IMAGES`` images, a
non-image upload, a non-multipart /classify). Limits are lowered for the run (1 MiB, 64 images) so oversize
requests stay cheap. A valid request fails unless it gets a 200 with one prediction per image; an invalid
one fails unless it gets its expected 4xx. The resident memory (RSS) of the server's process tree is sampled
every ``--rss-every`` seconds.

Prints (and with ``--json`` writes) the request counts per kind and status, failures, 5xx, transport errors,
latency percentiles of the valid requests and the RSS samples. Exit status 1 if any valid request failed or
any response was a 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptserve.service.launch import ServeProcess  # noqa: E402
from adaptserve.service.runtime import read_manifest, resolve  # noqa: E402

MAX_BYTES, MAX_IMAGES = 1 << 20, 64


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="PNG")
    return buf.getvalue()


def oip_binary(a: np.ndarray) -> dict:
    """An Open Inference Protocol request with ``a`` as a binary ``images`` tensor and binary outputs."""
    header = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(a.shape),
                                     "parameters": {"binary_data_size": a.nbytes}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    return {"content": header + a.tobytes(), "headers": {"content-type": "application/octet-stream",
                                                         "inference-header-content-length": str(len(header))}}


def make_kinds(h: int, w: int, c: int, model_name: str, seed: int = 0) -> dict:
    """name → (weight, expected status, n images or None, method, path, request kwargs). ``n`` images: the
    answer must hold that many predictions (``class_indices``, or an OIP output of that many rows)."""
    rng = np.random.default_rng(seed)
    img = lambda n: rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)  # noqa: E731
    js = lambda obj: {"content": json.dumps(obj).encode(), "headers": {"content-type": "application/json"}}  # noqa: E731
    npy_req = lambda a: {"content": npy(a), "headers": {"content-type": "application/x-npy"}}  # noqa: E731
    infer = f"/v2/models/{model_name}/infer"
    oip_json = lambda a, dt="UINT8": js({"inputs": [{"name": "images", "datatype": dt, "shape": list(a.shape),  # noqa: E731
                                                   "data": a.ravel().tolist()}]})
    return {
        # valid
        "json_1": (12, 200, 1, "POST", "/predict", js({"images": img(1)[0].tolist()})),
        "json_8": (8, 200, 8, "POST", "/predict", js({"images": img(8).tolist()})),
        "npy_32": (12, 200, 32, "POST", "/predict", npy_req(img(32))),
        "multipart_2": (8, 200, 2, "POST", "/classify",
                        {"files": [("files", (f"{i}.png", png(a), "image/png")) for i, a in enumerate(img(2))]}),
        "drift": (4, 200, None, "GET", "/drift", {}),
        "model": (2, 200, None, "GET", "/model", {}),
        "raw_npy_8": (6, 200, 8, "POST", "/raw/predict", npy_req(img(8))),
        "oip_json_4": (6, 200, 4, "POST", infer, oip_json(img(4))),
        "oip_binary_16": (8, 200, 16, "POST", infer, oip_binary(img(16))),
        "oip_metadata": (2, 200, None, "GET", f"/v2/models/{model_name}", {}),
        # invalid
        "bad_json": (4, 400, None, "POST", "/predict", {"content": b'{"images": [[[1, 2', "headers": {"content-type": "application/json"}}),
        "ragged": (3, 400, None, "POST", "/predict", js({"images": [[[0, 0, 0]], [[0, 0]]]})),
        "out_of_range": (3, 400, None, "POST", "/predict", js({"images": np.full((1, h, w, c), 300).tolist()})),
        "wrong_content_type": (3, 415, None, "POST", "/predict", {"content": b"x", "headers": {"content-type": "text/plain"}}),
        "corrupt_npy": (3, 400, None, "POST", "/predict",
                        {"content": b"\x93NUMPY" + os.urandom(64), "headers": {"content-type": "application/x-npy"}}),
        "empty_body": (3, 400, None, "POST", "/predict", {"content": b"", "headers": {"content-type": "application/json"}}),
        "oversize_body": (2, 413, None, "POST", "/predict", npy_req(np.zeros((MAX_BYTES + 1,), np.uint8))),
        "too_many_images": (3, 413, None, "POST", "/predict", npy_req(np.zeros((MAX_IMAGES + 1, 2, 2, 3), np.uint8))),
        "non_image_upload": (3, 400, None, "POST", "/classify", {"files": [("files", ("x.png", b"not an image", "image/png"))]}),
        "classify_not_multipart": (2, 415, None, "POST", "/classify", js({"images": []})),
        "wrong_hw_npy": (3, 400, None, "POST", "/predict", npy_req(img(2)[:, : h // 2])),
        "flat_vector": (2, 400, None, "POST", "/raw/predict", js({"images": [[1, 2, 3]]})),
        "oip_wrong_shape": (3, 400, None, "POST", infer, oip_json(img(1)[:, :, : w // 2])),
        "oip_wrong_datatype": (2, 400, None, "POST", infer, oip_json(img(1).astype(np.float32), "FP32")),
        "oip_unknown_model": (2, 404, None, "POST", "/v2/models/no-such-model/infer", oip_binary(img(1))),
    }


def tree_rss(pid: int, per_process: bool = False):
    """Resident bytes of process ``pid`` and all its descendants (BentoML's arbiter and workers); with
    ``per_process``, {"<pid> <role>": MiB} instead."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {} if per_process else 0
    sizes = {}
    for p in procs:
        try:
            role = "worker" if "--worker-id" in p.cmdline() else ("bentoml serve" if p.pid == pid else p.name())
            sizes[f"{p.pid} {role}"] = p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return {k: round(v / 2**20, 1) for k, v in sizes.items()} if per_process else sum(sizes.values())


def rows(r: httpx.Response) -> int:
    """Predictions in a 200 answer: ``class_indices`` of the REST routes, the first output's rows in OIP."""
    length = r.headers.get("inference-header-content-length")
    body = json.loads(r.content[:int(length)] if length else r.content)
    if "outputs" in body:
        return body["outputs"][0]["shape"][0]
    return len(body.get("class_indices", []))


async def soak(url: str, kinds: dict, duration: float, concurrency: int, seed: int) -> dict:
    names = list(kinds)
    weights = [kinds[k][0] for k in names]
    counts: dict[str, Counter] = defaultdict(Counter)
    failures: list[dict] = []
    latencies: list[float] = []
    deadline = time.monotonic() + duration

    async def client(i: int, c: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline:
            name = rng.choices(names, weights)[0]
            _, expected, n, method, path, kw = kinds[name]
            t0 = time.perf_counter()
            try:
                r = await c.request(method, path, **kw)
            except httpx.HTTPError as e:
                counts[name]["transport_error"] += 1
                failures.append({"kind": name, "error": f"{type(e).__name__}: {e}", "at_s": round(duration - deadline + time.monotonic(), 1)})
                continue
            dt = time.perf_counter() - t0
            counts[name][r.status_code] += 1
            ok = r.status_code == expected
            if ok and n is not None:
                ok = rows(r) == n
            if ok and expected == 200:
                latencies.append(dt)
            if not ok:
                failures.append({"kind": name, "status": r.status_code, "body": r.text[:300],
                                 "at_s": round(duration - deadline + time.monotonic(), 1)})

    # Idle pooled connections expire on the client before uvicorn's 5 s keep-alive closes them: with both at 5 s
    # (httpx's default) a request can go out on a connection the server is closing → ReadError (a known race).
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        await asyncio.gather(*(client(i, c) for i in range(concurrency)))
    lat = np.array(latencies) * 1000
    return {"counts": {k: dict(v) for k, v in counts.items()}, "failures": failures,
            "latency_ms_valid": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                                 "max": float(lat.max())} if len(lat) else None}


async def sample_rss(pid: int, every: float, until: float, out: list) -> None:
    t0 = time.monotonic()
    while time.monotonic() < until:
        await asyncio.sleep(every)
        out.append((round(time.monotonic() - t0, 1), tree_rss(pid)))


async def run(url: str, pid: int, kinds: dict, args) -> dict:
    samples: list = [(0.0, tree_rss(pid))]
    per_process_start = tree_rss(pid, per_process=True)
    until = time.monotonic() + args.duration
    sampler = asyncio.create_task(sample_rss(pid, args.rss_every, until, samples))
    t0 = time.perf_counter()
    result = await soak(url, kinds, args.duration, args.concurrency, args.seed)
    wall = time.perf_counter() - t0
    sampler.cancel()
    samples.append((round(wall, 1), tree_rss(pid)))
    result.update(wall_s=wall, rss_samples=samples, rss_mib_per_process={"start": per_process_start,
                                                                        "end": tree_rss(pid, per_process=True)})
    return result


def summarize(result: dict, kinds: dict, args, log: Path, load: tuple) -> dict:
    counts = result["counts"]
    total = sum(sum(v.values()) for v in counts.values())
    valid = {k for k, v in kinds.items() if v[1] == 200}
    n_valid = sum(sum(counts.get(k, {}).values()) for k in valid)
    status = Counter()
    for v in counts.values():
        status.update({str(k): n for k, n in v.items()})
    fails = result["failures"]
    rss = [b for _, b in result["rss_samples"]]
    after = [b for t, b in result["rss_samples"] if t >= args.warmup] or rss[-1:]
    growth = 100 * (rss[-1] / after[0] - 1)
    log_text = log.read_text(errors="replace")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model, "duration_s": args.duration,
        "concurrency": args.concurrency, "load_average_at_start": load, "load_average_at_end": os.getloadavg(),
        "requests": total, "requests_per_s": total / result["wall_s"], "valid_requests": n_valid,
        "invalid_requests": total - n_valid, "status_counts": dict(status),
        "failed_valid": sum(1 for f in fails if f["kind"] in valid),
        "failed_invalid": sum(1 for f in fails if f["kind"] not in valid),
        "http_5xx": sum(n for s, n in status.items() if s.startswith("5")),
        "transport_errors": status.get("transport_error", 0),
        "latency_ms_valid": result["latency_ms_valid"],
        "rss_mib": {"start": rss[0] / 2**20, "end": rss[-1] / 2**20, "max": max(rss) / 2**20, "min": min(rss) / 2**20,
                    f"at_{args.warmup:.0f}s": after[0] / 2**20},
        "rss_growth_after_warmup_pct": growth,
        "rss_samples_mib": [(t, round(b / 2**20, 1)) for t, b in result["rss_samples"]],
        "rss_mib_per_process": result["rss_mib_per_process"],
        "tracebacks_in_server_log": log_text.count("Traceback"),
        "first_failures": fails[:10], "per_kind": counts,
    }


def oip_model_name(url: str) -> str:
    """The model's name on the Open Inference Protocol routes: the name of the tag ``/model`` reports (a
    folder's last part for an exported folder), as ``service.service`` builds it."""
    name = httpx.get(url + "/model", timeout=10).json()["tag"].partition(":")[0]
    return Path(name).name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="BentoML store tag or exported model folder")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--warmup", type=float, default=300.0,
                   help="seconds after which resident memory must stay flat (growth from then to the end)")
    p.add_argument("--max-growth", type=float, default=10.0, help="allowed RSS growth after --warmup, percent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra server environment")
    p.add_argument("--json", type=Path, help="also write the summary here")
    args = p.parse_args()

    folder, _ = resolve(args.model)
    spec = read_manifest(folder)["input_spec"]
    env = {"ADAPTSERVE_MAX_BYTES": MAX_BYTES, "ADAPTSERVE_MAX_IMAGES": MAX_IMAGES,
           **dict(e.split("=", 1) for e in args.env)}
    log = Path(tempfile.mkdtemp(prefix="adaptserve-soak-")) / "serve.log"
    load = os.getloadavg()
    with ServeProcess(args.model, log=log, **env) as srv:
        ready = srv.wait_ready()
        kinds = make_kinds(spec["height"], spec["width"], spec["channels"], oip_model_name(srv.url), args.seed)
        print(f"server ready in {ready:.1f} s (log {log}); {args.concurrency} clients for {args.duration:.0f} s, "
              f"load average {load[0]:.2f}", file=sys.stderr)
        result = asyncio.run(run(srv.url, srv.proc.pid, kinds, args))
        alive = httpx.get(srv.url + "/readyz", timeout=10).status_code
    summary = summarize(result, kinds, args, log, load)
    summary["readyz_after"] = alive
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    grew = summary["rss_growth_after_warmup_pct"] > args.max_growth
    return 1 if summary["failed_valid"] or summary["http_5xx"] or grew else 0


if __name__ == "__main__":
    sys.exit(main())
