"""Datasets as iid samplers in a registry: what a dataset is, and what is known about it.

A dataset is a `Dataset` spec: its sampler (n, rng, Params) -> (x (n, D) float64, labels (n,)
int64 or None), its default noise and count, and what is known about it (log-density, distance
to its noise-free support, the iid twin of a sampler that is not iid). The synthetic samplers
live in toydiff.data.zoo; the moons are here because the guide starts from them. Everything random
takes an explicit numpy Generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..core.config import DATASETS as NAMES, DataConfig
from ..core.errors import ToydiffError
from ..core.registry import Registry
from . import zoo
from .zoo import Params


@dataclass(frozen=True)
class Dataset:
    sample: Callable[[int, np.random.Generator, Params], tuple[np.ndarray, Optional[np.ndarray]]]
    noise: float  # the default of data.noise (-1 in the config)
    modes: int = 0  # the default of data.modes (0 in the config); 0 here: the dataset has no count
    any_dim: bool = False  # takes data.dim; otherwise 2-D
    log_density: Optional[Callable[[np.ndarray, Params], np.ndarray]] = None  # data units
    support_distance: Optional[Callable[[np.ndarray, Params], np.ndarray]] = None  # to the noise-free shape
    iid_twin: Optional[str] = None  # for a sampler that is not iid: the iid sampler of the same law
    mixture: Optional[Callable[[Params], zoo.Mixture]] = None  # its law as a Gaussian mixture, where it is one (or
    #                                                          for the moons, the quadrature of one): toydiff.diffusion.oracle


DATASETS: Registry[Dataset] = Registry("dataset", NAMES)


def params(cfg: DataConfig) -> Params:
    """The dataset's parameters with the config's "auto" values (noise -1, modes 0) resolved; checked."""
    spec = DATASETS.get(cfg.name)
    if cfg.dim != 2 and not spec.any_dim:
        some = ", ".join(n for n in DATASETS.names() if DATASETS.get(n).any_dim)
        raise ToydiffError(f"data.dim applies only to datasets of any dimension ({some}), not '{cfg.name}'; "
                           "leave it at 2")
    if cfg.modes and not spec.modes:
        some = ", ".join(n for n in DATASETS.names() if DATASETS.get(n).modes)
        raise ToydiffError(f"data.modes applies to datasets with a count ({some}), not '{cfg.name}'; leave it at 0")
    return Params(noise=spec.noise if cfg.noise < 0 else cfg.noise, scale=cfg.scale,
                  modes=cfg.modes or spec.modes, dim=cfg.dim)


def moons(n: int, rng: np.random.Generator, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """An iid sample of Two Moons: each point picks a moon with probability 1/2 and a uniform angle.

    Same geometry as sklearn's make_moons (outer arc (cos a, sin a), inner arc
    (1 - cos a, 1/2 - sin a)), but make_moons puts exactly n/2 points per moon at evenly
    spaced angles, which is not an iid sample and flatters any two-sample comparison.
    """
    labels = rng.integers(0, 2, size=n)
    angle = rng.uniform(0.0, math.pi, size=n)
    outer = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    inner = np.stack([1.0 - np.cos(angle), 0.5 - np.sin(angle)], axis=1)
    x = np.where(labels[:, None] == 0, outer, inner)
    if noise > 0:
        x = x + noise * rng.standard_normal(size=x.shape)
    return x, labels.astype(np.int64)


def sklearn_moons(n: int, rng: np.random.Generator, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's make_moons itself (evenly spaced, n/2 per moon): the guide's data, for exact reproduction."""
    from sklearn.datasets import make_moons  # sklearn.datasets alone takes seconds to import

    x, labels = make_moons(n_samples=n, noise=noise or None, random_state=int(rng.integers(2**31 - 1)))
    return x.astype(np.float64), labels.astype(np.int64)


def moons_distance(x: np.ndarray) -> np.ndarray:
    """Euclidean distance (data units) from each point (n, 2) to the nearer of the two noise-free arcs."""
    x = np.asarray(x, dtype=np.float64)

    def to_arc(p: np.ndarray, centre, lower: bool) -> np.ndarray:
        q = p - np.asarray(centre)
        on_span = (q[:, 1] <= 0) if lower else (q[:, 1] >= 0)  # the half-circle's angular range
        radial = np.abs(np.hypot(q[:, 0], q[:, 1]) - 1.0)
        ends = np.minimum(np.hypot(q[:, 0] - 1, q[:, 1]), np.hypot(q[:, 0] + 1, q[:, 1]))
        return np.where(on_span, radial, ends)

    return np.minimum(to_arc(x, (0.0, 0.0), lower=False), to_arc(x, (1.0, 0.5), lower=True))


