"""Evaluation of a DANN model: accuracies, label-free checkpoint score, domain metrics, diagnostics.

- ``target_acc`` / ``source_acc``: top-1 accuracy where labels exist.
- ``domain_acc``: accuracy of the trained G_d telling source from target (balanced sets). ≈ 0.5 means
  G_d is confused — what DANN aims for; ≈ 1.0 means the features still separate the domains.
- ``pad``: proxy A-distance 2(1 − 2ε), ε the held-out error of a *fresh* linear domain classifier on
  frozen features (Ben-David et al. 2007; DANN paper §5): 0 = aligned, 2 = separable.
- ``mmd``: MK-MMD² (:func:`train.dann.mk_mmd`) between up to 1,000 source and 1,000 target features, the
  distance ``--mmd-weight`` minimises; 0 = the same distribution (logged whether or not it is trained on).
- ``im``, ``target_entropy``, ``snd``, ``dev_risk``: label-free validators (:mod:`train.validators`); the
  one ``--select`` names picks ``best.pt`` when the target is unlabelled.
"""

from __future__ import annotations

import numpy as np
import torch

from adaptserve.train import validators
from adaptserve.train.dann import mk_mmd
from adaptserve.train.data import Dataset
from adaptserve.train.models import shipped_domain_logit


class TrainingDiverged(ValueError):
    """The weights became non-finite; a user-fixable setting (lr, λ) — the CLI prints it as one line."""


@torch.no_grad()
def predict(model, images: np.ndarray | torch.Tensor, device: torch.device, batch_size: int = 500):
    """Run ``model`` (a :class:`train.models.DANN`) in eval mode → (probs, features, p_target) as numpy."""
    was_training = model.training
    model.eval()
    probs, feats, dom = [], [], []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[i:i + batch_size])).to(device)  # copy: may be a read-only mmap
        logits, f, d = model(x)
        d = shipped_domain_logit(d)  # G_d's, the discriminator export ships (MDAN's per-source ones aside)
        probs.append(logits.float().softmax(1).cpu())
        feats.append(f.float().cpu())
        dom.append(torch.sigmoid(d.float()).cpu())
    model.train(was_training)
    return torch.cat(probs).numpy(), torch.cat(feats).numpy(), torch.cat(dom).numpy()


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


def information_maximization(probs: np.ndarray, eps: float = 1e-8) -> float:
    mean = probs.mean(0)
    h_mean = -(mean * np.log(mean + eps)).sum()
    mean_h = -(probs * np.log(probs + eps)).sum(1).mean()
    return float(h_mean - mean_h)


