"""Datasets: turn a dataset spec into uint8 images in a model's input spec, held in memory.

Specs (accepted by ``--source``, ``--target``, ``--eval``, ``--reference``):

=====================  ===============================================================
``mnist[:split]``      ``DATA/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``
``mnist_m[:split]``    ``DATA/mnist_m/mnist_m_{train,test}_{images.npy.xz,labels.npy}``
``usps[:split]``       ``DATA/usps/usps.h5`` (``train/data``, ``train/target``, ...)
``svhn[:split]``       ``DATA/svhn/{train,test}_32x32.mat``
``syn[:split]``        rendered SynDigits-style digits (:mod:`train.syn`; BSDS500 backgrounds from DATA if there)
``demo-source[:split]`` embedded: scikit-learn's 8×8 digits, upscaled, grey (no files)
``demo-target[:split]`` embedded: the same digits blended MNIST-M-style with colour textures
``folder:PATH``        class sub-folders (labelled, ImageFolder layout) or any folder of images
``npz:PATH``           arrays ``images`` (N,H,W[,C]) uint8 and optional ``labels``
=====================  ===============================================================

``split`` is ``train`` or ``test``; without it a source/target uses ``train`` and ``--eval`` uses
``test``. ``DATA`` is ``--data-dir`` or the env var ``ADAPTSERVE_DATA``.
Every dataset is brought to the model's input spec by :func:`service.preprocess.to_input_spec`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaptserve.service.preprocess import ImageError, InputSpec, decode_image, to_input_spec

COPIES = 6  # demo: random affine copies per digit (kept together: one holdout group each)
NAMED = ("mnist", "mnist_m", "usps", "svhn", "syn", "demo-source", "demo-target")
DIGITS = [str(i) for i in range(10)]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataError(ValueError):
    """A dataset spec that cannot be loaded; the message says what is missing and what is expected."""


@dataclass
class Dataset:
    """Images (N,H,W,C) uint8 in the model's input spec, labels (N,) int64 or None, class names."""

    spec: str
    images: np.ndarray
    labels: np.ndarray | None
    classes: list[str]
    groups: np.ndarray | None = None  # images sharing an id are copies of one original (demo augmentation)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> "Dataset":
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return Dataset(self.spec, self.images[idx], pick(self.labels), self.classes, pick(self.groups))


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    d = explicit or os.environ.get("ADAPTSERVE_DATA")
    if not d:
        raise DataError("no data directory: pass --data-dir DIR or set ADAPTSERVE_DATA "
                        "(layout: DIR/mnist, DIR/mnist_m, DIR/usps, DIR/svhn; see `adaptserve train --help`)")
    p = Path(d).expanduser()
    if not p.is_dir():
        raise DataError(f"data directory {p} does not exist")
    return p


def parse_spec(spec: str, default_split: str = "train") -> tuple[str, str]:
    """``'mnist:test'`` → ``('mnist', 'test')``; ``'folder:/x'`` → ``('folder', '/x')``."""
    kind, _, arg = spec.partition(":")
    if kind in ("folder", "npz"):
        if not arg:
            raise DataError(f"dataset spec {spec!r} needs a path: {kind}:PATH")
        return kind, arg
    if kind not in NAMED:
        raise DataError(f"unknown dataset spec {spec!r}; expected one of {', '.join(NAMED)} "
                        "(optionally :train or :test), folder:PATH or npz:PATH")
    split = arg or default_split
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r} in {spec!r}; use :train or :test")
    return kind, split


def load(spec: str, input_spec: InputSpec, *, default_split: str = "train",
         data_root: str | os.PathLike | None = None, classes: list[str] | None = None,
         labels_optional: bool = False) -> Dataset:
    """Load ``spec`` into memory, in ``input_spec``. ``classes`` maps a labelled folder's names.

    ``labels_optional`` (an unlabelled target): a folder whose sub-folders are not all among ``classes`` is
    read as unlabelled images (any folder tree of images) instead of refused."""
    kind, arg = parse_spec(spec, default_split)
    groups = None
    if kind == "demo-source" or kind == "demo-target":
        images, labels = demo_domain(kind.split("-")[1], arg)
        names = DIGITS
        groups = np.arange(len(images)) // COPIES  # demo_domain keeps the copies of a digit together
    elif kind == "syn":
        images, labels = syn_domain(arg, data_root)
        names = DIGITS
    elif kind == "folder":
        images, labels, names = _load_folder(Path(arg).expanduser(), input_spec, classes, labels_optional)
    elif kind == "npz":
        images, labels = _load_npz(Path(arg).expanduser())
        names = classes or [str(i) for i in range(int(labels.max()) + 1 if labels is not None else 0)]
    else:
        images, labels = _NAMED_LOADERS[kind](data_dir(data_root), arg)
        names = DIGITS
    if len(images) == 0:
        raise DataError(f"dataset {spec!r} holds no images")
    try:
        images = to_input_spec(images, input_spec)
    except ImageError as e:
        raise DataError(f"dataset {spec!r}: {e}") from None
    if labels is not None:
        labels = np.asarray(labels, np.int64)
        if len(labels) != len(images):
            raise DataError(f"dataset {spec!r}: {len(images)} images but {len(labels)} labels")
    return Dataset(spec, images, labels, list(names), groups)


