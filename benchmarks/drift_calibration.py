"""False alarms of the drift tests on in-distribution data, by the size of the held-out pool behind them.

    # runs adapted to target sets of 1k, 3k, 10k images (npz subsets of MNIST-M train) and to all of it:
    ADAPTSERVE_DATA=../shared/data python benchmarks/drift_calibration.py --run RUN_1K RUN_3K RUN_10K RUN_ALL
    # one run, smaller target sets emulated by taking 10 % of N of its held-out images
    ADAPTSERVE_DATA=../shared/data python benchmarks/drift_calibration.py --run RUN_ALL --sizes 1000 3000
    # the demo: the model `make demo` exported, windows of fresh copies of the demo-target test digits
    python benchmarks/drift_calibration.py --model demo_out/model --demo-variants 10

**Sizes** (``--run``): a user adapts to a target set of N images and exports with the default
``--target-holdout 0.1``, so the drift reference is built from ``0.1·N`` held-out images. For each run (N =
its own target set, or each of ``--sizes``) the benchmark builds the reference from those held-out images
with export's own code (:func:`export.reference.build`) and with the calibration of adaptserve up to
session 5 side by side: ``old`` — W = min(200, calibration pool), windows bootstrapped with replacement,
KS at α/3; ``new`` — the pool bootstrap, W = min(200, pool), KS levels from the calibration windows.
It does so ``--pools`` times (other reference/calibration splits, and other held-out images when N is
below the run's), and each time checks ``--windows`` windows of W distinct images from:

- ``train-target``: N − 0.1·N of the images the run *trained on* — what a user scores next;
- ``target-test``: ``--target-test`` (default MNIST-M test: never trained on);
- ``source``: the source's test split (a real shift: the power), and ``noise``/``blur``: target test
  images with Gaussian noise σ = 16 (of 255) or Gaussian blur σ = 1 px.

Rates are over all windows of all pools, with the lowest and highest pool beside them: a user gets one
pool, so the spread between pools is what one export can be off by. The model's outputs come from the
checkpoint in PyTorch (the exported ONNX graph agrees to 1e-6, which export checks).

**Demo** (``--model``): the exported model's own drift reference, as the service and the scorer use it,
against windows drawn from ``--demo-variants`` fresh draws of the demo-target *test* digits (new random
affine copies and textures: in-distribution, never trained on or held out), and, for the power, from
demo-source test images and from fresh copies with Gaussian noise σ = 16 or blur σ = 1 px.

Prints a markdown table (rate of windows alarmed by any test, and per test, with a 95 % Clopper–Pearson
interval) and writes ``--json``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.stats import binomtest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptserve.service import drift  # noqa: E402



def rate(alarms: np.ndarray) -> str:
    k, n = int(np.sum(alarms)), len(alarms)
    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    return f"{100 * k / n:.1f} % [{100 * ci.low:.1f}, {100 * ci.high:.1f}]"


def old_build(outputs: dict, groups=None, alpha: float = 0.01, n_bootstrap: int = 1000, seed: int = 0):
    """The calibration of adaptserve up to session 5: W = min(200, n_cal), bootstrap windows drawn *with*
    replacement (duplicates left out of the window's own MMD term), KS tests at exactly α/3."""
    from adaptserve.export import reference as ref_mod

    n = len(outputs["p_target"])
    ref_idx, cal_idx = ref_mod.split_pools(n, seed, groups)
    mean, comps = ref_mod.fit_pca(outputs["features"][ref_idx])
    proj = (np.asarray(outputs["features"], np.float64) - mean) @ comps.T
    part = lambda idx: {"p_target": outputs["p_target"][idx], "probabilities": outputs["probabilities"][idx],  # noqa: E731
                        "projections": proj[idx]}
    ref, cal = part(ref_idx), part(cal_idx)
    window, a = min(200, len(cal_idx)), alpha / len(drift.TESTS)
    rng = np.random.default_rng(seed)
    bw = drift.median_heuristic(ref["projections"], seed=seed)
    yy = drift.offdiag_mean(drift.rbf_kernel(ref["projections"], ref["projections"], bw))
    k_cr = drift.rbf_kernel(cal["projections"], ref["projections"], bw).mean(1, dtype=np.float64)
    null = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        idx = rng.integers(0, len(cal_idx), window)
        k_xx = drift.rbf_kernel(cal["projections"][idx], cal["projections"][idx], bw)
        distinct = idx[:, None] != idx[None, :]
        null[b] = float(k_xx[distinct].mean(dtype=np.float64)) + yy - 2.0 * float(k_cr[idx].mean())
    return drift.DriftReference(
        p_target=ref["p_target"], probabilities=ref["probabilities"], pca_mean=mean, pca_components=comps,
        projections=ref["projections"], bandwidth=bw, window=window, alpha=alpha, alpha_per_test=a,
        mmd2_threshold=float(np.quantile(null, 1 - a)), null_mmd2=null, null_p_discriminator=np.ones(1),
        null_p_softmax=np.ones(1), mmd_yy=yy)


def new_build(outputs: dict, groups=None, seed: int = 0):
    import tempfile

    from adaptserve.export import reference as ref_mod

    arrays, settings = ref_mod.build(outputs, groups=groups, seed=seed)
    with tempfile.TemporaryDirectory() as d:
        np.savez(Path(d) / "r.npz", **arrays)
        return drift.DriftReference.load(Path(d) / "r.npz"), settings


def check_windows(ref: drift.DriftReference, pool: dict, n_windows: int, rng) -> np.ndarray:
    """(n_windows, 4) alarms: the three tests and 'any', on windows of W distinct images of ``pool``."""
    out = np.zeros((n_windows, len(drift.TESTS) + 1), bool)
    n = len(pool["p_target"])
    for i in range(n_windows):
        idx = rng.choice(n, ref.window, replace=False)
        r = ref.check(pool["p_target"][idx], pool["probabilities"][idx], pool["features"][idx])
        out[i] = [r[t]["alarm"] for t in drift.TESTS] + [r["drift"]]
    return out


def torch_outputs(model, images: np.ndarray) -> dict:
    import torch

    from adaptserve.train.evaluate import predict

    probs, feats, p_t = predict(model, images, torch.device("cpu"))
    return {"probabilities": probs, "features": feats, "p_target": p_t}


def sizes_mode(args) -> list[dict]:
    import torch

    from adaptserve.service.preprocess import InputSpec
    from adaptserve.train import checkpoint as ckpt_io
    from adaptserve.train.data import holdout_split, load

    torch.set_num_threads(args.threads)
    rows = []
    for run in args.run:
        model, meta, _ = ckpt_io.load_model(ckpt_io.find(run, "last"))
        spec = InputSpec.from_dict(meta["input_spec"])
        pool = load(meta["target"], spec, data_root=args.data_dir, labels_optional=True)
        train_idx, held_idx = holdout_split(len(pool), meta["target_holdout"], groups=pool.groups)
        test = load(args.target_test, spec, data_root=args.data_dir).images
        source = load(f"{meta['source'].split(':')[0]}:test", spec, data_root=args.data_dir).images
        rng = np.random.default_rng(0)
        sub = test[rng.choice(len(test), min(3000, len(test)), replace=False)]
        t0 = time.perf_counter()
        outs = {"held": torch_outputs(model, pool.images[held_idx]),
                "train-target": torch_outputs(model, pool.images[train_idx]),
                "target-test": torch_outputs(model, test), "source": torch_outputs(model, source),
                "noise": torch_outputs(model, np.clip(sub + rng.normal(0, 16, sub.shape), 0, 255).astype(np.uint8)),
                "blur": torch_outputs(model, gaussian_filter(sub.astype(np.float32), (0, 1, 1, 0)).round()
                                      .astype(np.uint8))}
        print(f"{run}: target {meta['target']} ({len(pool)} images, {len(held_idx)} held out); model outputs in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        take = lambda o, idx: {k: v[idx] for k, v in o.items()}  # noqa: E731
        for n in args.sizes or [len(pool)]:
            n_held = min(int(round(meta["target_holdout"] * n)), len(held_idx))
            n_train = min(n - n_held, len(train_idx))
            for name in ("old", "new"):
                rates, window, warnings = {}, None, []
                for k in range(args.pools):  # other held-out images (when N is below the run's) and other splits
                    prng = np.random.default_rng(1000 + k)
                    held = take(outs["held"], prng.choice(len(held_idx), n_held, replace=False))
                    if name == "old":
                        ref = old_build(held, seed=k)
                    else:
                        ref, settings = new_build(held, seed=k)
                        warnings = settings["warnings"]
                    window = ref.window
                    pools = {"train-target": take(outs["train-target"], prng.choice(len(train_idx), n_train, replace=False)),
                             **{p: outs[p] for p in ("target-test", "source", "noise", "blur")}}
                    for pname, p in pools.items():
                        rates.setdefault(pname, []).append(check_windows(ref, p, args.windows, prng))
                row = {"run": str(run), "N": n, "held_out": n_held, "calibration": name, "window": window,
                       "pools": args.pools, "warned": bool(warnings)}
                for pname, a in rates.items():
                    per_pool = [float(x[:, -1].mean()) for x in a]
                    allw = np.concatenate(a)
                    row[pname] = {"any": float(allw[:, -1].mean()), "any_ci": rate(allw[:, -1]),
                                  "per_pool_min_max": [min(per_pool), max(per_pool)],
                                  **{t: float(allw[:, i].mean()) for i, t in enumerate(drift.TESTS)}}
                rows.append(row)
                print(json.dumps({k: (f"{v['any_ci']} (pools {100 * v['per_pool_min_max'][0]:.1f}–"
                                      f"{100 * v['per_pool_min_max'][1]:.1f} %)" if isinstance(v, dict) else v)
                                  for k, v in row.items()}), flush=True)
    return rows


def demo_mode(args) -> list[dict]:
    from adaptserve.service.runtime import Model
    from adaptserve.train.data import demo_domain

    model = Model.open(args.model)
    ref = model.drift_reference
    pools = {}
    fresh = np.concatenate([demo_domain("target", "test", variant=v)[0] for v in range(1, args.demo_variants + 1)])
    rng = np.random.default_rng(0)
    sub = model.prepare(fresh[rng.choice(len(fresh), 3000, replace=False)])
    for name, images in (("demo-target test digits, fresh copies", fresh),
                         ("demo-source test", demo_domain("source", "test")[0]),
                         ("fresh copies + noise σ=16", np.clip(sub + rng.normal(0, 16, sub.shape), 0, 255).astype(np.uint8)),
                         ("fresh copies + blur σ=1", gaussian_filter(sub.astype(np.float32), (0, 1, 1, 0)).round()
                          .astype(np.uint8))):
        pred = model.predict(model.prepare(images))
        pools[name] = {"p_target": pred.p_target, "probabilities": pred.probabilities, "features": pred.features}
    row = {"model": str(args.model), "window": ref.window, "fresh_images": len(fresh)}
    for name, p in pools.items():
        a = check_windows(ref, p, args.windows, np.random.default_rng(1))
        row[name] = {"any": float(a[:, -1].mean()), "any_ci": rate(a[:, -1]),
                     **{t: float(a[:, i].mean()) for i, t in enumerate(drift.TESTS)}}
    print(json.dumps(row, indent=1), flush=True)
    return [row]


def table(rows: list[dict]) -> str:
    pools = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    head = [k for k in rows[0] if not isinstance(rows[0][k], dict)]
    lines = ["| " + " | ".join(head + [f"{p}: windows alarmed (95 % CI)" for p in pools]) + " |",
             "|" + " --- |" * (len(head) + len(pools))]
    for r in rows:
        cells = [r[p]["any_ci"] + (" (pools {:.1f}–{:.1f})".format(*(100 * x for x in r[p]["per_pool_min_max"]))
                                   if "per_pool_min_max" in r[p] else "") for p in pools]
        lines.append("| " + " | ".join([str(r[h]) for h in head] + cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, nargs="+", help="trained run directories (sizes mode)")
    ap.add_argument("--sizes", type=int, nargs="+", help="target-set sizes N to emulate from each run's target "
                    "(default: the run's own target set)")
    ap.add_argument("--pools", type=int, default=5, help="held-out pools (and reference/calibration splits) per N")
    ap.add_argument("--target-test", default="mnist_m:test", help="in-distribution images never trained on")
    ap.add_argument("--model", help="an exported model folder or store tag (demo mode)")
    ap.add_argument("--demo-variants", type=int, default=10, help="fresh draws of the demo-target test split")
    ap.add_argument("--windows", type=int, default=200, help="windows checked per pool")
    ap.add_argument("--data-dir", default=os.environ.get("ADAPTSERVE_DATA"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if bool(args.run) == bool(args.model):
        ap.error("give --run (sizes mode) or --model (demo mode)")
    importlib.import_module("threadpoolctl").threadpool_limits(1)
    t0 = time.perf_counter()
    rows = sizes_mode(args) if args.run else demo_mode(args)
    print(table(rows))
    print(f"{time.perf_counter() - t0:.0f} s; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"{platform.processor() or platform.machine()}; load average {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
