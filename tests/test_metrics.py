"""The classifier two-sample test on cases whose answer is known."""

import numpy as np
import pytest

from toydiff.errors import ToydiffError
from toydiff.metrics import knn_auc


def test_same_distribution_scores_one_half(rng):
    a, b = rng.normal(size=(2000, 2)), rng.normal(size=(2000, 2))
    assert abs(knn_auc(a, b) - 0.5) < 0.03


def test_shifted_distribution_is_told_apart(rng):
    a, b = rng.normal(size=(2000, 2)), rng.normal(size=(2000, 2)) + [1.0, 0.0]
    # Bayes-optimal AUC for a unit mean shift of unit Gaussians is Phi(1 / sqrt 2) = 0.760
    assert knn_auc(a, b) == pytest.approx(0.760, abs=0.03)


def test_bad_input_is_refused(rng):
    with pytest.raises(ToydiffError, match="same D"):
        knn_auc(rng.normal(size=(50, 2)), rng.normal(size=(50, 3)))
    with pytest.raises(ToydiffError, match="NaN"):
        knn_auc(np.full((50, 2), np.nan), rng.normal(size=(50, 2)))
    with pytest.raises(ToydiffError, match="at least 10 points"):
        knn_auc(rng.normal(size=(5, 2)), rng.normal(size=(50, 2)))
