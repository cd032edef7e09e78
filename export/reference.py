"""The drift reference: held-out target images → reference statistics and calibrated null thresholds.

Which images: by default the held-out part of the run's target (``train.data.holdout_split`` with the
run's ``target_holdout``) — never trained on, never used by training's evaluation (that uses the target's
test split, or for folder/npz targets the training part). ``--reference SPEC`` replaces it with any
dataset spec.

How they are used (numpy only; the statistics themselves are in :mod:`service.drift`):

- a fixed seeded permutation splits them into a **reference pool** — 2,000 images when at least 4,000
  are held out, otherwise half — and a **calibration pool** (the rest, never smaller than the reference);
- the reference pool's discriminator scores, softmax outputs and PCA-projected features are stored (with
  the MMD's reference-only term, so the service does not recompute it); the PCA basis (mean + top
  ``PCA_DIMS`` components, numpy SVD) is fitted on the reference features;
- ``B`` **calibration windows** of ``W = min(200, n_cal)`` images — ``n_cal`` the calibration pool's
  independent draws: its images, or its groups of near-copies — are drawn by a two-stage (pool) bootstrap:
  first a resampled pool (``n_cal`` groups drawn with replacement), then W images drawn with replacement
  from it. Each test's statistic is computed against the reference. ``α`` is the overall false-alarm rate
  of a window, each of the three tests runs at ``a = α/3``: the MMD² alarm threshold is the ``(1 − a)``
  quantile of these null statistics; the KS tests alarm at ``p < min(a, q_a)``, ``q_a`` the ``a`` quantile
  of their null p-values — the exact KS level where the images are independent draws, lower where they are
  not (the demo's augmented copies of one digit make the reference a clustered sample, and its exact
  p-values too small). The empirical false-alarm rates of each test and of "any test" are recorded.
  Duplicated images inside a window are left out of the window's within-sample MMD term (pairs of the
  same image would add k(x, x) = 1).

Why two stages: every live window is compared with thresholds that came from *one* finite calibration
pool, whose own sampling error all calibration windows share. Windows drawn straight from the pool (with
or without replacement) miss that error, so their null is too narrow once W is a sizeable part of the
pool: up to session 5 (W = min(200, pool), one-stage bootstrap) a 1,000-image target (50 + 50 held out)
alarmed on 1.8 % of in-distribution windows on average but on 7 % with its worst split, and the demo (W =
200 from 215 calibration digits, windows of distinct images) on 4.5 %. Resampling the pool first adds
that error to the null (the variance of a window mean becomes σ²(1/W + 1/n) instead of σ²/W). Measured in
docs/benchmarks.md §9: at most 2 % of in-distribution windows alarm with any split tried, at every pool
size from 100 to 5,900 held-out images. When the pool allows no window of at least ``MIN_WINDOW``
images, export still writes the reference and says so (``warnings`` in the manifest and on the command
line): the tests then miss all but large shifts.
"""

from __future__ import annotations

import numpy as np

from adaptserve.service import drift

WINDOW, ALPHA, N_BOOTSTRAP, PCA_DIMS, SEED = 200, 0.01, 1000, 10, 0
MIN_WINDOW = 50  # below this the export warns: too few held-out images for useful drift tests
REFERENCE_MAX = 2000
MIN_IMAGES = 256  # parity needs 256 real images; below that the drift split is not meaningful either


