"""``adaptserve score`` images/s against a raw ONNX Runtime loop over the same array, alternated in one run.

    ADAPTSERVE_DATA=/work/shared/data .venv/bin/python benchmarks/score_throughput.py \
        --model /tmp/driftbench/mnistm-dann --n 40000 --batch-size 256 --threads 1 --rounds 3

MODEL is a folder from ``adaptserve export --out`` (``benchmarks/drift_power.py`` makes one). The input is the
first N MNIST-M train images saved once as a ``.npy`` (``--array``, default under /tmp; never in the repo).

Per round, in alternating order:

- **score** — ``adaptserve score MODEL ARRAY.npy --out scores.csv --batch-size B --threads T --no-progress``
  in-process (:func:`adaptserve.main`): opens and verifies the model, memory-maps the array, runs the classifier
  *and* the discriminator, writes one CSV row per image and ``scores.csv.drift.json`` (drift check on every
  window of 200, on a worker thread);
- **score --no-drift** — the same with ``--no-drift``: no discriminator, no drift windows, no report;
- **raw** — the loop a user would write: one ``onnxruntime.InferenceSession`` on ``model.onnx`` with the same
  intra-op threads (spinning off, as the scorer's), ``np.load(mmap_mode="r")``, ``session.run(["probabilities"],
  ...)`` per batch of B, argmax, and nothing written.

All timings include opening the model(s) and reading the array. The ratio is score / raw images/s (target ≥ 0.9).

``--cost`` instead prints where the drift work goes, in CPU ms per window of W images on 1 thread (best of 3
over the first 20 windows of the array): the whole check, its KS tests, its MMD, the discriminator, and the
classifier that the raw loop runs too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import adaptserve  # noqa: E402
from adaptserve.service.runtime import session  # noqa: E402


def make_array(path: Path, n: int, data_dir) -> None:
    from adaptserve.train.data import load
    from adaptserve.service.preprocess import InputSpec

    images = load("mnist_m:train", InputSpec(32, 32, 3), data_root=data_dir).images
    if len(images) < n:
        raise SystemExit(f"MNIST-M train has {len(images)} images, fewer than --n {n}")
    np.save(path, np.ascontiguousarray(images[:n]))


def run_score(model: Path, array: Path, out: Path, batch: int, threads: int, drift: bool = True) -> float:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = adaptserve.main(["score", str(model), str(array), "--out", str(out), "--batch-size", str(batch),
                                "--threads", str(threads), "--no-progress"] + ([] if drift else ["--no-drift"]))
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"adaptserve score exited with {code}")
    return seconds


def run_raw(model: Path, array: Path, batch: int, threads: int) -> float:
    t0 = time.perf_counter()
    sess = session(model / "model.onnx", "cpu", threads)
    x = np.load(array, mmap_mode="r")
    labels = np.empty(len(x), np.int64)
    for i in range(0, len(x), batch):
        (probs,) = sess.run(["probabilities"], {"images": np.asarray(x[i:i + batch])})
        labels[i:i + batch] = probs.argmax(1)
    return time.perf_counter() - t0


def cost(model_dir: Path, array: Path, windows: int = 20) -> None:
    from adaptserve.service.drift import ks_columns, one_blas_thread
    from adaptserve.service.runtime import Model

    model = Model.open(model_dir, device="cpu", threads=1)
    ref, classifier, disc = model.drift_reference, *model._sessions
    w = ref.window
    x = np.asarray(np.load(array, mmap_mode="r")[:windows * w])
    pred = model.predict(x)
    wins = [(pred.p_target[i:i + w], pred.probabilities[i:i + w], pred.features[i:i + w], x[i:i + w])
            for i in range(0, len(x), w)]

    def ms(f) -> float:  # best of 3 rounds of CPU time per window
        best = float("inf")
        for _ in range(3):
            t = time.process_time()
            for win in wins:
                f(*win)
            best = min(best, (time.process_time() - t) / len(wins))
        return best * 1e3

    with one_blas_thread():
        parts = {
            "drift check (all three tests)": ms(lambda p, s, f, _: ref.check(p, s, f)),
            "  KS: discriminator + 10 softmax columns": ms(lambda p, s, f, _: ks_columns(
                ref._ks_sorted, np.column_stack([np.asarray(p, np.float64), np.asarray(s, np.float64)]))),
            "  MMD² on PCA features": ms(lambda p, s, f, _: ref.mmd2(f)),
            "discriminator graph": ms(lambda p, s, f, _: disc.run(
                ["p_target"], {k: {"features": f, "probabilities": s}[k] for k in [i.name for i in disc.get_inputs()]})),
            "classifier graph (what raw runs)": ms(lambda p, s, f, xi: classifier.run(["probabilities"], {"images": xi})),
        }
    print(f"CPU ms per window of {w} images (1 thread, best of 3 over {len(wins)} windows):")
    for name, v in parts.items():
        print(f"  {name:42s} {v:6.2f}")
    extra = parts["drift check (all three tests)"] + parts["discriminator graph"]
    print(f"drift work / classifier: {extra / parts['classifier graph (what raw runs)']:.1%}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/driftbench/mnistm-dann"))
    ap.add_argument("--array", type=Path, default=None, help="input .npy (made from MNIST-M train if missing)")
    ap.add_argument("--n", type=int, default=40000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data-dir", default=os.environ.get("ADAPTSERVE_DATA"))
    ap.add_argument("--cost", action="store_true", help="print the drift work's CPU cost per window and exit")
    args = ap.parse_args(argv)
    array = args.array or Path(tempfile.gettempdir()) / f"adaptserve-mnist_m-{args.n}.npy"
    if not array.exists():
        make_array(array, args.n, args.data_dir)
    if args.cost:
        cost(args.model, array)
        return 0
    n = len(np.load(array, mmap_mode="r"))
    times = {"score": [], "score --no-drift": [], "raw": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scores.csv"
        runs = {"score": lambda: run_score(args.model, array, out, args.batch_size, args.threads),
                "score --no-drift": lambda: run_score(args.model, array, out, args.batch_size, args.threads, False),
                "raw": lambda: run_raw(args.model, array, args.batch_size, args.threads)}
        runs["raw"]()  # warm the page cache and ORT once
        for r in range(args.rounds):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                s = runs[name]()
                times[name].append(s)
                print(f"round {r} {name:16s} {s:6.2f} s  {n / s:8.0f} images/s", flush=True)
    med = {k: n / float(np.median(v)) for k, v in times.items()}
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {n} images, batch {args.batch_size}, "
          f"{args.threads} thread(s), load average {tuple(round(x, 2) for x in os.getloadavg())}")
    print("median images/s: " + ", ".join(f"{k} {v:.0f} ({v / med['raw']:.2f}× raw)" for k, v in med.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
