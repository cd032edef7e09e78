"""The DANN math: gradient reversal, schedules, losses."""

import math

import pytest
import torch

from adaptserve.train.dann import (dann_lambda, domain_loss, entropy, entropy_weights, grad_reverse, lr_factor, mk_mmd,
                        tail_factor, warmup_factor)


@pytest.mark.parametrize("coeff", [0.0, 0.37, 1.0, 10.0])
def test_grl_forward_is_identity_and_backward_is_minus_lambda(coeff):
    torch.manual_seed(0)
    x = torch.randn(5, 7, requires_grad=True)
    upstream = torch.randn(5, 7)
    y = grad_reverse(x, coeff)
    assert torch.equal(y, x)
    y.backward(upstream)
    assert torch.equal(x.grad, -coeff * upstream)


def test_grl_reverses_only_the_branch_behind_it():
    w = torch.tensor(2.0, requires_grad=True)
    f = w * 3.0
    (f + grad_reverse(f, 0.5)).backward()  # d/dw: 3 from the plain branch, -0.5*3 through the GRL
    assert w.grad.item() == pytest.approx(3.0 - 1.5)


def test_lambda_schedule_values():
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)  # 0.98661
    assert dann_lambda(0.5) == pytest.approx(0.986614, abs=1e-6)
    assert dann_lambda(1.0) == pytest.approx(0.999909, abs=1e-6)
    assert dann_lambda(0.1) < dann_lambda(0.2) < dann_lambda(0.3)


def test_lr_schedule_values():
    assert lr_factor(0.0) == 1.0
    assert lr_factor(0.5) == pytest.approx(6 ** -0.75)  # 0.2612
    assert lr_factor(1.0) == pytest.approx(11 ** -0.75)  # 0.1656
    assert 0.01 * lr_factor(1.0) == pytest.approx(0.001656, abs=1e-6)


def test_domain_loss_at_chance_is_two_ln2_and_perfect_is_zero():
    logits = torch.zeros(8)
    assert domain_loss(logits, 4).item() == pytest.approx(2 * math.log(2), rel=1e-6)
    perfect = torch.tensor([-30.0] * 4 + [30.0] * 4)
    assert domain_loss(perfect, 4).item() == pytest.approx(0.0, abs=1e-6)
    inverted = -perfect
    assert domain_loss(inverted, 4).item() > 50


def test_entropy_and_cdan_e_weights():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.9, 0.1], [0.5, 0.5]])
    h = entropy(p)
    assert h[0].item() == pytest.approx(0.0, abs=1e-6)
    assert h[1].item() == pytest.approx(math.log(2), rel=1e-5)
    w = entropy_weights(p, 2)
    assert w[:2].mean().item() == pytest.approx(1.0) and w[2:].mean().item() == pytest.approx(1.0)
    assert w[0] > w[1] and w[2] > w[3]  # confident examples weigh more


def test_tail_factor_is_a_cosine_to_zero_over_the_last_fraction():
    assert tail_factor(0.5, 0.0) == 1.0 and tail_factor(0.99, 0.0) == 1.0
    assert tail_factor(0.75, 0.25) == 1.0 and tail_factor(0.2, 0.25) == 1.0
    assert tail_factor(0.875, 0.25) == pytest.approx(0.5)
    assert tail_factor(1.0, 0.25) == pytest.approx(0.0, abs=1e-12)
    values = [tail_factor(p / 100, 0.25) for p in range(75, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_factor_values():
    assert [warmup_factor(s, 100) for s in (0, 49, 98, 99, 100, 5000)] == [0.01, 0.5, 0.99, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0 and warmup_factor(7, 0) == 1.0  # 0 switches it off


def _mmd_by_hand(a, b, alphas=(0.125, 0.25, 0.5, 1.0, 2.0)):
    """The biased MK-MMD² written out pair by pair (no matrices), to check mk_mmd against."""
    z = [r for r in a] + [r for r in b]
    base = sum(float(((u - v) ** 2).sum()) for u in z for v in z) / len(z) ** 2
    k = lambda u, v: sum(math.exp(-float(((u - v) ** 2).sum()) / (2 * al * base)) for al in alphas)  # noqa: E731
    mean = lambda xs, ys: sum(k(u, v) for u in xs for v in ys) / (len(xs) * len(ys))  # noqa: E731
    return mean(a, a) + mean(b, b) - 2 * mean(a, b)


def test_mk_mmd_zero_for_the_same_batch_positive_and_growing_with_shift():
    torch.manual_seed(0)
    a = torch.randn(64, 16)
    assert mk_mmd(a, a).item() == pytest.approx(0.0, abs=1e-5)
    assert mk_mmd(a, a[torch.randperm(64)]).item() == pytest.approx(0.0, abs=1e-5)  # a set: order is no matter
    b = torch.randn(64, 16)  # same distribution, other draw: small but not zero
    shifted = [mk_mmd(a, b + s).item() for s in (0.0, 0.5, 1.0, 2.0)]
    assert 0 < shifted[0] < shifted[1] < shifted[2] < shifted[3]
    assert shifted[0] < 0.1 * shifted[3]
    x, y = torch.randn(6, 3), torch.randn(5, 3) + 1.0  # unequal sizes, against the pair-by-pair sum
    assert mk_mmd(x, y).item() == pytest.approx(_mmd_by_hand(x, y), rel=1e-4)
    assert mk_mmd(10 * x, 10 * y).item() == pytest.approx(mk_mmd(x, y).item(), rel=1e-4)  # bandwidth follows scale


def test_mk_mmd_gradient_reaches_the_features_not_the_classifier():
    from adaptserve.train.models import build_model

    torch.manual_seed(0)
    model, arch = build_model("dann_mnist", 10, "dann")
    spec = arch.input_spec
    x = torch.rand(16, spec.height, spec.width, spec.channels) * 255
    x[8:] = 255 - x[8:]  # a shifted "target" half
    logits, f, d = model(x.to(torch.uint8), 1.0)
    mk_mmd(f[:8], f[8:]).backward()
    feats = [p.grad for p in model.features.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in feats) and any(g.abs().sum() > 0 for g in feats)
    assert all(p.grad is None for p in model.classifier.parameters())
    assert all(p.grad is None for p in model.discriminator.parameters())
