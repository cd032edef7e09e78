"""Real (short) training runs on the embedded demo pair: the loop, its files, resume, DDP, the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import kill_and_resume
from adaptserve.train import checkpoint as ckpt_io
from adaptserve.train.config import TrainConfig
from adaptserve.train.loop import run

pytestmark = pytest.mark.slow


def small_cfg(**kw) -> TrainConfig:
    base = dict(steps=60, batch_size=32, eval_every=20, log_every=10, threads=1, tsne=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_run_writes_every_artifact(tmp_path):
    summary = run(small_cfg(method="cdan-e", tsne=True), tmp_path / "r", progress=False)
    out = tmp_path / "r"
    for name in ["config.yaml", "metrics.jsonl", "summary.json", "curves.png", "tsne.png",
                 "checkpoints/last.pt", "checkpoints/best.pt"]:
        assert (out / name).is_file(), name
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if r["kind"] == "eval"]
    trains = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in evals] == [20, 40, 60]
    assert {"lr", "lambda", "loss_cls", "loss_domain", "batch_domain_acc"} <= set(trains[0])
    assert {"source_acc", "target_acc", "domain_acc", "pad", "im"} <= set(evals[0])
    assert trains[0]["lambda"] < trains[-1]["lambda"] and trains[0]["lr"] > trains[-1]["lr"]
    assert summary["target_acc"] == evals[-1]["target_acc"] and summary["steps"] == 60
    state = ckpt_io.load(out / "checkpoints" / "last.pt")  # weights_only=True
    assert state["step"] == 60 and state["meta"]["classes"] == [str(i) for i in range(10)]


def test_mmd_term_grad_clip_and_warmup_in_the_loop(tmp_path):
    """--warmup-steps scales the first steps' lr by (step+1)/N; --grad-clip clips (a bound of 1e-3: every
    step; 1e6: no step, and the run equals the unclipped one bit for bit); --mmd-weight logs its loss; every
    evaluation logs the feature MMD."""
    kw = dict(steps=30, eval_every=30, log_every=10)
    recs = {}
    for name, extra in {"base": {}, "warm": dict(warmup_steps=20), "warm-noclip": dict(warmup_steps=20, grad_clip=1e6),
                        "clip-mmd": dict(warmup_steps=20, grad_clip=1e-3, mmd_weight=1.0)}.items():
        run(small_cfg(**kw, **extra), tmp_path / name, progress=False)
        recs[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    lr = {n: [r["lr"] for r in rs if r["kind"] == "train"] for n, rs in recs.items()}
    assert [w / b for w, b in zip(lr["warm"], lr["base"])] == pytest.approx([0.5, 1.0, 1.0])  # steps 10, 20, 30
    weights = {n: ckpt_io.load(tmp_path / n / "checkpoints" / "last.pt")["model"] for n in recs}
    assert all(torch.equal(weights["warm"][k], weights["warm-noclip"][k]) for k in weights["warm"])
    assert not all(torch.equal(weights["warm"][k], weights["clip-mmd"][k]) for k in weights["warm"])
    trains = {n: [r for r in rs if r["kind"] == "train"] for n, rs in recs.items()}
    assert all(r["clipped"] == 0.0 and r["grad_norm"] > 1e-3 for r in trains["warm-noclip"])
    assert all(r["clipped"] == 1.0 and r["loss_mmd"] > 0 for r in trains["clip-mmd"])
    assert "grad_norm" not in trains["base"][0] and "loss_mmd" not in trains["base"][0]
    assert all(r["mmd"] >= 0 for rs in recs.values() for r in rs if r["kind"] == "eval")


def test_speed_options_channels_last_same_math_cpu_bf16_lower_precision(tmp_path):
    """--channels-last changes only the memory layout: after 20 steps the weights match the default run's
    to float tolerance. --cpu-bf16 really runs in bfloat16 (its losses differ from float32's, a little)."""
    kw = dict(steps=20, eval_every=20, log_every=10, device="cpu")
    runs = {"fp32": {}, "cl": {"channels_last": True}, "bf16": {"cpu_bf16": True}}
    for name, opts in runs.items():
        run(small_cfg(**kw, **opts), tmp_path / name, progress=False)
    weights = {n: ckpt_io.load(tmp_path / n / "checkpoints" / "last.pt")["model"] for n in runs}
    for k, v in weights["fp32"].items():
        assert torch.allclose(v, weights["cl"][k], rtol=1e-3, atol=1e-5), k
        assert weights["bf16"][k].dtype == v.dtype and torch.isfinite(weights["bf16"][k].float()).all(), k
    loss = {n: [json.loads(x)["loss_cls"] for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()
                if json.loads(x)["kind"] == "train"] for n in runs}
    assert loss["bf16"] != loss["fp32"] and loss["bf16"] == pytest.approx(loss["fp32"], rel=0.05)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, cli):
    steps = 120
    aug = ["--aug-rotate", "10", "--aug-scale", "0.3", "--aug-shift", "0.1"]  # its draws must repeat on resume too
    flags = ["--steps", str(steps), "--batch-size", "32", "--eval-every", "10", "--eval-samples", "300",
             "--threads", "1", "--no-tsne", "--no-progress", *aug]
    a, b = kill_and_resume(cli, flags, tmp_path, steps)
    assert b["step"] == steps
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["ema"] is not None and a["ema"]["updates"] == b["ema"]["updates"] == steps  # the default keeps an EMA
    for k in a["ema"]["model"]:
        assert torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]), k
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    steps_logged = [json.loads(x)["step"] for x in lines if json.loads(x)["kind"] == "eval"]
    assert steps_logged == list(range(10, steps + 1, 10))  # no duplicates, nothing lost


