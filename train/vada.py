"""VADA's extra terms: target conditional entropy and virtual adversarial training (VAT).

Shu et al., "A DIRT-T Approach to Unsupervised Domain Adaptation", ICLR 2018. VADA adds to DANN's loss

    λ_s · L_v(source) + λ_t · (L_c(target) + L_v(target))

- L_c = mean_x H(p(y|x)): conditional entropy on the target, which pushes decision boundaries away from
  dense target regions (the cluster assumption).
- L_v = mean_x KL(p(y|x) ‖ p(y|x + r_adv)) (Miyato et al. 2018): local Lipschitzness where the data is.
  r_adv = radius · ĝ, ĝ the unit gradient w.r.t. r of KL(p(y|x) ‖ p(y|x + r)) at r = ξ·d̂, d̂ a random
  unit direction (one power iteration); p(y|x) is held constant.

Perturbations live in the network's input space *after* the in-graph normalisation (x/255 − mean)/std
(or the per-image one of ``--input-norm instance``), where the reference code's radius 3.5 was set.
The three passes of one VAT term share one dropout mask (the RNG is forked, not advanced) and leave the
BatchNorm running statistics alone (momentum 0), so the perturbed batches do not leak into them.

Example::

    >>> logits, f, d = model(x, coeff=dann_lambda(p))                  # x: B source rows, then B target rows
    >>> extra, terms = vada_loss(model, x, logits, B, source_weight=1.0, target_weight=1e-2)
    >>> loss = dann_loss + extra
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def conditional_entropy(logits: torch.Tensor) -> torch.Tensor:
    """mean_i H(softmax(logits_i)) in nats: 0 for one-hot predictions, ln K for uniform ones."""
    logp = logits.float().log_softmax(1)
    return -(logp.exp() * logp).sum(1).mean()


def _unit(d: torch.Tensor) -> torch.Tensor:
    """Each row (image) scaled to L2 norm 1."""
    return d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (d.dim() - 1)))


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """BatchNorm layers still normalise with the batch's statistics but do not update their running ones."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


def vat_loss(head: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, radius: float = 3.5,
             xi: float = 1e-6, model: nn.Module | None = None) -> torch.Tensor:
    """KL(p(x) ‖ p(x + r_adv)) averaged over the batch; ``x`` (N, C, H, W) normalised images, ``head`` maps
    them to logits. The gradient reaches the network through the perturbed pass only. ``model``: the module
    whose BatchNorm statistics stay frozen during the three passes (default: none frozen)."""
    devices = [x.device] if x.device.type == "cuda" else []
    d = xi * _unit(torch.randn_like(x))  # the one draw that advances the RNG
    frozen = frozen_bn_stats(model) if model is not None else contextlib.nullcontext()

    def same_noise(z):  # every pass sees the dropout mask of the first: the RNG state is restored after each
        with torch.random.fork_rng(devices=devices):
            return head(z).float()

    with frozen:
        with torch.no_grad():
            p = same_noise(x).softmax(1)
        d.requires_grad_(True)
        kl = F.kl_div(same_noise(x.detach() + d).log_softmax(1), p, reduction="batchmean")
        (g,) = torch.autograd.grad(kl, d)
        r_adv = radius * _unit(g.detach())
        return F.kl_div(same_noise(x + r_adv).log_softmax(1), p, reduction="batchmean")


def vada_loss(model, x: torch.Tensor, logits: torch.Tensor, n_source: int, source_weight: float = 1.0,
              target_weight: float = 1e-2, radius: float = 3.5) -> tuple[torch.Tensor, dict]:
    """VADA's additions to DANN's loss for one step's batch ``x`` (uint8, the first ``n_source`` rows source,
    the rest target) whose logits are ``logits``: λ_t·(L_c + L_v)(target) + λ_s·L_v(source) →
    (scalar, {"loss_ent_t", "loss_vat_t"[, "loss_vat_s"]: each term's value})."""
    head = lambda z: model.classifier(model.features(z))  # noqa: E731  normalised images → logits
    xn = model.normalize(x)
    terms = {"loss_ent_t": conditional_entropy(logits[n_source:]),
             "loss_vat_t": vat_loss(head, xn[n_source:], radius, model=model)}
    loss = target_weight * (terms["loss_ent_t"] + terms["loss_vat_t"])
    if source_weight > 0:
        terms["loss_vat_s"] = vat_loss(head, xn[:n_source], radius, model=model)
        loss = loss + source_weight * terms["loss_vat_s"]
    return loss, terms
