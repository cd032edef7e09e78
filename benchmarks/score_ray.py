"""Batch scoring on Ray Data against the local scorer, side by side in one run.

    ADAPTSERVE_DATA=../shared/data .venv/bin/python benchmarks/score_ray.py --model MODEL_FOLDER \\
        --sizes 20000 200000 --pngs 20000 --workers 1 2 --rounds 1

MODEL_FOLDER is an exported model (``adaptserve export RUN --out DIR``). Inputs, made once under ``--tmp``
(never in the repo): ``.npy`` arrays of ``--sizes`` MNIST-M train images (repeated past 59k) at the model's
input size, and a folder of ``--pngs`` PNG files of them. For each input and round: ``adaptserve score``
(the local scorer, ``--threads`` ORT threads) and ``--engine ray --workers N`` for each N, each on a
Ray started for its run (``ray.init(num_cpus=2)``; its start-up is in the total) — drift checks on,
the same CSV output (the functions behind ``adaptserve score``, called in this process). Reported: total images/s, and for Ray its fixed start-up (``ray.init``; the first
batch back on the driver, which includes the actors' start and model load) and its steady-state
images/s after the first batch; the driver's CPU time per image (receiving rows, writing them, drift windows:
what bounds one driver). Ratio: Ray steady-state / local.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_inputs(model: Path, sizes: list[int], pngs: int, tmp: Path, data_dir: str) -> dict[str, Path]:
    from PIL import Image

    from adaptserve.service.preprocess import InputSpec
    from adaptserve.train.data import load

    spec = InputSpec.from_dict(json.loads((model / "manifest.json").read_text())["input_spec"])
    tmp.mkdir(parents=True, exist_ok=True)
    out, base = {}, None
    for n in sizes:
        path = tmp / f"mnistm-{n}-{spec.height}x{spec.width}x{spec.channels}.npy"
        if not path.exists():
            base = base if base is not None else load("mnist_m", spec, data_root=data_dir).images
            rng = np.random.default_rng(0)
            np.save(path, base[rng.integers(0, len(base), n)])
        out[f"{n:,} images, .npy"] = path
    if pngs:
        folder = tmp / f"mnistm-{pngs}-png"
        if not folder.is_dir() or len(list(folder.iterdir())) < pngs:
            folder.mkdir(exist_ok=True)
            a = np.load(out[next(iter(out))], mmap_mode="r") if out else None
            for i in range(pngs):
                Image.fromarray(np.asarray(a[i % len(a)])).save(folder / f"{i:06d}.png")
        out[f"{pngs:,} PNG files"] = folder
    return out


def run(engine: str, model: Path, path: Path, out: Path, batch_size: int, ray_batch_size: int, threads: int) -> dict:
    """One scoring run, as ``adaptserve score`` does it (``--engine local`` or ``ray --workers N``)."""
    from adaptserve.service.score import score
    from adaptserve.service.score_ray import score_ray

    if engine == "local":
        return score(model, path, out, batch_size=batch_size, threads=threads, progress=False)
    return score_ray(model, path, out, workers=int(engine.split("×")[1]), batch_size=ray_batch_size, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--pngs", type=int, default=20_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=2, help="ORT threads of the local scorer")
    ap.add_argument("--batch-size", type=int, default=256, help="the local scorer's (its default)")
    ap.add_argument("--ray-batch-size", type=int, default=1024, help="Ray's (its default: one task per batch)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--tmp", type=Path, default=Path("/tmp/adaptserve-score-ray"))
    ap.add_argument("--data-dir", default=os.environ.get("ADAPTSERVE_DATA"))
    args = ap.parse_args()
    inputs = make_inputs(args.model, args.sizes, args.pngs, args.tmp, args.data_dir)
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    for name, path in inputs.items():
        for r in range(args.rounds):
            for engine in ["local"] + [f"ray×{w}" for w in args.workers]:
                t = time.perf_counter()
                s = run(engine, args.model, path, args.tmp / f"out-{engine}.csv", args.batch_size, args.ray_batch_size,
                      args.threads)
                wall = time.perf_counter() - t
                rows.append({"input": name, "engine": engine, "round": r, "n": s["n_items"], "wall_s": wall,
                             "images_per_s": s["n_items"] / wall, "init_s": s.get("ray_init_s"),
                             "first_batch_s": s.get("first_batch_s"), "steady": s.get("steady_images_per_s"),
                             "driver_cpu_s": s.get("driver_cpu_s")})
                m = rows[-1]
                extra = (f"  ray.init {m['init_s']:.1f} s, first batch {m['first_batch_s']:.1f} s, steady "
                         f"{m['steady']:,.0f} img/s, driver CPU {m['driver_cpu_s']:.1f} s"
                         if m["init_s"] is not None else "")
                print(f"{name:22s} {engine:6s} {m['wall_s']:7.1f} s {m['images_per_s']:9,.0f} img/s{extra}", flush=True)
    load = os.getloadavg()
    print(f"\n{started:%Y-%m-%d %H:%M} UTC, load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}\n")
    print("| input | engine | images/s (total) | Ray start-up: ray.init / first batch | steady-state images/s | "
          "steady vs local | driver CPU µs/image |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in inputs:
        local_rate = np.median([m["images_per_s"] for m in rows if m["input"] == name and m["engine"] == "local"])
        for engine in ["local"] + [f"ray×{w}" for w in args.workers]:
            ms = [m for m in rows if m["input"] == name and m["engine"] == engine]
            total = np.median([m["images_per_s"] for m in ms])
            if engine == "local":
                print(f"| {name} | local | {total:,.0f} | — | {total:,.0f} | 1.00× | — |")
            else:
                steady = np.median([m["steady"] for m in ms])
                print(f"| {name} | {engine} | {total:,.0f} | {np.median([m['init_s'] for m in ms]):.1f} s / "
                      f"{np.median([m['first_batch_s'] for m in ms]):.1f} s | {steady:,.0f} | {steady / local_rate:.2f}× | "
                      f"{np.median([m['driver_cpu_s'] / m['n'] for m in ms]) * 1e6:.0f} |")


if __name__ == "__main__":
    main()
