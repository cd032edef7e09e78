"""``adaptserve`` — the command line: ``train``, ``eval``, ``export`` (and the later pipeline stages).

Each subcommand imports only what it needs, so ``adaptserve --help`` is instant and torch-free
commands stay torch-free. Errors a user can fix exit with status 2 and one clear line, no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it is None/False or its help already says it."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


DATA_HELP = ("dataset specs: mnist, mnist_m, usps, svhn (optionally :train/:test; files under --data-dir or "
             "$ADAPTSERVE_DATA), syn (rendered digits, made once and cached), demo-source, demo-target "
             "(embedded, no files), folder:PATH (class "
             "sub-folders = labelled), npz:PATH (arrays images, labels)")


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit status 2."""


def _add_train(sub) -> None:
    from adaptserve.train.config import METHODS, TrainConfig, field_help
    from adaptserve.train.recipes import FAMILY

    p = sub.add_parser("train", help="train source-only / DANN / CDAN(-E) / MDAN / VADA into a run directory",
                       description="Adapt a classifier from a labelled source to an unlabelled target. "
                       + DATA_HELP)  # every option's help states its default (TrainConfig's)
    p.add_argument("--config", help="YAML file of options (flags override it)")
    p.add_argument("--out", type=Path, help="run directory (default runs/<method>-<source>-<target>-s<seed>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue RUN_DIR from checkpoints/last.pt with its saved config")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    defaults = TrainConfig()  # the paper recipe's values; where a recipe differs, the help lists each recipe's
    helps = {**field_help(), "method": "/".join(METHODS),
             "arch": ", ".join(["auto", *FAMILY]),
             "recipe": "the defaults the other options start from: auto (the measured best for the architecture "
                       "family: digits for 28/32-px digit CNNs, lenet for USPS pairs, resnet for folders), paper "
                       "(Ganin et al.'s SGD recipe, the old default), digits, lenet, resnet. Measured on the demo "
                       "pair: digits 90.4 ± 0.3 %% DANN target accuracy, paper 57.0 %% (train/recipes.py, "
                       "docs/training.md)"}
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        show = lambda v: ("on" if v else "off") if isinstance(v, bool) else str(v)  # noqa: E731
        by_recipe = _recipe_defaults(f.name, default, show)
        shown = by_recipe or ("" if default is None else f" (default {show(default)})")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{helps.get(f.name, '')}{shown}".lstrip())
        elif f.name == "source":  # repeatable: several labelled sources
            p.add_argument(flag, action="append", default=None, metavar="SPEC",
                           help=f"{helps.get(f.name, '')}{shown}".lstrip())
        else:
            kind = type(default) if default is not None else str
            p.add_argument(flag, type=kind, default=None, help=f"{helps.get(f.name, '')}{shown}".lstrip())


def _recipe_defaults(name: str, paper_value, show) -> str:
    """' (default by recipe: digits 0.001, lenet/paper/resnet 0.01)' where the recipes differ, else ''."""
    from adaptserve.train.recipes import RECIPES

    if name == "recipe":
        return " (default auto)"
    values: dict[str, list[str]] = {}
    for recipe, options in RECIPES.items():
        values.setdefault(show(options.get(name, paper_value)), []).append(recipe)
    if len(values) < 2:
        return ""
    return " (default by recipe: " + ", ".join(f"{'/'.join(sorted(r))} {v}" for v, r in values.items()) + ")"


def cmd_train(args) -> int:
    from adaptserve.train.config import TrainConfig
    from adaptserve.train.loop import run

    if args.resume:
        cfg_file = args.resume / "config.yaml"
        if not cfg_file.is_file():
            raise UserError(f"--resume {args.resume}: no config.yaml there (not a run directory)")
        cfg = TrainConfig.from_sources(cfg_file, default_recipe="paper")  # a run saved before recipes: the paper's
        out = args.resume
    else:
        overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
        cfg = TrainConfig.from_sources(args.config, **overrides).validate()
        out = args.out or Path("runs") / f"{cfg.method}-{cfg.source_name}-{cfg.target}-s{cfg.seed}".replace(":", "_").replace("/", "_")
        if (out / "checkpoints" / "last.pt").exists():
            raise UserError(f"{out} already holds a run; use --resume {out} or another --out")
        created = not out.exists()
        try:  # fail now, not after loading the data, when --out cannot be a directory
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {out}: cannot create the run directory ({e.strerror})") from None
    try:
        summary = run(cfg, out, resume=bool(args.resume), progress=not args.no_progress)
    except BaseException:  # a run that failed before writing anything leaves no empty directory behind
        if not args.resume and created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    if summary:
        tgt = f"target acc {summary['target_acc']:.2%}, " if "target_acc" in summary else ""
        print(f"done: {tgt}source acc {summary['source_acc']:.2%}, domain acc {summary['domain_acc']:.2%}, "
              f"{summary['images_per_s']:.0f} images/s, {summary['wall_time_s']:.0f} s → {out}")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy of a run's checkpoint on any dataset spec", description=DATA_HELP)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--eval", required=True, help="dataset spec, e.g. mnist_m:test or folder:PATH")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto")


