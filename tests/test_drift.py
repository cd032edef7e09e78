"""Drift statistics (service/drift.py) and their calibration (export/reference.py) on synthetic data:
false alarms near α on in-distribution windows, detection of clear shifts. numpy/scipy only, seconds."""

import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import ks_2samp

from adaptserve.export.reference import build, calibrate, fit_pca, split_pools
from adaptserve.service import drift

W, A = 200, 0.05  # window, per-test level used in the rate checks (5 % gives tighter rate estimates than 1 %)
D, K = 20, 6
RNG_W = np.random.default_rng(42)
W_CLS, W_DOM = RNG_W.normal(size=(D, K)), RNG_W.normal(size=D) / np.sqrt(D) + np.r_[np.full(3, 0.3), np.zeros(D - 3)]
SCALES = np.linspace(2.0, 0.2, D)


def outputs(n: int, rng, shift: float = 0.0) -> dict:
    """A synthetic 'model': Gaussian features, softmax of a linear classifier, sigmoid discriminator."""
    f = rng.normal(size=(n, D)) * SCALES
    f[:, :3] += shift
    logits = f @ W_CLS
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return {"features": f, "probabilities": p, "p_target": 1 / (1 + np.exp(-f @ W_DOM))}


def test_ks_columns_equal_scipy_ks_2samp_with_ties_and_memoised_p_values():
    rng = np.random.default_rng(1)
    for _ in range(40):
        n, m = int(rng.integers(3, 400)), int(rng.integers(3, 300))
        ref = np.column_stack([rng.integers(0, 8, n), rng.normal(size=n), rng.dirichlet([0.3, 1], n)[:, 0]])
        win = np.column_stack([rng.integers(0, 9, m), rng.normal(rng.uniform(0, 0.5), size=m),
                               rng.dirichlet([0.3, 1], m)[:, 0]])
        j = min(n, m) // 3
        win[:j, 1] = ref[:j, 1]  # values shared between the samples
        for _ in range(2):  # the second call takes every p-value from the memo
            d, p = drift.ks_columns(np.sort(ref, axis=0), win)
            for k in range(3):
                r = ks_2samp(ref[:, k], win[:, k])
                assert d[k] == pytest.approx(r.statistic, abs=1e-12) and p[k] == pytest.approx(r.pvalue, rel=1e-12)
    with pytest.raises(ValueError):
        drift.ks_columns(np.zeros((5, 2)), np.zeros((4, 3)))


def test_statistics_match_their_definitions():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 3)), rng.normal(size=(40, 3)) + 0.3
    s = 0.9
    k = lambda a, b: np.exp(-((a - b) ** 2).sum() / (2 * s * s))  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(30) for j in range(30) if i != j) / (30 * 29)
    yy = sum(k(y[i], y[j]) for i in range(40) for j in range(40) if i != j) / (40 * 39)
    xy = sum(k(a, b) for a in x for b in y) / (30 * 40)
    assert drift.mmd2_unbiased(x, y, s) == pytest.approx(xx + yy - 2 * xy, rel=1e-5)  # float32 kernel values
    a, b = rng.normal(size=300), rng.normal(size=200)
    assert drift.ks_test(a, b) == pytest.approx(tuple(ks_2samp(a, b)))
    probs_ref, probs_win = rng.dirichlet(np.ones(4), 300), rng.dirichlet(np.full(4, 0.7), 200)
    d_k, p_k, p_bonf = drift.ks_per_class(probs_ref, probs_win)  # one vectorised call = one KS per column
    per_column = [ks_2samp(probs_ref[:, k], probs_win[:, k]) for k in range(4)]
    assert d_k == pytest.approx([r.statistic for r in per_column]) and p_k == pytest.approx([r.pvalue for r in per_column])
    assert p_bonf == pytest.approx(min(1.0, 4 * min(r.pvalue for r in per_column)))
    assert drift.sq_distances(x, y) == pytest.approx(((x[:, None] - y[None]) ** 2).sum(-1), rel=1e-12, abs=1e-12)
    assert drift.bonferroni([0.2, 0.004, 0.5]) == pytest.approx(0.012)
    assert drift.bonferroni([0.9, 0.5]) == 1.0
    assert drift.empirical_p(np.arange(99.0), 97.5) == pytest.approx(2 / 100)  # null values ≥ 97.5: {98}
    pts = np.array([[0.0], [1.0], [3.0]])  # distances 1, 2, 3 → median 2
    assert drift.median_heuristic(pts) == pytest.approx(2.0)


