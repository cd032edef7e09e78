"""Label-free validators (train/validators.py) on toy cases whose right answer is known."""

import numpy as np
import pytest

from adaptserve.train import validators as V


def test_entropy_prefers_confident_predictions():
    confident = np.full((20, 4), 0.01) + np.eye(4)[np.arange(20) % 4] * 0.96
    assert V.mean_entropy(confident) < V.mean_entropy(np.full((20, 4), 0.25))
    assert V.mean_entropy(np.full((5, 4), 0.25)) == pytest.approx(np.log(4), abs=1e-6)


def test_snd_is_higher_for_clustered_predictions():
    rng = np.random.default_rng(0)
    clustered = np.eye(5)[rng.integers(0, 5, 200)] * 0.9 + 0.02  # five tight clusters of ~40
    scattered = rng.dirichlet(np.ones(5), 200)
    assert V.snd(clustered) > V.snd(scattered)
    assert V.snd(np.eye(3)[np.repeat([0, 1, 2], 4)]) == pytest.approx(np.log(3), abs=1e-6)


def test_dev_is_the_plain_loss_without_shift_and_the_target_region_loss_with_it():
    rng = np.random.default_rng(1)
    f_s = rng.normal(size=(2000, 1))
    loss = (f_s[:, 0] > 0).astype(float)  # the classifier fails on the right half of the source
    same = V.dev_risk(f_s, loss, rng.normal(size=(2000, 1)))
    assert same == pytest.approx(loss.mean(), abs=0.05)
    shifted = V.dev_risk(f_s, loss, rng.normal(1.5, 1.0, size=(2000, 1)))  # the target sits on the right
    true_target_risk = float((rng.normal(1.5, 1.0, 100_000) > 0).mean())  # ≈ 0.93
    assert shifted == pytest.approx(true_target_risk, abs=0.1) and shifted > same + 0.25


def test_score_ranks_higher_as_better():
    m = {"step": 7, "im": 1.2, "target_entropy": 0.3, "snd": 4.0, "dev_risk": 0.25, "target_acc": 0.9}
    assert [V.score(m, s) for s in ("im", "entropy", "snd", "dev", "last", "target_acc")] == \
        [1.2, -0.3, 4.0, -0.25, 7.0, 0.9]
    scores = V.scores(np.eye(3)[[0, 1, 2, 0]] * 0.9 + 0.033, np.eye(3)[[0, 1, 2]] * 0.9 + 0.033,
                      np.array([0, 1, 2]), np.eye(3), np.eye(3)[[0, 1, 2, 0]])
    assert set(scores) == {"snd", "dev_risk"} and all(np.isfinite(list(scores.values())))
