"""Likelihoods against closed forms: the ODE NLL and the ELBO with exact (oracle) denoisers."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from toydiff.core.config import ScheduleConfig
from toydiff.diffusion.likelihood import elbo_nll, ode_nll
from toydiff.diffusion.oracle import GaussianMixture
from toydiff.diffusion.schedules import NoiseSchedule

GAUSS = GaussianMixture([1.0], [[0.3, -0.2]], [[0.5, 0.8]])
MIX = GaussianMixture([0.3, 0.7], [[-0.6, 0.2], [0.5, -0.3]], [[0.15, 0.1], [0.2, 0.25]])


def test_oracle_log_prob_matches_scipy():
    x = torch.tensor(np.random.default_rng(0).normal(size=(50, 2)))
    expect = np.log(0.3 * stats.multivariate_normal([-0.6, 0.2], np.diag([0.15**2, 0.1**2])).pdf(x.numpy())
                    + 0.7 * stats.multivariate_normal([0.5, -0.3], np.diag([0.2**2, 0.25**2])).pdf(x.numpy()))
    assert np.allclose(MIX.log_prob(x).numpy(), expect, rtol=1e-10)


def test_oracle_eps_is_minus_scaled_score_by_autograd():
    x = torch.randn(20, 2, dtype=torch.float64, requires_grad=True)
    ab = torch.full((20, 1), 0.4, dtype=torch.float64)
    score = torch.autograd.grad(MIX.log_prob(x, 0.4).sum(), x)[0]
    assert torch.allclose(MIX.eps(x.detach(), None, ab), -math.sqrt(0.6) * score, atol=1e-10)


@pytest.mark.parametrize("gmm", [GAUSS, MIX], ids=["gaussian", "mixture"])
def test_ode_nll_matches_the_exact_density(gmm):
    """With the exact eps, the probability-flow ODE gives the exact log-density (of x at t = 1)."""
    s = NoiseSchedule.from_config(ScheduleConfig(name="cosine", T=1000))
    x = torch.tensor(gmm.sample(64, np.random.default_rng(1)))
    nll = ode_nll(gmm.eps, s, x, rtol=1e-7, atol=1e-7)
    exact = -gmm.log_prob(x, float(s.alpha_bar64[1]))  # the density of x_1 = sqrt(abar_1) x0 + noise
    assert torch.allclose(nll, exact, atol=2e-3), (nll - exact).abs().max()
    assert float((nll - exact).mean()) == pytest.approx(0.0, abs=1e-3)


def test_ode_nll_hutchinson_is_unbiased_on_average():
    s = NoiseSchedule.from_config(ScheduleConfig(name="cosine", T=100))
    x = torch.tensor(GAUSS.sample(2000, np.random.default_rng(2)))
    nll = ode_nll(GAUSS.eps, s, x, exact_divergence=False, generator=torch.Generator().manual_seed(0),
                  rtol=1e-5, atol=1e-5)
    exact = -GAUSS.log_prob(x, float(s.alpha_bar64[1]))
    diff = nll - exact
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(len(diff)) + 2e-3


def expected_elbo_gaussian(schedule, mu, sd):
    """E[ELBO] for x0 ~ N(mu, diag sd^2) and the exact denoiser, by hand: every KL term is
    c0_t^2 Var(x0 | x_t) / (2 beta_tilde_t) per axis, with Var(x0 | x_t) = sd^2 (1 - ab) / (ab sd^2 + 1 - ab)."""
    ab, b, T = schedule.alpha_bar64, schedule.betas64, schedule.T
    total = 0.5 * (ab[T] * (sd**2 + mu**2).sum() - len(mu) * ab[T] - len(mu) * math.log1p(-ab[T]))
    for t in range(1, T + 1):
        var0 = sd**2 * (1 - ab[t]) / (ab[t] * sd**2 + 1 - ab[t])
        if t == 1:
            total += 0.5 * (var0 / b[1] + math.log(b[1]) + math.log(2 * math.pi)).sum()
        else:
            c0 = math.sqrt(ab[t - 1]) * b[t] / (1 - ab[t])
            total += c0**2 * var0.sum() / (2 * (1 - ab[t - 1]) / (1 - ab[t]) * b[t])
    return total


@pytest.mark.parametrize("T", [100, 1000])
def test_elbo_matches_its_expectation_by_hand_for_gaussian_data(T):
    s = NoiseSchedule.from_config(ScheduleConfig(name="cosine", T=T))
    x = torch.tensor(GAUSS.sample(4000, np.random.default_rng(3)))
    bound = elbo_nll(GAUSS.eps, s, x, generator=torch.Generator().manual_seed(0))
    expect = expected_elbo_gaussian(s, GAUSS.means[0].numpy(), GAUSS.stds[0].numpy())
    se = float(bound.std()) / math.sqrt(len(bound))
    assert float(bound.mean()) == pytest.approx(expect, abs=4 * se)


@pytest.mark.parametrize("gmm", [GAUSS, MIX], ids=["gaussian", "mixture"])
def test_elbo_is_an_upper_bound_on_the_nll(gmm):
    """With fixed (posterior) variances the bound is valid but loose: about 0.8 nats at T = 1000 for GAUSS."""
    s = NoiseSchedule.from_config(ScheduleConfig(name="cosine", T=1000))
    x = torch.tensor(gmm.sample(4000, np.random.default_rng(3)))
    gap = elbo_nll(gmm.eps, s, x, generator=torch.Generator().manual_seed(0)) + gmm.log_prob(x)
    assert float(gap.mean()) > 3 * float(gap.std()) / math.sqrt(len(gap))


def test_scaled_frame_nll_converts_to_data_units_with_the_scalers_log_det():
    """NLL in data units = NLL in the scaler's frame - log|det d x_scaled / d x| (the rule likelihoods() uses)."""
    from toydiff.data.scaler import Scaler
    data_gmm = GaussianMixture([0.4, 0.6], [[3.0, -20.0], [5.0, -10.0]], [[0.5, 2.0], [0.3, 3.0]])
    x = data_gmm.sample(64, np.random.default_rng(4))
    scaler = Scaler.fit(data_gmm.sample(5000, np.random.default_rng(5)), "minmax")
    scaled_gmm = GaussianMixture(data_gmm.weights.numpy(), scaler.transform(data_gmm.means.numpy()),
                                 data_gmm.stds.numpy() / scaler.scale)
    s = NoiseSchedule.from_config(ScheduleConfig(name="cosine", T=1000))
    nll_scaled = ode_nll(scaled_gmm.eps, s, torch.tensor(scaler.transform(x)), rtol=1e-7, atol=1e-7)
    nll_data = nll_scaled - scaler.log_abs_det
    # x at t = 1 carries noise of std sqrt(1 - abar_1) in the scaled frame: compare with that density, mapped back
    exact_scaled = -scaled_gmm.log_prob(torch.tensor(scaler.transform(x)), float(s.alpha_bar64[1]))
    assert torch.allclose(nll_data, exact_scaled - scaler.log_abs_det, atol=2e-3)
    assert torch.allclose(nll_data, -data_gmm.log_prob(torch.tensor(x)), atol=0.02)


