"""Sample-quality metrics: pure functions (samples, reference) -> number, numpy in.

Each is reported beside its finite-sample noise floor (see `floors`): the same metric
between two independent reference samples of the same size. Why several: W2 is
dominated by how much mass sits on each part of the data and barely sees blur, while
MMD, the classifier test and precision / recall see blur and sharpening.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np
import ot
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from ..core.errors import ToydiffError

MMD_SCALES = 5  # RBF bandwidths per MMD, from the reference's neighbourhood scale to its median distance
MMD_NEIGHBOURS = 5  # the narrowest bandwidth reaches this many neighbours (narrower kernels see points, not density)
BLOCK = 1024  # rows of a pairwise-distance block: memory stays O(BLOCK * n)


def check_pair(samples: np.ndarray, reference: np.ndarray, minimum: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Both (n, D) with the same D, finite, at least `minimum` rows; returned as float64."""
    samples, reference = np.asarray(samples, np.float64), np.asarray(reference, np.float64)
    if samples.ndim != 2 or reference.ndim != 2 or samples.shape[1] != reference.shape[1]:
        raise ToydiffError(f"samples {samples.shape} and reference {reference.shape} must be (n, D) with the same D")
    if min(len(samples), len(reference)) < minimum:
        raise ToydiffError(f"this metric needs at least {minimum} points on each side, "
                           f"got {len(samples)} and {len(reference)}")
    if not (np.isfinite(samples).all() and np.isfinite(reference).all()):
        raise ToydiffError("the samples or the reference contain NaN or infinite values")
    return samples, reference


def _blocks(x: np.ndarray, y: np.ndarray, dtype=torch.float64) -> Iterator[tuple[int, torch.Tensor]]:
    """(row offset, Euclidean distances of a block of x's rows to all of y)."""
    xt, yt = torch.from_numpy(x).to(dtype), torch.from_numpy(y).to(dtype)
    for i in range(0, len(x), BLOCK):
        yield i, torch.cdist(xt[i:i + BLOCK], yt)


def w2_exact(samples: np.ndarray, reference: np.ndarray) -> float:
    """Exact 2-Wasserstein distance between the two empirical measures (POT's network simplex)."""
    x, y = check_pair(samples, reference, 1)
    return float(np.sqrt(ot.emd2([], [], ot.dist(x, y), numItermax=10**8)))


