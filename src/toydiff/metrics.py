"""Sample-quality metrics: pure functions (samples, reference) -> number.

Only the classifier two-sample test lives here so far; the metrics issue adds the
rest, each beside its finite-sample noise floor.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier

from .errors import ToydiffError


def knn_auc(samples: np.ndarray, reference: np.ndarray, *, folds: int = 5, seed: int = 0) -> float:
    """Classifier two-sample test: out-of-fold ROC AUC of a k-NN classifier (k = sqrt(n_train)) telling
    samples (n, D) from reference (m, D). 0.5 = indistinguishable; 1.0 = perfectly told apart.

    On Two Moons at n = m = 5000 two iid draws of the data score 0.50 +- 0.01 (shared/REFERENCE.md).
    """
    samples, reference = np.asarray(samples, np.float64), np.asarray(reference, np.float64)
    if samples.ndim != 2 or reference.ndim != 2 or samples.shape[1] != reference.shape[1]:
        raise ToydiffError(f"samples {samples.shape} and reference {reference.shape} must be (n, D) with the same D")
    if min(len(samples), len(reference)) < 2 * folds:
        raise ToydiffError(f"the classifier test needs at least {2 * folds} points on each side")
    if not (np.isfinite(samples).all() and np.isfinite(reference).all()):
        raise ToydiffError("the samples or the reference contain NaN or infinite values")
    x = np.concatenate([samples, reference])
    y = np.concatenate([np.ones(len(samples)), np.zeros(len(reference))])
    k = max(1, int(np.sqrt(len(x) * (folds - 1) / folds)))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    p = cross_val_predict(KNeighborsClassifier(k), x, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, p))
