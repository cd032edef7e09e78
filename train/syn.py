"""``syn``: SynDigits-style rendered digits, made offline — a digit domain that is neither handwriting nor
MNIST-M, for multi-source adaptation (Digit-Five's SynDigits cannot be downloaded here).

    images, labels = render(25_000, seed=1, backgrounds=bsds500_patches(data_root))   # (N, 32, 32, 3) uint8

Each image: one digit 0–9 (classes balanced, order shuffled) drawn with one of the TrueType fonts that
ship with matplotlib (DejaVu Sans/Serif/Mono and STIX in their weights and slants, Computer Modern), at a
random size (14–27 px of a 32-px image), position (±4 px), rotation (±15°) and colour, at the larger sizes
often between parts of neighbouring digits cut by the left and right edges (as SynDigits crops numbers;
at the smaller sizes a whole number would fit and make the label ambiguous), on a flat colour, a
linear gradient between two colours, or — when the data directory holds ``bsds500/bsds500_train.tar`` —
a random BSDS500 patch; then a Gaussian blur of radius 0–1.2 px. The digit colour keeps a luminance
distance ≥ 70 from its background's mean, so every image is legible.

Deterministic by seed on a machine (the same Pillow/FreeType rasterise the same pixels);
:func:`train.data.load` generates each split once and caches it (``ADAPTSERVE_CACHE``): ``syn`` is
25,000 images (seed 1), ``syn:test`` 9,000 (seed 2).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

SIZE = 32
SPLITS = {"train": (25_000, 1), "test": (9_000, 2)}  # images, seed
VERSION = 1  # bump when the rendering changes: it keys the cache
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
              "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
              "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
              "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf")
MIN_CONTRAST = 70.0


def font_paths() -> list[Path]:
    """The matplotlib fonts used (those of :data:`FONT_FILES` present in this matplotlib)."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = [folder / f for f in FONT_FILES if (folder / f).is_file()]
    if not paths:
        raise FileNotFoundError(f"no fonts of {FONT_FILES} in {folder}")
    return paths


def bsds500_patches(data_root: Path | None, n: int = 2000, seed: int = 0) -> np.ndarray | None:
    """``n`` random 32×32 crops (at scales 1–3×) of the BSDS500 training photos, or None without the tar."""
    if data_root is None or not (Path(data_root) / "bsds500" / "bsds500_train.tar").is_file():
        return None
    from PIL import Image

    photos = []
    with tarfile.open(Path(data_root) / "bsds500" / "bsds500_train.tar") as tar:
        for member in sorted(m.name for m in tar.getmembers() if m.name.endswith(".jpg")):
            with Image.open(io.BytesIO(tar.extractfile(member).read())) as img:
                photos.append(np.asarray(img.convert("RGB")))
    rng = np.random.default_rng(seed)
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        side = int(SIZE * rng.uniform(1, 3))
        y, x = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        crop = Image.fromarray(photo[y:y + side, x:x + side])
        out[i] = np.asarray(crop.resize((SIZE, SIZE), Image.BILINEAR))
    return out


def _luma(rgb) -> float:
    r, g, b = np.asarray(rgb, np.float64)[..., :3].reshape(-1, 3).mean(0)
    return 0.299 * r + 0.587 * g + 0.114 * b


def _background(rng: np.random.Generator, patches: np.ndarray | None) -> np.ndarray:
    kind = rng.choice(3, p=[0.3, 0.3, 0.4] if patches is not None else [0.5, 0.5, 0.0])
    if kind == 2:
        return patches[rng.integers(len(patches))].copy()
    a = rng.integers(0, 256, 3).astype(np.float64)
    if kind == 0:
        return np.broadcast_to(a, (SIZE, SIZE, 3)).astype(np.uint8).copy()
    b = rng.integers(0, 256, 3).astype(np.float64)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1) - 0.5
    t = np.clip((np.cos(angle) * xx + np.sin(angle) * yy) + 0.5, 0, 1)[..., None]
    return np.rint(a * (1 - t) + b * t).astype(np.uint8)


def _ink(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A text colour at least MIN_CONTRAST away in luminance from the background's mean."""
    base = _luma(background)
    for _ in range(50):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        if abs(_luma(c) - base) >= MIN_CONTRAST:
            return c
    return (255, 255, 255) if base < 128 else (0, 0, 0)


def _glyphs(fonts, rng: np.random.Generator, label: int, ink, size: int, scale: int = 3):
    """An RGBA layer (``scale``× resolution) holding the digit centred, maybe between parts of neighbours."""
    from PIL import Image, ImageDraw

    canvas = SIZE * scale
    layer = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    text = str(label)
    if size >= 21 and rng.random() < 0.6:  # neighbours cut by the image edges, as SynDigits crops numbers
        text = f"{rng.integers(10)}{text}{rng.integers(10)}"
    font = fonts[rng.integers(len(fonts))].font_variant(size=size * scale)
    gap = int(rng.integers(0, 3)) * scale
    widths = [draw.textlength(ch, font=font) for ch in text]
    if len(text) == 3 and sum(widths) + 2 * gap < 1.4 * canvas:  # the neighbours would show whole: drop them
        text, widths = text[1], widths[1:2]
    x = canvas / 2 - widths[len(text) // 2] / 2 - sum(widths[:len(text) // 2]) - gap * (len(text) // 2)
    for ch, w in zip(text, widths):
        draw.text((x, canvas / 2), ch, font=font, fill=(*ink, 255), anchor="lm")
        x += w + gap
    return layer


def render(n: int, seed: int, backgrounds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rendered digits (N, 32, 32, 3) uint8 and labels (N,) int64; deterministic in ``seed``."""
    from PIL import Image, ImageFilter, ImageFont

    rng = np.random.default_rng(seed)
    fonts = [ImageFont.truetype(str(p), 32) for p in font_paths()]
    labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    scale = 3
    for i, label in enumerate(labels):
        bg = _background(rng, backgrounds)
        ink = _ink(rng, bg)
        layer = _glyphs(fonts, rng, int(label), ink, int(rng.integers(14, 28)), scale)
        layer = layer.rotate(rng.uniform(-15, 15), resample=Image.BICUBIC,
                             translate=tuple(int(v) for v in rng.integers(-4, 5, 2) * scale))
        big = Image.fromarray(bg).resize((SIZE * scale, SIZE * scale), Image.BILINEAR).convert("RGBA")
        img = Image.alpha_composite(big, layer).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)
        radius = rng.uniform(0, 1.2)
        if radius > 0.3:
            img = img.filter(ImageFilter.GaussianBlur(radius))
        images[i] = np.asarray(img)
    return images, labels