def cmd_eval(args) -> int:
    from adaptserve.service.preprocess import InputSpec
    from adaptserve.train import checkpoint as ckpt_io
    from adaptserve.train.data import load
    from adaptserve.train.evaluate import accuracy, information_maximization, predict
    from adaptserve.train.loop import pick_device

    path = ckpt_io.find(args.run_dir, args.checkpoint)
    model, meta, state = ckpt_io.load_model(path)  # the EMA weights when the run kept them, as export uses
    device = pick_device(args.device)
    model.to(device)
    data = load(args.eval, InputSpec.from_dict(meta["input_spec"]), default_split="test",
                data_root=args.data_dir, classes=meta["classes"])
    probs, _, p_target = predict(model, data.images, device)
    result = {"checkpoint": str(path), "step": state["step"], "eval": args.eval, "n": len(data),
              "im": information_maximization(probs), "mean_p_target": float(p_target.mean())}
    if data.labels is not None:
        result["accuracy"] = accuracy(probs, data.labels)
    out = Path(args.run_dir) / f"eval-{args.eval.replace(':', '_').replace('/', '_')}.json"
    if Path(args.run_dir).is_dir():
        out.write_text(json.dumps(result, indent=2))
    acc = f"accuracy {result['accuracy']:.2%}" if "accuracy" in result else "no labels"
    print(f"{args.eval}: {acc} on {len(data)} images (checkpoint {path.name}, step {state['step']})")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="checkpoint → verified ONNX model + drift reference in the BentoML store",
                       description="Export a run's checkpoint to ONNX (classifier with in-graph preprocessing, "
                       "domain discriminator), check ONNX Runtime against PyTorch, compute the drift reference on "
                       "held-out target images, and save everything as BentoML model NAME:<version> "
                       "($BENTOML_HOME). " + DATA_HELP, formatter_class=DefaultsHelp)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory (or a checkpoint file)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--name", help="BentoML model name (default adaptserve-<method>); made tag-safe")
    p.add_argument("--out", type=Path, help="also write the model files into this new folder")
    p.add_argument("--reference", metavar="SPEC",
                   help="dataset spec of in-distribution target images for the drift reference "
                   "(default: the run's held-out target images)")
    p.add_argument("--data-dir", help="data directory (default: the run's, or $ADAPTSERVE_DATA)")
    p.add_argument("--bootstrap", type=int, default=None, metavar="B",
                   help="bootstrap windows for the drift thresholds (default 1000)")


def cmd_export(args) -> int:
    from adaptserve.export.bundle import export

    if args.bootstrap is not None and args.bootstrap < 100:
        raise UserError("--bootstrap must be at least 100")
    tag, manifest = export(args.run_dir, checkpoint=args.checkpoint, name=args.name, out=args.out,
                           reference=args.reference, data_dir=args.data_dir, n_bootstrap=args.bootstrap)
    par, drift = manifest["parity"], manifest["drift"]
    acc = manifest["run"]["accuracies"].get("target_acc")
    print(f"parity: {par['images']} images, max |Δp| {par['max_abs_diff_probabilities']:.1e}; drift reference: "
          f"{drift['n_reference']} + {drift['n_calibration']} calibration images, window {drift['window']}"
          + (f"; run target acc {acc:.2%}" if acc is not None else ""), file=sys.stderr)
    for warning in drift.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    if args.out:
        print(f"files also written to {args.out}", file=sys.stderr)
    print(tag)
    return 0


