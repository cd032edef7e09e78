"""Run an exported adaptserve model with ONNX Runtime — no torch (the service and the scorer use this).

    from adaptserve.service.runtime import Model
    model = Model.open("adaptserve-dann:latest")   # BentoML store tag, or a folder from `export --out`
    pred = model.predict(images)                    # uint8 (N,H,W,C), any size/channels → resized/converted
    pred.labels, pred.probabilities, pred.features, pred.p_target

Opening verifies the sha256 of every file listed in ``manifest.json`` and refuses a mismatch
(:class:`IntegrityError`). Providers: ``CUDAExecutionProvider`` only when onnxruntime offers it *and* a
CUDA driver with at least one device is present; otherwise ``CPUExecutionProvider`` alone, so machines
without a GPU get no CUDA load errors.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adaptserve.service.preprocess import ImageError, InputSpec, to_input_spec

MANIFEST = "manifest.json"
FORMAT = "adaptserve-model/1"
FILES = ("model.onnx", "discriminator.onnx", "drift_reference.npz")


class IntegrityError(ValueError):
    """A model folder whose files are missing or do not match the sha256 in its manifest."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise IntegrityError(f"{folder} is not an adaptserve model: no {MANIFEST}")
    return parse_manifest(path.read_bytes(), path)


def parse_manifest(data: bytes, where: str | os.PathLike) -> dict:
    """``manifest.json``'s bytes → the manifest; :class:`IntegrityError` (naming ``where``) if it is not one."""
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "files" not in manifest:
        raise IntegrityError(f"{where} is not an {FORMAT} manifest")
    return manifest


def verify(folder: str | os.PathLike, manifest: dict | None = None) -> dict:
    """Check every file listed in the manifest against its sha256 and size; return the manifest."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    return check_files(manifest, folder, lambda name: sha256_file(folder / name) if (folder / name).is_file() else None)


def check_files(manifest: dict, where: str | os.PathLike, digest) -> dict:
    """Every file the manifest lists has ``digest(name)`` (its sha256, None if absent) as recorded: the check
    shared by a folder (:func:`verify`) and files held in memory (:meth:`Model.from_files`)."""
    missing = [name for name in FILES if name not in manifest["files"]]
    if missing:
        raise IntegrityError(f"{Path(where) / MANIFEST} does not list {', '.join(missing)}")
    for name, entry in manifest["files"].items():
        path = Path(where) / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise IntegrityError(f"{Path(where) / MANIFEST} lists a file outside the model folder: {name!r}")
        digest_now = digest(name)
        if digest_now is None:
            raise IntegrityError(f"{path} is missing (listed in {MANIFEST})")
        if digest_now != entry["sha256"]:
            raise IntegrityError(f"{path} does not match its manifest: sha256 {digest_now[:16]}… expected "
                                 f"{entry['sha256'][:16]}… — the file was modified or corrupted; re-export the model")
    return manifest


def resolve(source: str | os.PathLike) -> tuple[Path, str | None]:
    """A folder path → (folder, None); otherwise a BentoML tag (``name`` means ``name:latest``) → (path, tag)."""
    p = Path(source)
    if p.is_dir():
        return p, None
    s = str(source)
    if os.sep in s or s.startswith("."):
        raise FileNotFoundError(f"model folder {s} does not exist")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bm = bentoml.models.get(s)
    except NotFound:
        raise FileNotFoundError(f"no model {s!r} in the BentoML store ({os.environ.get('BENTOML_HOME', '~/bentoml')}); "
                                "`bentoml models list` shows what is there") from None
    except ValueError as e:  # malformed tag
        raise ValueError(f"{s!r} is neither a model folder nor a BentoML tag: {e}") from None
    return Path(bm.path), str(bm.tag)


def gpu_available() -> bool:
    """A CUDA driver loads and reports at least one device (checked without onnxruntime's noisy probing)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            count = ctypes.c_int(0)
            return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
        except (AttributeError, OSError):
            return False
    return False


def providers(device: str = "auto") -> list[str]:
    """ORT providers: ``auto`` → CUDA + CPU when CUDA is usable, else CPU; ``cpu``; ``cuda`` (must be usable)."""
    import onnxruntime as ort

    cuda_ok = "CUDAExecutionProvider" in ort.get_available_providers() and gpu_available()
    if device == "cuda" and not cuda_ok:
        raise ValueError("device cuda was asked for but onnxruntime has no usable CUDA provider or GPU")
    if device in ("auto", "cuda") and cuda_ok:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}: auto, cpu or cuda")
    return ["CPUExecutionProvider"]


def session(path: str | os.PathLike | bytes, device: str = "auto", threads: int = 0):
    """An ``onnxruntime.InferenceSession`` of a file or of a model's bytes, with warnings suppressed and ``threads`` intra-op threads (0 = ORT).

    Intra-op pool threads sleep between runs instead of spin-waiting: the scorer and the service run Python
    work (parsing, rows, drift checks) between ORT calls, and spinning threads took the CPU it needed — the
    scorer was 1.6× faster with spinning off at 2 threads (docs/benchmarks.md §7).
    """
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), sess_options=so, providers=providers(device))


