"""The toy-data zoo: iid samplers of the standard low-dimensional distributions, with labels where they exist.

Each sampler is (n, rng, p: Params) -> (x (n, D) float64, labels (n,) int64 or None), drawing
every random number from the explicit numpy Generator. Shapes follow the papers that made
them standard (FFJORD's 8gaussians, checkerboard, pinwheel, 2spirals, rings; scikit-learn's
moons, circles, swiss roll), but every one is an iid sample: a class or component is drawn
per point, never an exact n / k split. `Params.scale` multiplies the noise-free shape and
`Params.noise` is the std of the Gaussian noise added after it (data units).
Where the density is known in closed form (the Gaussian mixtures; the noise-free
checkerboard; the moons, by quadrature) `log_density(x, p)` gives it, so likelihoods can be
checked against the truth; it returns None where the parameters leave it unknown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from scipy.special import logsumexp

from ..core.errors import ToydiffError


@dataclass(frozen=True)
class Params:
    noise: float  # std of the Gaussian noise added to every coordinate, data units
    scale: float = 1.0  # multiplies the noise-free shape
    modes: int = 0  # the dataset's count (Gaussians, arms, rings, board squares per side)
    dim: int = 2  # the dimension, for the datasets that take any


def _noisy(x: np.ndarray, rng: np.random.Generator, p: Params) -> np.ndarray:
    return x * p.scale + (p.noise * rng.standard_normal(x.shape) if p.noise > 0 else 0.0)


def circles(n: int, rng: np.random.Generator, p: Params):
    """Two concentric circles, radii 1 (label 0) and 1/2 (label 1), uniform angle (scikit-learn's make_circles
    with factor = 0.5, drawn iid)."""
    labels = rng.integers(0, 2, size=n)
    angle = rng.uniform(0, 2 * math.pi, size=n)
    radius = np.where(labels == 0, 1.0, 0.5)
    return _noisy(radius[:, None] * np.c_[np.cos(angle), np.sin(angle)], rng, p), labels


def circles_distance(x: np.ndarray, p: Params) -> np.ndarray:
    r = np.hypot(x[:, 0], x[:, 1])
    return np.minimum(np.abs(r - p.scale), np.abs(r - 0.5 * p.scale))


def swissroll(n: int, rng: np.random.Generator, p: Params):
    """The 2-D swiss roll: t = 1.5 pi (1 + 2 u), (t cos t, t sin t) / (4.5 pi), so the outer end is at radius 1
    (scikit-learn's make_swiss_roll, its (x, z) plane, rescaled)."""
    t = 1.5 * math.pi * (1 + 2 * rng.uniform(size=n))
    return _noisy(np.c_[t * np.cos(t), t * np.sin(t)] / (4.5 * math.pi), rng, p), None


@dataclass(frozen=True)
class Mixture:
    """A Gaussian mixture with diagonal components, in numpy float64: weights (K,), means (K, D), per-axis standard
    deviations (K, D) (a (K, 1) array is broadcast). toydiff.diffusion.oracle.GaussianMixture adds its exact denoiser."""

    weights: np.ndarray
    means: np.ndarray
    stds: np.ndarray

    def __post_init__(self):
        weights, means = np.asarray(self.weights, np.float64), np.asarray(self.means, np.float64)
        if means.ndim != 2 or weights.shape != (means.shape[0],):
            raise ToydiffError("a Gaussian mixture needs weights (K,), means (K, D) and stds (K, D) or (K, 1)")
        stds = np.broadcast_to(np.asarray(self.stds, np.float64), means.shape).copy()
        if not (np.all(weights > 0) and math.isclose(float(weights.sum()), 1.0, rel_tol=1e-9)):
            raise ToydiffError("mixture weights must be positive and sum to 1")
        if not np.all(stds > 0):
            raise ToydiffError("mixture standard deviations must be positive")
        for name, value in (("weights", weights), ("means", means), ("stds", stds)):
            object.__setattr__(self, name, value)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n iid points (n, D) and the component each came from (n,)."""
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        return self.means[k] + self.stds[k] * rng.standard_normal((n, self.dim)), k.astype(np.int64)

    def log_density(self, x: np.ndarray) -> np.ndarray:
        """log p(x) (n,) = log sum_k w_k N(x; mu_k, diag(s_k^2))."""
        x = np.asarray(x, dtype=np.float64)
        log_n = -0.5 * (((x[:, None, :] - self.means[None]) / self.stds[None]) ** 2
                        + 2 * np.log(self.stds[None]) + math.log(2 * math.pi)).sum(-1)
        return logsumexp(np.log(self.weights)[None] + log_n, axis=1)


def ring_of_gaussians(p: Params) -> Mixture:
    """`modes` (8) equal Gaussians of std `noise` centred on the circle of radius 2 scale (FFJORD's 8gaussians)."""
    k = p.modes
    angle = 2 * math.pi * np.arange(k) / k
    return Mixture(np.full(k, 1 / k), 2 * p.scale * np.c_[np.cos(angle), np.sin(angle)],
                           np.full((k, 1), p.noise))


def mixture_distance(make):
    """Distance to the nearest mean of the mixture `make(p)` (its noise-free shape: the modes' centres)."""
    def distance(x: np.ndarray, p: Params) -> np.ndarray:
        means = make(p).means
        return np.sqrt(((np.asarray(x)[:, None, :] - means[None]) ** 2).sum(-1)).min(1)
    return distance


def grid_of_gaussians(p: Params) -> Mixture:
    """A modes x modes (5 x 5) grid of equal Gaussians at spacing `scale`, centred on 0."""
    side = (np.arange(p.modes) - (p.modes - 1) / 2) * p.scale
    means = np.array([(a, b) for a in side for b in side])
    return Mixture(np.full(len(means), 1 / len(means)), means, np.full((len(means), 1), p.noise))


def gaussian_mixture(p: Params) -> Mixture:
    """`modes` equal Gaussians in `dim` dimensions, std `noise`, means uniform in [-2 scale, 2 scale]^dim from a
    generator seeded by (dim, modes) alone: the same distribution for every run with those settings."""
    layout = np.random.default_rng([p.dim, p.modes, 0x6A1])
    means = layout.uniform(-2, 2, size=(p.modes, p.dim)) * p.scale
    return Mixture(np.full(p.modes, 1 / p.modes), means, np.full((p.modes, 1), p.noise))


def mixture_sampler(make):
    """A zoo sampler drawing from the mixture `make(p)`, labelled by component."""
    def sample(n: int, rng: np.random.Generator, p: Params):
        return make(p).sample(n, rng)
    sample.__doc__ = make.__doc__
    return sample


def mixture_log_density(make):
    def log_density(x: np.ndarray, p: Params) -> np.ndarray:
        return make(p).log_density(x)
    return log_density


def checkerboard(n: int, rng: np.random.Generator, p: Params):
    """Uniform on the dark squares of a modes x modes board (4 x 4: FFJORD's checkerboard) over [-2, 2]^2 scale."""
    k = p.modes
    cells = [(i, j) for i in range(k) for j in range(k) if (i + j) % 2 == 0]
    pick = rng.integers(0, len(cells), size=n)
    corner = np.array(cells, dtype=np.float64)[pick]
    x = (corner + rng.uniform(size=(n, 2))) * (4 / k) - 2
    return _noisy(x, rng, p), None


def checkerboard_distance(x: np.ndarray, p: Params) -> np.ndarray:
    """Distance to the nearest dark square of the board (0 on one)."""
    k, side = p.modes, 4 * p.scale / p.modes
    lo = np.array([(i, j) for i in range(k) for j in range(k) if (i + j) % 2 == 0], dtype=np.float64) * side \
        - 2 * p.scale
    x = np.asarray(x)[:, None, :]
    gap = np.maximum(np.maximum(lo[None] - x, x - (lo[None] + side)), 0.0)
    return np.sqrt((gap ** 2).sum(-1)).min(1)


def checkerboard_log_density(x: np.ndarray, p: Params) -> np.ndarray | None:
    """log of 1 / (dark area) on the dark squares, -inf off them; None for a noisy board (no closed form)."""
    if p.noise > 0:
        return None
    k, side = p.modes, 4 * p.scale / p.modes
    ij = np.floor((np.asarray(x) / p.scale + 2) / (4 / k)).astype(np.int64)
    inside = np.all((ij >= 0) & (ij < k), axis=1) & (ij.sum(1) % 2 == 0)
    area = (k * k + 1) // 2 * side**2
    return np.where(inside, -math.log(area), -np.inf)


def pinwheel(n: int, rng: np.random.Generator, p: Params):
    """FFJORD's pinwheel: `modes` (5) arms, radial std 0.3, tangential std `noise` (0.1), rate 0.25, radius x2."""
    labels = rng.integers(0, p.modes, size=n)
    features = rng.standard_normal((n, 2)) * np.array([0.3, p.noise])
    features[:, 0] += 1.0
    angle = 2 * math.pi * labels / p.modes + 0.25 * np.exp(features[:, 0])
    c, s = np.cos(angle), np.sin(angle)
    x = np.stack([c * features[:, 0] - s * features[:, 1], s * features[:, 0] + c * features[:, 1]], axis=1)
    return 2 * p.scale * x, labels


def two_spirals(n: int, rng: np.random.Generator, p: Params):
    """Two interleaved spirals (FFJORD's 2spirals): angle theta = sqrt(u) 3 pi, point (-theta cos theta,
    theta sin theta) / 3 on arm 0 and its negative on arm 1."""
    labels = rng.integers(0, 2, size=n)
    theta = np.sqrt(rng.uniform(size=n)) * 3 * math.pi
    x = np.c_[-theta * np.cos(theta), theta * np.sin(theta)] / 3
    return _noisy(np.where(labels[:, None] == 0, x, -x), rng, p), labels


def rings(n: int, rng: np.random.Generator, p: Params):
    """`modes` (4) concentric circles of radii 2 k / modes, k = 1..modes, each point's ring chosen with
    probability proportional to its radius (uniform density along the rings), labelled by ring."""
    radii = 2 * np.arange(1, p.modes + 1) / p.modes
    labels = rng.choice(p.modes, size=n, p=radii / radii.sum())
    angle = rng.uniform(0, 2 * math.pi, size=n)
    return _noisy(radii[labels, None] * np.c_[np.cos(angle), np.sin(angle)], rng, p), labels.astype(np.int64)


def rings_distance(x: np.ndarray, p: Params) -> np.ndarray:
    radii = 2 * p.scale * np.arange(1, p.modes + 1) / p.modes
    return np.abs(np.hypot(x[:, 0], x[:, 1])[:, None] - radii[None]).min(1)
