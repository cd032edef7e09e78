"""Inference speed on the CPU: the exported ONNX graph in ONNX Runtime vs the same model in PyTorch eager.

    python benchmarks/onnx_vs_torch.py                      # a freshly built dann_mnist (random weights)
    python benchmarks/onnx_vs_torch.py --run runs/demo-dann # a trained run's checkpoint
    python benchmarks/onnx_vs_torch.py --arch dann_mnist_bn

Both sides compute the same thing: uint8 (N,32,32,3) images → normalise → G_f → G_y → softmax, returning
probabilities, logits and features (torch: ``inference_module`` under ``torch.inference_mode()``; ORT:
``model.onnx`` as written by ``adaptserve export``, CPUExecutionProvider). For each thread count
(``torch.set_num_threads(t)``; ORT ``intra_op_num_threads=t``, ``inter_op_num_threads=1``):

- batch-1 latency: median and p90 of ``--calls`` single-image calls (after 20 warm-up calls);
- batch-256 throughput: images/s from the median of ``--batches`` calls of 256 images (after 3 warm-ups).

Calls alternate between the two runtimes per measurement block so background load hits both alike.
Prints a markdown table with the date, the machine and the load average.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptserve.export.onnx_export import _Classifier, export_graphs  # noqa: E402
from adaptserve.service.runtime import session  # noqa: E402
from adaptserve.train import checkpoint as ckpt_io  # noqa: E402
from adaptserve.train.checkpoint import load_model  # noqa: E402
from adaptserve.train.models import build_model  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn, calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="run directory or checkpoint (default: a freshly built model)")
    ap.add_argument("--arch", default="dann_mnist", help="architecture of the freshly built model")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--calls", type=int, default=300, help="batch-1 calls per measurement (≥ 200)")
    ap.add_argument("--batches", type=int, default=20, help="batch-256 calls per measurement")
    args = ap.parse_args()
    if args.calls < 200:
        ap.error("--calls must be at least 200")

    if args.run:
        model, meta, _ = load_model(ckpt_io.find(args.run, "best"))
        what = f"{meta['arch']} ({meta['method']}) from {args.run}"
    else:
        torch.manual_seed(0)
        model, arch = build_model(args.arch, 10, "dann")
        model.eval()
        meta = {"arch": args.arch, "method": "dann", "classes": [str(i) for i in range(10)],
                "input_spec": arch.input_spec.to_dict()}
        what = f"{args.arch}, freshly built (random weights, 10 classes)"
    spec = meta["input_spec"]
    rng = np.random.default_rng(0)
    x1 = rng.integers(0, 256, (1, spec["height"], spec["width"], spec["channels"]), dtype=np.uint8)
    x256 = rng.integers(0, 256, (256, spec["height"], spec["width"], spec["channels"]), dtype=np.uint8)
    t1, t256 = torch.from_numpy(x1), torch.from_numpy(x256)
    net = _Classifier(model).eval()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export_graphs(model, meta, Path(tmp))
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            sess = session(Path(tmp) / "model.onnx", device="cpu", threads=threads)
            names = ["probabilities", "logits", "features"]
            with torch.inference_mode():
                diff = float(np.abs(sess.run(names, {"images": x256})[0] - net(t256)[0].numpy()).max())
                res = {}
                for label, fn_torch, fn_ort, calls, warm in [
                        ("b1", lambda: net(t1), lambda: sess.run(names, {"images": x1}), args.calls, 20),
                        ("b256", lambda: net(t256), lambda: sess.run(names, {"images": x256}), args.batches, 3)]:
                    tt, to = [], []
                    for _ in range(4):  # alternate in blocks
                        tt += timed(fn_torch, calls // 4, warm)
                        to += timed(fn_ort, calls // 4, warm)
                    res[label] = (tt, to)
            (bt, bo), (ct, co) = res["b1"], res["b256"]
            med = statistics.median
            p90 = lambda v: float(np.percentile(v, 90))  # noqa: E731
            rows.append((threads, "PyTorch eager", med(bt) * 1e3, p90(bt) * 1e3, 256 / med(ct), None))
            rows.append((threads, "ONNX Runtime", med(bo) * 1e3, p90(bo) * 1e3, 256 / med(co), diff))

    import onnxruntime

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"### ONNX Runtime vs PyTorch eager, CPU — {datetime.date.today().isoformat()}\n")
    print(f"Model: {what}; input uint8 {spec['height']}×{spec['width']}×{spec['channels']}; "
          f"outputs probabilities, logits, features.  ")
    print(f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs, load average {load} (shared machine); "
          f"Python {platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}.  ")
    print(f"Batch 1: median (p90) of {args.calls} calls; batch 256: median of {args.batches} calls.\n")
    print("| threads | runtime | batch-1 latency, ms: median (p90) | batch-256 throughput, images/s | ORT speed-up b1 / b256 |")
    print("|---:|---|---:|---:|---:|")
    for i in range(0, len(rows), 2):
        t, o = rows[i], rows[i + 1]
        for r in (t, o):
            speed = f"{t[2] / o[2]:.1f}× / {o[4] / t[4]:.1f}×" if r is o else ""
            print(f"| {r[0]} | {r[1]} | {r[2]:.3f} ({r[3]:.3f}) | {r[4]:,.0f} | {speed} |")
    print(f"\nmax |Δ probabilities| ORT vs torch at batch 256: {max(r[5] for r in rows if r[5] is not None):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
