"""Multi-source benchmark: best single source vs sources combined vs MDAN, per target, several seeds.

    ADAPTSERVE_DATA=../shared/data python benchmarks/multisource.py --steps 3000 --seeds 0 1 2 \\
        --out benchmarks/runs/multisource [--targets mnist_m mnist usps] [--columns ...] [--single-from ...] \\
        [--recipe lenet] [--input-norm instance] [--mmd-weight 1] [--mdan-gamma 0.3] [--aug 10 0.4 0.1] \\
        [--pseudo-weight 1] [--pseudo-balance] [--report]

For each target T the sources are the other two of {mnist, mnist_m, usps} plus ``syn`` (the issue's setting).
Columns (``--columns``): ``single`` — source-only and DANN from each source alone (the table shows the best
single source, picked by target accuracy: an oracle baseline, as in the MDAN paper's tables, never a model
anyone would ship); ``combined-so`` / ``combined-dann`` — all sources combined; ``mdan-soft`` / ``mdan-hard``;
``mdan-darn`` — MDAN's per-source losses with DARN's weights (``--mdan-mode darn``: the best-fitting sources count most).
Every run of a target uses the architecture and recipe the trainer picks for the multi-source run (``--recipe
auto``: the grey LeNet for → USPS, else the digits recipe's 28×28×3 CNN when a colour domain is present;
``--recipe lenet``: the USPS pairs' grey LeNet with its self-training and augmentation, colour sources seen as
grey), so the columns differ only in the method; ``--steps``, ``--input-norm``, ``--mmd-weight``,
``--mdan-gamma``, ``--aug``, ``--pseudo-weight`` and ``--pseudo-balance`` apply to every run of the benchmark when given
(self-training never to the source-only columns: it learns from the target), else the recipe's values hold
(give each setting its own ``--out``). Each run is an ordinary ``adaptserve train`` run directory: finished
runs are skipped, a killed one is resumed from its last checkpoint. Last-step target accuracy, mean ± std over
seeds; ``results.json`` beside.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptserve.train.config import TrainConfig  # noqa: E402
from adaptserve.train.loop import run  # noqa: E402

DOMAINS = ("mnist", "mnist_m", "usps")
COLUMNS = ("single", "combined-so", "combined-dann", "mdan-soft", "mdan-hard", "mdan-darn")
ANCHORS = {"mnist_m": "MDAN paper (MNIST+SVHN+Syn → MNIST-M): combined DANN 65.1, MDAN soft 68.7",
           "mnist": "MDAN paper (SVHN+MNIST-M+Syn → MNIST): combined DANN 92.5, MDAN soft 97.9",
           "usps": "Digit-Five (Lee et al. 2021): combined source-only 81.6, M3SDA-β 97.4"}


def sources_for(target: str) -> list[str]:
    """The issue's sources for ``target``: the other two digit domains and ``syn``."""
    return [d for d in DOMAINS if d != target] + ["syn"]


