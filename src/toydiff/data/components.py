"""The disconnected pieces of a dataset's support, found in its training rows (model.components).

A continuous map from one Gaussian onto separated pieces must put mass between them (Salmona et al. 2022):
a model that draws which piece first and then a point of it need not. The pieces are the connected
components of the rows' neighbourhood graph (an edge between rows closer than a radius) in the model's
frame, the radius read off the data: RADIUS_FACTOR times the median distance of a row to its NEIGHBOURS-th
nearest neighbour, so that it grows with the spacing of the rows and a gap several spacings wide splits them.
Components holding fewer than MIN_SHARE of the rows (or MIN_ROWS) are strays of a sparse tail, not pieces:
each of their rows joins the piece of its nearest row in a real one. Measured on the zoo (10,000 rows):
two moons at noise 0.05 give 2, circles 2, rings 4, the ring of 8 Gaussians 8; a single Gaussian, two
Gaussians whose tails touch, the checkerboard (its squares meet at corners), the pinwheel and the spirals
(their arms meet at the centre) give 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toydiff.core.errors import ToydiffError

NEIGHBOURS = 10  # the k of the k-th nearest neighbour distance that measures the rows' spacing
RADIUS_FACTOR = 3.0  # the graph's radius in those spacings (2 split noisy moons' ends; 5 joined the rings)
NEIGHBOURS_WIDE = 50  # the nearest rows searched for edges: a row's edges are those of them within the radius
MIN_SHARE = 0.01  # a component with fewer rows than this share (or MIN_ROWS) is a stray, not a piece
MIN_ROWS = 10
MIN_DATA = 100  # rows below which the support's pieces are not told apart: one component


@dataclass(frozen=True)
class Components:
    """The component of each training row and what they are: labels (N,) in 0..K-1 numbered by their first
    row, shares (K,) of the rows, the graph's radius in the model's frame; `note` says why one was kept."""
    labels: np.ndarray
    shares: tuple[float, ...]
    radius: float
    note: str = ""

    @classmethod
    def of(cls, labels: np.ndarray, radius: float, note: str = "") -> "Components":
        """Components of these labels, their shares counted from them."""
        return cls(labels, tuple(float(s) for s in np.bincount(labels) / len(labels)), radius, note)

    @property
    def count(self) -> int:
        return len(self.shares)

    def record(self) -> dict:
        """run.json's record of them."""
        return {"count": self.count, "shares": [round(s, 6) for s in self.shares], "radius": self.radius,
                **({"note": self.note} if self.note else {})}


def one(n: int, note: str = "") -> Components:
    return Components.of(np.zeros(n, dtype=np.int64), 0.0, note)


def find_components(x: np.ndarray, expected: int = 0) -> Components:
    """The pieces of the rows x (N, D) in the model's frame. expected: 0 = as many as are found; K >= 2 = the
    user's count, and finding another count is a one-line error that says what was found."""
    from scipy.sparse.csgraph import connected_components
    from scipy.sparse import coo_matrix
    from sklearn.neighbors import NearestNeighbors

    n = len(x)
    if n < MIN_DATA:
        if expected >= 2:
            raise ToydiffError(f"model.components = {expected} needs at least {MIN_DATA} training rows to find "
                               f"the pieces in, and there are {n}; set model.components = 1")
        return one(n, f"{n} rows are too few to tell pieces apart (fewer than {MIN_DATA})")
    # each row's NEIGHBOURS_WIDE nearest (itself first), ascending: the spacing is read off column NEIGHBOURS,
    # and the edges are those of them within the radius (memory n x k, not n^2)
    distance, near = NearestNeighbors(n_neighbors=min(n, NEIGHBOURS_WIDE)).fit(x).kneighbors(x)
    radius = float(RADIUS_FACTOR * np.median(distance[:, NEIGHBOURS]))
    if radius <= 0:  # more than half the rows repeat their neighbours exactly
        return one(n, "the rows repeat too often to measure their spacing")
    keep = distance < radius
    graph = coo_matrix((np.ones(keep.sum()), (np.nonzero(keep)[0], near[keep])), shape=(n, n))
    _, raw = connected_components(graph, directed=False)
    sizes = np.bincount(raw)
    real = np.flatnonzero(sizes >= max(MIN_SHARE * n, MIN_ROWS))
    inside = np.isin(raw, real)
    if (~inside).any():  # strays join the piece of their nearest row in a real one
        nearest = NearestNeighbors(n_neighbors=1).fit(x[inside]).kneighbors(x[~inside])[1][:, 0]
        raw = raw.copy()
        raw[~inside] = raw[inside][nearest]
    values, first = np.unique(raw, return_index=True)
    labels = np.argsort(np.argsort(first))[np.searchsorted(values, raw)]  # numbered by their first row
    found = Components.of(labels.astype(np.int64), radius)
    if expected >= 2 and found.count != expected:
        raise ToydiffError(f"model.components = {expected}, but the training rows fall into {found.count} "
                           f"piece{'s' if found.count != 1 else ''} (neighbourhood radius {radius:.3g} in the "
                           "model's frame); set model.components = 0 to take what is found, or 1 for none")
    return found


def describe_components(found: Components) -> str:
    """The line a run prints about its pieces (model.components)."""
    if found.count == 1:
        why = found.note or f"no gap wider than the neighbourhood radius {found.radius:.3g}"
        return f"components: one piece ({why}); sampling as without model.components"
    shares = ", ".join(f"{s:.1%}" for s in found.shares[:8]) + (", ..." if found.count > 8 else "")
    return (f"components: {found.count} separate pieces of the training rows (neighbourhood radius "
            f"{found.radius:.3g} in the model's frame), each sample's piece drawn by their shares {shares}")
