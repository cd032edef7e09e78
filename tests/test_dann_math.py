"""The DANN math: gradient reversal, schedules, losses."""

import math

import pytest
import torch

from train.dann import dann_lambda, domain_loss, entropy, entropy_weights, grad_reverse, lr_factor, tail_factor


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
