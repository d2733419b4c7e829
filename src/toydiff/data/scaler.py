"""The Scaler: the map between the data's units and the model's frame, fitted on the training data (numpy only).

    scaler = Scaler.fit(x, "minmax")        # or "standardize", or "quantile"
    z = scaler.transform(x); x_back = scaler.inverse(z)

minmax and standardize are per-axis affine maps (AffineScaler). quantile maps each column through
its empirical distribution function to a standard normal (QuantileScaler, the rank-Gauss transform
tabular diffusion models use, e.g. TabDDPM): bounded and spiky columns (pixel counts 0..16, most
of them 0) become smooth for the model, and every sample comes back inside the column's training
range, with its spikes as exact values. A user's table, whose columns have types (toydiff.data.columns),
goes through a TableScaler: its numbers through one of those, its binary and categorical columns as
their levels, and back as values the column takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy.special import ndtr, ndtri

from ..core.config import SCALINGS, choose
from ..core.errors import ToydiffError
from .columns import Column

AUTO = {"table": "quantile", "points": "minmax"}  # data.scaling = auto: a user's table (its columns typed) goes
#   through the rank-Gauss map, which returns a column's spikes and piles as exact values (diabetes: tree AUC
#   0.58 against min-max's 0.75, breast cancer 0.55 against 0.59, 2 splits each); the zoo through the guide's
#   min-max into [-1, 1]
QUANTILES = 1000  # the quantile scaler's knots per column (fewer with fewer rows)
EDGE = 1e-7  # the quantile scaler keeps u in [EDGE, 1 - EDGE] before the normal's inverse (|z| <= 5.2)


class Scaler:
    """What every scaler offers: transform, inverse, dim, log_abs_det (None when the map's Jacobian is not
    constant), to_dict; `fit` and `from_dict` choose the kind."""

    kind: str

    @staticmethod
    def fit(x: np.ndarray, kind: str = "minmax", names: Optional[Sequence[str]] = None,
            columns: Optional[Sequence[Column]] = None) -> "Scaler":
        """Fit on x (n, D); `names` (the D column names) make the error for a constant column name it. With
        `columns` (a user's table's column types) a TableScaler: the numbers through `kind`, the discrete
        columns as their levels. kind "auto": AUTO's choice for a table (columns given) or for points."""
        if kind == "auto":
            kind = AUTO["table" if columns is not None else "points"]
        choose("scaling", kind, SCALINGS)
        if columns is not None:
            return TableScaler.fit_table(np.asarray(x, dtype=np.float64), kind, tuple(columns))
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
        if kind == TableScaler.kind:
            return TableScaler.from_table(d)
        if kind not in SCALINGS:
            raise ToydiffError("the stored scaler is malformed; the run directory is damaged")
        return QuantileScaler.from_quantiles(d) if kind == "quantile" else AffineScaler.from_affine(d)

    @property
    def scaling(self) -> str:
        """The data.scaling the numbers went through (a table's numeric columns'; "none" without any)."""
        return self.kind

    @property
    def dim(self) -> int:
        """D: the columns in data units."""
        raise NotImplementedError

    @property
    def frame_dim(self) -> int:
        """The coordinates of the model's frame (more than D where a categorical column is one-hot)."""
        return self.dim

    @property
    def frame_names(self) -> Optional[list[str]]:
        """Names of the frame's coordinates where they differ from the columns' (None: the same)."""
        return None

    @property
    def frame_columns(self) -> list[int]:
        """The frame coordinate where each column starts."""
        return list(range(self.dim))

    @property
    def log_abs_det(self) -> Optional[float]:
        raise NotImplementedError

    def transform(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def inverse(self, x: np.ndarray, whole: bool = True) -> np.ndarray:
        """Back to data units; whole: a table's integer columns come back rounded (the others have none)."""
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

    def inverse(self, x: np.ndarray, whole: bool = True) -> np.ndarray:
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

    def inverse(self, z: np.ndarray, whole: bool = True) -> np.ndarray:
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


@dataclass(frozen=True)
class TableScaler(Scaler):
    """A user's table with its column types. Continuous, integer and ordinal columns go through `numeric` (the
    chosen minmax, standardize or quantile scaler, fitted on them); a binary column is one coordinate, -1 for
    its lower level and +1 for its upper; a categorical column is one coordinate per level seen in the
    training rows, +1 for the row's level and -1 for the others (one-hot at +-1). Back in data units: a
    binary column's level by the sign, a categorical's by the largest of its coordinates (a level never seen
    in training is never drawn), integers rounded and ordinals moved to their nearest training value
    (`whole`), and every number clipped to the training rows' range, so that every value is one the training
    rows admit. The frame keeps the columns' order."""

    columns: tuple[Column, ...]
    numeric: Optional[Scaler]  # over the number (non-discrete) columns in order; None when there are none
    low: np.ndarray  # (D,) each column's training minimum, data units
    high: np.ndarray  # (D,) and maximum
    seen: tuple[tuple[float, ...], ...]  # per column: a categorical's levels seen in training (its coordinates)
    kind = "table"

    @classmethod
    def fit_table(cls, x: np.ndarray, kind: str, columns: tuple[Column, ...], every_level: bool = False
                  ) -> "TableScaler":
        """Fitted on the rows x (n, D); every_level: a coordinate for each level of a categorical column, not only
        those x holds (an evaluation frame, where samples may take a level the reference rows lack)."""
        if x.ndim != 2 or x.shape[1] != len(columns):
            raise ValueError(f"{len(columns)} column types for data of shape {x.shape}")
        numbers = [j for j, c in enumerate(columns) if not c.discrete]
        numeric = Scaler.fit(x[:, numbers], kind, [columns[j].name for j in numbers]) if numbers else None
        seen = tuple((c.values if every_level else tuple(float(v) for v in np.unique(c.nearest(x[:, j]))))
                     if c.kind == "categorical" else () for j, c in enumerate(columns))
        return cls(columns, numeric, x.min(axis=0), x.max(axis=0), seen)

    @property
    def scaling(self) -> str:
        return self.numeric.kind if self.numeric is not None else "none"

    def _widths(self) -> list[int]:
        return [len(s) if c.kind == "categorical" else 1 for c, s in zip(self.columns, self.seen)]

    @property
    def dim(self) -> int:
        return len(self.columns)

    @property
    def frame_dim(self) -> int:
        return sum(self._widths())

    @property
    def frame_names(self) -> Optional[list[str]]:
        if self.frame_dim == self.dim:
            return None
        return [name for c, s in zip(self.columns, self.seen)
                for name in ([f"{c.name}={c.level(v)}" for v in s] if c.kind == "categorical" else [c.name])]

    @property
    def _numbers(self) -> list[int]:
        return [j for j, c in enumerate(self.columns) if not c.discrete]

    @property
    def frame_columns(self) -> list[int]:
        return [int(v) for v in np.concatenate([[0], np.cumsum(self._widths())[:-1]])]

    def _starts(self) -> np.ndarray:
        return np.asarray(self.frame_columns, dtype=int)

    @property
    def log_abs_det(self) -> Optional[float]:
        """The numeric scaler's, where every column is a number (a discrete column has no density)."""
        return self.numeric.log_abs_det if self.numeric is not None and len(self._numbers) == self.dim else None

    def transform(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        z, starts, numbers = np.empty((len(x), self.frame_dim)), self._starts(), self._numbers
        if numbers:
            z[:, starts[numbers]] = self.numeric.transform(x[:, numbers])
        for j, (c, s) in enumerate(zip(self.columns, self.seen)):
            if c.kind == "binary":
                z[:, starts[j]] = np.where(c.nearest(x[:, j]) == c.values[1], 1.0, -1.0)
            elif c.kind == "categorical":
                z[:, starts[j]:starts[j] + len(s)] = np.where(c.nearest(x[:, j])[:, None] == np.asarray(s), 1.0, -1.0)
        return z

    def inverse(self, z: np.ndarray, whole: bool = True) -> np.ndarray:
        z = np.asarray(z, dtype=np.float64)
        x, starts, numbers = np.empty((len(z), self.dim)), self._starts(), self._numbers
        if numbers:
            x[:, numbers] = self.numeric.inverse(z[:, starts[numbers]])
        for j, (c, s) in enumerate(zip(self.columns, self.seen)):
            if c.kind == "binary":
                x[:, j] = np.where(z[:, starts[j]] >= 0, c.values[1], c.values[0])
            elif c.kind == "categorical":
                x[:, j] = np.asarray(s)[np.argmax(z[:, starts[j]:starts[j] + len(s)], axis=1)]
            elif c.kind == "integer" and whole:
                x[:, j] = np.round(x[:, j])
            elif c.kind == "ordinal" and whole:
                x[:, j] = c.nearest(x[:, j])
        return np.clip(x, self.low, self.high)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "columns": [c.to_dict() for c in self.columns],
                "numeric": None if self.numeric is None else self.numeric.to_dict(), "low": self.low.tolist(),
                "high": self.high.tolist(), "seen": [list(s) for s in self.seen]}

    @classmethod
    def from_table(cls, d: dict) -> "TableScaler":
        try:
            columns = tuple(Column.from_dict(c) for c in d["columns"])
            numeric = None if d["numeric"] is None else Scaler.from_dict(d["numeric"])
            low, high = np.asarray(d["low"], np.float64), np.asarray(d["high"], np.float64)
            seen = tuple(tuple(float(v) for v in s) for s in d["seen"])
        except (KeyError, TypeError, ValueError) as e:
            raise ToydiffError(f"the stored scaler is malformed ({e}); the run directory is damaged") from None
        numbers = sum(not c.discrete for c in columns)
        if not columns or low.shape != (len(columns),) or high.shape != low.shape or len(seen) != len(columns) \
                or not np.all(low <= high) or (numeric is None) != (numbers == 0) \
                or (numeric is not None and (numeric.dim != numbers or isinstance(numeric, TableScaler))) \
                or any(bool(s) != (c.kind == "categorical") or not set(s) <= set(c.values)
                       for c, s in zip(columns, seen)):
            raise ToydiffError("the stored scaler is malformed; the run directory is damaged")
        return cls(columns, numeric, low, high, seen)
