"""The noise schedule against formulas written out independently of toydiff's code."""

import math

import numpy as np
import pytest
import torch

from toydiff.core.config import ScheduleConfig
from toydiff.core.errors import ToydiffError
from toydiff.diffusion.schedules import BETA_SCHEDULES, NoiseSchedule


def schedules():
    return [NoiseSchedule.from_config(ScheduleConfig(name=n, T=T)) for n in BETA_SCHEDULES.names() for T in (1, 10, 50)
            if not (n == "linear" and T == 1)] + [NoiseSchedule.from_config(ScheduleConfig(name="linear", T=1000))]


def test_polynomial_is_the_guides_linspace_power():
    s = NoiseSchedule.from_config(ScheduleConfig(name="polynomial", T=10, beta_max=0.99, power=4))
    guide = np.linspace(0, 0.99, 11) ** 4  # the guide: index 0 is a placeholder, t runs 1..T
    np.testing.assert_allclose(s.betas64, guide, rtol=1e-12, atol=0)
    assert s.betas64[-1] == pytest.approx(0.99**4)


def test_linear_is_evenly_spaced_from_start_to_end():
    s = NoiseSchedule.from_config(ScheduleConfig(name="linear", T=1000, beta_start=1e-4, beta_end=0.02))
    assert s.betas64[1] == pytest.approx(1e-4) and s.betas64[1000] == pytest.approx(0.02)
    assert np.allclose(np.diff(s.betas64[1:]), (0.02 - 1e-4) / 999)


def test_cosine_alpha_bar_is_nichol_dhariwal_eq17():
    T, s_ = 50, 0.008
    s = NoiseSchedule.from_config(ScheduleConfig(name="cosine", T=T, cosine_s=s_, max_beta=1.0))
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 10, 25, 49):
        assert s.alpha_bar64[t] == pytest.approx(f(t) / f(0), rel=1e-10)


@pytest.mark.parametrize("schedule", schedules(), ids=lambda s: f"T{s.T}")
def test_alpha_bar_is_the_cumulative_product(schedule):
    prod = 1.0
    for t in range(1, schedule.T + 1):
        prod *= 1.0 - schedule.betas64[t]
        assert schedule.alpha_bar64[t] == pytest.approx(prod, rel=1e-12, abs=1e-300)
    assert schedule.alpha_bar64[0] == 1.0


@pytest.mark.parametrize("schedule", schedules(), ids=lambda s: f"T{s.T}")
def test_posterior_matches_ho_eq_6_7_and_bayes(schedule):
    """q(x_{t-1} | x_t, x_0): eq. 7 written out, and the same Gaussian from Bayes' rule by precisions."""
    torch.manual_seed(0)
    x0, xt = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    for t in range(1, schedule.T + 1):
        ab, ab_prev, beta = schedule.alpha_bar64[t], schedule.alpha_bar64[t - 1], schedule.betas64[t]
        mean, var = schedule.posterior(x0.float(), xt.float(), torch.full((4,), t))
        # eq. 7
        mu = math.sqrt(ab_prev) * beta / (1 - ab) * x0 + math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab) * xt
        var_ho = (1 - ab_prev) / (1 - ab) * beta
        assert torch.allclose(mean.double(), mu, atol=2e-5, rtol=1e-5)
        assert var.shape == (4, 1) and float(var[0]) == pytest.approx(var_ho, rel=1e-5, abs=1e-7)
        if t > 1 and beta < 1:
            # Bayes: prior x_{t-1} ~ N(sqrt(ab_prev) x0, 1 - ab_prev), likelihood x_t ~ N(sqrt(1 - beta) x_{t-1}, beta)
            prec = 1 / (1 - ab_prev) + (1 - beta) / beta
            mu_b = (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(1 - beta) * xt / beta) / prec
            assert torch.allclose(mean.double(), mu_b, atol=2e-5, rtol=1e-4)
            assert float(var[0]) == pytest.approx(1 / prec, rel=1e-4)


def test_guides_eps_form_mean_equals_posterior_form():
    """The guide's mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) equals eq. 7 with x0 from eps."""
    s = NoiseSchedule.from_config(ScheduleConfig(name="polynomial", T=10))
    torch.manual_seed(1)
    x0, eps = torch.randn(1000, 2, dtype=torch.float64), torch.randn(1000, 2, dtype=torch.float64)
    for t in range(1, 11):
        ab, beta = s.alpha_bar64[t], s.betas64[t]
        xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
        guide_mu = (xt - beta / math.sqrt(1 - ab) * eps) / math.sqrt(1 - beta)
        mean, _ = s.posterior(x0.float(), xt.float(), torch.full((1000,), t))
        assert torch.allclose(mean.double(), guide_mu, atol=1e-4)


def test_closed_form_and_iterated_forward_process_agree():
    """q(x_t | x_0) in one draw vs t draws of q(x_t | x_{t-1}): same mean and covariance, given x_0."""
    s = NoiseSchedule.from_config(ScheduleConfig(name="polynomial", T=10))
    n, gen = 200_000, torch.Generator().manual_seed(0)
    x0 = torch.tensor([[0.7, -0.4]]).expand(n, 2)
    for t in (1, 3, 7, 10):
        t_vec = torch.full((n,), t)
        closed = s.q_sample(x0, t_vec, torch.randn(n, 2, generator=gen))
        x = x0
        for k in range(1, t + 1):
            x = s.q_step(x, torch.full((n,), k), torch.randn(n, 2, generator=gen))
        ab = s.alpha_bar64[t]
        for sample in (closed, x):
            se = math.sqrt((1 - ab) / n)
            assert torch.allclose(sample.mean(0).double(), math.sqrt(ab) * x0[0].double(), atol=5 * se)
            cov = torch.cov(sample.T.double())
            assert torch.allclose(cov, (1 - ab) * torch.eye(2, dtype=torch.float64), atol=6 * (1 - ab) * math.sqrt(2 / n))