def proxy_a_distance(f_source: np.ndarray, f_target: np.ndarray, seed: int = 0, n: int = 1000) -> float:
    """2(1 − 2ε) from a logistic-regression domain classifier trained on half, tested on the other half."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    n = min(n, len(f_source), len(f_target))
    xs = f_source[rng.choice(len(f_source), n, replace=False)]
    xt = f_target[rng.choice(len(f_target), n, replace=False)]
    x = np.concatenate([xs, xt])
    y = np.r_[np.zeros(n), np.ones(n)]
    order = rng.permutation(2 * n)
    x, y = x[order], y[order]
    half = n
    scaler = StandardScaler().fit(x[:half])
    clf = LogisticRegression(max_iter=300, C=1.0).fit(scaler.transform(x[:half]), y[:half])
    err = 1.0 - clf.score(scaler.transform(x[half:]), y[half:])
    return float(2.0 * (1.0 - 2.0 * min(err, 0.5)))


def feature_mmd(f_source: np.ndarray, f_target: np.ndarray, seed: int = 0, n: int = 1000) -> float:
    """MK-MMD² between random subsets of ``n`` source and ``n`` target feature rows."""
    rng = np.random.default_rng(seed)
    pick = lambda f: torch.from_numpy(f[rng.choice(len(f), min(n, len(f)), replace=False)])  # noqa: E731
    return float(mk_mmd(pick(f_source), pick(f_target)))


def _balanced_domain_acc(p_source: np.ndarray, p_target: np.ndarray) -> float:
    n = min(len(p_source), len(p_target))
    return float(((p_source[:n] < 0.5).mean() + (p_target[:n] >= 0.5).mean()) / 2)


def evaluate(model, source: Dataset, target: Dataset, device: torch.device, seed: int = 0,
             parts: dict[str, int] | None = None) -> dict:
    """All eval metrics for ``source`` (labelled) and ``target`` (labels optional). ``parts`` (several
    sources): ``source`` is their images one after another, ``{name: count}`` in that order; adds
    ``per_source: {name: {source_acc, domain_acc}}`` (G_d telling that source from the target)."""
    ps, fs, ds = predict(model, source.images, device)
    pt, ft, dt = predict(model, target.images, device)
    if not all(np.isfinite(a).all() for a in (ps, fs, ds, pt, ft, dt)):
        raise TrainingDiverged("training diverged: the model's outputs are NaN/inf at this evaluation (no "
                               "checkpoint was written from it). Lower --lr, --lambda-max or --gamma and start "
                               "again, or --resume from the last good checkpoints/last.pt with a lower --lr "
                               "in its config.yaml")
    out = {
        "source_acc": accuracy(ps, source.labels),
        "domain_acc": _balanced_domain_acc(ds, dt),
        "im": information_maximization(pt),
        "target_entropy": validators.mean_entropy(pt),
        "pad": proxy_a_distance(fs, ft, seed),
        "mmd": feature_mmd(fs, ft, seed),
        **validators.scores(pt, ps, source.labels, fs, ft, seed),
    }
    if target.labels is not None:
        out["target_acc"] = accuracy(pt, target.labels)
    if parts:
        bounds = np.cumsum([0, *parts.values()])
        out["per_source"] = {name: {"source_acc": accuracy(ps[a:b], source.labels[a:b]),
                                    "domain_acc": _balanced_domain_acc(ds[a:b], dt)}
                             for name, a, b in zip(parts, bounds[:-1], bounds[1:])}
        # every source against the target, each counted once (the first n rows would be the first source's)
        out["domain_acc"] = float(np.mean([v["domain_acc"] for v in out["per_source"].values()]))
    return out


def _best_source_acc(record: dict) -> float:
    """The source accuracy the health checks read: with several sources, the best-learnt one's — a method that
    weights sources (``--mdan-mode darn`` or ``hard``) may leave one unfitted on purpose, and the pooled
    accuracy then falls while the classifier learns; wrong labels or a too-high lr sink every source."""
    per = record.get("per_source")
    return max(p["source_acc"] for p in per.values()) if per else record["source_acc"]


def diagnose(history: list[dict], progress: float, method: str) -> list[tuple[str, str]]:
    """Warnings for the failure modes DANN users report most; returns (key, message) pairs.

    ``history``: the eval records so far (dicts from :func:`evaluate`), oldest first.
    """
    if not history:
        return []
    last = history[-1]
    out = []
    adversarial = method != "source-only"
    if adversarial and progress >= 0.3 and len(history) >= 2 and all(
            h["domain_acc"] >= 0.98 for h in history[-2:]):
        out.append(("domain_stuck_high",
                    f"domain accuracy {last['domain_acc']:.1%} near 100% at p={progress:.2f}: the discriminator "
                    "wins and the features are not aligned. Try a larger --lambda-max (up to 10), a larger --gamma "
                    "so λ reaches full strength sooner, a smaller or dropout-only discriminator, and check the "
                    "GRL sign (the gradient into the features must be −λ times the discriminator's)."))
    # both below wait until p ≥ 0.3: early on nothing has learned yet (the paper CNN at lr 0.01 often
    # needs a few hundred steps), so one low evaluation is not a symptom
    source_acc = _best_source_acc(last)
    if adversarial and progress >= 0.3 and source_acc < 0.5 and all(
            abs(h["domain_acc"] - 0.5) < 0.03 for h in history):
        out.append(("domain_stuck_chance",
                    f"domain accuracy has stayed at chance ({last['domain_acc']:.1%}) since the first evaluation "
                    f"while source accuracy is only {source_acc:.1%}: the features may have collapsed "
                    "(λ too strong too early). Try a smaller --lambda-max, a lower --lr, or a smaller --gamma "
                    "so λ ramps up more slowly."))
    if progress >= 0.3 and len(history) >= 2 and all(_best_source_acc(h) < 0.5 for h in history[-2:]):
        out.append(("source_low",
                    f"source accuracy {source_acc:.1%} at p={progress:.2f}: the classifier is not learning "
                    "the labelled domain. Check the source labels and class folders, try a lower --lr (the recipes "
                    "start from Adam 1e-3 or SGD 0.01–0.1), and a smaller --lambda-max until source accuracy rises."))
    return out
