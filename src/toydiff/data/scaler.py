"""The Scaler: the map between the data's units and the model's frame, fitted on the training data (numpy only).

    scaler = Scaler.fit(x, "minmax")        # or "standardize", or "quantile"
    z = scaler.transform(x); x_back = scaler.inverse(z)

minmax and standardize are per-axis affine maps (AffineScaler). quantile maps each column through
its empirical distribution function to a standard normal (QuantileScaler, the rank-Gauss transform
tabular diffusion models use, e.g. TabDDPM): bounded and spiky columns (pixel counts 0..16, most
of them 0) become smooth for the model, and every sample comes back inside the column's training
range, with its spikes as exact values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy.special import ndtr, ndtri

from ..core.config import SCALINGS, choose
from ..core.errors import ToydiffError

QUANTILES = 1000  # the quantile scaler's knots per column (fewer with fewer rows)
EDGE = 1e-7  # the quantile scaler keeps u in [EDGE, 1 - EDGE] before the normal's inverse (|z| <= 5.2)


class Scaler:
    """What every scaler offers: transform, inverse, dim, log_abs_det (None when the map's Jacobian is not
    constant), to_dict; `fit` and `from_dict` choose the kind."""

    kind: str

    @staticmethod
    def fit(x: np.ndarray, kind: str = "minmax", names: Optional[Sequence[str]] = None) -> "Scaler":
        """Fit on x (n, D); `names` (the D column names) make the error for a constant column name it."""
        choose("scaling", kind, SCALINGS)
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ToydiffError(f"the scaler needs data of shape (n >= 2, D), got {x.shape}")
        constant = np.flatnonzero(~(np.ptp(x, axis=0) > 0))
        if constant.size:
            j = int(constant[0])
            column = f"'{names[j]}'" if names is not None and len(names) == x.shape[1] else str(j)
            raise ToydiffError(f"data column {column} is constant, so {kind} scaling would divide by zero; "
                               "drop that column")
        return QuantileScaler.fit_quantiles(x) if kind == "quantile" else AffineScaler.fit_affine(x, kind)

    @staticmethod
    def from_dict(d: dict) -> "Scaler":
        kind = d.get("kind") if isinstance(d, dict) else None
        if kind not in SCALINGS:
            raise ToydiffError("the stored scaler is malformed; the run directory is damaged")
        return QuantileScaler.from_quantiles(d) if kind == "quantile" else AffineScaler.from_affine(d)

    @property
    def dim(self) -> int:
        raise NotImplementedError

    @property
    def log_abs_det(self) -> Optional[float]:
        raise NotImplementedError

    def transform(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def inverse(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class AffineScaler(Scaler):
    """Per-axis affine map x_scaled = (x - shift) / scale. minmax sends each axis' [min, max] to [-1, 1] (the
    guide's choice); standardize gives zero mean and unit standard deviation."""

    kind: str
    shift: np.ndarray  # (D,) float64
    scale: np.ndarray  # (D,) float64

    @classmethod
    def fit_affine(cls, x: np.ndarray, kind: str) -> "AffineScaler":
        if kind == "minmax":
            lo, hi = x.min(axis=0), x.max(axis=0)
            return cls(kind, (hi + lo) / 2, (hi - lo) / 2)
        return cls(kind, x.mean(axis=0), x.std(axis=0))

    @property
    def dim(self) -> int:
        return self.shift.shape[0]

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
    def from_affine(cls, d: dict) -> "AffineScaler":
        try:
            shift, scale = np.asarray(d["shift"], np.float64), np.asarray(d["scale"], np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise ToydiffError(f"the stored scaler is malformed ({e}); the run directory is damaged") from None
        if shift.shape != scale.shape or shift.ndim != 1 or not np.all(scale > 0) or not np.all(np.isfinite(shift)) \
                or not np.all(np.isfinite(scale)):
            raise ToydiffError("the stored scaler is malformed; the run directory is damaged")
        return cls(d["kind"], shift, scale)


@dataclass(frozen=True)
class QuantileScaler(Scaler):
    """Each column through its empirical distribution function, then the standard normal's inverse:
    z = Phi^-1(F_n(x)), with F_n interpolated between QUANTILES knots (ties, such as a column's many zeros,
    map to the middle of their probability mass, as scikit-learn's QuantileTransformer does), and back by
    x = F_n^-1(Phi(z)). Monotone per column; its Jacobian is not constant (log_abs_det is None), so
    likelihoods are not reported in data units for it."""

    quantiles: np.ndarray  # (K, D) the columns' values at probabilities linspace(0, 1, K)
    kind: str = "quantile"

    @classmethod
    def fit_quantiles(cls, x: np.ndarray) -> "QuantileScaler":
        return cls(np.quantile(x, np.linspace(0, 1, min(QUANTILES, len(x))), axis=0))

    @property
    def dim(self) -> int:
        return self.quantiles.shape[1]

    @property
    def _references(self) -> np.ndarray:
        return np.linspace(0, 1, len(self.quantiles))

    def transform(self, x: np.ndarray) -> np.ndarray:
        x, r = np.asarray(x, dtype=np.float64), self._references
        u = np.empty_like(x)
        for j, q in enumerate(self.quantiles.T):  # the mean of the increasing and the decreasing interpolation
            u[:, j] = 0.5 * (np.interp(x[:, j], q, r) - np.interp(-x[:, j], -q[::-1], -r[::-1]))
        return ndtri(np.clip(u, EDGE, 1 - EDGE))

    def inverse(self, z: np.ndarray) -> np.ndarray:
        u, r = ndtr(np.asarray(z, dtype=np.float64)), self._references
        return np.stack([np.interp(u[:, j], r, q) for j, q in enumerate(self.quantiles.T)], axis=1)

    @property
    def log_abs_det(self) -> None:
        return None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "quantiles": self.quantiles.tolist()}

    @classmethod
    def from_quantiles(cls, d: dict) -> "QuantileScaler":
        try:
            q = np.asarray(d["quantiles"], np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise ToydiffError(f"the stored scaler is malformed ({e}); the run directory is damaged") from None
        if q.ndim != 2 or len(q) < 2 or not np.all(np.isfinite(q)) or not np.all(np.diff(q, axis=0) >= 0) \
                or not np.all(q[-1] > q[0]):
            raise ToydiffError("the stored scaler is malformed; the run directory is damaged")
        return cls(q)
