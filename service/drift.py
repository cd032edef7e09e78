"""Drift tests: a window of live model outputs against the export-time reference — numpy + scipy only.

Export (``export/reference.py``) computes the reference from held-out target images that training never
saw and calibrates the thresholds; the service and the batch scorer run :class:`DriftReference.check`
on windows of ``W`` images. Three tests, each comparing a window ``x_1..x_m`` (``m = W``) with the
reference pool ``y_1..y_n``:

1. **Discriminator KS** — two-sample Kolmogorov–Smirnov on the domain discriminator's scores
   ``p_target = σ(G_d(f, p))``::

       D = sup_t |F_ref(t) − F_win(t)|,   p-value as ``scipy.stats.ks_2samp`` gives it (two-sided; exact
       distribution for samples up to 10,000, asymptotic above) — see :func:`ks_columns` for how it is
       computed fast against a reference sorted once.

   A DANN discriminator is trained to be confused between source and target, so this is a weak detector
   on its own; it is cheap and reads directly as "the inputs look less like the target".

2. **BBSD** (black-box shift detection, Lipton et al. 2018; Rabanser et al. 2019) — one KS test per class
   on the softmax outputs ``p_k``, combined with **Bonferroni**::

       p = min(1, K · min_k p_k)

   Rejecting when ``p < a`` keeps the family-wise false-alarm rate of the K tests at most ``a``.

3. **MMD** — squared maximum mean discrepancy between the window's and the reference's features, projected
   on the top principal components of the reference features (``z = (f − μ) Vᵀ``), with the RBF kernel
   ``k(a, b) = exp(−‖a − b‖² / (2σ²))`` and σ the median pairwise distance within the reference
   (median heuristic). The unbiased estimator (Gretton et al. 2012, eq. 3)::

       MMD²_u = 1/(m(m−1)) Σ_{i≠j} k(x_i, x_j) + 1/(n(n−1)) Σ_{i≠j} k(y_i, y_j) − 2/(mn) Σ_{i,j} k(x_i, y_j)

   It has no simple closed-form null distribution at this size, so export bootstraps windows from a
   calibration pool (in-distribution, disjoint from the reference) and stores the null statistics: the
   alarm threshold is their ``(1 − α/3)`` quantile and the p-value is ``(1 + #{null ≥ stat}) / (1 + B)``.

``α`` (default 0.01) is the overall false-alarm rate of a window: each of the three tests runs at
``α/3`` (Bonferroni across tests), so "drift" (any test alarms) has a false-alarm rate of at most ``α``.
The export records each test's empirical false-alarm rate on the bootstrap windows, and that of "any".
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# scipy is imported where it is used, not here: ``scipy.stats`` and ``scipy.spatial`` take ≈ 0.5 s to import,
# and ``bentoml serve`` imports the service twice (its CLI, then the worker) — ≈ 1 s of a 3-s cold start. A
# service whose reference carries the KS p-value table (every export makes one) never needs scipy to check.

TESTS = ("ks_discriminator", "ks_softmax_bonferroni", "mmd_pca")


_BLAS = None  # threadpoolctl's controller of the loaded BLAS libraries, made on first use (≈ 10 ms)


@contextlib.contextmanager
def one_blas_thread():
    """Limit BLAS (numpy's OpenBLAS, or MKL) to one thread inside the block; a no-op without threadpoolctl.

    Drift checks run beside ONNX Runtime's threads (on a worker thread in the scorer and the service). Their
    matrix products are small, and a multi-threaded BLAS's workers spin-wait for the cores ORT is using:
    the scorer ran at 0.52× a raw ORT loop with BLAS's default threads and 0.80× with one
    (docs/benchmarks.md §7). The limit is process-wide while it lasts; nothing else on the serving path
    uses BLAS.
    """
    global _BLAS
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        yield
        return
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    with _BLAS.limit(limits=1, user_api="blas"):
        yield


_KS_P: dict[tuple[int, int, int], float] = {}  # (n, m, D·lcm(n, m)) → ks_2samp's two-sided p-value
_KS_P_MAX = 100_000  # cap on values memoised on the fly (a seeded table always goes in whole)


def ks_columns(reference_sorted: np.ndarray, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sample KS test of every column: ``reference_sorted`` (n, K) with each column ascending, ``window``
    (m, K) → (D per column, p per column); the same numbers as ``scipy.stats.ks_2samp`` column by column.

    F_win only moves at window values and F_ref never decreases, so ``D = sup_t |F_ref(t) − F_win(t)|`` is
    reached at a window value x, at x or just below it::

        D = max_x max(|F_ref(x) − F_win(x)|, |F_ref(x⁻) − F_win(x⁻)|)

    — ``O(m log n)`` per column with binary searches into the reference, sorted once (scipy sorts and
    searches both samples on every call, 5–10× slower here). The two-sided p-value depends only on
    ``(n, m, D)``, and ``D`` is a multiple of ``1/lcm(n, m)``: each distinct value is computed once with
    ``ks_2samp`` (exact for n, m ≤ 10,000 — the costly part) and memoised.
    """
    ref = np.asarray(reference_sorted, np.float64)
    win = np.sort(np.asarray(window, np.float64), axis=0)
    if ref.ndim != 2 or win.ndim != 2 or ref.shape[1] != win.shape[1] or not len(ref) or not len(win):
        raise ValueError(f"KS needs non-empty (n, K) and (m, K) samples with the same K; "
                         f"got {ref.shape} and {win.shape}")
    n, m = len(ref), len(win)
    lcm = math.lcm(n, m)
    stats, pvals = np.empty(ref.shape[1]), np.empty(ref.shape[1])
    for k in range(ref.shape[1]):
        r, w = ref[:, k], win[:, k]
        d = max(np.abs(np.searchsorted(r, w, "right") / n - np.searchsorted(w, w, "right") / m).max(),
                np.abs(np.searchsorted(r, w, "left") / n - np.searchsorted(w, w, "left") / m).max())
        key = (n, m, round(d * lcm))
        p = _KS_P.get(key)
        if p is None:
            from scipy.stats import ks_2samp

            res = ks_2samp(r, w)
            d, p = float(res.statistic), float(res.pvalue)
            if len(_KS_P) < _KS_P_MAX:
                _KS_P[(n, m, round(d * lcm))] = p
        stats[k], pvals[k] = d, p
    return stats, pvals


KS_TABLE_MAX = 20_000  # largest lcm(n, m) for which a table of every p-value is worth building


def ks_pvalue_table(n: int, m: int) -> np.ndarray | None:
    """The two-sided p-value ``ks_2samp`` gives samples of sizes ``n`` and ``m`` (first, second) for every
    possible statistic ``D = h / lcm(n, m)``, ``h = 0 … lcm`` — or ``None`` when lcm > ``KS_TABLE_MAX`` or
    scipy's exact routine is not there. NaN where the exact computation fails (ks_2samp falls back to its
    asymptotic formula there, and so does :func:`ks_columns`).

    Built once at export (≈ 2–4 s for 2,000 × 200) and stored with the drift reference, it takes the exact
    p-values off the checks' path: without it the first few hundred windows each pay ≈ 1 ms per new ``D``.
    """
    lcm = math.lcm(n, m)
    if lcm > KS_TABLE_MAX:
        return None
    try:  # the routine ks_2samp itself calls; private, so guarded
        from scipy.stats._stats_py import _attempt_exact_2kssamp
    except ImportError:
        return None
    g = math.gcd(n, m)
    table = np.full(lcm + 1, np.nan)
    with np.errstate(all="ignore"):
        for h in range(lcm + 1):
            ok, _, p = _attempt_exact_2kssamp(n, m, g, h / lcm, "two-sided")
            if ok:
                table[h] = min(max(float(p), 0.0), 1.0)
    return table


def seed_ks_pvalues(n: int, m: int, table: np.ndarray) -> None:
    """Fill :func:`ks_columns`' memo with a :func:`ks_pvalue_table` for sizes ``(n, m)``."""
    if len(table) != math.lcm(n, m) + 1:
        raise ValueError(f"a KS p-value table for sizes {n} and {m} has {math.lcm(n, m) + 1} entries, "
                         f"not {len(table)}")
    _KS_P.update({(n, m, h): float(p) for h, p in enumerate(table) if np.isfinite(p)})


def ks_test(reference: np.ndarray, window: np.ndarray) -> tuple[float, float]:
    """Two-sample KS test: ``(D, p)`` with ``D = sup_t |F_ref(t) − F_win(t)|`` (1-D arrays)."""
    ref = np.sort(np.asarray(reference, np.float64).ravel())
    d, p = ks_columns(ref[:, None], np.asarray(window, np.float64).reshape(-1, 1))
    return float(d[0]), float(p[0])


def bonferroni(pvalues) -> float:
    """Family-wise p-value of K tests: ``min(1, K · min_k p_k)``."""
    p = np.asarray(pvalues, np.float64).ravel()
    return float(min(1.0, p.size * p.min())) if p.size else 1.0


def ks_per_class(reference: np.ndarray, window: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """KS on every column (class) of ``(N, K)`` softmax outputs → (D per class, p per class, Bonferroni p)."""
    reference, window = np.asarray(reference, np.float64), np.asarray(window, np.float64)
    if reference.ndim != 2 or window.ndim != 2 or reference.shape[1] != window.shape[1]:
        raise ValueError(f"softmax outputs must be (N, K) with the same K; got {reference.shape} and {window.shape}")
    stats, pvals = ks_columns(np.sort(reference, axis=0), window)
    return stats, pvals, bonferroni(pvals)


def sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances ``‖a_i − b_j‖²`` (float64, scipy's ``cdist``)."""
    from scipy.spatial.distance import cdist

    return cdist(np.asarray(a, np.float64), np.asarray(b, np.float64), "sqeuclidean")


def rbf_kernel(a: np.ndarray, b: np.ndarray, bandwidth: float) -> np.ndarray:
    """``k(a_i, b_j) = exp(−‖a_i − b_j‖² / (2σ²))`` with ``σ = bandwidth``, as float32 (sum it with
    :func:`kernel_sum`).

    In float32 via ``γ = 1/(2σ²)``: ``2γ·a bᵀ − γ‖b‖² − γ‖a‖²``, clipped at 0 (rounding can leave tiny
    positives for (near-)identical points), then ``exp`` — one small matmul and four passes over the
    matrix (k within 5e-7 of the float64 kernel, MMD² within 2e-5 relative, measured). For a window of
    200 against 2,000 reference points in 10 dimensions this is the largest part of a drift check
    (1.3–1.7 ms measured, against 2.8 ms for float64 ``cdist`` + ``exp``; ``exp`` is most of it).
    """
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    gamma = np.float32(0.5 / bandwidth ** 2)
    k = a @ (b.T * (2 * gamma))
    k -= gamma * np.einsum("ij,ij->i", b, b)[None, :]
    k -= gamma * np.einsum("ij,ij->i", a, a)[:, None]
    np.minimum(k, np.float32(0), out=k)
    return np.exp(k, out=k)


def kernel_sum(k: np.ndarray) -> float:
    """Σ k_ij of a float32 kernel matrix: rows summed in float32 (pairwise summation), the row sums in
    float64 — as accurate as a float64 sum here and half its cost."""
    return float(k.sum(1).sum(dtype=np.float64))


def median_heuristic(x: np.ndarray, max_n: int = 1000, seed: int = 0) -> float:
    """σ = median of the pairwise distances ``‖x_i − x_j‖`` (i < j) of up to ``max_n`` rows of ``x``."""
    x = np.asarray(x, np.float64)
    if len(x) > max_n:
        x = x[np.random.default_rng(seed).choice(len(x), max_n, replace=False)]
    d = np.sqrt(sq_distances(x, x)[np.triu_indices(len(x), 1)])
    med = float(np.median(d)) if d.size else 0.0
    return med if med > 0 else 1.0  # constant features: any positive σ gives MMD² = 0


def offdiag_mean(k: np.ndarray) -> float:
    """Mean of the off-diagonal entries of a square kernel matrix: 1/(n(n−1)) Σ_{i≠j} k_ij."""
    n = k.shape[0]
    return float((kernel_sum(k) - np.trace(k, dtype=np.float64)) / (n * (n - 1)))


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, bandwidth: float, yy_term: float | None = None) -> float:
    """Unbiased MMD² between samples ``x`` (m, d) and ``y`` (n, d), RBF kernel; see the module doc.

    ``yy_term`` — the reference's ``1/(n(n−1)) Σ_{i≠j} k(y_i, y_j)`` — can be passed precomputed
    (it does not depend on the window).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("MMD² needs at least 2 samples on each side")
    if yy_term is None:
        yy_term = offdiag_mean(rbf_kernel(y, y, bandwidth))
    xy_term = kernel_sum(rbf_kernel(x, y, bandwidth)) / (len(x) * len(y))
    return offdiag_mean(rbf_kernel(x, x, bandwidth)) + yy_term - 2.0 * xy_term


def empirical_p(null: np.ndarray, stat: float) -> float:
    """Bootstrap p-value ``(1 + #{null ≥ stat}) / (1 + B)`` (never 0)."""
    null = np.asarray(null)
    return float((1 + np.count_nonzero(null >= stat)) / (1 + null.size))


@dataclass
class DriftReference:
    """The arrays of ``drift_reference.npz`` (written by ``adaptserve export``) and the tests on a window."""

    p_target: np.ndarray          # (n,) reference discriminator scores P(target)
    probabilities: np.ndarray     # (n, K) reference softmax outputs
    pca_mean: np.ndarray          # (D,) mean of the reference features
    pca_components: np.ndarray    # (k, D) top-k principal directions of the reference features
    projections: np.ndarray       # (n, k) reference features projected
    bandwidth: float              # RBF σ (median heuristic on the reference projections)
    window: int                   # W: the window size the thresholds are calibrated for
    alpha: float                  # overall false-alarm rate of a window (any test)
    alpha_per_test: float         # α / number of tests
    mmd2_threshold: float         # (1 − α/3) quantile of the bootstrap null MMD²
    null_mmd2: np.ndarray         # (B,) bootstrap null MMD² statistics
    null_p_discriminator: np.ndarray  # (B,) bootstrap null KS p-values, discriminator
    null_p_softmax: np.ndarray    # (B,) bootstrap null Bonferroni p-values, softmax

    mmd_yy: float | None = None   # the reference's within-sample MMD term (computed on first use if absent)
    ks_p_table: np.ndarray | None = None  # ks_pvalue_table(n, window) (exact p-values; absent in old exports)
    ks_p_threshold_discriminator: float | None = None  # KS alarm levels ≤ α/3 from the calibration windows
    ks_p_threshold_softmax: float | None = None        # (absent in old exports: α/3)
    _ks_sorted: np.ndarray = field(default=None, repr=False)  # (n, 1 + K): [p_target, probabilities], sorted
    _pca32: tuple | None = field(default=None, repr=False)     # (mean, componentsᵀ) as float32

    def __post_init__(self):
        # the reference side of every KS test, sorted once: a check only sorts and searches the window
        self._ks_sorted = np.sort(np.column_stack([np.asarray(self.p_target, np.float64),
                                                   np.asarray(self.probabilities, np.float64)]), axis=0)
        if self.ks_p_table is not None:
            seed_ks_pvalues(len(self.p_target), self.window, self.ks_p_table)

    @classmethod
    def load(cls, path: str | Path) -> "DriftReference":
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        return cls(p_target=a["ref_p_target"], probabilities=a["ref_probabilities"], pca_mean=a["pca_mean"],
                   pca_components=a["pca_components"], projections=a["ref_projections"],
                   bandwidth=float(a["mmd_bandwidth"]), window=int(a["window"]), alpha=float(a["alpha"]),
                   alpha_per_test=float(a["alpha_per_test"]),
                   mmd2_threshold=float(a["mmd2_threshold"]), null_mmd2=a["null_mmd2"],
                   null_p_discriminator=a["null_p_discriminator"], null_p_softmax=a["null_p_softmax"],
                   mmd_yy=float(a["mmd_yy"]) if "mmd_yy" in a else None, ks_p_table=a.get("ks_p_table"),
                   **{k: float(a[k]) for k in ("ks_p_threshold_discriminator", "ks_p_threshold_softmax") if k in a})

    def project(self, features: np.ndarray) -> np.ndarray:
        """PCA projection ``(f − μ) Vᵀ`` of features (N, D) → (N, k), in float32 like the features themselves
        (0.2 ms for 200 × 1,200 → 10, against 3–4 ms in float64)."""
        if self._pca32 is None:
            self._pca32 = (self.pca_mean.astype(np.float32), np.ascontiguousarray(self.pca_components.T, np.float32))
        mean, components = self._pca32
        return (np.asarray(features, np.float32) - mean) @ components

    def mmd2(self, features: np.ndarray, projected: bool = False) -> float:
        """MMD² of a window's features (N, D) — or of features already projected (N, k) — and the reference."""
        if self.mmd_yy is None:
            self.mmd_yy = offdiag_mean(rbf_kernel(self.projections, self.projections, self.bandwidth))
        x = np.asarray(features, np.float32) if projected else self.project(features)
        return mmd2_unbiased(x, self.projections, self.bandwidth, self.mmd_yy)

    def check(self, p_target: np.ndarray, probabilities: np.ndarray, features: np.ndarray,
              projected: bool = False) -> dict:
        """Run the three tests on one window of exactly ``W`` images; returns per-test results and ``drift``.

        Each entry has ``statistic``, ``p_value``, ``threshold`` and ``alarm`` (KS: p < its calibrated level
        ≤ α/3; MMD: MMD² > its threshold); ``drift`` is true when any test alarms. Effect sizes: the shift
        of the mean discriminator score and the largest per-class KS distance.
        """
        n = len(p_target)
        if not (n == len(probabilities) == len(features)):
            raise ValueError("p_target, probabilities and features must hold the same number of images")
        if n != self.window:
            raise ValueError(f"the thresholds are calibrated for windows of {self.window} images, got {n}")
        with one_blas_thread():
            return self._check(p_target, probabilities, features, projected)

    def _check(self, p_target, probabilities, features, projected: bool = False) -> dict:
        stats, pvals = ks_columns(self._ks_sorted, np.column_stack([np.asarray(p_target, np.float64),
                                                                    np.asarray(probabilities, np.float64)]))
        d_stat, d_p = float(stats[0]), float(pvals[0])
        c_stats, c_p, c_bonf = stats[1:], pvals[1:], bonferroni(pvals[1:])
        m = self.mmd2(features, projected)
        t_d = self.alpha_per_test if self.ks_p_threshold_discriminator is None else self.ks_p_threshold_discriminator
        t_c = self.alpha_per_test if self.ks_p_threshold_softmax is None else self.ks_p_threshold_softmax
        out = {
            "ks_discriminator": {"statistic": d_stat, "p_value": d_p, "threshold": t_d, "alarm": d_p < t_d,
                                 "mean_p_target_shift": float(np.mean(p_target) - np.mean(self.p_target))},
            "ks_softmax_bonferroni": {"statistic": float(c_stats.max()), "p_value": c_bonf, "threshold": t_c,
                                      "alarm": c_bonf < t_c, "class": int(np.argmin(c_p))},
            "mmd_pca": {"statistic": m, "p_value": empirical_p(self.null_mmd2, m),
                        "threshold": self.mmd2_threshold, "alarm": m > self.mmd2_threshold},
        }
        out["drift"] = any(v["alarm"] for v in out.values())
        return out

    def tests(self, result: dict) -> list[dict]:
        """:meth:`check`'s result as the one list every consumer shows (service ``/drift``, ``/metrics``,
        the scorer's report): per test name, statistic, p-value, threshold and verdict.

        The KS tests alarm when ``p_value < threshold`` (calibrated, ≤ α/3); the MMD test when
        ``statistic > threshold`` (the calibrated MMD² quantile) — ``threshold_on`` says which. Effect sizes
        beside the statistic: ``mean_p_target_shift`` (discriminator KS: window mean of P(target) minus the
        reference's) and ``class_index`` (softmax KS: the class whose KS p-value is smallest).
        """
        out = []
        for name in TESTS:
            r = result[name]
            entry = {"name": name, "statistic": float(r["statistic"]), "p_value": float(r["p_value"]),
                     "threshold": float(r.get("threshold", self.alpha_per_test)),
                     "threshold_on": "statistic" if name == "mmd_pca" else "p_value", "is_drift": bool(r["alarm"])}
            if "mean_p_target_shift" in r:
                entry["mean_p_target_shift"] = float(r["mean_p_target_shift"])
            if "class" in r:
                entry["class_index"] = int(r["class"])
            out.append(entry)
        return out


class WindowBuffer:
    """Per-image drift inputs (P(target), softmax, features) cut into consecutive windows of exactly W.

        buf = WindowBuffer(200)
        for w in buf.add(p_target, probabilities, features):   # 0 or more full windows
            ref.check(*w)
        buf.n                                                   # images waiting in the unfinished window

    The live monitor (:mod:`service.monitor`) and the batch scorer (:mod:`service.score`) both cut their
    windows here, so a stream of images forms the same windows in either."""

    def __init__(self, window: int):
        self.window = window
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.n = 0

    def add(self, p_target, probabilities, features) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        self._parts.append((np.asarray(p_target, np.float32), np.asarray(probabilities, np.float32),
                            np.asarray(features, np.float32)))
        self.n += len(p_target)
        if self.n < self.window:
            return []
        cols = [np.concatenate(c) for c in zip(*self._parts)]
        full = self.n // self.window * self.window
        windows = [tuple(c[i:i + self.window] for c in cols) for i in range(0, full, self.window)]
        rest = tuple(c[full:] for c in cols)
        self._parts, self.n = ([rest] if len(rest[0]) else []), self.n - full
        return windows
