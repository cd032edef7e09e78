"""Label-free validators: scores computed without target labels that rank checkpoints (higher = better).

With target softmax outputs p (n, K), features, and a *labelled source validation set*:

- ``im`` — information maximisation, H(mean p) − mean H(p): confident *and* class-balanced predictions.
- ``entropy`` — −mean H(p): confident predictions (Morerio et al. 2018's entropy criterion).
- ``snd`` — soft neighbourhood density (Saito et al., ICCV 2021): with rows of p L2-normalised to p̂,
  S = p̂ p̂ᵀ with the diagonal left out, P = softmax_row(S / τ), τ = 0.05, score = mean_i H(P_i). A model
  whose target points sit in dense neighbourhoods (clusters) spreads each row of P over many neighbours.
- ``dev`` — deep embedded validation (You et al., ICML 2019): the importance-weighted source validation
  loss, with w(x) = p(target|f(x)) / p(source|f(x)) · n_s/n_t from a logistic domain classifier on the
  features, and a control variate::

      DEV = mean(w·ℓ) + η·mean(w) − η,    η = −Cov(w·ℓ, w) / Var(w)      (score = −DEV; lower risk is better)

  ℓ is the cross-entropy of the source validation images (the source's test split for named datasets).
- ``last`` — no selection: the last step (with ``--ema``, the EMA weights at the last step).

Example::

    >>> snd(np.eye(3)[np.repeat([0, 1, 2], 4)])   # three tight clusters of 4: each row spreads over 3
    1.0986...
"""

from __future__ import annotations

import numpy as np

SND_TAU = 0.05
MAX_N = 2000  # images per validator (SND's similarity matrix is n × n)


def mean_entropy(probs: np.ndarray, eps: float = 1e-8) -> float:
    """mean H(p) over the rows of (n, K) probabilities, in nats; ``entropy`` ranks by its negative."""
    return float(-(probs * np.log(probs + eps)).sum(1).mean())


def snd(probs: np.ndarray, tau: float = SND_TAU, eps: float = 1e-8) -> float:
    p = probs / (np.linalg.norm(probs, axis=1, keepdims=True) + eps)
    s = (p @ p.T) / tau
    np.fill_diagonal(s, -np.inf)
    s -= s.max(1, keepdims=True)
    e = np.exp(s)
    q = e / e.sum(1, keepdims=True)
    return float(-(q * np.log(q + eps)).sum(1).mean())


def dev_risk(f_source: np.ndarray, loss_source: np.ndarray, f_target: np.ndarray, seed: int = 0) -> float:
    """DEV's control-variate estimate of the target risk (lower is better); see the module docstring."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([f_source, f_target]).astype(np.float64)
    y = np.r_[np.zeros(len(f_source)), np.ones(len(f_target))]
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(max_iter=300, C=1.0, random_state=seed).fit(scaler.transform(x), y)
    p_t = clf.predict_proba(scaler.transform(f_source))[:, 1].clip(1e-6, 1 - 1e-6)
    w = p_t / (1 - p_t) * (len(f_source) / len(f_target))
    wl = w * loss_source
    var_w = w.var()
    eta = -np.cov(wl, w)[0, 1] / var_w if var_w > 0 else 0.0
    return float(wl.mean() + eta * w.mean() - eta)


def scores(p_target: np.ndarray, p_source: np.ndarray, y_source: np.ndarray, f_source: np.ndarray,
           f_target: np.ndarray, seed: int = 0) -> dict:
    """SND and DEV on (up to ``MAX_N`` of) the images: {"snd", "dev_risk"} (IM and the entropy are in evaluate)."""
    rng = np.random.default_rng(seed)
    it = rng.permutation(len(p_target))[:MAX_N]
    js = rng.permutation(len(p_source))[:MAX_N]
    loss = -np.log(p_source[js, y_source[js]] + 1e-8)
    return {"snd": snd(p_target[it]), "dev_risk": dev_risk(f_source[js], loss, f_target[it], seed)}


def score(metrics: dict, select: str) -> float:
    """The value ``select`` ranks an evaluation record by (higher is better)."""
    if select == "last":
        return float(metrics["step"])
    if select == "dev":
        return -metrics["dev_risk"]
    if select == "entropy":
        return -metrics["target_entropy"]
    return float(metrics[{"im": "im", "snd": "snd", "target_acc": "target_acc"}[select]])
