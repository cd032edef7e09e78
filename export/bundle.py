"""``adaptserve export``: run directory → verified files → BentoML model store (and optionally a folder).

Everything is built and checked in a temporary directory first — the ONNX graphs, the parity check, the
drift reference, the manifest, and a final open through :class:`service.runtime.Model` (hash check +
prediction) — and only then copied into ``bentoml.models.create(...)``, whose block discards the model if
anything inside it raises. ``--out`` is written to a sibling temporary folder and renamed into place.
So a failed export leaves nothing in the store and no ``--out`` folder.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from adaptserve.service.runtime import FILES, FORMAT, MANIFEST, Model, run_graphs, session, sha256_file

log = logging.getLogger("adaptserve.export")


def sanitize_name(name: str) -> str:
    """Make ``name`` a valid BentoML tag name: lowercase ``[a-z0-9._-]``, alphanumeric ends, ≤ 63 chars."""
    s = re.sub(r"[^a-z0-9._-]+", "-", name.lower())
    s = re.sub(r"^[^a-z0-9]+|[^a-z0-9]+$", "", s[:63])
    if not s:
        raise ValueError(f"--name {name!r} has no usable characters for a BentoML tag (a-z, 0-9, '.', '_', '-')")
    return s


def _read_optional(path: Path, kind: str):
    if not path.is_file():
        log.warning("%s not found; the manifest will not record it", path)
        return None
    import yaml

    text = path.read_text()
    return yaml.safe_load(text) if kind == "yaml" else json.loads(text)


def _versions() -> dict:
    import bentoml
    import onnx
    import onnxruntime
    import scipy
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "bentoml": bentoml.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__}


def _ort_outputs(folder: Path, images: np.ndarray) -> dict:
    """ONNX Runtime (CPU) outputs of the two graphs in ``folder`` on uint8 images in the input spec."""
    probs, _, feats, p_target = run_graphs(session(folder / "model.onnx", "cpu"),
                                           session(folder / "discriminator.onnx", "cpu"), images)
    return {"probabilities": probs, "features": feats, "p_target": p_target}


def build(run_dir: Path, work: Path, *, checkpoint: str = "best", reference: str | None = None,
          data_dir: str | None = None, n_bootstrap: int | None = None) -> dict:
    """Write the model files and ``manifest.json`` into the empty folder ``work``; return the manifest."""
    from adaptserve.export import reference as ref_mod
    from adaptserve.export.onnx_export import OPSET, PARITY_MAX, check_parity, export_graphs, torch_outputs
    from adaptserve.service.preprocess import InputSpec
    from adaptserve.train import checkpoint as ckpt_io

    t0 = time.perf_counter()
    ckpt_path = ckpt_io.find(run_dir, checkpoint)
    run_root = ckpt_path.parent.parent if Path(run_dir).is_file() else Path(run_dir)
    model, meta, state = ckpt_io.load_model(ckpt_path)
    config = _read_optional(run_root / "config.yaml", "yaml") or {}
    summary = _read_optional(run_root / "summary.json", "json") or {}
    spec = InputSpec.from_dict(meta["input_spec"])
    ref_desc, images, groups = ref_mod.reference_images(meta, spec, reference, data_dir or config.get("data_dir"))
    if reference and _overlaps(reference, [*meta.get("sources", [meta["source"]]), meta["target"], config.get("eval")]):
        log.warning("--reference %s is data the run trained or evaluated on; the drift reference should be "
                    "held-out in-distribution target images", reference)
    log.info("checkpoint %s (step %s), reference %s: %d images", ckpt_path, state.get("step"), ref_desc, len(images))

    io_desc = export_graphs(model, meta, work)

    # ONNX Runtime on every reference image; parity against PyTorch on (up to PARITY_MAX of) them
    outputs = _ort_outputs(work, images)
    parity = check_parity(torch_outputs(model, images[:PARITY_MAX]),
                          {k: v[:PARITY_MAX] for k, v in outputs.items()})
    log.info("parity on %d images: max |Δp| %.2g, max |ΔP(target)| %.2g", parity["images"],
             parity["max_abs_diff_probabilities"], parity["max_abs_diff_p_target"])

    # drift reference from the exported graphs' own outputs (what the service will compute)
    kw = {"n_bootstrap": n_bootstrap} if n_bootstrap else {}
    arrays, drift_settings = ref_mod.build(outputs, groups=groups, **kw)
    np.savez(work / "drift_reference.npz", **arrays)
    drift_settings["reference"] = ref_desc
    for w in drift_settings["warnings"]:
        log.warning("drift reference: %s", w)
    drift_settings["reference_images"] = len(images)

    accuracies = {k: summary[k] for k in ("target_acc", "best_target_acc", "source_acc", "domain_acc", "pad", "im")
                  if k in summary}
    manifest = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "classes": meta["classes"], "input_spec": meta["input_spec"],
        "source": meta["source"], "target": meta["target"], "method": meta["method"], "arch": meta["arch"],
        "num_features": io_desc["num_features"],
        "graphs": {"model.onnx": io_desc["model"], "discriminator.onnx": io_desc["discriminator"]},
        "opset": OPSET, "exporter": "torch.onnx.export(dynamo=True)",
        "checkpoint": {"path": str(ckpt_path.resolve()), "which": checkpoint, "step": state.get("step"),
                       "sha256": sha256_file(ckpt_path)},
        "run": {"dir": str(run_root.resolve()), "accuracies": accuracies, "best": summary.get("best"),
                "eval": summary.get("eval", config.get("eval"))},
        "training_config": config,
        "parity": parity,
        "drift": drift_settings,
        "versions": _versions(),
        "files": {name: {"sha256": sha256_file(work / name), "bytes": (work / name).stat().st_size}
                  for name in FILES},
    }
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
    # the runtime's own view of the finished folder: hashes verify, a prediction runs
    check = Model.open(work, device="cpu")
    check.predict(images[:2])
    log.info("built and verified in %.1f s", time.perf_counter() - t0)
    return manifest


def _overlaps(spec: str, used: list) -> bool:
    from adaptserve.train.data import DataError, parse_spec

    try:
        return parse_spec(spec) in {parse_spec(u) for u in used if u}
    except DataError:
        return False


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _check_out(out: Path | None) -> None:
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} already exists and is not empty; choose another folder or remove it")
    if out is not None:  # fail before the minutes of work, not at the end: the nearest existing ancestor
        parent = next(p for p in out.absolute().parents if p.exists())
        if not parent.is_dir():
            raise NotADirectoryError(f"--out {out}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"--out {out}: no permission to write in {parent}")


def export(run_dir: Path, *, checkpoint: str = "best", name: str | None = None, out: Path | None = None,
           reference: str | None = None, data_dir: str | None = None, n_bootstrap: int | None = None,
           _fail_in_store=None) -> tuple[str, dict]:
    """Build, verify, then save to the BentoML store (and ``out``); return (tag, manifest)."""
    out = Path(out) if out is not None else None
    _check_out(out)
    if name is not None:
        name = sanitize_name(name)
    with tempfile.TemporaryDirectory(prefix="adaptserve-export-") as tmp:
        work = Path(tmp) / "model"
        work.mkdir()
        manifest = build(Path(run_dir), work, checkpoint=checkpoint, reference=reference, data_dir=data_dir,
                         n_bootstrap=n_bootstrap)
        name = name or sanitize_name(f"adaptserve-{manifest['method']}")
        tag = save(work, manifest, name, out, _fail_in_store)
    return tag, manifest


def save(work: Path, manifest: dict, name: str, out: Path | None = None, _fail_in_store=None) -> str:
    """Copy the verified folder ``work`` into a new BentoML model ``name:<version>`` (and to ``out``)."""
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    import bentoml

    files = [*FILES, MANIFEST]
    out_tmp = None
    if out is not None:
        _check_out(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out_tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(out_tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
    renamed = False
    try:
        labels = {"method": manifest["method"], "arch": manifest["arch"], "source": manifest["source"],
                  "target": manifest["target"]}
        metadata = {"format": FORMAT, "classes": manifest["classes"], "input_spec": manifest["input_spec"],
                    "accuracies": manifest["run"]["accuracies"], "checkpoint_sha256": manifest["checkpoint"]["sha256"],
                    "model_onnx_sha256": manifest["files"]["model.onnx"]["sha256"]}
        with bentoml.models.create(name, labels=labels, metadata=metadata) as bm:
            for f in files:
                shutil.copy2(work / f, bm.path_of(f))
            Model.open(bm.path, device="cpu")  # verify the copy before it is committed
            if out_tmp is not None:
                for f in files:
                    shutil.copy2(work / f, out_tmp / f)
                Model.open(out_tmp, device="cpu")
            if _fail_in_store is not None:  # tests: a failure after the files are in place
                _fail_in_store(bm)
            if out_tmp is not None:
                os.rename(out_tmp, out)
                renamed = True
            tag = str(bm.tag)
    except BaseException:
        if renamed:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if out_tmp is not None and out_tmp.exists():
            shutil.rmtree(out_tmp, ignore_errors=True)
    return tag

