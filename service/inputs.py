"""What the batch scorers read: a folder of image files, a ``.npy`` or a ``.npz`` — streamed in batches.

:func:`open_input` → a :class:`Source`: its kind, item count, whether it is labelled, and an iterator of
:class:`Batch` (ids, images, per-item errors, labels). A folder whose top level holds only sub-folders named
after the model's classes is labelled by them; an ``.npz`` may carry ``labels``. A ``.npy`` is memory-mapped,
so memory is one batch. An unreadable or undecodable file is an item with an ``error`` and no image, never
the end of the run; a problem with the input as a whole is a :class:`ScoreError`. The local scorer
(:mod:`service.score`) and the Ray scorer's actors (:mod:`service.score_ray`) read through the same functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from adaptserve.service.preprocess import DEFAULT_MAX_PIXELS, ImageError, decode_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
DEFAULT_BATCH = 256


class ScoreError(ValueError):
    """A problem with the scorer's arguments or input as a whole (the CLI prints it, exit 2)."""


@dataclass
class Batch:
    ids: list                      # path strings or integer indices, one per item
    images: list | np.ndarray      # uint8 arrays (any size) or None when unreadable; arrays: one (N,H,W[,C])
    errors: list                   # None or a message, one per item
    labels: list | None = None     # true class indices (or None per item), when labelled


@dataclass
class Source:
    kind: str                      # "folder" | "array"
    n: int
    labelled: bool
    batches: Iterator[Batch] = field(repr=False)
    shape: tuple | None = None     # arrays: (H, W[, C]) of every image


def list_folder(root: Path, classes: list[str]) -> tuple[list[Path], list[int] | None]:
    """The image files below ``root`` (sorted) and their class indices when the folder is labelled (its top
    level holds only sub-folders named after classes), else None."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ScoreError(f"folder {root} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    subdirs = [p.name for p in root.iterdir() if p.is_dir()]
    top_files = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    labelled = bool(subdirs) and not top_files and set(subdirs) <= set(classes)
    return files, [classes.index(p.relative_to(root).parts[0]) for p in files] if labelled else None


def decode_files(datas, max_pixels: int) -> tuple[list, list]:
    """Image file bytes (or an exception met reading them) → (decoded images or None, error or None)."""
    images, errors = [], []
    for data in datas:
        try:
            if isinstance(data, Exception):
                raise data
            images.append(decode_image(data, max_pixels))
            errors.append(None)
        except (ImageError, OSError) as e:
            images.append(None)
            errors.append(str(e))
    return images, errors


def read_file(path: Path):
    """The file's bytes, or the OSError met reading it (for :func:`decode_files`)."""
    try:
        return path.read_bytes()
    except OSError as e:
        return e


def _folder(root: Path, classes: list[str], batch_size: int, max_pixels: int) -> Source:
    files, labels = list_folder(root, classes)

    def gen():
        for i in range(0, len(files), batch_size):
            chunk = files[i:i + batch_size]
            images, errors = decode_files([read_file(p) for p in chunk], max_pixels)
            yield Batch([str(p) for p in chunk], images, errors, labels[i:i + batch_size] if labels else None)

    return Source("folder", len(files), labels is not None, gen())


def open_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(images, labels or None) of a ``.npy`` (memory-mapped) or ``.npz`` file; ScoreError naming the problem."""
    try:
        if path.suffix.lower() == ".npy":
            images, labels = np.load(path, mmap_mode="r", allow_pickle=False), None
        else:
            z = np.load(path, allow_pickle=False)
            keys = [k for k in z.files if k != "labels"]
            key = "images" if "images" in z.files else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise ScoreError(f"{path} has no array 'images' (found: {', '.join(z.files) or 'none'})")
            images, labels = z[key], (z["labels"] if "labels" in z.files else None)
    except ScoreError:
        raise
    except Exception as e:  # ValueError / OSError / zipfile.BadZipFile / EOFError on a broken file
        raise ScoreError(f"{path} is not a readable {path.suffix} file: {e}") from None
    if images.ndim not in (3, 4):
        raise ScoreError(f"{path}: images must be (N,H,W) or (N,H,W,C), got shape {images.shape}")
    if labels is not None:
        labels = np.asarray(labels).ravel()
        if len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise ScoreError(f"{path}: 'labels' must be {len(images)} integer class indices, "
                             f"got shape {labels.shape} dtype {labels.dtype}")
    return images, labels


def _arrays(path: Path, batch_size: int) -> Source:
    images, labels = open_arrays(path)

    def gen():
        for i in range(0, len(images), batch_size):
            chunk = np.asarray(images[i:i + batch_size])
            n = len(chunk)
            yield Batch(list(range(i, i + n)), chunk, [None] * n,
                        labels[i:i + n].tolist() if labels is not None else None)

    return Source("array", len(images), labels is not None, gen(), tuple(images.shape[1:]))


def open_input(path: str | os.PathLike, classes: list[str], batch_size: int = DEFAULT_BATCH,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Source:
    path = Path(path)
    if path.is_dir():
        return _folder(path, classes, batch_size, max_pixels)
    if not path.exists():
        raise ScoreError(f"input {path} does not exist")
    if path.suffix.lower() not in (".npy", ".npz"):
        raise ScoreError(f"input {path}: expected a folder of images, a .npy or a .npz file")
    return _arrays(path, batch_size)