def run_graphs(classifier, discriminator, x: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, ...]:
    """Run both sessions on uint8 images ``x`` (already in the input spec) in chunks of ``batch_size``.

    Returns (probabilities, logits, features, p_target). The discriminator is fed only the inputs its graph
    declares (``features`` and/or ``probabilities``); ``discriminator=None`` skips it (``p_target`` is None).
    """
    disc_inputs = [i.name for i in discriminator.get_inputs()] if discriminator is not None else []
    parts = []
    for i in range(0, len(x), batch_size):
        probs, logits, feats = classifier.run(["probabilities", "logits", "features"], {"images": x[i:i + batch_size]})
        feeds = {"features": feats, "probabilities": probs}
        p_target = (discriminator.run(["p_target"], {k: feeds[k] for k in disc_inputs})[0]
                    if discriminator is not None else None)
        parts.append((probs, logits, feats, p_target))
    if len(parts) == 1:  # one chunk (every request the service gets): no copies
        return parts[0]
    return tuple(None if c[0] is None else np.concatenate(c) for c in zip(*parts))


@dataclass
class Prediction:
    """Outputs for N images: class index and name, softmax, logits, features, P(target) from G_d."""

    predictions: np.ndarray     # (N,) int64
    labels: list[str]           # (N,) class names
    probabilities: np.ndarray   # (N, K) float32
    logits: np.ndarray          # (N, K) float32
    features: np.ndarray        # (N, D) float32
    p_target: np.ndarray | None  # (N,) float32, discriminator's P(target domain); None if not run

    def __len__(self) -> int:
        return len(self.predictions)

    def to_dict(self) -> dict:
        return {"predictions": self.predictions.tolist(), "labels": self.labels,
                "probabilities": self.probabilities.tolist(),
                "p_target": None if self.p_target is None else self.p_target.tolist()}


@dataclass
class Model:
    """An opened, verified model: two ONNX Runtime sessions and the manifest."""

    path: Path
    manifest: dict
    tag: str | None = None
    device: str = "auto"
    threads: int = 0
    _sessions: tuple = field(default=(), repr=False)
    _drift: object = field(default=None, repr=False)

    @classmethod
    def open(cls, source: str | os.PathLike, *, device: str = "auto", threads: int = 0) -> "Model":
        """Open a model folder or a BentoML store tag; verify the files' sha256 (IntegrityError if not)."""
        path, tag = resolve(source)
        manifest = verify(path)
        model = cls(path, manifest, tag, device, threads)
        model._sessions = (session(path / "model.onnx", device, threads),
                           session(path / "discriminator.onnx", device, threads))
        return model

    @classmethod
    def from_files(cls, files: dict[str, bytes], *, device: str = "auto", threads: int = 0,
                   where: str = "<model in memory>") -> "Model":
        """Open a model from its files' bytes (``manifest.json`` and every file it lists, as a folder holds them),
        verified like :meth:`open`; nothing touches the disk (a Ray actor killed while opening leaves nothing)."""
        import io

        from adaptserve.service.drift import DriftReference

        if MANIFEST not in files:
            raise IntegrityError(f"{where} is not an adaptserve model: no {MANIFEST}")
        manifest = parse_manifest(files[MANIFEST], f"{where}/{MANIFEST}")
        check_files(manifest, where, lambda name: hashlib.sha256(files[name]).hexdigest() if name in files else None)
        model = cls(Path(where), manifest, None, device, threads)
        model._sessions = (session(files["model.onnx"], device, threads),
                           session(files["discriminator.onnx"], device, threads))
        model._drift = DriftReference.load(io.BytesIO(files["drift_reference.npz"]))
        return model

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_dict(self.manifest["input_spec"])

    @property
    def providers(self) -> list[str]:
        return self._sessions[0].get_providers()

    @property
    def drift_reference(self):
        """The :class:`service.drift.DriftReference` of this model (loaded on first use)."""
        if self._drift is None:
            from adaptserve.service.drift import DriftReference

            self._drift = DriftReference.load(self.path / "drift_reference.npz")
        return self._drift

    def prepare(self, images) -> np.ndarray:
        """Validate and convert images to the input spec; :class:`ImageError` says what is wrong."""
        a = to_input_spec(images, self.input_spec)
        if len(a) == 0:
            raise ImageError("no images: the batch is empty")
        return a

    def predict(self, images, batch_size: int = 1024, discriminator: bool = True) -> Prediction:
        """Classify images — (H,W[,C]) or (N,H,W[,C]), uint8 or floats in [0,1] — in one call.

        ``discriminator=False`` skips the domain discriminator (``p_target`` is None): for callers that do
        not check drift."""
        classifier, disc = self._sessions
        probs, logits, feats, p_target = run_graphs(classifier, disc if discriminator else None,
                                                    self.prepare(images), batch_size)
        pred = probs.argmax(1).astype(np.int64)
        names = self.classes
        return Prediction(pred, [names[i] for i in pred], probs, logits, feats, p_target)