def test_beta_T_equal_to_one_is_allowed():
    """The guide's text asks for beta_T = 1: alpha_bar_T = 0, and every posterior term stays finite."""
    s = NoiseSchedule.from_config(ScheduleConfig(name="polynomial", T=10, beta_max=1.0))
    assert s.betas64[-1] == 1.0 and s.alpha_bar_T == 0.0
    for a in (s.beta_tilde, s.posterior_coef_x0, s.posterior_coef_xt, s.sqrt_alpha_bar):
        assert torch.isfinite(a).all()
    assert float(s.posterior_coef_xt[10]) == 0.0  # x_{T-1} no longer depends on x_T
    assert float(s.beta_tilde[10]) == pytest.approx(1 - s.alpha_bar64[9], rel=1e-6)
    assert s.terminal_warning() is None


@pytest.mark.parametrize("kw, match", [
    (dict(name="linear", T=10, beta_start=0.0), "beta_1 = 0 is outside"),
    (dict(name="linear", T=10, beta_end=1.5), "beta_7 = 1.00003 is outside"),
    (dict(name="polynomial", T=10, beta_max=1.2), "outside \\(0, 1\\]"),
    (dict(name="sigmoidish", T=10), "unknown schedule 'sigmoidish'; choose one of: linear, polynomial, cosine, sigmoid"),
])
def test_bad_schedules_are_refused(kw, match):
    """An unknown name is refused when the config is made; betas outside (0, 1] when the schedule is built."""
    with pytest.raises(ToydiffError, match=match):
        NoiseSchedule.from_config(ScheduleConfig(**kw))


def test_T_below_one_is_refused():
    with pytest.raises(ToydiffError, match="schedule.T must be >= 1"):
        ScheduleConfig(T=0)


def test_terminal_warning_names_alpha_bar_T():
    s = NoiseSchedule.from_config(ScheduleConfig(name="linear", T=50))  # Ho's betas at T = 50: abar_T ~ 0.6
    assert s.alpha_bar_T == pytest.approx(np.prod(1 - np.linspace(1e-4, 0.02, 50)))
    assert "alpha_bar_T = 0.6" in s.terminal_warning()


@pytest.mark.parametrize("shape", [(5, 1), (5, 2), (5, 5), (5, 3, 2)])
def test_forward_process_any_shape(shape):
    s = NoiseSchedule.from_config(ScheduleConfig(T=10))
    x0, eps, t = torch.randn(shape), torch.randn(shape), torch.tensor([1, 2, 5, 9, 10])
    xt = s.q_sample(x0, t, eps)
    assert xt.shape == shape
    for i, ti in enumerate(t.tolist()):
        expect = math.sqrt(s.alpha_bar64[ti]) * x0[i] + math.sqrt(1 - s.alpha_bar64[ti]) * eps[i]
        assert torch.allclose(xt[i], expect.float(), atol=1e-6)


def test_sigmoid_alpha_bar_is_the_rescaled_sigmoid():
    T, s_, e, tau = 100, -3.0, 3.0, 1.0
    s = NoiseSchedule.from_config(ScheduleConfig(name="sigmoid", T=T, max_beta=1.0))
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    for t in (1, 30, 70, 99):
        expect = (sig(e) - sig((t / T * (e - s_) + s_) / tau)) / (sig(e) - sig(s_))
        assert s.alpha_bar64[t] == pytest.approx(expect, rel=1e-9)


def test_zero_terminal_snr_rescaling_is_lin_et_al_algorithm_1():
    cfg = ScheduleConfig(name="linear", T=1000, zero_terminal_snr=True)
    s = NoiseSchedule.from_config(cfg)
    base = NoiseSchedule.from_config(ScheduleConfig(name="linear", T=1000))
    assert s.alpha_bar_T == pytest.approx(0.0, abs=1e-12) and s.betas64[-1] == pytest.approx(1.0)
    a, first, last = np.sqrt(base.alpha_bar64[1:]), math.sqrt(base.alpha_bar64[1]), math.sqrt(base.alpha_bar64[-1])
    assert np.allclose(np.sqrt(s.alpha_bar64[1:]), (a - last) * first / (first - last), atol=1e-12)
    assert s.alpha_bar64[1] == pytest.approx(base.alpha_bar64[1], rel=1e-12)


def test_zero_terminal_snr_refuses_eps_prediction():
    """Refused by the VP diffusion's rules (toydiff.methods.ddpm), which validate asks; v prediction passes every
    check."""
    from toydiff.core import config as C
    from toydiff.jobs.workflow import validate
    with pytest.raises(ToydiffError, match="set model.prediction=v"):
        validate(C.with_overrides(C.ExperimentConfig(), ["schedule.zero_terminal_snr=true", "model.prediction=eps"]))
    validate(C.with_overrides(C.ExperimentConfig(), ["schedule.zero_terminal_snr=true", "model.prediction=v"]))
