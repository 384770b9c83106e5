"""Bootstrap CIs: coverage sanity, shapes, pairing, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from mi_spec.analysis.stats import bootstrap_ci, bootstrap_ratio_ci


def test_mean_ci_of_standard_normal_has_the_textbook_width():
    x = np.random.default_rng(1).standard_normal(400)
    est, low, high = bootstrap_ci(x)
    assert low < 0 < high
    assert low < est < high
    assert high - low == pytest.approx(2 * 1.96 / 20, rel=0.25)


def test_vectorized_shapes_and_axis():
    x = np.random.default_rng(2).normal(size=(3, 4, 50))
    est, low, high = bootstrap_ci(x, n_boot=200)
    assert est.shape == low.shape == high.shape == (3, 4)
    np.testing.assert_allclose(est, x.mean(-1))
    assert np.all(low <= est) and np.all(est <= high)
    est0, low0, high0 = bootstrap_ci(np.moveaxis(x, -1, 0), n_boot=200, axis=0)
    np.testing.assert_allclose(low0, low)
    np.testing.assert_allclose(high0, high)


def test_generic_stat_matches_fast_mean_path():
    x = np.random.default_rng(3).normal(size=(2, 30))
    fast = bootstrap_ci(x, n_boot=300, seed=5)
    slow = bootstrap_ci(x, stat=lambda a, axis: np.mean(a, axis=axis), n_boot=300, seed=5)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a, b)
    med, lo, hi = bootstrap_ci(x, stat=np.median, n_boot=300)
    assert med.shape == (2,) and np.all(lo <= hi)


def test_determinism_per_seed():
    x = np.random.default_rng(4).normal(size=100)
    assert bootstrap_ci(x, seed=7) == bootstrap_ci(x, seed=7)
    assert bootstrap_ci(x, seed=7)[1] != bootstrap_ci(x, seed=8)[1]


def test_ratio_ci_is_paired_and_broadcasts():
    rng = np.random.default_rng(5)
    den = rng.normal(2.0, 1.0, size=300)
    num = np.stack([0.5 * den, 0.5 * den + rng.normal(0, 0.5, size=300)])  # [2, n], den [n]
    est, low, high = bootstrap_ratio_ci(num, den, n_boot=500)
    assert est.shape == low.shape == (2,)
    # perfectly proportional num/den: pairing makes every resampled ratio exactly 0.5
    assert est[0] == pytest.approx(0.5) and high[0] - low[0] < 1e-12
    assert low[1] < 0.5 < high[1] and high[1] - low[1] > 1e-3
    assert bootstrap_ratio_ci(num, den, seed=1)[1][1] == bootstrap_ratio_ci(num, den, seed=1)[1][1]


def test_ratio_ci_with_full_shape_denominator():
    rng = np.random.default_rng(6)
    den = rng.normal(1.0, 0.1, size=(4, 60))
    est, low, high = bootstrap_ratio_ci(2 * den, den, n_boot=100)
    np.testing.assert_allclose(est, 2.0)
    np.testing.assert_allclose(low, 2.0)
    np.testing.assert_allclose(high, 2.0)


def test_bad_inputs():
    with pytest.raises(ValueError):
        bootstrap_ci(np.array([]))
    with pytest.raises(ValueError):
        bootstrap_ci(np.ones(5), alpha=1.5)
    with pytest.raises(ValueError):
        bootstrap_ratio_ci(np.ones(5), np.ones(4))
