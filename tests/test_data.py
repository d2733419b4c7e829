"""Datasets and the Scaler, against sklearn and closed forms."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.datasets import make_moons

from toydiff.data.datasets import DATASETS, load_dataset, moons
from toydiff.data.scaler import Scaler
from toydiff.core.errors import ToydiffError


def test_noise_free_moons_lie_on_the_arcs(rng):
    x, labels = moons(5000, rng, noise=0.0)
    outer, inner = x[labels == 0], x[labels == 1]
    assert np.allclose(np.hypot(outer[:, 0], outer[:, 1]), 1.0)  # unit circle, upper half
    assert np.all(outer[:, 1] >= 0)
    assert np.allclose(np.hypot(inner[:, 0] - 1.0, inner[:, 1] - 0.5), 1.0)  # centre (1, 0.5), lower half
    assert np.all(inner[:, 1] <= 0.5)


def test_moons_is_iid_uniform_angle_and_fair_coin(rng):
    x, labels = moons(20000, rng, noise=0.0)
    assert stats.binomtest(int(labels.sum()), len(labels), 0.5).pvalue > 1e-3
    angle = np.arctan2(x[labels == 0, 1], x[labels == 0, 0])
    assert stats.kstest(angle / math.pi, "uniform").pvalue > 1e-3


def test_moons_noise_has_the_requested_std(rng):
    clean_rng, noisy_rng = np.random.default_rng(7), np.random.default_rng(7)
    clean, _ = moons(50000, clean_rng, noise=0.0)
    noisy, _ = moons(50000, noisy_rng, noise=0.1)
    assert np.std(noisy - clean) == pytest.approx(0.1, rel=0.02)


def test_sklearn_moons_is_make_moons(rng):
    from toydiff.core.config import DataConfig
    x, labels = load_dataset(DataConfig(name="sklearn-moons", noise=0.0), 1000, np.random.default_rng(3))
    seed = int(np.random.default_rng(3).integers(2**31 - 1))
    ref_x, ref_y = make_moons(n_samples=1000, random_state=seed)
    assert np.array_equal(x, ref_x) and np.array_equal(labels, ref_y)


def test_unknown_dataset_lists_the_choices(rng):
    with pytest.raises(ToydiffError, match="unknown dataset 'spiral'; choose one of: moons, sklearn-moons, circles"):
        DATASETS.get("spiral")


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_minmax_maps_each_axis_onto_minus_one_one(rng, dim):
    x = rng.normal(size=(300, dim)) * np.arange(1, dim + 1) + 10
    s = Scaler.fit(x, "minmax")
    z = s.transform(x)
    assert np.allclose(z.min(0), -1) and np.allclose(z.max(0), 1)
    assert np.allclose(s.inverse(z), x)
    assert s.log_abs_det == pytest.approx(-np.sum(np.log((x.max(0) - x.min(0)) / 2)))


def test_standardize_gives_zero_mean_unit_std(rng):
    x = rng.normal(3, 5, size=(500, 3))
    z = Scaler.fit(x, "standardize").transform(x)
    assert np.allclose(z.mean(0), 0, atol=1e-12) and np.allclose(z.std(0), 1)


def test_scaler_round_trips_through_its_dict(rng):
    s = Scaler.fit(rng.normal(size=(50, 2)))
    t = Scaler.from_dict(s.to_dict())
    assert t.kind == s.kind and np.array_equal(t.shift, s.shift) and np.array_equal(t.scale, s.scale)


def test_constant_column_is_refused():
    x = np.c_[np.arange(10.0), np.full(10, 3.0)]
    with pytest.raises(ToydiffError, match="data column 1 is constant"):
        Scaler.fit(x)


def test_unknown_scaling_is_refused(rng):
    with pytest.raises(ToydiffError, match="choose one of: minmax, standardize"):
        Scaler.fit(rng.normal(size=(10, 2)), "robust")


def test_moons_distance_against_hand_cases():
    from toydiff.data.datasets import moons_distance
    pts = np.array([[0.0, 1.0], [0.0, 1.5], [0.0, 0.0], [1.0, -0.5], [2.5, 0.5], [-1.0, -1.0], [0.5, 0.0]])
    # on the outer arc; 0.5 above it; the origin is 1 from the outer arc and hypot(1, 0.5) - 1 from the inner
    # arc (centre (1, 0.5), it lies in the arc's lower half-plane); bottom of the inner arc; 0.5 right of the inner arc's tip (2, 0.5); 1 below the outer tip (-1, 0);
    # (0.5, 0): distance to the inner arc |hypot(-0.5, -0.5) - 1|
    expect = [0.0, 0.5, np.hypot(1, 0.5) - 1, 0.0, 0.5, 1.0, 1 - np.hypot(0.5, 0.5)]
    assert np.allclose(moons_distance(pts), expect)


def test_noise_free_moons_have_zero_support_distance(rng):
    from toydiff.data.datasets import moons_distance
    assert np.allclose(moons_distance(moons(1000, rng, noise=0.0)[0]), 0.0, atol=1e-12)


def test_moons_density_integrates_to_one_and_matches_the_reference_entropy():
    from toydiff.data.datasets import moons_log_density
    g = np.linspace(-1.6, 2.6, 421)
    xx, yy = np.meshgrid(g, np.linspace(-1.1, 1.6, 271))
    p = np.exp(moons_log_density(np.c_[xx.ravel(), yy.ravel()], noise=0.05))
    assert p.sum() * (g[1] - g[0]) * (2.7 / 270) == pytest.approx(1.0, abs=2e-3)
    # entropy by Monte Carlo: about log(arc length 2 pi) + 0.5 log(2 pi e noise^2) = 0.26 in data units
    x, _ = moons(5000, np.random.default_rng(0), noise=0.05)
    h_data = -moons_log_density(x, noise=0.05).mean()
    assert h_data == pytest.approx(np.log(2 * np.pi) + 0.5 * np.log(2 * np.pi * np.e * 0.05**2), abs=0.05)
    # quadrature against plain Monte Carlo over the angle at a few points
    pts = np.array([[0.0, 1.0], [0.5, 0.3], [1.0, -0.45], [-0.9, 0.2]])
    a = np.random.default_rng(2).uniform(0, np.pi, 200_000)
    arcs = np.concatenate([np.c_[np.cos(a), np.sin(a)], np.c_[1 - np.cos(a), 0.5 - np.sin(a)]])
    mc = [np.mean(np.exp(-((p - arcs) ** 2).sum(1) / (2 * 0.05**2))) / (2 * np.pi * 0.05**2) for p in pts]
    assert np.allclose(moons_log_density(pts, noise=0.05), np.log(mc), atol=0.01)


def test_noise_free_moons_have_no_density():
    from toydiff.data.datasets import moons_log_density
    with pytest.raises(ToydiffError, match="no density"):
        moons_log_density(np.zeros((1, 2)), noise=0.0)


def test_moons_oracle_mixture_has_the_moons_density():
    """The Gaussian-mixture oracle of the noisy moons (midpoint rule over the arcs) against the
    Gauss-Legendre density of data.moons_log_density, on and between the arcs."""
    import torch

    from toydiff.data.datasets import moons, moons_log_density
    from toydiff.diffusion.oracle import moons_mixture
    x = moons(2000, np.random.default_rng(3), 0.08)[0]
    exact = moons_log_density(x, 0.05)
    mixture = moons_mixture(0.05).log_prob(torch.as_tensor(x)).numpy()
    assert np.abs(mixture - exact).max() < 1e-3


def test_the_quantile_scaler_is_scikit_learns_rank_gauss_on_continuous_columns():
    """On columns without ties, transform equals sklearn's QuantileTransformer(output_distribution="normal")
    (an independent implementation), endpoints included; inverse undoes it."""
    from sklearn.preprocessing import QuantileTransformer
    rng = np.random.default_rng(0)
    x = np.c_[rng.gamma(2.0, size=3000), rng.normal(size=3000) * 5 + 1, rng.uniform(-3, 3, size=3000)]
    ours = Scaler.fit(x, "quantile")
    theirs = QuantileTransformer(n_quantiles=1000, output_distribution="normal").fit(x)
    probe = np.r_[x[:500], x.min(0)[None], x.max(0)[None]]
    assert np.allclose(ours.transform(probe), theirs.transform(probe), atol=1e-6)
    assert np.allclose(ours.inverse(ours.transform(x[:500])), x[:500], atol=1e-6)
    assert ours.log_abs_det is None and Scaler.from_dict(ours.to_dict()).to_dict() == ours.to_dict()


def test_the_quantile_scaler_keeps_bounded_spiky_columns_in_range_with_their_spikes():
    """Pixel-like counts 0..16, 40% zeros and 15% sixteens: whatever the model outputs, the inverse map gives
    values inside [0, 16], and standard normal draws come back with the spikes' shares."""
    rng = np.random.default_rng(1)
    kind = rng.choice(3, size=5000, p=[0.4, 0.15, 0.45])
    x = np.where(kind == 0, 0.0, np.where(kind == 1, 16.0, rng.integers(1, 16, size=5000)))[:, None]
    s = Scaler.fit(x, "quantile")
    back = s.inverse(rng.normal(size=(20_000, 1)) * 3)  # far wider than N(0, 1): still in range
    assert back.min() == 0.0 and back.max() == 16.0
    drawn = s.inverse(rng.normal(size=(20_000, 1)))
    assert abs(np.mean(drawn == 0.0) - 0.4) < 0.02 and abs(np.mean(drawn == 16.0) - 0.15) < 0.02
    assert np.array_equal(s.inverse(s.transform(np.array([[0.0], [16.0]]))), [[0.0], [16.0]])
