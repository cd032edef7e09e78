"""The DANN math: gradient reversal, the paper's schedules, and the domain-adversarial losses.

Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016. With training progress
p = step / total ∈ [0, 1]:

    λ_p  = 2 / (1 + exp(−γ p)) − 1,      γ = 10     (adaptation weight, 0 → ~1)
    lr_p = μ0 / (1 + α p)^β,             α = 10, β = 0.75
    × ½(1 + cos(π (p − 1 + τ)/τ)) for p > 1 − τ   (``--lr-decay-tail τ``; the digits recipe: τ = 0.25)

Objective per step, one backward pass (the GRL turns the min-max into a plain minimisation)::

    L = CE(G_y(G_f(x_s)), y_s) + BCE(G_d(R_λ(G_f(x))), d)      d = 0 for source, 1 for target

where R_λ is the identity forward and multiplies the gradient by −λ backward. CDAN (Long et al. 2018)
feeds G_d the multilinear map f ⊗ softmax; CDAN+E weights each example by w = 1 + exp(−H(p)),
normalised to mean 1 within each domain, so confident examples count more.

Example::

    >>> logits, f, d = model(torch.cat([x_s, x_t]), coeff=dann_lambda(p))
    >>> loss = F.cross_entropy(logits[:n_s], y_s) + domain_loss(d, n_s)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class GradientReversal(torch.autograd.Function):
    """Identity forward; gradient × (−coeff) backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.neg() * ctx.coeff, None


def grad_reverse(x: torch.Tensor, coeff: float) -> torch.Tensor:
    """R_coeff(x): ``coeff = 0`` stops the gradient (source-only training still fits G_d)."""
    return GradientReversal.apply(x, float(coeff))


def dann_lambda(p: float, gamma: float = 10.0) -> float:
    """λ_p = 2/(1+exp(−γp)) − 1: 0 at p=0, ≈0.987 at p=0.5, ≈0.99991 at p=1 for γ=10."""
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def lr_factor(p: float, alpha: float = 10.0, beta: float = 0.75) -> float:
    """lr_p / μ0 = (1 + αp)^−β: 1 at p=0, 6^−0.75 ≈ 0.261 at p=0.5, 11^−0.75 ≈ 0.166 at p=1."""
    return (1.0 + alpha * p) ** (-beta)


def tail_factor(p: float, tail: float) -> float:
    """Cosine decay of the lr over the last ``tail`` of training: 1 until p = 1 − tail, then
    ½(1 + cos(π (p − (1 − tail)) / tail)) → 0 at p = 1. ``tail = 0``: always 1."""
    if tail <= 0 or p <= 1.0 - tail:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (p - (1.0 - tail)) / tail)))


def entropy(probs: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Shannon entropy per row of (N,K) probabilities, in nats."""
    return -(probs * torch.log(probs + eps)).sum(1)


def entropy_weights(probs: torch.Tensor, n_source: int) -> torch.Tensor:
    """CDAN+E weights w = 1 + exp(−H(p)), detached, normalised to mean 1 within source and target."""
    w = 1.0 + torch.exp(-entropy(probs.detach()))
    ws, wt = w[:n_source], w[n_source:]
    return torch.cat([ws / ws.mean(), wt / wt.mean()])


def domain_loss(domain_logits: torch.Tensor, n_source: int, weights: torch.Tensor | None = None
                ) -> torch.Tensor:
    """BCE of G_d on a concatenated batch (first ``n_source`` rows source=0, the rest target=1):
    mean over the source rows + mean over the target rows, as in the reference implementations."""
    target = torch.zeros_like(domain_logits)
    target[n_source:] = 1.0
    per = F.binary_cross_entropy_with_logits(domain_logits.float(), target, reduction="none")
    if weights is not None:
        per = per * weights
    return per[:n_source].mean() + per[n_source:].mean()