def holdout_split(n: int, fraction: float, seed: int = 12345, groups: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (train, held-out) with a fixed permutation, the same for every run seed.

    The held-out target images are never seen in training; export builds the drift reference from them.
    With ``groups`` (one id per image, e.g. the augmented copies of one demo digit) whole groups are
    held out, so no held-out image is a copy of a training image.
    """
    groups = np.arange(n) if groups is None else np.asarray(groups)
    ids = np.random.default_rng(seed).permutation(np.unique(groups))
    held = np.isin(groups, ids[: int(round(len(ids) * fraction))])
    return np.flatnonzero(~held), np.flatnonzero(held)


# --------------------------------------------------------------------------- named datasets

def _need(path: Path, layout: str) -> Path:
    if not path.is_file():
        raise DataError(f"missing data file {path}\nexpected layout: {layout}")
    return path


def _read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    magic, = struct.unpack(">I", raw[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or not 1 <= ndim <= 3:
        raise DataError(f"{path} is not an idx file of uint8 (magic {magic:#x})")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: expected {shape}, found {data.size} values")
    return data.reshape(shape)


def _mnist(root: Path, split: str):
    layout = "DATA/mnist/{train,t10k}-images-idx3-ubyte.gz and {train,t10k}-labels-idx1-ubyte.gz"
    prefix = "train" if split == "train" else "t10k"

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (root / "mnist" / name).is_file():
                return root / "mnist" / name
        return _need(root / "mnist" / f"{stem}.gz", layout)

    return (_read_idx(find(f"{prefix}-images-idx3-ubyte")),
            _read_idx(find(f"{prefix}-labels-idx1-ubyte")))


def _cache_dir() -> Path:
    d = Path(os.environ.get("ADAPTSERVE_CACHE", Path.home() / ".cache" / "adaptserve"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _load_npy_xz(path: Path) -> np.ndarray:
    """Decompress ``.npy.xz`` once (≈ 8 s for MNIST-M train) into a cache keyed by size and mtime."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = _cache_dir() / f"{path.name[:-3]}.{key}.npy"
    if not cached.exists():
        arr = np.load(io.BytesIO(lzma.open(path).read()))
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, cached)
        return arr
    return np.load(cached, mmap_mode="r")


