"""Random affine augmentation of training batches (train/augment.py, --aug-rotate/--aug-scale/--aug-shift)."""

import math

import pytest
import torch

from adaptserve.train import checkpoint as ckpt_io
from adaptserve.train.augment import random_affine, step_generator
from adaptserve.train.config import TrainConfig
from adaptserve.train.loop import run


def _square(n: int = 64, size: int = 28, side: int = 10) -> torch.Tensor:
    x = torch.zeros(n, size, size, 1, dtype=torch.uint8)
    lo = (size - side) // 2
    x[:, lo:lo + side, lo:lo + side] = 255
    return x


def _moments(img: torch.Tensor) -> tuple[float, float, float, float]:
    """(ink area in pixels, centre row, centre column, orientation in degrees) of a (H, W, 1) uint8 image."""
    w = img[..., 0].float() / 255
    r, c = torch.meshgrid(torch.arange(w.shape[0]).float(), torch.arange(w.shape[1]).float(), indexing="ij")
    m = w.sum()
    cr, cc = (w * r).sum() / m, (w * c).sum() / m
    mrr, mcc, mrc = (w * (r - cr) ** 2).sum() / m, (w * (c - cc) ** 2).sum() / m, (w * (r - cr) * (c - cc)).sum() / m
    return m.item(), cr.item(), cc.item(), math.degrees(0.5 * math.atan2(2 * mrc, mcc - mrr))


def test_no_augmentation_is_the_identity_and_shape_and_dtype_are_kept():
    x = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    out = random_affine(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape and torch.equal(out, x)


def test_draws_depend_on_seed_step_and_rank_only_and_differ_per_image():
    x = _square(16)
    a = random_affine(x, step_generator(0, 5), 20, 0.3, 0.1)
    assert torch.equal(a, random_affine(x, step_generator(0, 5), 20, 0.3, 0.1))  # a resumed run repeats them
    for g in (step_generator(0, 6), step_generator(1, 5), step_generator(0, 5, rank=1)):
        assert not torch.equal(a, random_affine(x, g, 20, 0.3, 0.1))
    assert len({bytes(img.numpy()) for img in a}) == len(a)  # every image its own transform


def test_zoom_stays_in_its_log_uniform_range_and_goes_both_ways():
    """A 10×10 square zoomed by z has area 100·z²: z in [1/1.4, 1.4] for --aug-scale 0.4."""
    areas = torch.tensor([_moments(img)[0] for img in random_affine(_square(), torch.Generator().manual_seed(1),
                                                                     scale=0.4)])
    z = (areas / 100).sqrt()
    assert z.min() >= 1 / 1.4 - 0.05 and z.max() <= 1.4 + 0.05
    assert z.min() < 0.85 and z.max() > 1.2  # both shrinks and enlargements are drawn


def test_shift_moves_the_centre_by_at_most_its_fraction_of_the_size():
    out = random_affine(_square(), torch.Generator().manual_seed(2), shift=0.1)
    moves = torch.tensor([_moments(img)[1:3] for img in out]) - 13.5  # the square's centre is (13.5, 13.5)
    assert moves.abs().max() <= 0.1 * 28 + 0.5
    assert moves.abs().max() > 1.5 and (moves > 0).any() and (moves < 0).any()


def test_rotation_turns_a_bar_by_at_most_the_given_angle_both_ways():
    x = torch.zeros(64, 28, 28, 1, dtype=torch.uint8)
    x[:, 13:15, 4:24] = 255  # a horizontal bar: orientation 0°
    angles = torch.tensor([_moments(img)[3] for img in random_affine(x, torch.Generator().manual_seed(3), rotate=15)])
    assert angles.abs().max() <= 15 + 1.5
    assert angles.min() < -8 and angles.max() > 8


def test_config_refuses_out_of_range_augmentation():
    for bad in (dict(aug_rotate=-1), dict(aug_scale=1.5), dict(aug_shift=0.6)):
        with pytest.raises(ValueError, match="aug"):
            TrainConfig(**bad).validate()


def test_a_run_with_augmentation_trains_other_weights_and_keeps_the_sampler(tmp_path):
    """Augmentation changes what the network sees, not which images are drawn: the data sampler's state
    after the run is the same with and without it (its draws come from a generator of their own)."""
    kw = dict(steps=20, batch_size=32, eval_every=20, log_every=10, threads=1, tsne=False, seed=0, ema=0.99,
              pseudo_weight=1.0, pseudo_threshold=0.0)
    run(TrainConfig(**kw), tmp_path / "plain", progress=False)
    run(TrainConfig(**kw, aug_rotate=10, aug_scale=0.3, aug_shift=0.1), tmp_path / "aug", progress=False)
    a, b = (ckpt_io.load(tmp_path / n / "checkpoints" / "last.pt") for n in ("plain", "aug"))
    assert torch.equal(a["sampler"], b["sampler"])
    assert not all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
