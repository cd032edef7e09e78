"""Bring images to a model's input spec — the one spatial/channel preprocessing step, torch-free.

Training (``train.data``), export (reference data) and serving (``/classify``, ``adaptserve score``)
all call :func:`to_input_spec`, so they cannot disagree. Pixel scaling and normalisation are *not*
here: they live inside the model (``train.models.Normalize``) and therefore inside the ONNX graph.

Contract: ``to_input_spec(images, spec) -> uint8 array (N, H, W, C)`` where ``spec`` has
``height``, ``width``, ``channels``.

- channels: 1 → 3 repeats the grey plane; 3 → 1 uses ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B);
  4 (RGBA) drops alpha first.
- size: an image at most ``PAD_MAX`` px smaller than the spec in both dimensions is zero-padded and
  centred (the MNIST 28×28 → 32×32 convention of MNIST-M and SVHN, which keeps digit scale); any
  other size is resized bilinearly with PIL.

Raw arrays sent to the service go through :func:`conform` instead: the same channel conversion, but H×W
must already be the spec's (a flat vector, a transposed array or the wrong crop is an error, not a
plausible answer) unless the caller asks for ``resize``. Image *files* are resized (that is what users
expect of files), after :func:`decode_image` has checked their pixel count from the header.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

PAD_MAX = 4
DEFAULT_MAX_PIXELS = 4096 * 4096  # one image file; ADAPTSERVE_MAX_PIXELS (service and scorer)


@dataclass(frozen=True)
class InputSpec:
    """What the model's ``images`` input expects: uint8 pixels in NHWC layout."""

    height: int
    width: int
    channels: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(int(d["height"]), int(d["width"]), int(d["channels"]))

    def __str__(self) -> str:
        return f"{self.height}x{self.width}x{self.channels} uint8 NHWC"


class ImageError(ValueError):
    """An input that cannot be turned into the model's input spec (message says why)."""


class ImageTooLarge(ImageError):
    """An image file with more pixels than allowed (HTTP 413); found from its header, before decoding."""


def as_uint8_nhwc(images: np.ndarray) -> np.ndarray:
    """Accept (H,W), (H,W,C), (N,H,W) or (N,H,W,C) uint8 — or floats in [0,1] — and return uint8 NHWC."""
    a = np.asarray(images)
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating):
            if a.size and (np.nanmin(a) < 0.0 or np.nanmax(a) > 1.0 or np.isnan(a).any()):
                raise ImageError("float images must hold values in [0, 1]")
            a = np.rint(a * 255.0).astype(np.uint8)
        elif np.issubdtype(a.dtype, np.integer):
            if a.size and (a.min() < 0 or a.max() > 255):
                raise ImageError("integer images must hold values in [0, 255]")
            a = a.astype(np.uint8)
        else:
            raise ImageError(f"unsupported image dtype {a.dtype}")
    if a.ndim == 2:  # one grey image
        a = a[None, :, :, None]
    elif a.ndim == 3:
        # (H,W,C) with a small channel axis is one image; otherwise a stack of grey images.
        a = a[None] if a.shape[-1] in (1, 3, 4) and a.shape[0] > 4 else a[..., None]
    if a.ndim != 4:
        raise ImageError(f"expected images of rank 2-4 (N,H,W,C), got shape {tuple(np.shape(images))}")
    if a.shape[-1] not in (1, 3, 4):
        raise ImageError(f"expected 1, 3 or 4 channels in the last axis, got shape {a.shape}")
    return a


def _convert_channels(a: np.ndarray, channels: int) -> np.ndarray:
    if a.shape[-1] == 4:
        a = a[..., :3]
    c = a.shape[-1]
    if c == channels:
        return a
    if c == 1 and channels == 3:
        return np.repeat(a, 3, axis=-1)
    if c == 3 and channels == 1:
        luma = a.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
    raise ImageError(f"cannot convert {c} channels to {channels}")