def sliced_w2(samples: np.ndarray, reference: np.ndarray, projections: int = 200, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance over random directions (POT), a cheap O(n log n) proxy for W2."""
    x, y = check_pair(samples, reference, 1)
    return float(ot.sliced_wasserstein_distance(x, y, n_projections=projections, p=2, seed=seed))


def _within_and_between(x: np.ndarray, y: np.ndarray, block_sum: Callable[[torch.Tensor], float],
                        dtype=torch.float64) -> tuple[float, float, float]:
    """Means of a kernel of the distance over all pairs within x, within y and between x and y, each point's
    pair with itself included (V-statistics). block_sum(d) sums the kernel over a block of distances."""
    n, m = len(x), len(y)
    kxx = sum(block_sum(d) for _, d in _blocks(x, x, dtype))
    kyy = sum(block_sum(d) for _, d in _blocks(y, y, dtype))
    kxy = sum(block_sum(d) for _, d in _blocks(x, y, dtype))
    return kxx / n**2, kyy / m**2, kxy / (n * m)


def energy_distance(samples: np.ndarray, reference: np.ndarray) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely and Rizzo) as a V-statistic, like scipy's
    and dcor's: never negative, 0 only for identical samples, so its floor has a known bound (a gamma law
    anchored at 0, evaluation.z_scores)."""
    x, y = check_pair(samples, reference)
    xx, yy, xy = _within_and_between(x, y, lambda d: float(d.sum()))
    return 2 * xy - xx - yy


def mmd_bandwidths(reference: np.ndarray, scales: int = MMD_SCALES) -> tuple[float, ...]:
    """RBF bandwidths that fit the reference (n, D) in any dimension: `scales` values in geometric progression
    from the median distance of a point to its MMD_NEIGHBOURS-th nearest neighbour (the finest structure n
    points can show as a density) to the median pairwise distance (the median heuristic, Gretton et al.
    2012; on 2000 points at most).

    A fixed set fails as D grows: pairwise distances grow like sqrt(D), and bandwidths fit for 2-D data
    leave every kernel value near 0, MMD's floor spread near 0 and its z-scores meaningless. For Two
    Moons at n = 5000 this gives about 0.015 .. 0.9 in the scaled frame, around the fixed 0.02 .. 0.5 it
    replaces (tests/test_metrics.py checks shift detection at D = 2, 8, 32 and 64)."""
    y = check_pair(reference, reference, 3)[0]
    k = min(MMD_NEIGHBOURS, len(y) - 1)
    nearest = NearestNeighbors(n_neighbors=k + 1).fit(y).kneighbors(y)[0][:, k]
    median = float(torch.pdist(torch.from_numpy(y[:2000])).median())
    lo = float(np.median(nearest))
    lo = lo if 0 < lo < median else median / 100  # many repeated rows: a nearest distance of 0
    return tuple(float(b) for b in np.geomspace(lo, median, scales))


def mmd2(samples: np.ndarray, reference: np.ndarray, bandwidths: Optional[tuple[float, ...]] = None) -> float:
    """MMD^2 as a V-statistic (Gretton et al. 2012's biased estimate: never negative, so its floor has a known
    bound, evaluation.z_scores) with an RBF kernel averaged over several bandwidths (default:
    mmd_bandwidths(reference); pass them explicitly to compare several pairs on one kernel).

    Kernel values are computed in float32 and summed per row, then in float64."""
    x, y = check_pair(samples, reference)
    bandwidths = mmd_bandwidths(y) if bandwidths is None else bandwidths

    def block_sum(d: torch.Tensor) -> float:
        d2 = d.square_()
        total = 0.0
        for s in bandwidths:
            # exp of arguments below about -87 underflows through a path 30x slower on CPU; clamping at -80
            # changes each such kernel value by less than 2e-35.
            k = torch.mul(d2, -0.5 / s**2).clamp_(min=-80.0).exp_()
            total += float(k.sum(1).double().sum())
        return total / len(bandwidths)

    xx, yy, xy = _within_and_between(x, y, block_sum, dtype=torch.float32)
    return xx + yy - 2 * xy


def knn_auc(samples: np.ndarray, reference: np.ndarray, *, folds: int = 5, seed: int = 0) -> float:
    """Classifier two-sample test: out-of-fold ROC AUC of a k-NN classifier (k = sqrt(n_train)) telling
    samples from reference. 0.5 = indistinguishable; 1.0 = told apart perfectly."""
    x, y = check_pair(samples, reference, 2 * folds)
    data = np.concatenate([x, y])
    labels = np.concatenate([np.ones(len(x)), np.zeros(len(y))])
    k = max(1, int(np.sqrt(len(data) * (folds - 1) / folds)))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    p = cross_val_predict(KNeighborsClassifier(k), data, labels, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(labels, p))


GBT_ROUNDS = 100  # boosting rounds of the tree test's classifier (no early stopping: the same trees every time)
GBT_LEAVES = 15  # leaves per tree
GBT_MIN_LEAF = 20  # rows per leaf at most asked (scikit-learn's default); fewer on small tables (gbt_min_leaf)


def gbt_min_leaf(rows: int, folds: int = 2) -> int:
    """Rows per leaf for a training fold of `rows` pooled rows: scikit-learn's 20 from 1,600 rows up, down to 3 on
    small tables, where 20 let a fold of 36 held-out rows and 36 samples grow no split at all (AUC 0.5 whatever the
    samples: a test without power)."""
    return int(np.clip(rows * (folds - 1) // folds // 40, 3, GBT_MIN_LEAF))


def gbt_auc(samples: np.ndarray, reference: np.ndarray, *, folds: int = 2, seed: int = 0) -> float:
    """Classifier two-sample test with gradient-boosted trees: out-of-fold ROC AUC of scikit-learn's
    HistGradientBoostingClassifier telling samples from reference. 0.5 = indistinguishable. Trees see what
    distances blur: a value a column never takes (a 0/1 column relaxed to a continuum), a threshold, a
    column's spikes, structure along one axis among many (the k-NN test averages it away in high D)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from threadpoolctl import threadpool_limits

    x, y = check_pair(samples, reference, 2 * folds)
    data = np.concatenate([x, y])
    labels = np.concatenate([np.ones(len(x)), np.zeros(len(y))])
    trees = HistGradientBoostingClassifier(max_iter=GBT_ROUNDS, max_leaf_nodes=GBT_LEAVES, early_stopping=False,
                                           min_samples_leaf=gbt_min_leaf(len(data), folds), random_state=seed)
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    # one OpenMP thread: on a few thousand rows its threads mostly wait for each other, and beside any other busy
    # process they spin (measured: 0.14 s per test alone, 9 s with a second job on a 2-core machine)
    with threadpool_limits(1, user_api="openmp"):
        p = cross_val_predict(trees, data, labels, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(labels, p))


def efficacy(samples: np.ndarray, sample_labels: np.ndarray, training: np.ndarray, training_labels: np.ndarray,
             held_out: np.ndarray, held_out_labels: np.ndarray, *, boot: int = 500, seed: int = 0) -> dict:
    """Machine-learning efficacy (train on synthetic, test on real): the held-out accuracy of gradient-boosted
    trees (scikit-learn's HistGradientBoostingClassifier, its defaults) trained on the labelled samples, beside
    the same classifier trained on the training rows; the gap's spread is a paired bootstrap over the held-out
    rows (its standard deviation)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from threadpoolctl import threadpool_limits

    right = []
    with threadpool_limits(1, user_api="openmp"):
        for x, y in ((samples, sample_labels), (training, training_labels)):
            if len(np.unique(y)) < 2:  # one class drawn: the classifier names it everywhere
                right.append(held_out_labels == y[0])
                continue
            trees = HistGradientBoostingClassifier(random_state=seed).fit(x, y)
            right.append(trees.predict(held_out) == held_out_labels)
    on_samples, on_training = (r.astype(float) for r in right)
    picks = np.random.default_rng(seed).integers(0, len(held_out), (boot, len(held_out)))
    gaps = on_training[picks].mean(1) - on_samples[picks].mean(1)
    return {"on_samples": float(on_samples.mean()), "on_training_rows": float(on_training.mean()),
            "gap": float(on_training.mean() - on_samples.mean()), "gap_std": float(gaps.std(ddof=1)),
            "held_out_rows": int(len(held_out)), "samples": int(len(samples)), "training_rows": int(len(training))}


def prdc(samples: np.ndarray, reference: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage with k-NN balls (Naeem et al. 2020, eq. 1-4).

    precision: share of samples inside some reference ball; recall: share of reference points
    inside some sample ball; density: mean count of reference balls holding a sample, over k;
    coverage: share of reference balls that hold a sample.
    """
    fake, real = check_pair(samples, reference, k + 1)
    r_real = torch.from_numpy(NearestNeighbors(n_neighbors=k + 1).fit(real).kneighbors(real)[0][:, -1])
    r_fake = torch.from_numpy(NearestNeighbors(n_neighbors=k + 1).fit(fake).kneighbors(fake)[0][:, -1])
    inside, count = 0, 0.0
    for _, d in _blocks(fake, real):  # d: (block of samples, reference)
        hit = d <= r_real[None, :]
        inside += int(hit.any(1).sum())
        count += float(hit.sum())
    recalled, covered = 0, 0
    for i, d in _blocks(real, fake):  # d: (block of reference, samples)
        recalled += int((d <= r_fake[None, :]).any(1).sum())
        covered += int((d.min(1).values <= r_real[i:i + BLOCK]).sum())
    return {"precision": inside / len(fake), "recall": recalled / len(real),
            "density": count / (k * len(fake)), "coverage": covered / len(real)}


def memorized_share(samples: np.ndarray, reference: np.ndarray, training: np.ndarray, quantile: float = 0.1) -> float:
    """Share of samples closer to a training row than the k-th closest of the m reference rows is, k =
    memorized_rank(m, quantile) (distance to the closest training record, Euclidean). Samples exchangeable
    with the reference score about k / (m + 1) (`memorized_null`); a model that reproduces its training rows
    scores more (a copy of them scores 1)."""
    x, y = check_pair(samples, reference)
    train = check_pair(training, y)[0]
    nearest = NearestNeighbors(n_neighbors=1).fit(train)
    cut = np.sort(nearest.kneighbors(y)[0][:, 0])[memorized_rank(len(y), quantile) - 1]
    return float(np.mean(nearest.kneighbors(x)[0][:, 0] < cut))


def memorized_rank(m: int, quantile: float = 0.1) -> int:
    """k: the order statistic of the m reference distances that cuts memorized_share, about quantile * (m + 1)."""
    return min(m, max(1, int(round(quantile * (m + 1)))))


def memorized_null(n: int, m: int, quantile: float = 0.1) -> tuple[float, float]:
    """The exact mean and standard deviation of memorized_share for n samples exchangeable with m reference
    rows (continuous distances): each sample lies below the k-th of m reference distances with probability
    U ~ Beta(k, m - k + 1), so the count is beta-binomial(n, k, m - k + 1). The cut's own uncertainty
    (through m) dominates once n >> m: more samples than reference rows still sharpen the test."""
    k = memorized_rank(m, quantile)
    a, b = k, m - k + 1
    var = n * a * b * (a + b + n) / ((a + b) ** 2 * (a + b + 1))
    return a / (a + b), float(np.sqrt(var)) / n


def off_data_fraction(distance: np.ndarray, threshold: float) -> float:
    """Share of points whose distance to the data's support exceeds `threshold`."""
    return float(np.mean(np.asarray(distance) > threshold))