def reference_images(meta: dict, input_spec, spec: str | None, data_root=None
                     ) -> tuple[str, np.ndarray, np.ndarray | None]:
    """Return (description, uint8 images in ``input_spec``, groups or None) of the reference; raise ValueError
    if unusable. ``groups`` labels near-copies (the demo's augmented copies of one digit) that must stay on
    one side of the reference / calibration split."""
    from adaptserve.train.data import DataError, holdout_split, load

    if spec:
        data = load(spec, input_spec, data_root=data_root, classes=meta["classes"], labels_optional=True)
        desc, images, groups = spec, data.images, data.groups
    else:
        frac = float(meta.get("target_holdout") or 0.0)
        if frac <= 0:
            raise DataError("the run kept no held-out target images (--target-holdout 0); "
                            "pass --reference SPEC with in-distribution target images")
        pool = load(meta["target"], input_spec, data_root=data_root, classes=meta["classes"], labels_optional=True)
        _, held = holdout_split(len(pool), frac, groups=pool.groups)
        desc, images = f"{meta['target']} (held-out {frac:g}: {len(held)} of {len(pool)})", pool.images[held]
        groups = pool.groups[held] if pool.groups is not None else None
    if len(images) < MIN_IMAGES:
        raise DataError(f"reference {desc} has {len(images)} images; export needs at least {MIN_IMAGES} "
                        "in-distribution target images (parity check and drift calibration) — pass "
                        "--reference SPEC with more, or train with a larger --target-holdout")
    return desc, np.ascontiguousarray(images), groups


