"""An exponential moving average (EMA) of the weights, and BatchNorm statistics recomputed for it.

After every optimiser step t (counting from 1)::

    θ_ema ← δ_t θ_ema + (1 − δ_t) θ,      δ_t = min(decay, (1 + t) / (10 + t))

The warm-up (TensorFlow's ``ExponentialMovingAverage(num_updates=t)``) keeps the average short early on:
δ is 0.5 at t = 8, 0.9 at t = 80, 0.99 at t ≈ 900, so a 1,200-step run averages ≈ its last 130 steps and
a long run its last ``1/(1 − decay)``. Only floating-point parameters are averaged. BatchNorm running
statistics are not: the mean and variance that fit an average of weights are not the average of the
running statistics, so :func:`refresh_bn` recomputes them for the EMA weights from training batches
(as ``torch.optim.swa_utils.update_bn`` does for SWA), before every evaluation and checkpoint.

Example::

    >>> ema = EMA(model, decay=0.999)
    >>> for x in batches: loss(model(x)).backward(); opt.step(); ema.update(model)
    >>> refresh_bn(ema.model, batches_of_uint8_images)   # then evaluate / save ema.model
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn


class EMA:
    """Holds ``model``'s moving average as a second module (``self.model``, always in eval mode)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def rate(self, t: int) -> float:
        """δ_t, the weight of the old average after update ``t`` (1-based)."""
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.rate(self.updates)
        ema_p = [p for p in self.model.parameters() if p.dtype.is_floating_point]
        new_p = [p.detach() for p in model.parameters() if p.dtype.is_floating_point]
        torch._foreach_lerp_(ema_p, new_p, 1.0 - d)  # θ_ema + (1 − δ)(θ − θ_ema)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


@torch.no_grad()
def refresh_bn(model: nn.Module, batches: Iterable, forward: Callable[[nn.Module, object], object] | None = None
               ) -> int:
    """Recompute every BatchNorm's running mean/var as the plain average over ``batches`` (train-mode
    forwards, no gradients); other modules keep their state and the model goes back to its mode.
    ``forward(model, batch)`` runs one batch (default ``model(batch)``). Returns the number of BN layers."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    was_training = model.training
    model.train()
    try:
        for batch in batches:
            (forward or (lambda mdl, b: mdl(b)))(model, batch)
    finally:
        for m in bns:
            m.momentum = momenta[m]
        model.train(was_training)
    return len(bns)