def test_ks_tests_false_alarms_near_alpha_and_detect_shifts():
    rng = np.random.default_rng(1)
    ref = outputs(1000, rng)
    p_d, p_c, power_d, power_c = [], [], [], []
    for _ in range(150):
        win = outputs(W, rng)
        p_d.append(drift.ks_test(ref["p_target"], win["p_target"])[1])
        p_c.append(drift.ks_per_class(ref["probabilities"], win["probabilities"])[2])
    for _ in range(30):
        shifted = outputs(W, rng, shift=1.5)
        power_d.append(drift.ks_test(ref["p_target"], shifted["p_target"])[1] < A)
        power_c.append(drift.ks_per_class(ref["probabilities"], shifted["probabilities"])[2] < A)
    assert np.mean(np.array(p_d) < A) <= 2 * A + 0.03
    assert np.mean(np.array(p_c) < A) <= 2 * A + 0.03  # Bonferroni: at most A, usually below
    assert np.mean(power_d) >= 0.9 and np.mean(power_c) >= 0.9


def test_split_pools_keeps_groups_of_near_copies_on_one_side():
    ref, cal = split_pools(1000)
    assert len(ref) == 500 and len(np.intersect1d(ref, cal)) == 0 and len(ref) + len(cal) == 1000
    groups = np.repeat(np.arange(150), 6)[:864]  # the demo: 6 augmented copies per digit
    ref, cal = split_pools(864, groups=groups)
    assert len(np.intersect1d(groups[ref], groups[cal])) == 0  # no digit on both sides
    assert sorted(np.concatenate([ref, cal]).tolist()) == list(range(864)) and abs(len(ref) - 432) <= 6


def test_mmd_threshold_from_bootstrap_false_alarms_near_alpha_and_detects_shift():
    rng = np.random.default_rng(2)
    pool = outputs(1000, rng)
    ref_idx, cal_idx = split_pools(1000)
    mean, comps = fit_pca(pool["features"][ref_idx])
    proj = lambda o: (o["features"] - mean) @ comps.T  # noqa: E731
    z = proj(pool)
    ref = {"p_target": pool["p_target"][ref_idx], "probabilities": pool["probabilities"][ref_idx],
           "projections": z[ref_idx]}
    cal = {"p_target": pool["p_target"][cal_idx], "probabilities": pool["probabilities"][cal_idx],
           "projections": z[cal_idx]}
    c = calibrate(ref, cal, W, alpha=3 * A, n_bootstrap=200, seed=0)  # per-test level A
    assert c["false_alarm_rate"]["mmd_pca"] <= A + 0.01  # by construction of the quantile
    bw, thr, y = c["bandwidth"], c["mmd2_threshold"], ref["projections"]
    k_yy = drift.rbf_kernel(y, y, bw)
    yy = (k_yy.sum() - np.trace(k_yy)) / (len(y) * (len(y) - 1))  # the window-independent term, once
    fresh = [drift.mmd2_unbiased(proj(outputs(W, rng)), y, bw, yy) for _ in range(80)]
    shifted = [drift.mmd2_unbiased(proj(outputs(W, rng, shift=0.5)), y, bw, yy) for _ in range(20)]
    assert np.mean(np.array(fresh) > thr) <= 2 * A + 0.03
    assert np.mean(np.array(shifted) > thr) >= 0.9


@pytest.mark.parametrize("n, m", [(350, 200), (2000, 200), (120, 120)])
def test_ks_pvalue_table_holds_ks_2samps_p_value_for_every_statistic(n, m):
    table = drift.ks_pvalue_table(n, m)
    lcm = np.lcm(n, m)
    assert table.shape == (lcm + 1,) and table[0] == 1.0 and np.all(np.diff(table[np.isfinite(table)]) <= 0)
    rng = np.random.default_rng(n + m)
    seen = set()
    for shift in np.linspace(0, 0.8, 25):
        r = ks_2samp(rng.normal(size=n), rng.normal(shift, size=m))
        h = round(r.statistic * lcm)
        seen.add(h)
        assert table[h] == pytest.approx(r.pvalue, rel=1e-12, abs=1e-300)
    assert len(seen) > 15
    drift._KS_P.clear()
    drift.seed_ks_pvalues(n, m, table)
    assert len(drift._KS_P) == np.isfinite(table).sum()
    with pytest.raises(ValueError, match="entries"):
        drift.seed_ks_pvalues(n, m + 1, table)
    assert drift.ks_pvalue_table(1999, 200) is None  # lcm 399,800: not worth a table


def test_reference_file_round_trip_and_check(tmp_path):
    rng = np.random.default_rng(3)
    arrays, settings = build(outputs(2200, rng), n_bootstrap=200)
    assert settings["n_reference"] == 1100 and settings["n_calibration"] == 1100 and settings["window"] == W
    assert settings["warnings"] == [] and set(settings["ks_p_threshold"]) == {"ks_discriminator", "ks_softmax_bonferroni"}
    assert settings["alpha_per_test"] == pytest.approx(0.01 / 3)
    assert set(settings["empirical_false_alarm_rate"]) == {*drift.TESTS, "any"}
    np.savez(tmp_path / "ref.npz", **arrays)
    drift._KS_P.clear()
    ref = drift.DriftReference.load(tmp_path / "ref.npz")
    assert ref.ks_p_table is not None and len(drift._KS_P) > 1000  # seeded from the file: checks need no scipy
    win = outputs(W, rng)
    ok = ref.check(win["p_target"], win["probabilities"], win["features"])
    assert set(ok) == {*drift.TESTS, "drift"} and 0 < ok["mmd_pca"]["p_value"] <= 1
    bad = outputs(W, rng, shift=2.0)
    alarm = ref.check(bad["p_target"], bad["probabilities"], bad["features"])
    assert alarm["drift"] and alarm["mmd_pca"]["alarm"] and alarm["ks_softmax_bonferroni"]["alarm"]
    with pytest.raises(ValueError, match="calibrated for windows of 200"):
        ref.check(win["p_target"][:10], win["probabilities"][:10], win["features"][:10])


