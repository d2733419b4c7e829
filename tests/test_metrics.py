"""Metrics on cases whose answer is known in closed form, and the floors' behaviour."""

import math

import numpy as np
import pytest
from scipy import stats

from toydiff import metrics as M
from toydiff.errors import ToydiffError


def test_identical_samples_score_perfectly(rng):
    x = rng.normal(size=(400, 2))
    assert M.w2_exact(x, x) == pytest.approx(0.0, abs=1e-9)
    assert M.sliced_w2(x, x) == pytest.approx(0.0, abs=1e-9)
    assert M.prdc(x, x) == {"precision": 1.0, "recall": 1.0, "density": pytest.approx(1.0, abs=0.2), "coverage": 1.0}


def test_w2_of_a_shift_is_the_shift(rng):
    """Translating a point cloud by v moves it exactly |v| in W2 (the identity coupling is optimal)."""
    x = rng.normal(size=(500, 2))
    assert M.w2_exact(x + [0.3, -0.4], x) == pytest.approx(0.5, rel=1e-9)


def test_w2_between_gaussians_matches_closed_form(rng):
    """W2(N(0, I), N(m, s^2 I)) = sqrt(|m|^2 + D (1 - s)^2) for isotropic Gaussians."""
    n, m, s = 2000, np.array([1.0, 0.0]), 2.0
    x, y = rng.normal(size=(n, 2)), m + s * rng.normal(size=(n, 2))
    assert M.w2_exact(x, y) == pytest.approx(math.sqrt(1 + 2 * (1 - s) ** 2), rel=0.05)


def test_mmd_between_shifted_gaussians_matches_closed_form(rng):
    """For N(0, s^2 I) vs N(m, s^2 I) in D dims and an RBF kernel of bandwidth b:
    MMD^2 = 2 (b^2 / (b^2 + 2 s^2))^(D/2) (1 - exp(-|m|^2 / (2 (b^2 + 2 s^2))))."""
    n, s, m = 4000, 0.1, np.array([0.1, 0.05])
    x, y = s * rng.normal(size=(n, 2)), m + s * rng.normal(size=(n, 2))
    bw = (0.05, 0.2)
    exact = np.mean([2 * (b**2 / (b**2 + 2 * s**2)) * (1 - math.exp(-m @ m / (2 * (b**2 + 2 * s**2)))) for b in bw])
    assert M.mmd2(x, y, bandwidths=bw) == pytest.approx(exact, rel=0.1)


def test_energy_distance_matches_scipy_in_one_dimension(rng):
    """scipy's energy_distance is sqrt(2 E|X-Y| - E|X-X'| - E|Y-Y'|) with V-statistics; ours is unbiased."""
    x, y = rng.normal(size=(300, 1)), rng.normal(0.5, 1, size=(300, 1))
    n = 300
    # convert our unbiased within-sample means to scipy's biased (V-statistic) ones: multiply by (n - 1) / n
    xx = np.abs(x - x.T).sum() / (n * (n - 1))
    yy = np.abs(y - y.T).sum() / (n * (n - 1))
    ours = M.energy_distance(x, y)
    biased = ours + xx + yy - (n - 1) / n * (xx + yy)
    assert math.sqrt(biased) == pytest.approx(stats.energy_distance(x[:, 0], y[:, 0]), rel=1e-9)


def test_classifier_auc_same_and_shifted(rng):
    a, b = rng.normal(size=(2000, 2)), rng.normal(size=(2000, 2))
    assert abs(M.knn_auc(a, b) - 0.5) < 0.03
    # Bayes-optimal AUC for a unit mean shift of unit Gaussians is Phi(1 / sqrt 2) = 0.760
    assert M.knn_auc(a, b + [1.0, 0.0]) == pytest.approx(0.760, abs=0.03)


def test_prdc_separates_off_data_samples_from_missed_data(rng):
    real = rng.normal(size=(1000, 2))
    half = real[real[:, 0] > 0] + 0.01 * rng.normal(size=((real[:, 0] > 0).sum(), 2))  # one half of the data only
    far = rng.normal(size=(1000, 2)) + [10.0, 0.0]
    p_half = M.prdc(half, real)
    assert p_half["precision"] > 0.95 and p_half["coverage"] < 0.6
    p_far = M.prdc(far, real)
    assert p_far["precision"] == 0.0 and p_far["recall"] == 0.0 and p_far["coverage"] == 0.0


def test_blur_is_seen_by_the_classifier_and_mmd_more_than_by_w2():
    """REFERENCE.md: W2 barely sees blur; the classifier test and MMD do (moons, scaled frame)."""
    from toydiff.data import moons
    rng = np.random.default_rng(0)
    ref, good = moons(3000, rng, 0.05)[0], moons(3000, rng, 0.05)[0]
    blurred = moons(3000, rng, 0.05)[0] + 0.08 * rng.normal(size=(3000, 2))
    assert M.knn_auc(blurred, ref) > M.knn_auc(good, ref) + 0.04
    assert M.mmd2(blurred, ref) > 3 * max(abs(M.mmd2(good, ref)), 1e-5)
    assert M.w2_exact(blurred[:1000], ref[:1000]) < 1.5 * M.w2_exact(good[:1000], ref[:1000])


def test_bad_input_is_refused(rng):
    with pytest.raises(ToydiffError, match="same D"):
        M.mmd2(rng.normal(size=(50, 2)), rng.normal(size=(50, 3)))
    with pytest.raises(ToydiffError, match="NaN"):
        M.knn_auc(np.full((50, 2), np.nan), rng.normal(size=(50, 2)))
    with pytest.raises(ToydiffError, match="at least 10 points"):
        M.knn_auc(rng.normal(size=(5, 2)), rng.normal(size=(50, 2)))
