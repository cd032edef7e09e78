"""Time to accuracy: training seconds until MNIST → MNIST-M first reaches a target accuracy, adaptserve's
default against fungtion/DANN's loop as shipped (the re-implementation of benchmarks/train_throughput.py).

    ADAPTSERVE_DATA=../shared/data python benchmarks/time_to_accuracy.py --target-acc 0.85 --eval-every 500 \\
        --threads 2 --cap 3

Both run one after the other on the same machine at ``--threads`` torch threads, each evaluated every
``--eval-every`` steps on the MNIST-M test split; the clock counts training steps only (evaluation is
excluded on both sides).

* ours: ``adaptserve train --source mnist --target mnist_m --steps 10000`` with no other option (the
  ``digits`` recipe; 10,000 steps as in docs/benchmarks.md §1f — the λ ramp and the lr decay follow the
  length), accuracy of the weights it ships (EMA); training seconds at step s are read from its
  ``metrics.jsonl`` (images seen / its images-per-second, evaluation excluded). Stopped at the first
  evaluation at or above the target.
* reference: fungtion/DANN's ``train/main.py`` (Adam 1e-3 constant, its λ schedule over 100 epochs, two
  forwards, per-item PIL pipelines through ``DataLoader(num_workers=8)``), its ``test.py`` evaluation
  (``eval()`` mode, α = 0, MNIST-M test at 28 px normalised by 0.5). Stopped at the target or when its
  training time passes ``--cap`` × ours — then ours is at most 1/cap of its time, with its accuracy
  curve up to there as the evidence.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torchvision import transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_throughput import BATCH, PngItems, reference_datasets, reference_steps  # noqa: E402

from adaptserve.service.preprocess import InputSpec  # noqa: E402
from adaptserve.train.data import load  # noqa: E402
from adaptserve.train.metrics import read_metrics  # noqa: E402


def ours(data_dir: str, target: float, eval_every: int, threads: int, seed: int, steps: int) -> dict:
    """``adaptserve train`` with its defaults (and ``steps``) in a subprocess, stopped at the first eval ≥ ``target``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "adaptserve", "train", "--source", "mnist", "--target", "mnist_m",
               "--seed", str(seed), "--steps", str(steps), "--threads", str(threads), "--eval-every", str(eval_every), "--no-tsne",
               "--data-dir", data_dir, "--out", str(out)]
        log = open(Path(tmp) / "train.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        curve, train_s, done = [], {}, None
        try:
            while proc.poll() is None and done is None:
                time.sleep(2)
                path = out / "metrics.jsonl"
                if not path.exists():
                    continue
                train, evals = read_metrics(path)  # a line still being written is skipped
                train_s.update({r["step"]: r["step"] * 2 * 128 / r["images_per_s"] for r in train})
                for r in evals:
                    if r["step"] not in [c["step"] for c in curve]:
                        curve.append({"step": r["step"], "acc": r["target_acc"], "train_s": train_s.get(r["step"])})
                        print(f"ours      step {r['step']:6d}  {train_s.get(r['step'], float('nan')):7.0f} s  "
                              f"target {r['target_acc']:.1%}", flush=True)
                        if r["target_acc"] >= target:
                            done = curve[-1]
            if done is None:
                print(f"adaptserve train exited with status {proc.returncode}:\n"
                      + (Path(tmp) / "train.log").read_text()[-3000:], flush=True)
        finally:
            proc.kill()
            proc.wait()
            log.close()
    return {"curve": curve, "reached": done}


def reference_eval(net: nn.Module, test: PngItems) -> float:
    """fungtion/DANN's test.py: eval mode, α = 0, batch 128, accuracy of the class head."""
    net.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(test, batch_size=BATCH, shuffle=False, num_workers=0):
            class_output, _ = net(x.expand(len(x), 3, 28, 28), 0.0)
            correct += int((class_output.argmax(1) == y).sum())
    net.train()
    return correct / len(test)


def reference(data_dir: str, target: float, eval_every: int, threads: int, budget_s: float, seed: int,
              workers: int = 8) -> dict:
    """fungtion/DANN's loop (train_throughput.reference_steps) until ``target`` or ``budget_s`` of training."""
    source, target_train = reference_datasets(data_dir)
    mm_test = load("mnist_m:test", InputSpec(32, 32, 3), data_root=data_dir)
    test = PngItems(mm_test.images, mm_test.labels, transforms.Compose([
        transforms.Resize(28), transforms.ToTensor(), transforms.Normalize(mean=(0.5,) * 3, std=(0.5,) * 3)]))
    curve, train_s, done = [], 0.0, None
    t0 = time.perf_counter()
    for step, net in reference_steps(source, target_train, threads, workers, seed):
        if step % eval_every:
            continue
        train_s += time.perf_counter() - t0
        acc = reference_eval(net, test)
        curve.append({"step": step, "acc": acc, "train_s": train_s})
        print(f"reference step {step:6d}  {train_s:7.0f} s  target {acc:.1%}", flush=True)
        if acc >= target:
            done = curve[-1]
        if done is not None or train_s >= budget_s:
            break
        t0 = time.perf_counter()
    return {"curve": curve, "reached": done}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-acc", type=float, default=0.85)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cap", type=float, default=3.0, help="stop the reference at this multiple of ours' time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=10_000, help="ours: the length of its schedule (λ, lr decay)")
    ap.add_argument("--data-dir", default=os.environ.get("ADAPTSERVE_DATA"))
    ap.add_argument("--json", type=Path, default=None, help="also write the curves here")
    args = ap.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    a = ours(args.data_dir, args.target_acc, args.eval_every, args.threads, args.seed, args.steps)
    if a["reached"] is None:
        raise SystemExit(f"ours did not reach {args.target_acc:.0%} in its {args.steps} steps: {a['curve']}")
    t_ours = a["reached"]["train_s"]
    b = reference(args.data_dir, args.target_acc, args.eval_every, args.threads, args.cap * t_ours, args.seed)
    load_avg = os.getloadavg()
    print(f"\n{started:%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, {args.threads} threads, "
          f"load average now {load_avg[0]:.1f}/{load_avg[1]:.1f}/{load_avg[2]:.1f}")
    print(f"| loop | first eval ≥ {args.target_acc:.0%} (step) | training time | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| adaptserve default | {a['reached']['step']} | {t_ours / 60:.1f} min | 1.00× |")
    if b["reached"]:
        t_ref = b["reached"]["train_s"]
        print(f"| fungtion/DANN as shipped | {b['reached']['step']} | {t_ref / 60:.1f} min | "
              f"{t_ref / t_ours:.2f}× |")
    else:
        last = b["curve"][-1] if b["curve"] else {"step": 0, "acc": float("nan"), "train_s": 0}
        print(f"| fungtion/DANN as shipped | not reached: {last['acc']:.1%} at step {last['step']} | "
              f"> {last['train_s'] / 60:.1f} min | > {last['train_s'] / t_ours:.2f}× |")
    if args.json:
        args.json.write_text(json.dumps({"ours": a, "reference": b, "threads": args.threads,
                                         "started": started.isoformat(), "load_average": load_avg}, indent=1))


if __name__ == "__main__":
    main()
