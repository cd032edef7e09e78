"""Checkpoint → two ONNX graphs, and the ONNX Runtime vs PyTorch parity check.

- ``model.onnx``: :meth:`train.models.DANN.inference_module` (Normalize → G_f → G_y) in eval mode.
  Input ``images`` uint8 (N, H, W, C) in the model's input spec — pixel scaling and normalisation are in
  the graph — and outputs ``probabilities`` (softmax, N×K), ``logits`` (N×K), ``features`` (N×D).
  No gradient-reversal layer and no discriminator weights: they are not part of the module.
- ``discriminator.onnx``: G_d alone, inputs ``features`` (N×D) and ``probabilities`` (N×K) — both are
  always declared (a plain DANN discriminator ignores the probabilities) — output ``p_target`` (N,) =
  σ(G_d) = P(target domain).

Both are exported with the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, onnxscript) at
opset :data:`OPSET` with a dynamic batch dimension, on the CPU, and pass ``onnx.checker`` with
``full_check=True``. BatchNorm is folded into the preceding conv/linear by the exporter's optimiser.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adaptserve.train.models import shipped_domain_logit


OPSET = 18
ATOL = 1e-4  # max |p_onnx − p_torch| allowed on probabilities (and P(target))
PARITY_MAX = 1024  # images compared (all reference images up to this many)

log = logging.getLogger("adaptserve.export")


class ExportError(ValueError):
    """The exported graph is invalid or disagrees with PyTorch."""


class _Classifier(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inference = model.inference_module()

    def forward(self, images):
        logits, features = self.inference(images)
        return logits.softmax(1), logits, features


class _Discriminator(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.discriminator = model.discriminator

    def forward(self, features, probabilities):
        return torch.sigmoid(self.discriminator(features, probabilities))


def _export(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str], path: Path) -> None:
    module.eval()
    batch = torch.export.Dim("batch")
    shapes = {name: {0: batch} for name in input_names}
    quiet = io.StringIO()
    for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, input_names=input_names, output_names=output_names,
                                        dynamic_shapes=shapes, dynamo=True, opset_version=OPSET, verbose=False,
                                        external_data=False)
            program.save(str(path), external_data=False)
    except Exception as e:
        raise ExportError(f"ONNX export of {type(module).__name__.strip('_').lower()} failed: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _finish(path: Path, props: dict[str, str], doc: str) -> None:
    """Add metadata_props and a doc string, save, and run the full ONNX checker."""
    import onnx

    m = onnx.load(str(path))
    onnx.helper.set_model_props(m, props)
    m.doc_string = doc
    m.producer_name = "adaptserve"
    onnx.save(m, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path.name} fails onnx.checker: {str(e).splitlines()[0]}") from None
    opsets = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    if opsets.get("ai.onnx", 0) < OPSET:
        raise ExportError(f"{path.name}: opset {opsets} < {OPSET}")


def export_graphs(model: nn.Module, meta: dict, out_dir: Path) -> dict:
    """Write ``model.onnx`` and ``discriminator.onnx`` into ``out_dir``; return their I/O description."""
    spec = meta["input_spec"]
    x = torch.randint(0, 256, (2, spec["height"], spec["width"], spec["channels"]), dtype=torch.uint8)
    props = {"classes": json.dumps(meta["classes"]), "input_spec": json.dumps(spec), "arch": meta["arch"],
             "method": meta["method"]}
    classifier = _Classifier(model).eval()
    _export(classifier, (x,), ["images"], ["probabilities", "logits", "features"], out_dir / "model.onnx")
    _finish(out_dir / "model.onnx", props, "adaptserve classifier: uint8 NHWC images → probabilities, logits, "
            "features (normalisation in-graph)")
    with torch.no_grad():
        p, _, f = classifier(x)
    disc = _Discriminator(model).eval()
    _export(disc, (f, p), ["features", "probabilities"], ["p_target"], out_dir / "discriminator.onnx")
    _finish(out_dir / "discriminator.onnx", {**props, "role": "domain discriminator"},
            "adaptserve domain discriminator: features, probabilities → p_target = P(target domain)")
    return {"model": {"inputs": {"images": ["N", spec["height"], spec["width"], spec["channels"], "uint8"]},
                      "outputs": {"probabilities": ["N", len(meta["classes"])], "logits": ["N", len(meta["classes"])],
                                  "features": ["N", int(f.shape[1])]}},
            "discriminator": {"inputs": _input_names(out_dir / "discriminator.onnx"), "outputs": ["p_target"],
                              "conditional": bool(model.discriminator.conditional)},
            "num_features": int(f.shape[1])}


def _input_names(path: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


@torch.no_grad()
def torch_outputs(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """PyTorch eager reference outputs (eval mode, CPU, float32)."""
    model.eval()
    out = {"probabilities": [], "features": [], "p_target": []}
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[i:i + batch_size]))  # a copy: images may be a read-only mmap
        logits, f, d = model(x)
        d = shipped_domain_logit(d)
        p = logits.softmax(1)
        out["probabilities"].append(p.numpy())
        out["features"].append(f.numpy())
        out["p_target"].append(torch.sigmoid(d).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def check_parity(torch_out: dict, onnx_out: dict, atol: float = ATOL) -> dict:
    """ORT vs PyTorch: max |Δ| of probabilities and P(target) ≤ ``atol`` and identical argmax; else raise."""
    dp = float(np.abs(onnx_out["probabilities"] - torch_out["probabilities"]).max())
    dd = float(np.abs(onnx_out["p_target"] - torch_out["p_target"]).max())
    df = float(np.abs(onnx_out["features"] - torch_out["features"]).max())
    flips = int((onnx_out["probabilities"].argmax(1) != torch_out["probabilities"].argmax(1)).sum())
    n = len(torch_out["probabilities"])
    report = {"images": n, "max_abs_diff_probabilities": dp, "max_abs_diff_p_target": dd,
              "max_abs_diff_features": df, "argmax_mismatches": flips, "atol": atol}
    if dp > atol or dd > atol or flips:
        raise ExportError(f"ONNX Runtime disagrees with PyTorch on {n} images: max |Δ probabilities| {dp:.3g}, "
                          f"max |Δ P(target)| {dd:.3g} (allowed {atol:g}), {flips} argmax mismatches")
    return report
