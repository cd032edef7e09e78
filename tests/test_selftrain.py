"""Self-training on the EMA teacher's confident target pseudo-labels (train/selftrain.py, --pseudo-weight)."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import kill_and_resume
from torch import nn

from adaptserve.train.config import TrainConfig
from adaptserve.train.loop import run
from adaptserve.train.selftrain import ClassThresholds, pseudo_label_loss, teacher_probs


def test_pseudo_label_loss_counts_only_confident_rows_over_the_whole_batch():
    torch.manual_seed(0)
    student = torch.randn(6, 4, requires_grad=True)
    q = torch.tensor([[0.97, 0.01, 0.01, 0.01]] * 2 + [[0.4, 0.3, 0.2, 0.1]] * 4, requires_grad=True)
    loss, used = pseudo_label_loss(student, q, threshold=0.9)
    ce = F.cross_entropy(student[:2], torch.tensor([0, 0]), reduction="sum") / 6  # 2 confident rows, /B
    assert loss.item() == pytest.approx(ce.item()) and used.item() == pytest.approx(2 / 6)
    loss.backward()
    assert student.grad[:2].abs().sum() > 0 and student.grad[2:].abs().sum() == 0
    assert q.grad is None  # the teacher's labels are targets, not trained
    everyone, used0 = pseudo_label_loss(student.detach(), q.detach(), threshold=0.0)
    assert everyone.item() == pytest.approx(F.cross_entropy(student.detach(), q.argmax(1)).item()) and used0 == 1
    nobody, used1 = pseudo_label_loss(student.detach(), q.detach(), threshold=0.99)
    assert nobody.item() == 0 and used1 == 0


def test_class_thresholds_lower_tau_for_a_class_the_teacher_is_unsure_of():
    """Class 0: the teacher is sure of 1 row in 4 it calls 0; class 1: of every row; class 2: never seen.
    r = (0.25, 1, 0) → β = r / max r → τ_c = τ·β/(2 − β): (0.9·0.25/1.75, 0.9, 0)."""
    ct = ClassThresholds(3, momentum=0.5)
    assert torch.equal(ct.thresholds(0.9), torch.full((3,), 0.9))  # nothing seen yet: plain τ
    q = torch.tensor([[0.95, 0.05, 0.0]] + [[0.6, 0.4, 0.0]] * 3 + [[0.02, 0.98, 0.0]] * 2)
    for _ in range(3):  # the rates are ratios of two averages with the same momentum: steady from the start
        ct.update(q, 0.9)
    tau = ct.thresholds(0.9)
    assert torch.allclose(tau, torch.tensor([0.9 * 0.25 / 1.75, 0.9, 0.0]))
    # per-row thresholds: the unsure class's rows at 0.6 now count, the same rows under one τ do not
    student = torch.zeros(6, 3)
    _, used = pseudo_label_loss(student, q, tau)
    _, used_flat = pseudo_label_loss(student, q, 0.9)
    assert used.item() == pytest.approx(1.0) and used_flat.item() == pytest.approx(3 / 6)
    again = ClassThresholds(3)
    again.load_state_dict(ct.state_dict())
    assert torch.equal(again.thresholds(0.9), tau)


def test_teacher_probs_from_the_teacher_in_eval_mode_or_the_students_own_detached_prediction():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).eval()
    wrapped = lambda x, lam, split: (teacher(x), None, None)  # noqa: E731  the model's (logits, f, d) signature
    bn = teacher[2]
    before = bn.running_mean.clone()
    x = torch.randn(5, 3, 2, 2) * 4 + 2
    q = teacher_probs(wrapped, x, torch.zeros(5, 3))
    assert torch.allclose(q, teacher(x).softmax(1)) and not q.requires_grad
    assert torch.equal(bn.running_mean, before)
    own = torch.randn(5, 3, requires_grad=True)
    q_own = teacher_probs(None, x, own)
    assert torch.allclose(q_own, own.softmax(1)) and not q_own.requires_grad


def test_config_refuses_bad_pseudo_label_settings():
    for bad in (dict(pseudo_weight=-1), dict(pseudo_threshold=1.0), dict(pseudo_start=1.5)):
        with pytest.raises(ValueError, match="pseudo"):
            TrainConfig(**bad).validate()


@pytest.mark.slow
def test_the_pseudo_label_term_starts_at_pseudo_start_with_the_ema_teacher(tmp_path):
    """30 steps, on from step 15 (pseudo_start 0.5): the log records before it have no pseudo-label term; after
    it, every row above τ = 0 is used and the loss is positive; the weights differ from the run without it."""
    kw = dict(steps=30, batch_size=32, eval_every=30, log_every=10, threads=1, tsne=False, seed=0, ema=0.99)
    run(TrainConfig(**kw), tmp_path / "base", progress=False)
    run(TrainConfig(**kw, pseudo_weight=1.0, pseudo_threshold=0.0, pseudo_start=0.5), tmp_path / "pl", progress=False)
    trains = [r for r in map(json.loads, (tmp_path / "pl" / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert [r["step"] for r in trains] == [10, 20, 30]
    assert "loss_pseudo" not in trains[0]
    assert all(r["pseudo_used"] == 1.0 and r["loss_pseudo"] > 0 for r in trains[1:])
    from adaptserve.train import checkpoint as ckpt_io

    a, b = (ckpt_io.load(tmp_path / n / "checkpoints" / "last.pt")["model"] for n in ("base", "pl"))
    assert not all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_class_adaptive_self_training_logs_its_lowest_tau_and_resumes_exactly(tmp_path, cli):
    """--pseudo-balance: the lowest τ_c is logged (≤ τ), the running per-class rates are checkpointed, and a
    run killed after its first checkpoint (self-training already on) resumes to the same weights."""
    flags = ["--steps", "60", "--batch-size", "32", "--eval-every", "10", "--log-every", "10", "--threads", "1",
             "--ema", "0.9", "--pseudo-weight", "1", "--pseudo-start", "0.1", "--pseudo-threshold", "0.3",
             "--pseudo-balance", "--eval-samples", "300", "--no-tsne", "--no-progress"]
    a, b = kill_and_resume(cli, flags, tmp_path, 60)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["pseudo_classes"]["predicted"].sum() > 0
    trains = [r for r in map(json.loads, (tmp_path / "full" / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert all(0 <= r["pseudo_tau_min"] < 0.3 for r in trains[1:])  # some class is less sure than the best