def moons_log_density(x: np.ndarray, noise: float, nodes: int = 400) -> np.ndarray:
    """log p(x) (n,) of noisy Two Moons in data units, by Gauss-Legendre quadrature over the arc angle:
    p(x) = 1/2 sum over moons of (1 / pi) int_0^pi N(x; arc(a), noise^2 I) da."""
    if noise <= 0:
        raise ToydiffError("noise-free moons have no density (they live on curves)")
    u, w = np.polynomial.legendre.leggauss(nodes)
    angle, log_w = (u + 1) * math.pi / 2, np.log(w * math.pi / 2 / math.pi)  # d(angle) / pi
    arcs = [np.stack([np.cos(angle), np.sin(angle)], 1), np.stack([1 - np.cos(angle), 0.5 - np.sin(angle)], 1)]
    x = np.asarray(x, dtype=np.float64)
    out = np.empty(len(x))
    for i in range(0, len(x), 4096):
        xb = x[i:i + 4096]
        terms = [(-((xb[:, None, :] - arc[None]) ** 2).sum(-1) / (2 * noise**2)) + log_w[None] for arc in arcs]
        out[i:i + 4096] = np.logaddexp.reduce(np.concatenate(terms, axis=1), axis=1)
    return out + math.log(0.5) - math.log(2 * math.pi * noise**2)


def _scaled_moons(n: int, rng: np.random.Generator, p: Params):
    x, labels = moons(n, rng, p.noise / p.scale)
    return x * p.scale, labels


def _scaled_sklearn_moons(n: int, rng: np.random.Generator, p: Params):
    x, labels = sklearn_moons(n, rng, p.noise / p.scale)
    return x * p.scale, labels


def _moons_support(x: np.ndarray, p: Params) -> np.ndarray:
    return moons_distance(np.asarray(x) / p.scale) * p.scale


def moons_mixture_law(noise: float, scale: float = 1.0, per_moon: int = 256) -> zoo.Mixture:
    """Noisy Two Moons as a mixture of 2 * per_moon Gaussians of std `noise`, centred at the Gauss-Legendre nodes of
    each arc's angle and weighted by the rule's weights: the quadrature of moons_log_density. The widest gap
    between nodes (0.02 at the default) is well below the noise (0.05): for every practical purpose the law."""
    if noise <= 0:
        raise ToydiffError("the moons oracle needs noise > 0 (noise-free moons live on curves)")
    u, w = np.polynomial.legendre.leggauss(per_moon)
    angle = (u + 1) * math.pi / 2
    outer = np.c_[np.cos(angle), np.sin(angle)]
    inner = np.c_[1 - np.cos(angle), 0.5 - np.sin(angle)]
    return zoo.Mixture(np.r_[w, w] / (2 * w.sum()), scale * np.r_[outer, inner], np.full((2 * per_moon, 1), noise))


def _moons_law(p: Params) -> Optional[zoo.Mixture]:
    return moons_mixture_law(p.noise, p.scale) if p.noise > 0 else None


def _moons_density(x: np.ndarray, p: Params) -> np.ndarray | None:
    if p.noise == 0:
        return None  # noise-free moons live on curves
    return moons_log_density(np.asarray(x) / p.scale, p.noise / p.scale) - 2 * math.log(p.scale)


for _name, _spec in {
    "moons": Dataset(_scaled_moons, 0.05, log_density=_moons_density, support_distance=_moons_support,
                     mixture=_moons_law),
    "sklearn-moons": Dataset(_scaled_sklearn_moons, 0.05, support_distance=_moons_support, iid_twin="moons",
                             mixture=_moons_law),
    "circles": Dataset(zoo.circles, 0.05, support_distance=zoo.circles_distance),
    "swissroll": Dataset(zoo.swissroll, 0.02),
    "gaussians": Dataset(zoo.mixture_sampler(zoo.ring_of_gaussians), 0.1, modes=8,
                         log_density=zoo.mixture_log_density(zoo.ring_of_gaussians), mixture=zoo.ring_of_gaussians,
                         support_distance=zoo.mixture_distance(zoo.ring_of_gaussians)),
    "grid": Dataset(zoo.mixture_sampler(zoo.grid_of_gaussians), 0.05, modes=5,
                    log_density=zoo.mixture_log_density(zoo.grid_of_gaussians), mixture=zoo.grid_of_gaussians),
    "checkerboard": Dataset(zoo.checkerboard, 0.0, modes=4, log_density=zoo.checkerboard_log_density,
                            support_distance=zoo.checkerboard_distance),
    "pinwheel": Dataset(zoo.pinwheel, 0.1, modes=5),
    "spirals": Dataset(zoo.two_spirals, 0.1),
    "rings": Dataset(zoo.rings, 0.05, modes=4, support_distance=zoo.rings_distance),
    "gmm": Dataset(zoo.mixture_sampler(zoo.gaussian_mixture), 0.2, modes=8, any_dim=True,
                   log_density=zoo.mixture_log_density(zoo.gaussian_mixture), mixture=zoo.gaussian_mixture),
}.items():
    DATASETS.register(_name)(_spec)


def load_dataset(cfg: DataConfig, n: int, rng: np.random.Generator) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """n points (and labels, or None) of the configured dataset."""
    return DATASETS.get(cfg.name).sample(n, rng, params(cfg))
