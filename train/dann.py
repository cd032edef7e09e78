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

``--mmd-weight w`` adds w·MK-MMD²(f_s, f_t) between the two domains' features (DAN, Long et al. 2015),
the distribution-alignment term of the description this project follows; ``--warmup-steps`` ramps the lr
linearly from μ0/N up to the schedule's value over the first N steps, ``--grad-clip`` caps the gradient's norm.

Several labelled sources S_1..S_k (each step draws B images from every source and B from the target):
``dann`` combines them (one G_d, all sources vs target); MDAN (Zhao et al., NeurIPS 2018) gives each
source its own G_d^i behind its own GRL and combines the per-source losses
L_i = CE_i + μ·BCE_i (S_i vs T) with a soft-max, whose gradient weights source i by softmax(γ·L)_i::

    soft:  (1/γ)·log Σ_i exp(γ·L_i)            hard:  max_i CE_i + μ·min_i BCE_i
    darn:  (1/γ)·min_{α ∈ simplex} ⟨α, γ·L⟩ + ‖α‖₂   (DARN, Wen et al. 2020: the best-fitting sources count most)

Example::

    >>> logits, f, d = model(torch.cat([x_s, x_t]), coeff=dann_lambda(p))
    >>> loss = F.cross_entropy(logits[:n_s], y_s) + domain_loss(d, n_s)
    >>> loss = loss + w * mk_mmd(f[:n_s], f[n_s:])                              # f: (2B, D) features
    >>> loss, weights = mdan_loss(ce_per_source, domain_per_source, gamma=10.0)   # both (k,)
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


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear lr warm-up: (step + 1) / N for the first N steps (0-based ``step``), then 1. N = 0: always 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


MMD_ALPHAS = (0.125, 0.25, 0.5, 1.0, 2.0)  # DAN's kernel family as TLlib builds it: σ² = 2^k · mean d², k = −3..1


def mk_mmd(f_s: torch.Tensor, f_t: torch.Tensor, alphas: tuple[float, ...] = MMD_ALPHAS) -> torch.Tensor:
    """Multi-kernel MMD² between source features (n, D) and target features (m, D) → scalar ≥ 0.

    k(a, b) = Σ_α exp(−‖a − b‖² / (2σ_α²)), σ_α² = α · mean_ij ‖z_i − z_j‖² over the pooled batch
    (detached: the bandwidths follow the features' scale but carry no gradient). The biased estimate

        MMD² = mean K(s, s) + mean K(t, t) − 2 · mean K(s, t)

    is a squared distance between the two kernel mean embeddings: 0 when the batches are the same set,
    growing as they move apart. Its gradient reaches G_f (and what comes before), never G_y."""
    n = len(f_s)
    z = torch.cat([f_s, f_t]).float()
    sq = (z * z).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * z @ z.T).clamp_min(0.0)  # no sqrt: finite gradient at d = 0
    base = d2.detach().mean().clamp_min(1e-12)
    k = sum(torch.exp(-d2 / (2.0 * a * base)) for a in alphas)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2.0 * k[:n, n:].mean()


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


def simplex_l2_weights(z: torch.Tensor) -> torch.Tensor:
    """argmin over the simplex of ⟨α, z⟩ + ‖α‖₂ for z (k,) → α (k,), summing to 1 (DARN's weights).

    KKT: α_i ∝ (τ − z_i)_+ with τ set by ‖(τ − z)_+‖₂ = 1, so the sources with the *smallest* z share the
    weight and one whose z exceeds the best by ≥ 1 gets none. Closed form: with the k smallest z in the
    support, τ solves k·τ² − 2·S_k·τ + Q_k − 1 = 0 (S_k, Q_k: their sum and sum of squares); the support is
    the k for which τ_k > z_(k) and (k = n or τ_k ≤ z_(k+1)). No host sync: all k are tried at once."""
    zs, _ = torch.sort(z.detach().float())
    k = torch.arange(1, len(zs) + 1, device=zs.device, dtype=zs.dtype)
    s, q = zs.cumsum(0), (zs * zs).cumsum(0)
    tau = (s + (s * s - k * (q - 1)).clamp_min(0).sqrt()) / k
    nxt = torch.cat([zs[1:], zs.new_full((1,), float("inf"))])
    ok = (s * s - k * (q - 1) >= 0) & (tau > zs) & (tau <= nxt)
    t = tau[torch.argmax(ok.to(zs.dtype) * k)]  # k = 1 is always consistent when nothing larger is
    a = (t - z.detach().float()).clamp_min(0)
    return (a / a.sum()).to(z.dtype)


def mdan_loss(ce: torch.Tensor, dom: torch.Tensor, gamma: float = 10.0, mu: float = 1.0, mode: str = "soft"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """MDAN's objective over k sources from per-source class losses ``ce`` (k,) and domain losses ``dom``
    (k,) → (scalar loss, each source's weight in its gradient (k,), detached, summing to 1).

    ``soft``: (1/γ)·log Σ_i exp(γ·(ce_i + μ·dom_i)); ∂/∂L_i = softmax(γ·L)_i, so the hardest source to
    fit and align counts most (γ → 0: the mean of the L_i plus a constant; γ → ∞: the max). With k = 1
    it is ce + μ·dom, DANN's loss. ``hard``: max_i ce_i + μ·min_i dom_i (the paper's Hard version); the
    weight is the one-hot of the source whose class loss is the max. ``darn`` (Wen et al., "Domain
    Aggregation Networks for Multi-Source Domain Adaptation", ICML 2020, on the same L_i):
    (1/γ)·min_{α ∈ simplex} [⟨α, γ·L⟩ + ‖α‖₂]; its gradient is α (:func:`simplex_l2_weights`, the envelope
    theorem), so the sources that fit and align *best* count most — the opposite of ``soft`` (γ → 0: the
    mean; γ → ∞: the min). With k = 1 it is ce + μ·dom + 1/γ."""
    total = ce + mu * dom
    if mode == "soft":
        return torch.logsumexp(gamma * total, 0) / gamma, torch.softmax(gamma * total.detach(), 0)
    if mode == "hard":
        i = int(torch.argmax(ce.detach()))
        return ce[i] + mu * dom.min(), F.one_hot(torch.tensor(i, device=ce.device), len(ce)).to(ce.dtype)
    if mode == "darn":
        w = simplex_l2_weights(gamma * total)
        return (w * total).sum() + w.norm() / gamma, w
    raise ValueError(f"unknown MDAN mode {mode!r}; choose soft, hard or darn")
