"""Label-free signals of which source is closest to the target, from finished multi-source runs' logs.

    python benchmarks/source_signals.py /work/runs/msbal/usps/mdan-soft-s* /work/runs/pairs/mnist+usps-s0

A source-weighting rule can only use what a run sees without target labels. For every run given this prints,
per source, the three signals such a rule could read — a discriminator's domain accuracy on the training
batches (mean over ``--window`` steps: MDAN's per-source G_d^i, or the combined run's one G_d on that source's
rows), the shipped G_d's on the held-out evaluation rows (the combined run's G_d; for MDAN the one of all
sources vs target that learns on detached features; mean over the evaluations in the window, and at the last
one), and the source's class fit (its held-out accuracy at the last step; DARN's weights follow its training
loss instead) — and which source each signal ranks first (lowest domain accuracy = hardest to tell from the target = closest;
highest source accuracy = best fitted). Beside them: the run's last-step target accuracy and IM. Compare the
"closest" columns with the best single source measured alone (docs/benchmarks.md §11) to see whether a
signal would have picked it. Nothing is trained.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptserve.train.metrics import read_metrics  # noqa: E402


def signals(run: Path, window: tuple[int, int]) -> dict:
    """{source: {train_domain, eval_domain, eval_domain_last, source_acc_last}} plus the run's last
    target accuracy and IM; domain accuracies are means over the records whose step is in ``window``."""
    if not (run / "metrics.jsonl").is_file():
        raise SystemExit(f"{run}: not a run directory (no metrics.jsonl in it)")
    train, evals = read_metrics(run / "metrics.jsonl")
    lo, hi = window
    tr = [r for r in train if lo <= r["step"] <= hi and "per_source" in r]
    ev = [r for r in evals if lo <= r["step"] <= hi and "per_source" in r]
    if not evals or "per_source" not in evals[-1]:
        raise SystemExit(f"{run}: no per-source evaluation in metrics.jsonl (a single-source run?)")
    last = evals[-1]
    per = {s: {"train_domain": statistics.mean(r["per_source"][s]["domain_acc"] for r in tr) if tr else None,
               "eval_domain": statistics.mean(r["per_source"][s]["domain_acc"] for r in ev) if ev else None,
               "eval_domain_last": last["per_source"][s]["domain_acc"],
               "source_acc_last": last["per_source"][s]["source_acc"]}
           for s in last["per_source"]}
    return {"per_source": per, "target_acc": last.get("target_acc"), "im": last["im"]}


def first(per: dict, key: str, highest: bool = False) -> str:
    """The source a signal ranks first (closest: lowest domain accuracy; best fitted: highest accuracy)."""
    vals = {s: v[key] for s, v in per.items() if v[key] is not None}
    return (max if highest else min)(vals, key=vals.get) if vals else "—"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories of multi-source runs")
    ap.add_argument("--window", nargs=2, type=int, default=(250, 1000), metavar=("FROM", "TO"),
                    help="the steps whose records are averaged (default 250 1000: early, when a weighting decides)")
    args = ap.parse_args()
    fmt = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
    runs = {run: signals(run, tuple(args.window)) for run in args.runs}  # every log read before the table
    print("| run | target acc %, IM (last step) | per source: train G_d acc / eval G_d acc / eval G_d acc last / "
          "source acc last | closest by train G_d / eval G_d / eval last | best fitted |")
    print("| --- | --- | --- | --- | --- |")
    for run, s in runs.items():
        per = s["per_source"]
        cells = "; ".join(f"{n} {fmt(v['train_domain'])} / {fmt(v['eval_domain'])} / {fmt(v['eval_domain_last'])} / "
                          f"{fmt(v['source_acc_last'])}" for n, v in per.items())
        acc = "—" if s["target_acc"] is None else f"{100 * s['target_acc']:.1f}"
        closest = " / ".join(first(per, k) for k in ("train_domain", "eval_domain", "eval_domain_last"))
        print(f"| {run.parent.name}/{run.name} | {acc}, {s['im']:.3f} | {cells} | {closest} | "
              f"{first(per, 'source_acc_last', highest=True)} |")


if __name__ == "__main__":
    main()
