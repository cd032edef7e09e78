"""Checkpoints: written atomically (temp file in the same folder, fsync, rename), read with
``torch.load(weights_only=True)`` — no pickled code is ever executed when a checkpoint is opened.

A checkpoint is a dict of tensors and plain values::

    {"model", "optimizer", "step", "rng", "sampler", "best", "meta"[, "ema"]}

``model`` holds the optimiser's weights (``--resume`` continues from them); ``ema``, when the run keeps
an EMA of the weights (``--ema``), holds ``{"model": EMA weights with recomputed BN statistics,
"updates", "decay"}`` — the weights :func:`load_model` gives eval and export.

``meta`` carries what export needs without the config: arch, method, classes, input spec.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A missing, unreadable or foreign checkpoint."""


def save_atomic(obj: dict, path: Path) -> None:
    """Write ``obj`` to ``path`` so that a kill at any moment leaves either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except RuntimeError as e:  # torch.save reports a failed write (disk full, file size limit) as RuntimeError
        raise OSError(f"cannot write checkpoint {path} (disk full or file size limit?): {e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def load(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "meta" not in ckpt:
        raise CheckpointError(f"{path} is not an adaptserve checkpoint")
    return ckpt


def find(run_dir: Path, which: str = "best") -> Path:
    """``RUN_DIR/checkpoints/{best,last}.pt``, or ``run_dir`` itself if it is a file."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    path = run_dir / "checkpoints" / f"{which}.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint {which}.pt in {run_dir / 'checkpoints'}; "
                              "is this a finished or started `adaptserve train` run directory?")
    return path


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_model(path: Path, weights: str = "shipped"):
    """Checkpoint file → (DANN model in eval mode on the CPU, meta, checkpoint dict).

    ``weights="shipped"``: the EMA weights when the run kept them (``--ema``; what eval and export use),
    else the trained ones; ``"trained"``: always the optimiser's own weights (what ``--resume`` continues).
    """
    from adaptserve.train.models import build_model

    state = load(path)  # map_location="cpu": a CUDA-trained checkpoint loads the same way
    meta = state["meta"]
    missing = [k for k in ("arch", "method", "classes", "input_spec") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: checkpoint meta lacks {', '.join(missing)}")
    model, arch = build_model(meta["arch"], len(meta["classes"]), meta["method"],
                              disc_bn=meta.get("disc_bn", False), n_sources=len(meta.get("sources") or [1]),
                              input_norm=meta.get("input_norm", "dataset"))
    use_ema = weights == "shipped" and state.get("ema") is not None
    try:
        model.load_state_dict(state["ema"]["model"] if use_ema else state["model"])
    except RuntimeError as e:  # missing/unexpected keys, size mismatches
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
        detail = "; ".join(lines)[:300]
        raise CheckpointError(
            f"{path}: the weights do not fit architecture {meta['arch']!r} with {len(meta['classes'])} classes "
            f"and method {meta['method']!r} recorded in the checkpoint ({detail})") from None
    if arch.input_spec.to_dict() != meta["input_spec"]:
        raise CheckpointError(f"{path}: input spec {meta['input_spec']} does not match {meta['arch']} "
                              f"({arch.input_spec.to_dict()})")
    return model.cpu().eval(), meta, state
