"""Label-free checkpoint selection against the oracle, from finished runs' ``metrics.jsonl``.

    python benchmarks/selection.py benchmarks/runs/default/*/*-s[0-9]

Every evaluation record of a run holds the target accuracy of the weights it evaluated (the EMA weights
when the run kept an EMA; ``trained_target_acc``: the optimiser's own) and every label-free validator of
:mod:`train.validators`. For each run this prints the target accuracy of the step each validator picks
(the highest score; ties → the later step), of the last step, and of the oracle (the best step by target
labels, which no user without labels can choose), and the gap *selected − oracle* in points; then the mean
gap per validator over all runs given. Nothing is trained: it reads the logs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptserve.train.metrics import read_metrics  # noqa: E402
from adaptserve.train.validators import score  # noqa: E402

SELECTORS = ("last", "im", "entropy", "snd", "dev")


def evals(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl")[1] if "target_acc" in r]


def picks(records: list[dict]) -> dict:
    """{selector: (step, target acc)} plus the oracle and, with an EMA, the trained weights' last step."""
    out = {}
    for sel in SELECTORS:
        if sel != "last" and not all(k in records[0] for k in ("snd", "dev_risk")):
            continue  # a run from before the validators were logged
        best = max(records, key=lambda r: (score(r, sel), r["step"]))
        out[sel] = (best["step"], best["target_acc"])
    oracle = max(records, key=lambda r: r["target_acc"])
    out["oracle"] = (oracle["step"], oracle["target_acc"])
    if "trained_target_acc" in records[-1]:
        out["trained last"] = (records[-1]["step"], records[-1]["trained_target_acc"])
        peak = max(records, key=lambda r: r["trained_target_acc"])
        out["trained peak"] = (peak["step"], peak["trained_target_acc"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    args = ap.parse_args()
    rows, gaps = [], {}
    for run in args.runs:
        recs = evals(run)
        if not recs:
            print(f"skip {run}: no evaluation with target labels", file=sys.stderr)
            continue
        p = picks(recs)
        oracle = p["oracle"][1]
        rows.append((run, p))
        for k, (_, acc) in p.items():
            gaps.setdefault(k, []).append(100 * (acc - oracle))
    cols = [c for c in ("trained last", "trained peak", *SELECTORS, "oracle") if any(c in p for _, p in rows)]
    print("| run | " + " | ".join(cols) + " |")
    print("|" + " --- |" * (len(cols) + 1))
    for run, p in rows:
        cells = [f"{100 * p[c][1]:.1f} (step {p[c][0]})" if c in p else "—" for c in cols]
        print(f"| {run} | " + " | ".join(cells) + " |")
    print("| mean gap to the oracle, points | " + " | ".join(
        f"{statistics.mean(gaps[c]):+.2f}" if c in gaps else "—" for c in cols) + " |")


if __name__ == "__main__":
    main()
