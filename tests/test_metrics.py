"""Metrics on cases whose answer is known in closed form, and the floors' behaviour."""

import math

import numpy as np
import pytest
from scipy import stats

from toydiff.evaluation import metrics as M
from toydiff.core.errors import ToydiffError


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
    """scipy's energy_distance is sqrt(2 E|X-Y| - E|X-X'| - E|Y-Y'|) with V-statistics, as ours is."""
    x, y = rng.normal(size=(300, 1)), rng.normal(0.5, 1, size=(237, 1))
    assert math.sqrt(M.energy_distance(x, y)) == pytest.approx(stats.energy_distance(x[:, 0], y[:, 0]), rel=1e-9)


def test_the_v_statistics_are_never_negative_and_mmd_matches_its_definition(rng):
    """Their floors are read as gamma laws anchored at 0, which needs both to be >= 0 on any pair; MMD^2 is
    checked against its definition with every pair (diagonal included) written out in numpy."""
    for _ in range(20):
        x, y = rng.normal(size=(40, 3)), rng.normal(size=(40, 3))
        assert M.energy_distance(x, y) >= 0 and M.mmd2(x, y, (0.5, 2.0)) >= 0
    x, y = rng.normal(size=(30, 2)), rng.normal(0.3, 1, size=(20, 2))

    def k(a, b):
        d2 = ((a[:, None] - b[None]) ** 2).sum(-1)
        return np.mean([np.exp(-d2 / (2 * s**2)) for s in (0.5, 2.0)], axis=0)
    exact = k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()
    assert M.mmd2(x, y, (0.5, 2.0)) == pytest.approx(exact, rel=1e-5)


def test_classifier_auc_same_and_shifted(rng):
    a, b = rng.normal(size=(2000, 2)), rng.normal(size=(2000, 2))
    assert abs(M.knn_auc(a, b) - 0.5) < 0.03
    # Bayes-optimal AUC for a unit mean shift of unit Gaussians is Phi(1 / sqrt 2) = 0.760
    assert M.knn_auc(a, b + [1.0, 0.0]) == pytest.approx(0.760, abs=0.03)


def test_tree_auc_same_and_shifted(rng):
    """The tree test at the null and against the Bayes-optimal AUC of a unit mean shift (Phi(1 / sqrt 2) = 0.760:
    a classifier cannot do better, and boosted trees on 2 x 2000 points come close)."""
    a, b = rng.normal(size=(2000, 2)), rng.normal(size=(2000, 2))
    assert abs(M.gbt_auc(a, b) - 0.5) < 0.04
    assert 0.70 < M.gbt_auc(a, b + [1.0, 0.0]) <= 0.760 + 0.02
    assert M.gbt_auc(a, b) == M.gbt_auc(a, b)  # fixed folds and trees: the same number every time


def _relaxed_binary_table(rng, n, relaxed=0.0):
    """A table with a 0/1 column and 8 continuous ones that depend on it; relaxed > 0 is what a model that treats
    the 0/1 column as continuous returns: values near 0 and 1, never exactly them."""
    b = rng.integers(0, 2, n).astype(float)
    if relaxed:
        b = np.clip(b + rng.normal(0, relaxed, n), 0, 1)
    return np.c_[b, rng.normal(size=(n, 8)) + b[:, None]]


def test_the_tree_test_flags_a_relaxed_binary_column_that_the_knn_test_misses():
    """Issue #28's known shift, through the whole evaluation against a file's held-out rows (permutation floors):
    the 0/1 column relaxed by noise of 0.03 leaves every distance-based metric at its floor, but boosted trees
    split at 0 and 1 and tell the samples apart; iid rows pass the tree test."""
    from toydiff.core.config import EvalConfig
    from toydiff.evaluation.judge import evaluate
    from toydiff.evaluation.reference import file_target
    rng = np.random.default_rng(28)
    target = file_target(_relaxed_binary_table(rng, 600))
    spec = EvalConfig(n=600, draws=12, w2_n=100, nll_n=0)
    same = evaluate(_relaxed_binary_table(rng, 600), target, spec)
    relaxed = evaluate(_relaxed_binary_table(rng, 600, relaxed=0.03), target, spec)
    limit = same["z_limit"]
    assert same["metrics"]["gbt_auc"]["z"] < limit and relaxed["metrics"]["gbt_auc"]["z"] > limit + 3
    assert relaxed["metrics"]["gbt_auc"]["value"] > 0.65 and relaxed["metrics"]["knn_auc"]["z"] < limit
    assert "gbt_auc z = " in relaxed["verdict"] and relaxed["verdict"].startswith("distinguishable")


def test_prdc_separates_off_data_samples_from_missed_data(rng):
    real = rng.normal(size=(1000, 2))
    half = real[real[:, 0] > 0] + 0.01 * rng.normal(size=((real[:, 0] > 0).sum(), 2))  # one half of the data only
    far = rng.normal(size=(1000, 2)) + [10.0, 0.0]
    p_half = M.prdc(half, real)
    assert p_half["precision"] > 0.95 and p_half["coverage"] < 0.6
    p_far = M.prdc(far, real)
    assert p_far["precision"] == 0.0 and p_far["recall"] == 0.0 and p_far["coverage"] == 0.0