def syn_domain(split: str, data_root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``syn`` split, rendered once (≈ 1 min for both) and cached; with BSDS500 backgrounds when the
    data directory has ``bsds500/bsds500_train.tar``, else flat and gradient backgrounds only."""
    from adaptserve.train import syn

    try:
        root = data_dir(data_root)
    except DataError:
        root = None
    patches = syn.bsds500_patches(root)
    n, seed = syn.SPLITS[split]
    cached = _cache_dir() / f"syn-v{syn.VERSION}-{split}-{'bsds500' if patches is not None else 'plain'}.npz"
    if cached.exists():
        with np.load(cached) as z:
            return z["images"], z["labels"]
    images, labels = syn.render(n, seed, patches)
    tmp = cached.with_name(f"{cached.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, images=images, labels=labels)
    os.replace(tmp, cached)
    return images, labels


def _mnist_m(root: Path, split: str):
    layout = "DATA/mnist_m/mnist_m_{train,test}_images.npy.xz (or .npy) and mnist_m_{train,test}_labels.npy"
    d = root / "mnist_m"
    img = d / f"mnist_m_{split}_images.npy"
    images = np.load(img) if img.is_file() else _load_npy_xz(_need(d / f"{img.name}.xz", layout))
    labels = np.load(_need(d / f"mnist_m_{split}_labels.npy", layout))
    return images, labels


def _usps(root: Path, split: str):
    path = _need(root / "usps" / "usps.h5", "DATA/usps/usps.h5 with train/data (N,256) floats in [0,1], "
                 "train/target, test/data, test/target")
    import h5py

    with h5py.File(path, "r") as f:
        x = np.asarray(f[f"{split}/data"], np.float32)
        y = np.asarray(f[f"{split}/target"])
    return np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8).reshape(-1, 16, 16), y


def _svhn(root: Path, split: str):
    path = _need(root / "svhn" / f"{split}_32x32.mat", "DATA/svhn/{train,test}_32x32.mat (the standard "
                 "SVHN cropped-digits files)")
    from scipy.io import loadmat

    m = loadmat(path)
    y = m["y"].reshape(-1).astype(np.int64)
    y[y == 10] = 0
    return np.ascontiguousarray(np.transpose(m["X"], (3, 0, 1, 2))), y


_NAMED_LOADERS = {"mnist": _mnist, "mnist_m": _mnist_m, "usps": _usps, "svhn": _svhn}


# --------------------------------------------------------------------------- files given by path

def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _load_folder(root: Path, input_spec: InputSpec, classes: list[str] | None, labels_optional: bool = False):
    """Class sub-folders → labelled (class names = folder names, sorted); otherwise unlabelled.

    With ``classes`` given, sub-folders must be among them — unless ``labels_optional``, where a folder
    whose sub-folders are not classes is read as unlabelled images."""
    if not root.is_dir():
        raise DataError(f"folder {root} does not exist")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    top_images = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    labelled = bool(subdirs) and not top_images
    files = _image_files(root)
    if not files:
        raise DataError(f"folder {root} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    names = [p.name for p in subdirs] if labelled else list(classes or [])
    if labelled and classes is not None:
        unknown = set(names) - set(classes)
        if unknown and labels_optional:
            labelled = False
        elif unknown:
            raise DataError(f"folder {root} has classes {sorted(unknown)} that the source does not have")
        names = list(classes)
    from tqdm import tqdm

    images, labels = [], []
    for path in tqdm(files, desc=f"reading {root.name}", unit="img", leave=False, disable=len(files) < 500):
        try:
            img = decode_image(path.read_bytes())
        except ImageError as e:
            raise DataError(f"bad image {path}: {e}") from None
        images.append(to_input_spec(img, input_spec)[0])
        if labelled:
            labels.append(names.index(path.relative_to(root).parts[0]))
    return np.stack(images), (np.array(labels) if labelled else None), names


def _load_npz(path: Path):
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist")
    try:
        with np.load(path) as z:
            if "images" not in z:
                raise DataError(f"{path} has no array 'images' (found: {', '.join(z.files)})")
            return z["images"], (z["labels"] if "labels" in z else None)
    except (ValueError, OSError) as e:
        raise DataError(f"{path} is not a readable .npz file: {e}") from None


# --------------------------------------------------------------------------- embedded demo pair

def demo_domain(domain: str, split: str, variant: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The embedded domain pair (no files, no network), deterministic on every machine.

    source: scikit-learn's 1,797 handwritten 8×8 digits, upscaled into a 20×20 box on a 28×28 black
    canvas (like MNIST), each digit in ``COPIES`` random affine copies (:func:`_jitter`).
    target: other random affine copies of the same digits, padded to 32×32 and blended MNIST-M-style
    with a random colour texture, ``|texture − digit|`` per channel (:func:`_textures`).
    Split: every 5th digit is test. ``variant`` > 0 draws other copies and textures of the same digits
    (new in-distribution images for measuring drift false alarms; the dataset specs use variant 0).
    docs/benchmarks.md §2 has the demo's numbers: source-only stays far below DANN on the target.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = (np.arange(len(digits.target)) % 5 == 0) == (split == "test")
    small = np.rint(digits.images[keep] * (255.0 / 16.0)).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((20, 20), Image.BILINEAR)) for im in small])
    big = np.pad(big, ((0, 0), (4, 4), (4, 4)))  # 28×28
    rng = np.random.default_rng({"source": 2015, "target": 2016}[domain] + 10 * (split == "test") + 100 * variant)
    images = np.repeat(big, COPIES, axis=0)
    labels = np.repeat(digits.target[keep].astype(np.int64), COPIES)
    images = np.stack([_jitter(Image.fromarray(im), rng) for im in images])
    if domain == "source":
        return images, labels
    digit = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None].astype(np.int16)
    texture = _textures(rng, len(digit), 32).astype(np.int16)
    return np.abs(texture - digit).astype(np.uint8), labels


def _jitter(img, rng: np.random.Generator) -> np.ndarray:
    """A random affine copy of a 28×28 digit: rotation ±12°, scale 0.85–1.1, shift ±2 px."""
    from PIL import Image

    angle, scale = np.deg2rad(rng.uniform(-12, 12)), rng.uniform(0.85, 1.1)
    tx, ty = rng.uniform(-2, 2, 2)
    c, s = np.cos(angle) / scale, np.sin(angle) / scale
    cx = cy = 13.5  # output pixel (x, y) samples input (a x + b y + o, d x + e y + f), about the centre
    coeffs = (c, s, cx - c * (cx + tx) - s * (cy + ty), -s, c, cy + s * (cx + tx) - c * (cy + ty))
    return np.asarray(img.transform((28, 28), Image.AFFINE, coeffs, Image.BILINEAR))


def _textures(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Random colour textures (N, size, size, 3) uint8: a 3×3 grid of colours in [0, 160) upsampled
    bicubically, plus ±12 per-pixel noise — darker than white strokes, so |texture − digit| keeps
    most strokes visible while changing colour, contrast and polarity as MNIST-M's BSDS500 patches do."""
    from PIL import Image

    out = np.empty((n, size, size, 3), np.uint8)
    coarse = rng.integers(0, 160, size=(n, 3, 3, 3), dtype=np.uint8)
    fine = rng.integers(-12, 13, size=(n, size, size, 3))
    for i in range(n):
        smooth = np.asarray(Image.fromarray(coarse[i]).resize((size, size), Image.BICUBIC), np.int16)
        out[i] = np.clip(smooth + fine[i], 0, 255)
    return out
