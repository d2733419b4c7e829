"""The Scaler: the per-axis affine map between the data's units and the model's frame (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .config import SCALINGS, choose
from .errors import ToydiffError


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
    def fit(cls, x: np.ndarray, kind: str = "minmax", names: Optional[Sequence[str]] = None) -> "Scaler":
        """Fit on x (n, D); `names` (the D column names) make the error for a constant column name it."""
        choose("scaling", kind, SCALINGS)
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
            j = int(constant[0])
            column = f"'{names[j]}'" if names is not None and len(names) == x.shape[1] else str(j)
            raise ToydiffError(f"data column {column} is constant, so {kind} scaling would divide by zero; "
                               "drop that column")
        return cls(kind, shift, scale)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.shift) / self.scale

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) * self.scale + self.shift

    @property
    def dim(self) -> int:
        return self.shift.shape[0]

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
