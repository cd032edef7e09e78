"""Accuracy benchmark: source-only / DANN / CDAN-E on the digit pairs, several seeds, mean ± std.

    ADAPTSERVE_DATA=../shared/data python benchmarks/accuracy.py --steps 3000 --seeds 0 1 2 \
        --out benchmarks/runs/accuracy [--pairs mnist:mnist_m mnist:usps usps:mnist] [--methods ...]

Each run starts from ``--recipe`` (default ``auto``: the trainer's default, the measured best recipe for the
pair's architecture family; ``paper`` gives the runs of docs/benchmarks.md §1–1c). ``--batch-size`` and
``--lr`` override it; ``--config FILE`` takes any other trainer options from a YAML file, as ``adaptserve train
--config`` does (e.g. ``benchmarks/recipes/fungtion_mnist_m.yaml``); the flags here win over it. Each run is an
ordinary ``adaptserve train`` run directory; finished runs (summary.json present) are skipped, so the script can
be stopped and started again; ``--report`` prints the table of all finished runs. Prints a markdown table of
last-step target accuracy (mean ± std over seeds) with the published anchors beside it, and writes
``results.json``.
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

PAIRS = ("mnist:mnist_m", "mnist:usps", "usps:mnist")
ANCHORS = {
    "mnist:mnist_m": "paper 52.3 → 76.7; wogong/pytorch-dann 84.0; fungtion/DANN ≈ 90",
    "mnist:usps": "TLlib DANN 91.7; s-chh 88.4",
    "usps:mnist": "TLlib DANN 95.2; s-chh 95.7",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS))
    ap.add_argument("--methods", nargs="+", default=["source-only", "dann", "cdan-e"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--recipe", default="auto", help="trainer recipe (train/recipes.py); paper = the runs of §1–1c")
    ap.add_argument("--batch-size", type=int, default=None, help="per domain (default: the recipe's)")
    ap.add_argument("--lr", type=float, default=None, help="μ0 (default: the recipe's)")
    ap.add_argument("--config", type=Path, help="YAML file of trainer options (arch, optimizer, ...)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/runs/accuracy"))
    ap.add_argument("--report", action="store_true", help="train nothing: print the table of every finished run under --out")
    args = ap.parse_args()
    if args.report:
        print(table([finished(p.parent) for p in sorted(args.out.glob("*/*/summary.json"))]))
        return

    TrainConfig.from_sources(args.config, recipe=args.recipe)  # an unknown key fails now, before any run
    results = []
    # seeds outermost: a benchmark cut short still has every method at the first seeds
    for pair in args.pairs:
        source, target = pair.split(":")
        for seed in args.seeds:
            for method in args.methods:
                out = args.out / f"{source}-{target}" / f"{method}-s{seed}"
                if not (out / "summary.json").exists():
                    # trainer defaults < the recipe (auto: by the pair's architecture family) < --config < flags
                    cfg = TrainConfig.from_sources(args.config, recipe=args.recipe, source=source, target=target,
                                                   method=method, seed=seed, steps=args.steps,
                                                   threads=args.threads, tsne=seed == args.seeds[0],
                                                   batch_size=args.batch_size, lr=args.lr)
                    summary = run(cfg, out, progress=False)
                    print(f"{pair} {method} seed {seed}: target {summary['target_acc']:.2%} "
                          f"({summary['wall_time_s']:.0f} s)", flush=True)
                results.append(finished(out))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))


def finished(run_dir: Path) -> dict:
    """A finished run's summary.json with its batch size and lr (from config.yaml) added."""
    import yaml

    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    recipe = [cfg.get("optimizer", "sgd")] + [name for key, name in (("bn_per_domain", "BN per domain"),
                                                                     ("disc_bn", "G_d BN")) if cfg.get(key)]
    recipe += [f"{name} {cfg[key]:g}" for key, name in (("mmd_weight", "MMD"), ("grad_clip", "clip"),
                                                        ("warmup_steps", "warm-up")) if cfg.get(key)]
    recipe += ["instance norm"] if cfg.get("input_norm", "dataset") != "dataset" else []
    return {**summary, "batch_size": cfg["batch_size"], "lr": cfg["lr"], "recipe": ", ".join(recipe)}


def table(results: list[dict]) -> str:
    rows = ["| pair | arch | method | recipe | steps | batch | lr | seeds | target acc % (mean ± std) | source acc % | wall time / run | published |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        key = (r["source"], r["target"], r["method"], r["arch"], r.get("recipe", "sgd"), r["steps"], r["batch_size"], r["lr"])
        groups.setdefault(key, []).append(r)
    order = {"source-only": 0, "dann": 1, "cdan": 2, "cdan-e": 3}
    for (source, target, method, arch, recipe, steps, batch, lr), rs in sorted(
            groups.items(), key=lambda kv: (kv[0][:2], order.get(kv[0][2], len(order)), kv[0][2:])):
        acc = [100 * r["target_acc"] for r in rs]
        src = [100 * r["source_acc"] for r in rs]
        std = f"{statistics.stdev(acc):.1f}" if len(acc) > 1 else "—"
        wall = statistics.mean(r["wall_time_s"] for r in rs)
        pair = f"{source}:{target}"
        rows.append(f"| {source} → {target} | {arch} | {method} | {recipe} | {steps} | {batch} | {lr:g} | {len(rs)} | "
                    f"{statistics.mean(acc):.1f} ± {std} | {statistics.mean(src):.1f} | {wall / 60:.1f} min | "
                    f"{ANCHORS.get(pair, '') if method == 'dann' else ''} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