def _exact_reverse_v(schedule, sd):
    """v (NoiseSchedule.learned_log_variance's input) giving the true Var(x_{t-1} | x_t) per axis and t for
    x0 ~ N(mu, diag sd^2): v_{t-1} - alpha_t v_{t-1}^2 / v_t with v_t = abar_t sd^2 + 1 - abar_t."""
    ab, b = schedule.alpha_bar64, schedule.betas64
    var_t = ab[:, None] * sd**2 + 1 - ab[:, None]  # (T + 1, D)
    true = np.empty_like(var_t)
    true[1:] = var_t[:-1] - (1 - b[1:, None]) * var_t[:-1] ** 2 / var_t[1:]
    hi = schedule.log_betas.double().numpy()[:, None]
    lo = schedule.log_beta_tilde_clipped.double().numpy()[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = (np.log(true) - lo) / (hi - lo)
    return torch.as_tensor(2 * frac - 1)


def test_elbo_with_the_exact_reverse_variances_is_tight():
    """Learned variances can close the bound: for Gaussian data the reverse process q(x_{t-1} | x_t) is itself
    Gaussian, and with its exact mean and variance the expected ELBO is the NLL (fixed variances: 0.8 nats
    loose, test above)."""
    s = NoiseSchedule.from_config(ScheduleConfig(name="cosine", T=1000))
    v = _exact_reverse_v(s, GAUSS.stds[0].numpy())
    x = torch.tensor(GAUSS.sample(4000, np.random.default_rng(3)))
    bound = elbo_nll(GAUSS.eps, s, x, generator=torch.Generator().manual_seed(0),
                     variance_fn=lambda x_t, t: v[t].to(x_t))
    gap = bound + GAUSS.log_prob(x)
    se = float(gap.std()) / math.sqrt(len(gap))
    assert abs(float(gap.mean())) < 4 * se + 2e-3, (float(gap.mean()), se)


def test_vlb_term_matches_torch_distributions():
    from torch.distributions import Normal, kl_divergence

    from toydiff.diffusion.likelihood import vlb_term
    s = NoiseSchedule.from_config(ScheduleConfig(name="linear", T=50))
    g = torch.Generator().manual_seed(0)
    x0, x_t, x0_hat = (torch.randn(64, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.randint(1, 51, (64,), generator=g)
    t[:8] = 1
    log_var = torch.randn(64, 3, generator=g, dtype=torch.float64) - 4
    got = vlb_term(s, x0, x_t, t, x0_hat, log_var)
    mean_q, var_q = s.posterior(x0, x_t, t)
    mean_p, _ = s.posterior(x0_hat, x_t, t)
    p = Normal(mean_p, (0.5 * log_var).exp())
    kl = kl_divergence(Normal(mean_q, var_q.sqrt().clamp_min(1e-30).expand_as(mean_q)), p).sum(1)
    expect = torch.where(t == 1, -p.log_prob(x0).sum(1), kl)
    assert torch.allclose(got, expect, rtol=1e-5, atol=1e-8)