def _resize(a: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((a.shape[0], height, width, a.shape[-1]), np.uint8)
    for i, img in enumerate(a):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        r = np.asarray(pil.resize((width, height), Image.BILINEAR))
        out[i] = r[..., None] if r.ndim == 2 else r
    return out


def describe_conversion(shape: tuple, spec: InputSpec) -> str | None:
    """What :func:`to_input_spec` does to images of shape (H, W[, C]): e.g. ``32×32×3 → 28×28×3 (bilinear)``;
    None when they already are the spec."""
    h, w = shape[:2]
    c = shape[2] if len(shape) > 2 else 1
    if (h, w, c) == (spec.height, spec.width, spec.channels):
        return None
    steps = []
    if c == 4:
        steps.append("alpha dropped")
    c3 = 3 if c == 4 else c
    if c3 != spec.channels:
        steps.append("grey repeated to 3 channels" if c3 == 1 else "RGB → grey (ITU-R 601 luma)")
    if (h, w) != (spec.height, spec.width):
        dh, dw = spec.height - h, spec.width - w
        steps.append("zero-padded, centred" if 0 <= dh <= PAD_MAX and 0 <= dw <= PAD_MAX else "bilinear")
    return f"{h}×{w}×{c} → {spec.height}×{spec.width}×{spec.channels} ({', '.join(steps)})"


def to_input_spec(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Return ``images`` as uint8 (N, spec.height, spec.width, spec.channels); see module doc."""
    a = _convert_channels(as_uint8_nhwc(images), spec.channels)
    h, w = a.shape[1:3]
    if (h, w) == (spec.height, spec.width):
        return np.ascontiguousarray(a)
    dh, dw = spec.height - h, spec.width - w
    if 0 <= dh <= PAD_MAX and 0 <= dw <= PAD_MAX:
        top, left = dh // 2, dw // 2
        return np.pad(a, ((0, 0), (top, dh - top), (left, dw - left), (0, 0)))
    return _resize(a, spec.height, spec.width)


def conform(images: np.ndarray, spec: InputSpec, resize: bool = False) -> np.ndarray:
    """Raw arrays → uint8 (N, H, W, C) of the spec: channels converted (1 ↔ 3, RGBA → RGB) but H×W must
    match unless ``resize`` (then as :func:`to_input_spec`); :class:`ImageError` names both shapes."""
    try:
        a = as_uint8_nhwc(images)
    except ImageError as e:
        raise ImageError(f"{e}; the model takes {spec.height}×{spec.width}×{spec.channels} (N,H,W,C)") from None
    if not resize and a.shape[1:3] != (spec.height, spec.width):
        raise ImageError(f"images are {a.shape[1]}×{a.shape[2]} px (array shape {tuple(np.shape(images))}); the model "
                         f"takes {spec.height}×{spec.width}×{spec.channels} (N,H,W,C) — send images of that size, or "
                         "ask for resize=true to have them resized")
    return to_input_spec(a, spec)


def image_pixels(data: bytes) -> int:
    """Width × height from an image file's header (Pillow opens lazily: nothing is decoded); 0 if unreadable."""
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():  # Pillow's bomb warning: the callers apply their own, lower limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.width * img.height
    except Exception:  # unreadable files are reported by decode_image
        return 0


def decode_image(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Decode PNG/JPEG/... bytes to uint8 (H, W, C); raise :class:`ImageError` if it is not an image and
    :class:`ImageTooLarge` if its header declares more than ``max_pixels`` pixels (checked before decoding)."""
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageTooLarge(f"image of {img.width}×{img.height} px = {img.width * img.height:,} pixels; the "
                                    f"limit is {max_pixels:,} (ADAPTSERVE_MAX_PIXELS)")
            img.load()
            mode = "L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB"
            arr = np.asarray(img.convert(mode))
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own limit, when max_pixels is None or above it
        raise ImageTooLarge(str(e)) from None
    except UnidentifiedImageError:  # Pillow's message names the BytesIO object (a memory address): useless
        raise ImageError("not a readable image (no image format recognised: PNG, JPEG, BMP, GIF, TIFF, WebP …)") from None
    except (OSError, ValueError) as e:
        raise ImageError(f"not a readable image ({e.__class__.__name__}: {e})") from None
    return arr[..., None] if arr.ndim == 2 else arr
