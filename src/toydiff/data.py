"""Datasets as iid samplers in a registry, and the Scaler that maps data into the model's frame.

A dataset is a function (n, rng, noise) -> (x (n, D) float64, labels (n,) int64).
Everything random takes an explicit numpy Generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from sklearn.datasets import make_moons

from .errors import ToydiffError
from .registry import Registry

Dataset = Callable[[int, np.random.Generator, float], tuple[np.ndarray, np.ndarray]]
DATASETS: Registry[Dataset] = Registry("dataset")


@DATASETS.register("moons")
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


@DATASETS.register("sklearn-moons")
def sklearn_moons(n: int, rng: np.random.Generator, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's make_moons itself (evenly spaced, n/2 per moon): the guide's data, for exact reproduction."""
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


# Where a dataset is not itself an iid sampler, the iid sampler of the same distribution
# (evaluation references must be iid: make_moons' even spacing flatters any comparison).
IID_TWIN = {"sklearn-moons": "moons"}
# Distance to the data's noise-free support, for the off-data fraction.
SUPPORT_DISTANCE = {"moons": moons_distance, "sklearn-moons": moons_distance}
# The true log-density (n,) in data units, where it is known: (x, noise) -> log p(x).
LOG_DENSITY = {"moons": moons_log_density}


def load_dataset(name: str, n: int, rng: np.random.Generator, noise: float) -> tuple[np.ndarray, np.ndarray]:
    return DATASETS.get(name)(n, rng, noise)


SCALINGS = ("minmax", "standardize")


@dataclass(frozen=True)
class Scaler:
    """Per-axis affine map x_scaled = (x - shift) / scale, fitted on the training data.

    minmax sends each axis' [min, max] to [-1, 1] (the guide's choice); standardize
    gives zero mean and unit standard deviation. Samples go back through `inverse`,
    so every output of toydiff is in data units.
    """

    kind: str
    shift: np.ndarray  # (D,) float64
    scale: np.ndarray  # (D,) float64

    @classmethod
    def fit(cls, x: np.ndarray, kind: str = "minmax") -> "Scaler":
        if kind not in SCALINGS:
            raise ToydiffError(f"unknown scaling '{kind}'; choose one of: {', '.join(SCALINGS)}")
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ToydiffError(f"the scaler needs data of shape (n >= 2, D), got {x.shape}")
        if kind == "minmax":
            lo, hi = x.min(axis=0), x.max(axis=0)
            shift, scale = (hi + lo) / 2, (hi - lo) / 2
        else:
            shift, scale = x.mean(axis=0), x.std(axis=0)
        constant = np.flatnonzero(~(scale > 0))
        if constant.size:
            raise ToydiffError(f"data column {int(constant[0])} is constant, so {kind} scaling would divide by zero; "
                               "drop that column")
        return cls(kind, shift, scale)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.shift) / self.scale

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) * self.scale + self.shift

    @property
    def log_abs_det(self) -> float:
        """log |det d x_scaled / d x|: add it to a log-density in the scaled frame to get one in data units."""
        return float(-np.log(self.scale).sum())

    def to_dict(self) -> dict:
        return {"kind": self.kind, "shift": self.shift.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Scaler":
        try:
            kind, shift, scale = d["kind"], np.asarray(d["shift"], np.float64), np.asarray(d["scale"], np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise ToydiffError(f"the stored scaler is malformed ({e}); the run directory is damaged") from None
        if kind not in SCALINGS or shift.shape != scale.shape or shift.ndim != 1 or not np.all(scale > 0):
            raise ToydiffError("the stored scaler is malformed; the run directory is damaged")
        return cls(kind, shift, scale)
