"""Self-training on confident target pseudo-labels from a teacher (the EMA weights): a refinement term.

For the B target rows of a step, a teacher with softmax ``q`` (the EMA model in eval mode, no gradient)
labels each image ``ŷ = argmax q``; the rows it is sure of (``max q ≥ τ``) train the student like labelled
ones::

    L_pl = 1/B · Σ_j 1[max_k q_jk ≥ τ] · CE(student logits_j, ŷ_j)

averaged over all B rows (FixMatch's normalisation: a batch with few confident rows pulls little). It
starts at ``pseudo_start`` (fraction of the steps, after DANN has aligned the domains: pseudo-labels from an
unadapted model teach its mistakes) and is added as ``w · L_pl``. The EMA teacher is a mean teacher
(Tarvainen & Valpola 2017; French et al. 2018 use it for domain adaptation): an average of the last
≈ 1/(1 − decay) students, more accurate than any one of them and slow to follow the student's own errors.
No target label is used anywhere.

Example::

    >>> q = ema.model(x_t, 0.0, None)[0].softmax(1)           # teacher, no grad
    >>> loss_pl, used = pseudo_label_loss(logits_t, q, 0.9)   # used: fraction of rows above τ
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pseudo_label_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, threshold: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_pl, fraction of rows with max q ≥ τ)`` for student logits ``(B, K)`` and teacher softmax ``(B, K)``."""
    conf, label = teacher_probs.detach().max(1)
    mask = (conf >= threshold).to(student_logits.dtype)
    ce = F.cross_entropy(student_logits, label, reduction="none")
    return (ce * mask).sum() / max(len(ce), 1), mask.mean()


@torch.no_grad()
def teacher_probs(teacher: torch.nn.Module | None, x_target: torch.Tensor, student_logits: torch.Tensor
                  ) -> torch.Tensor:
    """The teacher's softmax on the target rows: ``teacher`` (the EMA model, kept in eval mode) or, without
    one, the student's own detached prediction (plain self-training)."""
    if teacher is None:
        return student_logits.detach().float().softmax(1)
    return teacher(x_target, 0.0, None)[0].float().softmax(1)