def test_the_service_imports_and_checks_drift_without_scipy(tmp_path):
    """scipy costs ≈ 0.5 s per import and ``bentoml serve`` imports the service twice: the service module and a
    check against a reference that carries its KS table must not load it (cold start ≤ 2 s, issue 15)."""
    rng = np.random.default_rng(5)
    arrays, _ = build(outputs(2200, rng), n_bootstrap=50)
    np.savez(tmp_path / "ref.npz", **arrays)
    np.savez(tmp_path / "win.npz", **outputs(W, rng, shift=2.0))
    code = (f"import sys, numpy as np\n"
            f"import adaptserve.service.service\n"
            f"from adaptserve.service import drift\n"
            f"ref = drift.DriftReference.load({str(tmp_path / 'ref.npz')!r})\n"
            f"w = np.load({str(tmp_path / 'win.npz')!r})\n"
            f"r = ref.check(w['p_target'], w['probabilities'], w['features'])\n"
            f"print(r['drift'], sorted(m for m in sys.modules if m.split('.')[0] == 'scipy'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ADAPTSERVE_MODEL": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "[]"], out.stdout


def test_window_fits_the_independent_draws_of_the_pool_and_small_pools_warn():
    from adaptserve.export.reference import MIN_WINDOW, choose_window

    assert choose_window(1100) == 200 and choose_window(150) == 150 and choose_window(1) == 2
    _, settings = build(outputs(80, np.random.default_rng(4)), n_bootstrap=200)  # 40 + 40 held out
    assert settings["window"] == 40 < MIN_WINDOW
    assert len(settings["warnings"]) == 1 and "--target-holdout" in settings["warnings"][0]
    # near-copies count once: 480 images in groups of 6 = 40 + 40 independent draws → W = 40, a warning
    _, grouped = build(outputs(480, np.random.default_rng(4)), groups=np.repeat(np.arange(80), 6), n_bootstrap=200)
    assert grouped["n_calibration"] == 240 and grouped["n_calibration_independent"] == 40
    assert grouped["window"] == 40 and len(grouped["warnings"]) == 1


def test_pool_bootstrap_resamples_groups_together():
    from adaptserve.export.reference import pool_bootstrap

    groups = np.repeat(np.arange(5), 4)  # 5 groups of 4 near-copies
    windows = pool_bootstrap(20, 12, np.random.default_rng(0), groups)
    w = next(windows)
    assert len(w) == 12 and w.max() < 20
    plain = next(pool_bootstrap(20, 12, np.random.default_rng(0)))
    assert len(plain) == 12 and len(np.unique(plain)) < 12  # with replacement: duplicates are expected


def test_ks_threshold_is_alpha_for_independent_images_and_lower_for_clustered_ones():
    from adaptserve.export.reference import ks_threshold

    uniform = np.random.default_rng(5).uniform(size=1000)
    assert ks_threshold(uniform, 0.01) == 0.01 or ks_threshold(uniform, 0.01) == pytest.approx(0.01, abs=0.005)
    too_small = uniform ** 4  # p-values far smaller than the exact test's: 18 % below 0.01
    t = ks_threshold(too_small, 0.01)
    assert t < 0.01 and np.mean(too_small < t) <= 0.01


def test_small_pool_calibration_keeps_false_alarms_near_alpha_on_fresh_windows(tmp_path):
    """A 150 + 150 held-out pool (a 3,000-image target at --target-holdout 0.1), W = 150: windows of fresh
    in-distribution images alarm at no more than the calibrated rate (docs/benchmarks.md §9 on MNIST-M)."""
    rng = np.random.default_rng(6)
    alpha = 3 * A  # per-test level A, as in the other rate checks
    arrays, settings = build(outputs(300, rng), alpha=alpha, n_bootstrap=400)
    np.savez(tmp_path / "ref.npz", **arrays)
    ref = drift.DriftReference.load(tmp_path / "ref.npz")
    alarms = []
    for _ in range(200):
        win = outputs(ref.window, rng)
        alarms.append(ref.check(win["p_target"], win["probabilities"], win["features"])["drift"])
    assert settings["window"] == 150 and np.mean(alarms) <= alpha + 0.05  # 200 windows: ±0.03 binomial noise