def test_blur_is_seen_by_the_classifier_and_mmd_more_than_by_w2():
    """W2 barely sees blur; the classifier test and MMD do (moons with noise 0.05, blurred by 0.08 more):
    MMD lies beyond 3 deviations of its floor (10 pairs of iid draws, on the kernel fitted to the reference)."""
    from toydiff.data.datasets import moons
    rng = np.random.default_rng(0)
    ref, good = moons(3000, rng, 0.05)[0], moons(3000, rng, 0.05)[0]
    blurred = moons(3000, rng, 0.05)[0] + 0.08 * rng.normal(size=(3000, 2))
    assert M.knn_auc(blurred, ref) > M.knn_auc(good, ref) + 0.04
    bw = M.mmd_bandwidths(ref)
    floor = [M.mmd2(moons(3000, rng, 0.05)[0], moons(3000, rng, 0.05)[0], bw) for _ in range(10)]
    assert M.mmd2(blurred, ref, bw) > np.mean(floor) + 3 * np.std(floor, ddof=1)
    assert M.w2_exact(blurred[:1000], ref[:1000]) < 1.5 * M.w2_exact(good[:1000], ref[:1000])


def test_bad_input_is_refused(rng):
    with pytest.raises(ToydiffError, match="same D"):
        M.mmd2(rng.normal(size=(50, 2)), rng.normal(size=(50, 3)))
    with pytest.raises(ToydiffError, match="NaN"):
        M.knn_auc(np.full((50, 2), np.nan), rng.normal(size=(50, 2)))
    with pytest.raises(ToydiffError, match="at least 10 points"):
        M.knn_auc(rng.normal(size=(5, 2)), rng.normal(size=(50, 2)))


@pytest.mark.parametrize("dim", [2, 8, 32, 64])
def test_mmd_and_energy_see_a_shift_in_any_dimension_and_pass_iid_data(dim):
    """The whole evaluation on a D-dimensional Gaussian, n = 600: a second iid draw is within 3 floor deviations
    on MMD and energy, a copy shifted by 0.6 standard deviations along one axis is beyond them, and MMD's floor
    has a real spread. (Fixed RBF bandwidths of 0.02-0.5 gave a floor spread of 2e-8 and z = 1.7 for the
    shift at D = 64: every kernel value was near 0.)"""
    from toydiff.core.config import EvalConfig
    from toydiff.evaluation.judge import evaluate
    from toydiff.evaluation.reference import Target
    from toydiff.data.scaler import Scaler
    draw = lambda rng, n: rng.normal(size=(n, dim))  # noqa: E731
    target = Target(draw, Scaler.fit(draw(np.random.default_rng(0), 20_000)), {"dataset": f"gauss{dim}"})
    spec = EvalConfig(n=600, draws=12, w2_n=100, nll_n=0)
    rng = np.random.default_rng(dim)
    same = evaluate(draw(rng, 600), target, spec)["metrics"]
    shifted = draw(rng, 600)
    shifted[:, 0] += 0.6
    moved = evaluate(shifted, target, spec)["metrics"]
    for name in ("mmd2", "energy"):
        assert same[name]["z"] < 3 < moved[name]["z"], (name, same[name]["z"], moved[name]["z"])
    assert same["mmd2"]["floor_std"] > 1e-5
    for name in ("energy", "w2", "sliced_w2", "knn_auc"):  # no other distance-based metric degenerates either
        assert same[name]["floor_std"] > 1e-3 * abs(same[name]["floor_mean"]) and same[name]["floor_std"] > 0


def test_the_tree_test_can_split_a_table_of_a_few_dozen_rows():
    """36 samples against 36 held-out rows (wine's held-out split): with scikit-learn's 20 rows per leaf a fold
    could not grow one split and every table scored exactly 0.5; a shift of two deviations in one column is seen
    now, and identical laws still score about 0.5."""
    from toydiff.evaluation.metrics import gbt_auc, gbt_min_leaf
    assert gbt_min_leaf(72) == 3 and gbt_min_leaf(10_000) == 20
    rng = np.random.default_rng(0)
    shifted, same = [], []
    for _ in range(20):
        ref = rng.normal(size=(36, 5))
        moved = rng.normal(size=(36, 5))
        moved[:, 2] += 2.0
        shifted.append(gbt_auc(moved, ref))
        same.append(gbt_auc(rng.normal(size=(36, 5)), ref))
    assert np.mean(shifted) > 0.8 and abs(np.mean(same) - 0.5) < 0.06


def test_efficacy_compares_a_classifier_taught_by_samples_with_one_taught_by_training_rows():
    """Three Gaussian classes: samples drawn from the classes' own laws teach as well as training rows (gap about
    0, within its bootstrap spread); samples whose labels are shuffled teach nothing (held-out accuracy about 1/3,
    a gap far beyond its spread)."""
    from toydiff.evaluation.metrics import efficacy
    rng = np.random.default_rng(3)
    means = np.array([[0, 0, 0], [3, 0, 0], [0, 3, 0]], dtype=float)

    def draw(n):
        y = rng.integers(0, 3, n)
        return means[y] + rng.normal(size=(n, 3)), y
    (xt, yt), (xh, yh), (xs, ys) = draw(300), draw(200), draw(300)
    good = efficacy(xs, ys, xt, yt, xh, yh)
    assert abs(good["gap"]) < 3 * good["gap_std"] + 0.01 and good["on_training_rows"] > 0.85
    assert good["held_out_rows"] == 200 and good["samples"] == good["training_rows"] == 300
    bad = efficacy(xs, rng.permutation(ys), xt, yt, xh, yh)
    assert bad["on_samples"] < 0.5 and bad["gap"] > 5 * bad["gap_std"]
    # the accuracies, recomputed by hand with the same classifier
    from sklearn.ensemble import HistGradientBoostingClassifier
    hand = np.mean(HistGradientBoostingClassifier(random_state=0).fit(xs, ys).predict(xh) == yh)
    assert good["on_samples"] == pytest.approx(hand)
