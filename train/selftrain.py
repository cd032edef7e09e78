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

Class-adaptive thresholds (``--pseudo-balance``, :class:`ClassThresholds`): one τ for every class starves
the classes the teacher is unsure of on the target — at step 2,500 of a → USPS run the teacher was sure of
21 % of the rows it called 0 and 82 % of those it called 3 (docs/benchmarks.md §11b), so self-training saw
few 0s and learnt to predict fewer. FlexMatch's curriculum (Zhang et al. 2021) lowers a class's threshold
by how little it is learnt; here "learnt" is the share of the teacher's predictions of the class that clear
τ (FlexMatch counts them, which on an imbalanced target like USPS confuses rare with unlearnt)::

    r_c = P(max q ≥ τ | argmax q = c)   (running, over the recent target batches)
    β_c = r_c / max_k r_k,   τ_c = τ · β_c / (2 − β_c)   (FlexMatch's convex map: τ_c = τ for the best class)

Example::

    >>> q = ema.model(x_t, 0.0, None)[0].softmax(1)           # teacher, no grad
    >>> loss_pl, used = pseudo_label_loss(logits_t, q, 0.9)   # used: fraction of rows above τ
    >>> ct = ClassThresholds(10); ct.update(q, 0.9)
    >>> loss_pl, used = pseudo_label_loss(logits_t, q, ct.thresholds(0.9))   # τ_c per row's class
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pseudo_label_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                      threshold: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_pl, fraction of rows with max q ≥ τ)`` for student logits ``(B, K)`` and teacher softmax ``(B, K)``;
    ``threshold``: one τ, or ``(K,)`` — τ_c for a row the teacher calls c."""
    conf, label = teacher_probs.detach().max(1)
    tau = threshold.to(label.device)[label] if isinstance(threshold, torch.Tensor) else threshold
    mask = (conf >= tau).to(student_logits.dtype)
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


class ClassThresholds:
    """Running per-class confidence of the teacher → class-adaptive thresholds τ_c (module docstring).

    ``update(q, τ)`` folds one batch of teacher probabilities ``(B, K)`` into exponential moving averages
    (``momentum`` per step; summed over ranks under DDP) of how many rows the teacher calls c and how many
    of those clear τ. ``thresholds(τ)`` → ``(K,)``; τ for every class until some class has been seen. The
    averages live on the teacher's device (no host sync in the training step); ``state_dict`` /
    ``load_state_dict`` carry them through checkpoints on the CPU (resume is exact)."""

    def __init__(self, num_classes: int, momentum: float = 0.99):
        self.momentum = momentum
        self.predicted = torch.zeros(num_classes, dtype=torch.float64)
        self.confident = torch.zeros(num_classes, dtype=torch.float64)

    @torch.no_grad()
    def update(self, teacher_probs: torch.Tensor, threshold: float) -> None:
        conf, label = teacher_probs.detach().float().max(1)
        k = len(self.predicted)
        counts = torch.stack([torch.bincount(label, minlength=k),
                              torch.bincount(label[conf >= threshold], minlength=k)]).double()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        self.predicted, self.confident = self.predicted.to(counts.device), self.confident.to(counts.device)
        m = self.momentum
        self.predicted.mul_(m).add_(counts[0], alpha=1 - m)
        self.confident.mul_(m).add_(counts[1], alpha=1 - m)

    def thresholds(self, threshold: float) -> torch.Tensor:
        rate = self.confident / self.predicted.clamp_min(1e-12)
        best = rate.max()
        beta = rate / best.clamp_min(1e-12)
        return torch.where(best > 0, threshold * beta / (2 - beta), torch.full_like(rate, threshold)).float()

    def state_dict(self) -> dict:
        return {"predicted": self.predicted.cpu().clone(), "confident": self.confident.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.predicted = state["predicted"].to(self.predicted.device, torch.float64).clone()
        self.confident = state["confident"].to(self.confident.device, torch.float64).clone()