def split_pools(n: int, seed: int = SEED, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices (reference, calibration): 2,000 reference images if ``n ≥ 4000``, otherwise ``n // 2``.

    With ``groups``, whole groups go to one side (so about that many): near-copies split across the two
    pools would make calibration windows look closer to the reference than new data ever is, and the MMD
    threshold too low — on the demo pair 4 of 10 in-distribution windows alarmed that way."""
    n_ref = REFERENCE_MAX if n >= 2 * REFERENCE_MAX else n // 2
    rng = np.random.default_rng(seed)
    if groups is None:
        perm = rng.permutation(n)
        return np.sort(perm[:n_ref]), np.sort(perm[n_ref:])
    ids, sizes = np.unique(groups, return_counts=True)
    order = rng.permutation(len(ids))
    ref_ids = ids[order][: int(np.searchsorted(np.cumsum(sizes[order]), n_ref, side="right"))]
    in_ref = np.isin(groups, ref_ids)
    return np.flatnonzero(in_ref), np.flatnonzero(~in_ref)


def fit_pca(features: np.ndarray, dims: int = PCA_DIMS) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), components (k, D)) of ``features`` by SVD of the centred matrix; k = min(dims, D, n−1)."""
    f = np.asarray(features, np.float64)
    mean = f.mean(0)
    _, _, vt = np.linalg.svd(f - mean, full_matrices=False)
    k = max(1, min(dims, f.shape[1], len(f) - 1))
    return mean, vt[:k]


def pool_bootstrap(n_cal: int, window: int, rng, groups: np.ndarray | None = None):
    """Index arrays of calibration windows, endlessly: a resampled calibration pool (``n_cal`` images, or
    its groups of near-copies, drawn with replacement), then ``window`` images drawn with replacement from
    it — see the module docstring."""
    members = None
    if groups is not None:
        _, inverse = np.unique(groups, return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    while True:
        if members is None:
            pool = rng.integers(0, n_cal, n_cal)
        else:
            pool = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        yield pool[rng.integers(0, len(pool), window)]


def calibrate(ref: dict, cal: dict, window: int, alpha: float = ALPHA, n_bootstrap: int = N_BOOTSTRAP,
              seed: int = SEED, groups: np.ndarray | None = None) -> dict:
    """Null distributions of the three statistics from ``n_bootstrap`` pool-bootstrap windows of ``window``
    calibration images (``groups``: near-copies resampled together).

    ``ref`` / ``cal``: dicts with ``p_target`` (n,), ``probabilities`` (n, K), ``projections`` (n, k).
    ``alpha`` is overall; each test runs at ``alpha / 3``. Returns the null arrays, the MMD² threshold,
    the KS p-value thresholds, the bandwidth and the empirical false-alarm rates.
    """
    a = alpha / len(drift.TESTS)
    n_cal = len(cal["p_target"])
    if window > n_cal or window < 2:
        raise ValueError(f"window {window} does not fit a calibration pool of {n_cal}")
    rng = np.random.default_rng(seed)
    ks_table = drift.ks_pvalue_table(len(ref["p_target"]), window)
    if ks_table is not None:
        drift.seed_ks_pvalues(len(ref["p_target"]), window, ks_table)  # the bootstrap below uses it too
    with drift.one_blas_thread():  # ~1,000 small products: BLAS threads cost more than they save
        bandwidth = drift.median_heuristic(ref["projections"], seed=seed)
        yy = drift.offdiag_mean(drift.rbf_kernel(ref["projections"], ref["projections"], bandwidth))
        k_cr_mean = drift.rbf_kernel(cal["projections"], ref["projections"], bandwidth).mean(1, dtype=np.float64)
        ks_ref = np.sort(np.column_stack([ref["p_target"], ref["probabilities"]]).astype(np.float64), axis=0)
        ks_cal = np.column_stack([cal["p_target"], cal["probabilities"]])
        null_mmd, null_pd, null_pc = np.empty(n_bootstrap), np.empty(n_bootstrap), np.empty(n_bootstrap)
        windows = pool_bootstrap(n_cal, window, rng, groups)
        for b in range(n_bootstrap):
            idx = next(windows)
            z = cal["projections"][idx]
            k_xx = drift.rbf_kernel(z, z, bandwidth)
            distinct = idx[:, None] != idx[None, :]  # pairs of one image would add k(x, x) = 1: left out
            xx = float(k_xx[distinct].mean(dtype=np.float64)) if distinct.any() else 1.0
            null_mmd[b] = xx + yy - 2.0 * float(k_cr_mean[idx].mean())
            _, p = drift.ks_columns(ks_ref, ks_cal[idx])  # the tests of DriftReference.check, column for column
            null_pd[b], null_pc[b] = p[0], drift.bonferroni(p[1:])
    threshold = float(np.quantile(null_mmd, 1.0 - a))
    ks_d, ks_c = ks_threshold(null_pd, a), ks_threshold(null_pc, a)  # a, or lower for clustered images
    alarms = np.stack([null_pd < ks_d, null_pc < ks_c, null_mmd > threshold])
    return {
        "bandwidth": bandwidth, "mmd_yy": yy, "ks_p_table": ks_table, "mmd2_threshold": threshold,
        "ks_p_threshold_discriminator": ks_d, "ks_p_threshold_softmax": ks_c,
        "null_mmd2": null_mmd,
        "null_p_discriminator": null_pd, "null_p_softmax": null_pc,
        "false_alarm_rate": {"ks_discriminator": float(alarms[0].mean()),
                             "ks_softmax_bonferroni": float(alarms[1].mean()),
                             "mmd_pca": float(alarms[2].mean()), "any": float(alarms.any(0).mean())},
    }


def ks_threshold(null_p: np.ndarray, a: float) -> float:
    """``t ≤ a`` such that at most ``⌊a·B⌋`` of the ``B`` null p-values are ``< t``: ``a`` itself when the
    null p-values are no smaller than the exact test's (independent images), else the p-value that only
    ``⌊a·B⌋`` null windows fall below."""
    p = np.sort(np.asarray(null_p, np.float64))
    k = int(np.floor(a * len(p)))
    return float(min(a, p[k])) if k < len(p) else float(a)


def choose_window(n_cal: int, window_max: int = WINDOW) -> int:
    """``W = min(window_max, n_cal)`` (at least 2), ``n_cal`` the calibration pool's independent draws (its
    images, or its groups of near-copies): see the module docstring."""
    return max(2, min(window_max, n_cal))


def build(outputs: dict, alpha: float = ALPHA, n_bootstrap: int = N_BOOTSTRAP, seed: int = SEED,
          window_max: int = WINDOW, groups: np.ndarray | None = None) -> tuple[dict, dict]:
    """From the model's outputs on all reference images — ``p_target`` (n,), ``probabilities`` (n, K),
    ``features`` (n, D) — build the arrays of ``drift_reference.npz`` and the settings for the manifest."""
    n = len(outputs["p_target"])
    ref_idx, cal_idx = split_pools(n, seed, groups)
    mean, comps = fit_pca(outputs["features"][ref_idx])
    proj = (np.asarray(outputs["features"], np.float64) - mean) @ comps.T
    ref = {"p_target": outputs["p_target"][ref_idx], "probabilities": outputs["probabilities"][ref_idx],
           "projections": proj[ref_idx]}
    cal = {"p_target": outputs["p_target"][cal_idx], "probabilities": outputs["probabilities"][cal_idx],
           "projections": proj[cal_idx]}
    n_independent = len(cal_idx) if groups is None else len(np.unique(np.asarray(groups)[cal_idx]))
    window = choose_window(n_independent, window_max)
    c = calibrate(ref, cal, window, alpha, n_bootstrap, seed,
                  groups=None if groups is None else np.asarray(groups)[cal_idx])
    warnings = []
    if window < MIN_WINDOW:
        warnings.append(f"only {n} held-out images for the drift reference ({len(ref_idx)} reference + "
                        f"{len(cal_idx)} calibration, {n_independent} independent): calibrated windows hold {window} "
                        f"images (≥ {MIN_WINDOW} "
                        "wanted), so the drift tests will miss all but large shifts. Train with a larger "
                        "--target-holdout or export with --reference SPEC holding more in-distribution images.")
    arrays = {
        "ref_p_target": ref["p_target"].astype(np.float32),
        "ref_probabilities": ref["probabilities"].astype(np.float32),
        "pca_mean": mean, "pca_components": comps, "ref_projections": ref["projections"],
        "mmd_bandwidth": np.float64(c["bandwidth"]), "mmd_yy": np.float64(c["mmd_yy"]),
        "mmd2_threshold": np.float64(c["mmd2_threshold"]),
        "ks_p_threshold_discriminator": np.float64(c["ks_p_threshold_discriminator"]),
        "ks_p_threshold_softmax": np.float64(c["ks_p_threshold_softmax"]),
        "null_mmd2": c["null_mmd2"], "null_p_discriminator": c["null_p_discriminator"],
        "null_p_softmax": c["null_p_softmax"], "window": np.int64(window), "alpha": np.float64(alpha),
        "alpha_per_test": np.float64(alpha / len(drift.TESTS)),
        "seed": np.int64(seed), "n_reference": np.int64(len(ref_idx)), "n_calibration": np.int64(len(cal_idx)),
        "n_bootstrap": np.int64(n_bootstrap),
        **({"ks_p_table": c["ks_p_table"]} if c["ks_p_table"] is not None else {}),
    }
    settings = {
        "window": window, "alpha": alpha, "alpha_per_test": alpha / len(drift.TESTS), "tests": list(drift.TESTS),
        "seed": seed,
        "n_reference": len(ref_idx), "n_calibration": len(cal_idx), "n_calibration_independent": n_independent,
        "n_bootstrap": n_bootstrap,
        "window_sampling": f"{n_bootstrap} pool-bootstrap windows of {window}: a resampled calibration pool "
                           "(groups of near-copies together), then a window drawn from it with replacement",
        "pca_dims": int(comps.shape[0]), "mmd_kernel": "rbf", "mmd_bandwidth": c["bandwidth"],
        "mmd2_threshold": c["mmd2_threshold"],
        "ks_p_threshold": {"ks_discriminator": c["ks_p_threshold_discriminator"],
                           "ks_softmax_bonferroni": c["ks_p_threshold_softmax"]},
        "alarm": "p < ks_p_threshold (≤ alpha_per_test; KS tests), MMD² > mmd2_threshold; drift = any test alarms",
        "softmax_correction": "bonferroni",
        "empirical_false_alarm_rate": c["false_alarm_rate"],
        "warnings": warnings,
    }
    return arrays, settings
