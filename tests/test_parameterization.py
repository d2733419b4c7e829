"""eps / x0 / v conversions: from (x0, eps) build x_t, then every kind must give back x0 and eps."""

import math

import pytest
import torch

from toydiff.errors import ToydiffError
from toydiff.parameterization import Prediction, to_eps, to_x0, training_target


@pytest.mark.parametrize("kind", list(Prediction))
@pytest.mark.parametrize("alpha_bar", [0.999, 0.5, 1e-3])
@pytest.mark.parametrize("shape", [(7, 1), (7, 2), (7, 5)])
def test_round_trip(kind, alpha_bar, shape):
    torch.manual_seed(0)
    x0, eps = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    ab = torch.full((shape[0], 1), alpha_bar, dtype=torch.float64)
    x_t = math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * eps
    pred = training_target(kind, x0, eps, ab)
    assert torch.allclose(to_x0(kind, pred, x_t, ab), x0, atol=1e-9)
    assert torch.allclose(to_eps(kind, pred, x_t, ab), eps, atol=1e-9)


def test_v_target_is_salimans_ho():
    x0, eps, ab = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.25]]), torch.tensor([[0.36]])
    v = training_target(Prediction.V, x0, eps, ab)
    assert torch.allclose(v, 0.6 * eps - 0.8 * x0)


def test_eps_at_zero_alpha_bar_gives_the_mean_not_nan():
    """At abar = 0 (beta_T = 1) eps carries no information on x0: x0_hat is the scaled data's mean, 0."""
    x_t, eps = torch.randn(4, 2), torch.randn(4, 2)
    x0 = to_x0(Prediction.EPS, eps, x_t, torch.zeros(4, 1))
    assert torch.equal(x0, torch.zeros(4, 2))


def test_unknown_prediction_lists_the_choices():
    with pytest.raises(ToydiffError, match="unknown prediction 'score'; choose one of: eps, x0, v"):
        Prediction.parse("score")