def _add_score(sub) -> None:
    p = sub.add_parser("score", help="batch-score images with an exported model (torch-free), with a drift report",
                       description="Classify a folder of images (recursive), a .npy or a .npz (images, optional "
                       "labels) with an exported model; write one row per item to FILE (.csv, .jsonl or .parquet) "
                       "and the drift tests over consecutive windows of W images to FILE.drift.json. Unreadable "
                       "files get an error row and are skipped.", formatter_class=DefaultsHelp)
    p.add_argument("model", metavar="MODEL", help="BentoML store tag (name[:version]) or exported model folder")
    p.add_argument("input", metavar="INPUT", help="folder of images, .npy or .npz (with --engine ray also a parquet "
                   "dataset: a path or a URI such as s3://bucket/images.parquet)")
    p.add_argument("--out", type=Path, required=True, metavar="OUT",
                   help="output file: .csv, .jsonl or .parquet; without a suffix a parquet dataset folder "
                        "(one file per batch)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default 256; with --engine ray 1024: each batch is one Ray task, and "
                        "at 256 their overhead cost 20 %% of the throughput, docs/benchmarks.md §10)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = its default)")
    p.add_argument("--no-drift", action="store_true",
                   help="no drift report and no discriminator: only the predictions (faster)")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="an image file with more pixels (read from its header) is an error row, not decoded "
                        "(default: $ADAPTSERVE_MAX_PIXELS or 4096×4096)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process (default); ray: Ray Data actors, on this machine or a cluster "
                        "(pip install 'adaptserve[ray]'); INPUT may then also be a parquet dataset of image bytes "
                        "at a path or URI (s3://, gs://, ...)")
    p.add_argument("--address", default=None,
                   help="with --engine ray: auto or ray://HOST:10001 (default: $RAY_ADDRESS, else a Ray started for "
                        "this run on this machine)")
    p.add_argument("--workers", type=int, default=2, help="with --engine ray: scoring actors (default 2)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="with --engine ray: GPUs per actor (ONNX Runtime's CUDA provider); 0 = CPU")


def cmd_score(args) -> int:
    if args.engine == "ray":
        from adaptserve.service.score_ray import RAY_BATCH, score_ray

        s = score_ray(args.model, args.input, args.out, address=args.address, workers=args.workers,
                      batch_size=RAY_BATCH if args.batch_size is None else args.batch_size, gpus_per_worker=args.gpus_per_worker,
                      progress=not args.no_progress, drift=not args.no_drift, max_pixels=args.max_pixels)
    else:
        from adaptserve.service.score import DEFAULT_BATCH, score

        s = score(args.model, Path(args.input), args.out, batch_size=DEFAULT_BATCH if args.batch_size is None else args.batch_size,
                  progress=not args.no_progress,
                  device=args.device, threads=args.threads, drift=not args.no_drift, max_pixels=args.max_pixels)
    if s["n_errors"]:
        print(f"{s['n_errors']} of {s['n_items']} items could not be read and were skipped (see the error column "
              f"of {s['out']})", file=sys.stderr)
    acc = f", accuracy {s['accuracy']:.2%} on {s['n_labelled']} labelled" if s["accuracy"] is not None else ""
    if s["drift_report"] is None:
        print(f"scored {s['n_scored']} of {s['n_items']} items in {s['seconds']:.1f} s{acc}; no drift checks → {s['out']}")
        return 0
    drift = (f"{s['n_windows']} drift windows, {s['fraction_windows_alarmed']:.0%} alarmed, whole set "
             f"{'DRIFT' if s['whole_set_is_drift'] else 'ok'}" if s["n_windows"] else "no full drift window")
    rate = f" ({s['n_items'] / s['seconds']:.0f} images/s)" if s["seconds"] > 0 else ""
    print(f"scored {s['n_scored']} of {s['n_items']} items in {s['seconds']:.1f} s{rate}{acc}; {drift} → {s['out']}, "
          f"{s['drift_report']}")
    return 0


def _add_demo(sub) -> None:
    from adaptserve.demo import DEMO_STEPS

    p = sub.add_parser("demo", help="the whole journey on the embedded demo pair (no downloads, no GPU)",
                       description="Train source-only and DANN on the embedded demo pair, export the DANN model "
                       "to the BentoML store, batch-score the target test set, serve it on 127.0.0.1, send real "
                       "requests (predict, classify, drift) and print a summary table.",
                       formatter_class=DefaultsHelp)
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="where runs, model files, scores and logs go")
    p.add_argument("--steps", type=int, default=DEMO_STEPS)
    p.add_argument("--seed", type=int, default=0)


def cmd_demo(args) -> int:
    from adaptserve.demo import DemoError, report, run_demo

    if args.steps < 100:
        raise UserError("--steps must be at least 100 (the drift reference needs a trained model)")
    try:
        result = run_demo(args.out, steps=args.steps, seed=args.seed)
    except DemoError as e:
        print(f"adaptserve demo: failed: {e}", file=sys.stderr)
        return 1
    print()
    print(report(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptserve", description="Domain adaptation (DANN) from training to serving.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_score(sub)
    _add_demo(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "score": cmd_score,
                "demo": cmd_demo}
    try:
        return handlers[args.command](args)
    except (UserError, ValueError, OSError) as e:  # DataError, CheckpointError, ImageError are ValueErrors
        if args.verbose:
            raise
        print(f"adaptserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

