"""Real runs of the failure modes in docs/troubleshooting.md, on the embedded demo pair (no files needed).

    python benchmarks/failure_modes.py [--steps 1200] [--out benchmarks/runs/failure_modes] [--figures docs/img]
    python benchmarks/failure_modes.py --report     # the table of finished cases, warnings replayed with today's code

Each case is an ordinary run directory (metrics.jsonl, curves.png, the diagnostics in train.log); the
script prints one line per case and copies each ``curves.png`` to ``--figures`` as
``failure-<case>.png``. The GRL sign mistake cannot be configured (``--lambda-max`` must be ≥ 0), so that
case negates λ_p inside the loop to show what the bug looks like in someone's own training code.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptserve.train import loop as train_loop  # noqa: E402
from adaptserve.train.config import TrainConfig  # noqa: E402
from adaptserve.train.evaluate import TrainingDiverged, diagnose  # noqa: E402
from adaptserve.train.metrics import read_metrics  # noqa: E402
from adaptserve.train.plots import plot_curves  # noqa: E402

# The settings these cases were measured with (docs/troubleshooting.md): the paper CNN with SGD on the demo
# pair, λ capped at 0.5 — the demo's settings (adaptserve.demo.DEMO_TRAIN) when they were measured.
DEMO_ARCH, DEMO_LAMBDA_MAX = "dann_mnist", 0.5

CASES = {
    "healthy": dict(method="dann", lambda_max=DEMO_LAMBDA_MAX),
    "source-only": dict(method="source-only"),
    "lambda-too-strong": dict(method="dann", lambda_max=10.0),
    "no-warm-up": dict(method="dann", lambda_max=1.0, gamma=1000.0),
    "lr-too-high": dict(method="dann", lambda_max=DEMO_LAMBDA_MAX, lr=0.2),
    "grl-sign-flipped": dict(method="dann", lambda_max=DEMO_LAMBDA_MAX),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/runs/failure_modes"))
    ap.add_argument("--figures", type=Path, default=Path("docs/img"))
    ap.add_argument("--report", action="store_true", help="train nothing: print the table of finished cases")
    args = ap.parse_args()
    if args.report:
        for case in args.cases:
            if (args.out / case / "config.yaml").exists():
                print(line(case, args.out / case))
        return
    args.figures.mkdir(parents=True, exist_ok=True)
    original = train_loop.dann_lambda
    for case in args.cases:
        out = args.out / case
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        handler = logging.FileHandler(out / "train.log")  # the diagnostics warnings land here
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
        train_loop.dann_lambda = (lambda p, g: -original(p, g)) if case == "grl-sign-flipped" else original
        cfg = TrainConfig(arch=DEMO_ARCH, steps=args.steps, seed=args.seed, threads=1, tsne=False,
                          **CASES[case])
        try:
            train_loop.run(cfg, out, progress=False)
        except TrainingDiverged as e:  # the run stops itself; plot what it logged up to there
            (out / "diverged.txt").write_text(str(e))
            plot_curves(out / "metrics.jsonl", out / "curves.png", f"{case} (diverged)")
        finally:
            logging.getLogger().removeHandler(handler)
            train_loop.dann_lambda = original
        shutil.copy(out / "curves.png", args.figures / f"failure-{case}.png")
        print(line(case, out), flush=True)


def line(case: str, run_dir: Path) -> str:
    """One markdown row: final accuracies and the warnings :func:`diagnose` raises over the run's evaluations."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    train_log, evals = read_metrics(run_dir / "metrics.jsonl")
    warned = {}
    for i in range(1, len(evals) + 1):
        for key, _ in diagnose(evals[:i], evals[i - 1]["step"] / cfg["steps"], cfg["method"]):
            warned.setdefault(key, evals[i - 1]["step"])
    if (run_dir / "diverged.txt").exists():
        warned["stopped: training diverged"] = (evals[-1]["step"] if evals else 0) + cfg["eval_every"]
    w = ", ".join(f"{k} (step {step})" for k, step in warned.items()) or "—"
    last = evals[-1] if evals else {}
    cells = [f"{100 * last[k]:.1f}%" if k in last else "—" for k in ("target_acc", "source_acc", "domain_acc")]
    return f"| {case} | {' | '.join(cells)} | {last.get('pad', float('nan')):.2f} | {w} |"


if __name__ == "__main__":
    main()
