"""Drift detection at W = 200: false-alarm rate on in-distribution windows, power on shifted ones, per test.

    ADAPTSERVE_DATA=/work/shared/data .venv/bin/python benchmarks/drift_power.py \
        --run benchmarks/runs/accuracy/mnist-mnist_m/dann-s0 --model /tmp/driftbench/mnistm-dann \
        --windows 500 --id-windows 2000 --json /tmp/driftbench/drift_power.json

If ``--model`` does not exist it is exported first with ``adaptserve export RUN --out MODEL`` (into a temporary
BentoML store), which builds the drift reference from MNIST-M *train* images the run held out (2,000 reference
+ 3,900 calibration images). Everything below uses the code path of the service and the scorer:
:class:`service.runtime.Model` for the outputs and :meth:`service.drift.DriftReference.check` per window.

Pools (each image's outputs are computed once; a window is W indices into a pool):

- in-distribution: the 9,001 MNIST-M *test* images — a different split from the reference and calibration
  pools, never trained on (training only evaluated on them);
- MNIST test (10,000), USPS test (2,007): the source domain and a third domain;
- corrupted MNIST-M test: Gaussian noise, Gaussian blur, lower contrast, brightness, three severities each;
- mixes: a fraction of each window (10 / 25 / 50 %) drawn from MNIST test, the rest from MNIST-M test.

A window is W distinct images drawn without replacement from its pool; windows are drawn independently, so
an image appears in many windows (sampling with replacement across windows). Rates are the fraction of
windows with an alarm, with a 95 % Clopper–Pearson interval; the model's accuracy on each whole pool is printed
beside it (does an alarm coincide with harm?). The cost of a check is its wall time, next to the time the model
takes to produce the outputs of one window in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.stats import binomtest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptserve.service import drift  # noqa: E402
from adaptserve.service.runtime import Model  # noqa: E402

COLUMNS = (*drift.TESTS, "drift")


def export_model(run: Path, out: Path) -> None:
    """``adaptserve export RUN --out OUT`` into a throw-away BentoML store."""
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "BENTOML_HOME": home}
        subprocess.run([sys.executable, "-m", "adaptserve", "export", str(run), "--out", str(out),
                        "--name", "drift-power"], check=True, env=env)


# ---------------------------------------------------------------- corruptions of uint8 (N, H, W, C) images

def noise(x, sigma, rng):
    return np.clip(x + rng.normal(0, sigma, x.shape), 0, 255)


def blur(x, sigma, rng):
    return gaussian_filter(x.astype(np.float32), sigma=(0, sigma, sigma, 0))


def contrast(x, c, rng):
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return mean + c * (x.astype(np.float32) - mean)


def brightness(x, delta, rng):
    return np.clip(x.astype(np.float32) + delta, 0, 255)


CORRUPTIONS = [("noise", noise, (8, 16, 32), "σ={} (0–255)"), ("blur", blur, (0.5, 1.0, 1.5), "σ={} px"),
               ("contrast", contrast, (0.7, 0.5, 0.3), "×{}"), ("brightness", brightness, (16, 32, 64), "+{}")]


def as_uint8(x) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- windows

def outputs(model: Model, images: np.ndarray) -> dict:
    pred = model.predict(images)
    return {"p_target": pred.p_target, "probabilities": pred.probabilities, "features": pred.features}


def accuracy(pool: dict, labels: np.ndarray) -> float:
    return float(np.mean(pool["probabilities"].argmax(1) == labels))


def run_condition(ref, pools: list[tuple[dict, float]], n_windows: int, rng) -> dict:
    """``n_windows`` windows mixing pools by the given fractions; alarm counts per test and check times."""
    w = ref.window
    counts = np.array([round(f * w) for _, f in pools])
    counts[0] += w - counts.sum()
    alarms, seconds = np.zeros((n_windows, len(COLUMNS)), bool), np.empty(n_windows)
    for b in range(n_windows):
        parts = []
        for (pool, _), c in zip(pools, counts):
            idx = rng.choice(len(pool["p_target"]), c, replace=False)
            parts.append({k: v[idx] for k, v in pool.items()})
        win = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        t0 = time.perf_counter()
        r = ref.check(win["p_target"], win["probabilities"], win["features"])
        seconds[b] = time.perf_counter() - t0
        alarms[b] = [r[t]["alarm"] for t in drift.TESTS] + [r["drift"]]
    rates = {}
    for j, col in enumerate(COLUMNS):
        k = int(alarms[:, j].sum())
        ci = binomtest(k, n_windows).proportion_ci(0.95, method="exact")
        rates[col] = {"alarms": k, "rate": k / n_windows, "ci95": [float(ci.low), float(ci.high)]}
    return {"windows": n_windows, "rates": rates, "check_ms_median": float(np.median(seconds) * 1e3),
            "check_ms_p90": float(np.quantile(seconds, 0.9) * 1e3)}


def component_costs(ref, pool: dict, rng, n: int = 200) -> dict:
    """Median ms of each test alone on ``n`` in-distribution windows (the parts of one check)."""
    ref.mmd2(pool["features"][:ref.window])  # the reference's within-sample term, cached once
    fns = {"ks_discriminator": lambda i: drift.ks_test(ref.p_target, pool["p_target"][i]),
           "ks_softmax_bonferroni": lambda i: drift.ks_per_class(ref.probabilities, pool["probabilities"][i]),
           "mmd_pca": lambda i: ref.mmd2(pool["features"][i])}
    out = {}
    for name, fn in fns.items():
        t = []
        for _ in range(n):
            i = rng.choice(len(pool["p_target"]), ref.window, replace=False)
            t0 = time.perf_counter()
            fn(i)
            t.append(time.perf_counter() - t0)
        out[name] = float(np.median(t) * 1e3)
    return out


def fmt(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "benchmarks/runs/accuracy/mnist-mnist_m/dann-s0")
    ap.add_argument("--model", type=Path, default=Path("/tmp/driftbench/mnistm-dann"))
    ap.add_argument("--data-dir", default=os.environ.get("ADAPTSERVE_DATA"))
    ap.add_argument("--windows", type=int, default=500, help="windows per shifted condition")
    ap.add_argument("--id-windows", type=int, default=2000, help="windows of in-distribution MNIST-M test images")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for the model outputs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write all results here")
    args = ap.parse_args(argv)
    from adaptserve.train.data import load  # numpy-only loaders of the named datasets

    if not args.model.exists():
        export_model(args.run, args.model)
    model = Model.open(args.model, device="cpu", threads=args.threads)
    ref = model.drift_reference
    manifest = model.manifest["drift"]
    rng = np.random.default_rng(args.seed)

    def data(spec):
        d = load(spec, model.input_spec, data_root=args.data_dir)
        return d.images, d.labels

    mnist_m, y_mnist_m = data("mnist_m:test")
    t0 = time.perf_counter()
    pools = {"MNIST-M test (in-distribution)": outputs(model, mnist_m)}
    infer_s = (time.perf_counter() - t0) / len(mnist_m) * ref.window
    acc = {"MNIST-M test (in-distribution)": accuracy(pools["MNIST-M test (in-distribution)"], y_mnist_m)}
    for name, spec in (("MNIST test", "mnist:test"), ("USPS test", "usps:test")):
        images, labels = data(spec)
        pools[name] = outputs(model, images)
        acc[name] = accuracy(pools[name], labels)
    for name, fn, levels, label in CORRUPTIONS:
        for level in levels:
            key = f"MNIST-M {name} {label.format(level)}"
            pools[key] = outputs(model, as_uint8(fn(mnist_m, level, rng)))
            acc[key] = accuracy(pools[key], y_mnist_m)

    conditions = {name: [(pool, 1.0)] for name, pool in pools.items()}
    for frac in (0.10, 0.25, 0.50):
        conditions[f"mix: {frac:.0%} MNIST in MNIST-M"] = [(pools["MNIST-M test (in-distribution)"], 1 - frac),
                                                           (pools["MNIST test"], frac)]
    results = {}
    for name, spec in conditions.items():
        n = args.id_windows if name.startswith("MNIST-M test") else args.windows
        results[name] = {**run_condition(ref, spec, n, rng), "accuracy": acc.get(name)}
        print(f"{name:40s} " + " | ".join(fmt(results[name]["rates"][c]) for c in COLUMNS)
              + (f" | accuracy {100 * acc[name]:.1f}" if name in acc else ""), flush=True)
    costs = component_costs(ref, pools["MNIST-M test (in-distribution)"], rng)
    checks = [r["check_ms_median"] for r in results.values()]
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "load_average": os.getloadavg(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "model": str(args.model),
            "run": str(args.run), "window": ref.window, "alpha": ref.alpha, "alpha_per_test": ref.alpha_per_test,
            "reference": manifest.get("reference"), "n_reference": manifest["n_reference"],
            "n_calibration": manifest["n_calibration"], "calibration_false_alarm_rate":
            manifest["empirical_false_alarm_rate"], "check_ms_median_over_conditions": float(np.median(checks)),
            "test_ms_median": costs, "model_ms_per_window": infer_s * 1e3, "conditions": results}
    print(f"check: median {info['check_ms_median_over_conditions']:.1f} ms per window "
          f"(tests alone: {', '.join(f'{k} {v:.1f} ms' for k, v in costs.items())}); model outputs for one window "
          f"{info['model_ms_per_window']:.1f} ms ({args.threads} thread); load average {info['load_average']}")
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