def runs_for(target: str, single_from: list[str] | None = None) -> list[tuple[str, str, list[str], str, dict]]:
    """(column, run name, sources, method, extra options) of every run for one target; the ``single``
    column's runs only from ``single_from`` when given."""
    sources = sources_for(target)
    out = [("single", f"{m}-{s}", [s], m, {}) for s in sources for m in ("source-only", "dann")
           if single_from is None or s in single_from]
    named = {"combined-so": ("source-only", {}), "combined-dann": ("dann", {}),
             "mdan-soft": ("mdan", {"mdan_mode": "soft"}), "mdan-hard": ("mdan", {"mdan_mode": "hard"}),
             "mdan-darn": ("mdan", {"mdan_mode": "darn"})}
    return out + [(c, c, sources, *named[c]) for c in COLUMNS if c in named]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    ap.add_argument("--columns", nargs="+", default=list(COLUMNS), choices=COLUMNS)
    ap.add_argument("--single-from", nargs="+", default=None, choices=(*DOMAINS, "syn"),
                    help="train the single column only from these sources (default: every source of the target)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--recipe", default="auto", help="every run's recipe (train/recipes.py; default: auto)")
    ap.add_argument("--steps", type=int, default=None, help="every run's steps (default: the recipe's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--input-norm", default=None, choices=("dataset", "instance"),
                    help="every run's input norm (default: the recipe's — instance for the digits recipe)")
    ap.add_argument("--mmd-weight", type=float, default=None, help="every run's MMD weight (default: the recipe's)")
    ap.add_argument("--mdan-gamma", type=float, default=None, help="MDAN's γ, soft and darn (default: the trainer's)")
    ap.add_argument("--aug", nargs=3, type=float, default=None, metavar=("ROTATE", "SCALE", "SHIFT"),
                    help="every run's --aug-rotate/--aug-scale/--aug-shift (default: the recipe's)")
    ap.add_argument("--pseudo-weight", type=float, default=None,
                    help="every run's self-training weight (train/selftrain.py, from half the steps on; 0 = off; "
                         "default: the recipe's)")
    ap.add_argument("--pseudo-balance", action="store_true", default=None,
                    help="every run's self-training with class-adaptive thresholds (train/selftrain.py)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/runs/multisource"))
    ap.add_argument("--report", action="store_true", help="train nothing: the table of the finished runs")
    args = ap.parse_args()
    common = {"steps": args.steps, "input_norm": args.input_norm, "mmd_weight": args.mmd_weight,  # None: the recipe's
              "mdan_gamma": args.mdan_gamma, "pseudo_weight": args.pseudo_weight,
              "pseudo_balance": args.pseudo_balance,
              **dict(zip(("aug_rotate", "aug_scale", "aug_shift"), args.aug or (None,) * 3))}
    results = []
    for target in args.targets:
        multi = TrainConfig.from_sources(None, recipe=args.recipe, source=sources_for(target), target=target).validate()
        for seed in args.seeds:  # seeds outside: a benchmark cut short has every column at the first seeds
            for column, name, sources, method, extra in runs_for(target, args.single_from):
                out = args.out / target / f"{name}-s{seed}"
                if not (out / "summary.json").exists() and not args.report and column in args.columns:
                    resume = (out / "checkpoints" / "last.pt").exists()
                    cfg = (TrainConfig.from_sources(out / "config.yaml") if resume else TrainConfig.from_sources(
                        None, recipe=multi.recipe, arch=multi.arch, source=sources, target=target, method=method,
                        seed=seed, threads=args.threads, tsne=False,
                        **{**common, **extra, **({"pseudo_weight": 0.0} if method == "source-only" else {})}))
                    s = run(cfg, out, resume=resume, progress=False)
                    print(f"→ {target} {name} seed {seed}: {s['target_acc']:.2%} ({s['wall_time_s']:.0f} s)", flush=True)
                if (out / "summary.json").exists():  # the table has every finished run, of any column
                    s = json.loads((out / "summary.json").read_text())
                    results.append({**s, "column": s["method"] if column == "single" else column})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))


def table(results: list[dict]) -> str:
    """One row per target: each column's mean ± std over seeds (the best single source by its mean)."""
    def cell(rs):
        acc = [100 * r["target_acc"] for r in rs]
        return f"{statistics.mean(acc):.1f} ± {statistics.stdev(acc):.1f} ({len(acc)})" if len(acc) > 1 else \
            f"{acc[0]:.1f} (1)" if acc else "—"

    head = ["best single, source-only", "best single, DANN", "combined, source-only", "combined, DANN",
            "MDAN soft", "MDAN hard", "DARN weights"]
    rows = ["| target (sources) | steps | " + " | ".join(head) + " | anchors |",
            "| --- | --- |" + " --- |" * (len(head) + 1)]
    for target in DOMAINS:
        rs = [r for r in results if r["target"] == target]
        if not rs:
            continue
        cells = []
        for method in ("source-only", "dann"):
            single = {}
            for r in rs:
                if r["column"] == method and len(r.get("sources", [r["source"]])) == 1:
                    single.setdefault(r["source"], []).append(r)
            best = max(single.items(), key=lambda kv: statistics.mean(x["target_acc"] for x in kv[1]), default=None)
            cells.append(f"{cell(best[1])} [{best[0]}]" if best else "—")
        for col in COLUMNS[1:]:
            cells.append(cell([r for r in rs if r["column"] == col]))
        sources = "+".join(sources_for(target))
        steps = "/".join(sorted({str(r["steps"]) for r in rs}))
        rows.append(f"| {target} ({sources}) | {steps} | " + " | ".join(cells) + f" | {ANCHORS[target]} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