def test_ddp_two_processes_gloo(tmp_path):
    """Two processes on gloo, with class-adaptive self-training on from step 20: its per-class counts are
    summed over the ranks (both then hold the same thresholds), so the running total of predicted rows in
    the checkpoint is that of 2 × 16 target rows a step: 32·(1 − 0.99^20), not one rank's 16·(1 − 0.99^20)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "adaptserve", "train", "--method", "dann", "--steps", "40", "--batch-size", "16", "--eval-every", "20",
           "--pseudo-weight", "1", "--pseudo-start", "0.5", "--pseudo-balance",
           "--threads", "1", "--no-tsne", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "ddp")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    # 40 steps × 2 processes × (16 source + 16 target) images
    train_time = summary["wall_time_s"] - summary["eval_time_s"]
    assert summary["images_per_s"] * train_time == pytest.approx(40 * 2 * 32)
    counts = ckpt_io.load(tmp_path / "ddp" / "checkpoints" / "last.pt")["pseudo_classes"]
    assert float(counts["predicted"].sum()) == pytest.approx(32 * (1 - 0.99 ** 20))


def test_cli_errors_are_one_line_and_exit_2(tmp_path, cli):
    cases = [
        (["train", "--source", "imagenet"], "unknown dataset spec"),
        (["train", "--method", "magic"], "unknown method"),
        (["train", "--source", "mnist", "--data-dir", str(tmp_path)], "missing data file"),
        (["train", "--source", f"folder:{tmp_path}/nope"], "does not exist"),
        (["train", "--resume", str(tmp_path)], "no config.yaml"),
        (["eval", str(tmp_path), "--eval", "demo-target"], "no checkpoint best.pt"),
        (["train", "--lambda-max", "-1"], "--lambda-max must be >= 0"),
        (["train", "--recipe", "magic"], "unknown recipe"),
        (["train", "--ema", "1.5"], "--ema must be in [0, 1)"),
        (["train", "--recipe", "paper", "--lr", "1e6", "--steps", "20", "--eval-every", "10", "--batch-size", "16", "--threads", "1",
          "--no-tsne", "--out", str(tmp_path / "diverged")], "training diverged"),
    ]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for args, message in cases:
        r = subprocess.run(cli + args + ["--no-progress"] * (args[0] == "train"), capture_output=True, text=True,
                           cwd=cwd)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "diverged" / "checkpoints" / "last.pt").exists()  # no checkpoint of NaN weights
    assert not list(cwd.glob("runs/*")), "a run that failed on its data left an empty run directory"


def test_eval_command(tmp_path, cli):
    run(small_cfg(steps=20, eval_every=10), tmp_path / "r", progress=False)
    r = subprocess.run(cli + ["eval", str(tmp_path / "r"), "--eval", "demo-source:test", "--checkpoint", "last"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "r" / "eval-demo-source_test.json").read_text())
    assert result["n"] > 300 and 0.0 <= result["accuracy"] <= 1.0 and result["step"] == 20
    assert "demo-source:test: accuracy" in r.stdout
