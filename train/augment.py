"""Random affine augmentation of training batches: each image rotated, zoomed and shifted on its own.

For a uint8 batch ``x`` (N, H, W, C) every image n gets its own rotation θ_n ~ U(−r, r) degrees, zoom
z_n = (1 + s)^u with u ~ U(−1, 1) (log-uniform in [1/(1+s), 1+s]: z > 1 enlarges the content) and shift
(t_x, t_y) ~ U(−f, f)² of the image size, applied by bilinear resampling about the centre with zeros
outside the image (digits on a dark ground stay on a dark ground). The sampling grid of image n is

    [u_in, v_in]ᵀ = R(θ_n)·[u_out, v_out]ᵀ / z_n + 2·t_n       (affine_grid's coordinates in [−1, 1])

The loop augments the student's rows — source and target — while the EMA teacher labels the plain target
images (French et al. 2018, "Self-ensembling for visual domain adaptation": the consistency between an
augmented student and a plain teacher is what carries the labels across the domain gap; FixMatch's
weak/strong split). Export and serving see plain images: augmentation exists only in training.

The draws come from a generator seeded by (seed, step, rank), so a resumed run repeats them exactly.

Example::

    >>> g = torch.Generator().manual_seed(0)
    >>> random_affine(x_uint8, g, rotate=10, scale=0.4, shift=0.1).shape == x_uint8.shape
    True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(x: torch.Tensor, generator: torch.Generator, rotate: float = 0.0, scale: float = 0.0,
                  shift: float = 0.0) -> torch.Tensor:
    """Each image of uint8 ``x`` (N, H, W, C) rotated by ±``rotate``°, zoomed by a factor in
    [1/(1+``scale``), 1+``scale``] and shifted by ±``shift`` of its size; same shape and dtype."""
    n = len(x)
    u = lambda: torch.rand(n, generator=generator) * 2 - 1  # noqa: E731  U(−1, 1), n draws
    rot_u, zoom_u, tx, ty = u(), u(), u(), u()
    angle = rot_u * math.radians(rotate)
    inv_zoom = (1.0 + scale) ** -zoom_u
    cos, sin = torch.cos(angle) * inv_zoom, torch.sin(angle) * inv_zoom
    mat = torch.stack([torch.stack([cos, -sin, 2 * shift * tx], 1),
                       torch.stack([sin, cos, 2 * shift * ty], 1)], 1).to(x.device)  # (N, 2, 3)
    img = x.permute(0, 3, 1, 2).float()
    grid = F.affine_grid(mat, list(img.shape), align_corners=False)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The augmentation draws of one step: a function of (seed, step, rank) only, so resume is exact."""
    return torch.Generator().manual_seed(((seed + 1) * 7_919_993 + step) * 131 + rank)
