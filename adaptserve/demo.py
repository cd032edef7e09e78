"""``adaptserve demo``: the whole journey on the embedded demo pair — no downloads, no GPU, a few minutes.

    1. train    source-only and DANN on demo-source → demo-target, side by side (one process each)
    2. export   the DANN run → verified ONNX + drift reference → BentoML model store (and a folder)
    3. score    the demo-target test set (shuffled) with ``adaptserve score``: rows + drift report
    4. serve    ``bentoml serve`` on 127.0.0.1 at a free port
    5. request  /predict (8 images as JSON), /classify (the same 8 as PNG uploads), /drift after a window
                of target images and after a window of source images (a real domain shift); stop the server
and print one table. Any failing stage stops the demo with a message naming it and a non-zero exit.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from adaptserve.train.metrics import last_step


# Measured in docs/benchmarks.md §2. The trainer's default recipe (auto → digits: BN CNN at 28 px, Adam, BN per
# domain, EMA weights, lr decay at the end) at batch 64 to fit the demo's time budget. A third of the target's
# digits is held out (instead of a tenth): the drift reference and its calibration pool then hold 216 digits each,
# enough for calibrated windows of 200 (export counts a digit's 6 copies as one independent image).
DEMO_STEPS = 1600
DEMO_TRAIN = {"batch_size": 64, "target_holdout": 0.3}


def train_flags(options: dict) -> list[str]:
    """``{"disc_bn": True, "lr": 0.001}`` → ``["--disc-bn", "--lr", "0.001"]`` (the train CLI's flags)."""
    flags = []
    for key, value in options.items():
        name = key.replace("_", "-")
        flags += [f"--{name}" if value else f"--no-{name}"] if isinstance(value, bool) else [f"--{name}", str(value)]
    return flags


MODEL_NAME = "adaptserve-demo"
STAGES = 5


class DemoError(RuntimeError):
    """A stage of the demo failed; the message names the stage and where its log is."""


def stage(i: int, text: str) -> None:
    print(f"[{i}/{STAGES}] {text}", flush=True)


def _clear(path: Path, marker: str) -> None:
    """Remove ``path`` left by an earlier demo (only if it holds ``marker``, i.e. is ours to remove)."""
    if path.exists():
        if not (path / marker).exists():
            raise DemoError(f"{path} exists and is not a demo output (no {marker}); choose another --out")
        shutil.rmtree(path)


# ------------------------------------------------------------------------------------------ 1. train

def train_both(out: Path, steps: int, seed: int) -> dict[str, dict]:
    """Train source-only and DANN in two ``adaptserve train`` processes; a progress bar over both."""
    from tqdm import tqdm

    threads = max(1, (os.cpu_count() or 2) // 2)
    procs, logs = {}, {}
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for method in ("source-only", "dann"):
        _clear(out / method, "config.yaml")
        logs[method] = out / "logs" / f"train-{method}.log"
        cmd = [sys.executable, "-m", "adaptserve", "train", "--source", "demo-source", "--target",
               "demo-target", "--method", method, *train_flags(DEMO_TRAIN), "--steps", str(steps), "--seed",
               str(seed), "--threads", str(threads), "--out", str(out / method), "--no-progress"]
        with open(logs[method], "wb") as log:
            procs[method] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    bar = tqdm(total=2 * steps, unit="step", desc="training", dynamic_ncols=True)
    try:
        while any(p.poll() is None for p in procs.values()):
            bar.update(sum(last_step(out / m / "metrics.jsonl") for m in procs) - bar.n)
            time.sleep(1.0)
        bar.update(sum(last_step(out / m / "metrics.jsonl") for m in procs) - bar.n)
    finally:
        bar.close()
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for method, p in procs.items():
        if p.returncode != 0:
            tail = "\n".join(logs[method].read_text(errors="replace").splitlines()[-15:])
            raise DemoError(f"training {method} failed (exit {p.returncode}); log {logs[method]}:\n{tail}")
    return {m: json.loads((out / m / "summary.json").read_text()) for m in procs}


# ------------------------------------------------------------------------------ 3. data for scoring

def target_test_set(out: Path, spec) -> tuple[Path, np.ndarray, np.ndarray]:
    """The demo-target test split, shuffled (drift windows must be random samples of the traffic), as .npz."""
    from adaptserve.service.preprocess import to_input_spec
    from adaptserve.train.data import demo_domain

    images, labels = demo_domain("target", "test")
    order = np.random.default_rng(0).permutation(len(images))
    images, labels = to_input_spec(images[order], spec), labels[order]
    path = out / "demo-target-test.npz"
    np.savez(path, images=images, labels=labels)
    return path, images, labels


# ---------------------------------------------------------------------------------- 5. requests

def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="PNG")
    return buf.getvalue()


def _ok(r) -> dict:
    if r.status_code != 200:
        raise DemoError(f"{r.request.method} {r.request.url.path} answered {r.status_code}: {r.text[:300]}")
    return r.json()


def _drift_after(client, images: np.ndarray, checked: int, timeout: float = 30.0) -> dict:
    """Send exactly enough ``images`` to complete the current window; return /drift once it is checked."""
    need = _ok(client.get("/drift"))
    n = need["window_size"] - need["n_in_window"]
    _ok(client.post("/predict", content=_npy(images[:n]), headers={"content-type": "application/x-npy"}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = _ok(client.get("/drift"))
        if d["windows_checked"] >= checked and d["windows_pending"] == 0:
            return d
        time.sleep(0.1)
    raise DemoError(f"the drift check did not finish within {timeout:.0f} s: {d}")


def requests(url: str, target: np.ndarray, labels: np.ndarray, source: np.ndarray, classes: list[str]) -> dict:
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the table
    with httpx.Client(base_url=url, timeout=60) as c:
        t0 = time.perf_counter()
        pred = _ok(c.post("/predict", json={"images": target[:8].tolist()}))
        predict_ms = 1000 * (time.perf_counter() - t0)
        # the same 8 images again, as PNG uploads: /classify must agree with /predict on the same pixels
        files = [("files", (f"digit{i}.png", _png(target[i]), "image/png")) for i in range(8)]
        classify = _ok(c.post("/classify", files=files))
        drift_target = _drift_after(c, target[8:], checked=1)
        drift_source = _drift_after(c, source, checked=2)
    truth = [classes[k] for k in labels[:8]]
    return {"predict": pred, "predict_ms": predict_ms, "predict_correct": sum(a == b for a, b in zip(pred["labels"], truth)),
            "classify": classify, "classify_agree": sum(a == b for a, b in zip(classify["labels"], pred["labels"])),
            "drift_target": drift_target, "drift_source": drift_source}


# ------------------------------------------------------------------------------------------ the journey

def run_demo(out: Path, steps: int = DEMO_STEPS, seed: int = 0) -> dict:
    t_start = time.perf_counter()
    out = Path(out).resolve()  # the report names absolute paths
    out.mkdir(parents=True, exist_ok=True)
    stage(1, f"training source-only and DANN on demo-source → demo-target ({steps} steps each, in parallel)")
    runs = train_both(out, steps, seed)

    stage(2, "exporting the DANN run: ONNX + parity check + drift reference → BentoML model store")
    from adaptserve.export.bundle import export

    _clear(out / "model", "manifest.json")
    try:
        tag, manifest = export(out / "dann", name=MODEL_NAME, out=out / "model")
    except (ValueError, OSError) as e:
        raise DemoError(f"export failed: {e}") from e
    print(f"      → {tag} (also in {out / 'model'})", flush=True)

    stage(3, "batch scoring the demo-target test set with the exported model (adaptserve score)")
    from adaptserve.service.runtime import Model
    from adaptserve.service.score import score
    from adaptserve.service.preprocess import to_input_spec
    from adaptserve.train.data import demo_domain

    model = Model.open(tag)
    npz, target, labels = target_test_set(out, model.input_spec)
    scored = score(tag, npz, out / "scores.csv", model=model)

    stage(4, "starting bentoml serve on 127.0.0.1")
    from adaptserve.service.launch import ServeProcess

    source = to_input_spec(demo_domain("source", "test")[0], model.input_spec)
    source = source[np.random.default_rng(1).permutation(len(source))]
    with ServeProcess(tag, log=out / "logs" / "serve.log", ADAPTSERVE_THREADS=1) as srv:
        try:
            ready_s = srv.wait_ready()
        except RuntimeError as e:
            raise DemoError(f"the service did not start: {e}") from e
        print(f"      → ready in {ready_s:.1f} s at {srv.url}", flush=True)
        stage(5, "requests: /predict, /classify, /drift (a window of target images, then of source images)")
        answers = requests(srv.url, target, labels, source, model.classes)
    return {"runs": runs, "tag": tag, "manifest": manifest, "scored": scored, "ready_s": ready_s, "url": srv.url,
            "answers": answers, "out": out, "seconds": time.perf_counter() - t_start}


def _drift_line(d: dict) -> str:
    p = ", ".join(f"{t['name']} p={t['p_value']:.2g}" for t in d["tests"])
    return f"{d['status'].upper()} ({p})"


def _bentoml_cli() -> str:
    """How to call the bentoml of this environment from the current folder (e.g. .venv/bin/bentoml)."""
    cli = Path(sys.executable).parent / "bentoml"
    if not cli.exists():
        return "bentoml"
    rel = os.path.relpath(cli)
    return rel if not rel.startswith("..") else str(cli)


def report(r: dict) -> str:
    so, da = r["runs"]["source-only"], r["runs"]["dann"]
    a, s, par = r["answers"], r["scored"], r["manifest"]["parity"]
    rows = [("", "source-only", "DANN"),
            ("target accuracy (demo-target:test)", f"{so['target_acc']:.1%}", f"{da['target_acc']:.1%}"),
            ("source accuracy (demo-source:test)", f"{so['source_acc']:.1%}", f"{da['source_acc']:.1%}"),
            ("domain accuracy of G_d (0.5 = aligned)", f"{so['domain_acc']:.1%}", f"{da['domain_acc']:.1%}"),
            ("training wall time", f"{so['wall_time_s']:.0f} s", f"{da['wall_time_s']:.0f} s")]
    w = max(len(x[0]) for x in rows)
    lines = [f"{x[0]:<{w}}  {x[1]:>12}  {x[2]:>12}" for x in rows]
    out = r["out"]
    lines += [
        "",
        f"ONNX parity (ORT vs PyTorch)      max |Δp| {par['max_abs_diff_probabilities']:.1e} on {par['images']} held-out images",
        f"batch scoring                     {s['n_scored']} images, accuracy {s['accuracy']:.1%}, "
        f"{s['n_windows']} drift windows, {s['fraction_windows_alarmed']:.0%} alarmed, {s['seconds']:.1f} s",
        f"service                           {r['tag']} ready in {r['ready_s']:.1f} s at {r['url']} (stopped)",
        f"  POST /predict, 8 images (JSON)  {a['predict_correct']}/8 correct, {a['predict_ms']:.0f} ms",
        f"  POST /classify, the same 8 PNGs {a['classify_agree']}/8 labels equal to /predict's",
        f"  GET /drift, window of target    {_drift_line(a['drift_target'])}",
        f"  GET /drift, window of source    {_drift_line(a['drift_source'])}",
        "",
        f"runs, curves.png, tsne.png   {out / 'source-only'}, {out / 'dann'}",
        f"model                        {r['tag']} (BentoML store), files in {out / 'model'}",
        f"scores, drift report         {out / 'scores.csv'}, {out / 'scores.csv.drift.json'}",
        f"logs                         {out / 'logs'}",
        f"serve it yourself            ADAPTSERVE_MODEL={r['tag']} {_bentoml_cli()} serve",
        f"whole demo                   {r['seconds']:.0f} s",
    ]
    return "\n".join(lines)
