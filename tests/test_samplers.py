"""The ancestral sampler against an exact oracle.

For Gaussian data x0 ~ N(mu, s^2 I), E[x0 | x_t] is linear in x_t, so with that exact
denoiser every DDPM step is x_{t-1} = a_t x_t + b_t + sigma_t z and the law of the
output is Gaussian with a mean and variance given by a scalar recursion. The test
computes that recursion in float64 by hand and compares it with the sampler's output.
"""

import math

import numpy as np
import pytest
import torch

from toydiff.core.config import ScheduleConfig
from toydiff.diffusion.samplers import SAMPLERS, sample_ddpm
from toydiff.diffusion.schedules import NoiseSchedule

MU, S = 0.3, 0.5


def gaussian_denoiser(schedule):
    def denoise(x_t, t):
        ab = schedule.gather(schedule.alpha_bar, t, x_t).double()
        gain = ab.sqrt() * S**2 / (ab * S**2 + 1 - ab)  # Cov(x0, x_t) / Var(x_t)
        return (MU + gain * (x_t.double() - ab.sqrt() * MU)).to(x_t.dtype)
    return denoise


def recursion(schedule, variance="small"):
    """Mean and variance of the ancestral sampler's output, by hand."""
    m, v = 0.0, 1.0
    for t in range(schedule.T, 0, -1):
        ab, ab_prev, beta = schedule.alpha_bar64[t], schedule.alpha_bar64[t - 1], schedule.betas64[t]
        gain = math.sqrt(ab) * S**2 / (ab * S**2 + 1 - ab)
        c0 = math.sqrt(ab_prev) * beta / (1 - ab)
        ct = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
        a, b = c0 * gain + ct, c0 * (MU - gain * math.sqrt(ab) * MU)
        sigma2 = (1 - ab_prev) / (1 - ab) * beta if variance == "small" or t == 1 else beta
        sigma2 = 0.0 if t == 1 else sigma2  # no noise on the last step
        m, v = a * m + b, a * a * v + sigma2
    return m, v


@pytest.mark.parametrize("cfg", [ScheduleConfig(name="polynomial", T=10), ScheduleConfig(name="cosine", T=50),
                                 ScheduleConfig(name="polynomial", T=10, beta_max=1.0)],
                         ids=["guide", "cosine50", "betaT=1"])
def test_ddpm_output_law_matches_the_exact_recursion(cfg):
    schedule = NoiseSchedule.from_config(cfg)
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    x = sample_ddpm(gaussian_denoiser(schedule), schedule, torch.randn(n, 2, generator=gen), generator=gen)
    m, v = recursion(schedule)
    assert torch.allclose(x.mean(0).double(), torch.tensor([m, m], dtype=torch.float64), atol=5 * math.sqrt(v / n))
    assert torch.allclose(x.var(0).double(), torch.tensor([v, v], dtype=torch.float64), atol=6 * v * math.sqrt(2 / n))


def test_ddpm_with_many_steps_reaches_the_data_law():
    schedule = NoiseSchedule.from_config(ScheduleConfig(name="linear", T=1000))
    m, v = recursion(schedule)
    assert m == pytest.approx(MU, abs=0.01) and v == pytest.approx(S**2, rel=0.02)


def test_beta_T_one_ignores_x_T_in_the_first_step():
    """With alpha_T = 0 the step from T gives x_{T-1} ~ N(sqrt(abar_{T-1}) x0_hat, 1 - abar_{T-1}) whatever x_T is."""
    schedule = NoiseSchedule.from_config(ScheduleConfig(name="polynomial", T=10, beta_max=1.0))
    seen = {}
    def record(t, x_t, x0_hat):
        seen[t] = x_t.clone()
    denoise = lambda x, t: torch.zeros_like(x)  # noqa: E731
    for start in (torch.zeros(50_000, 1), torch.full((50_000, 1), 100.0)):
        sample_ddpm(denoise, schedule, start, generator=torch.Generator().manual_seed(0), callback=record)
        assert torch.isfinite(seen[9]).all()
        assert float(seen[9].std()) == pytest.approx(math.sqrt(1 - schedule.alpha_bar64[9]), rel=0.02)
        assert abs(float(seen[9].mean())) < 0.02


@pytest.mark.parametrize("shape", [(9, 1), (9, 2), (9, 5)])
def test_callback_sees_every_step_and_shapes_are_kept(shape):
    schedule = NoiseSchedule.from_config(ScheduleConfig(T=7))
    ts = []
    x = sample_ddpm(lambda x, t: 0.5 * x, schedule, torch.randn(shape), callback=lambda t, x, x0: ts.append(t))
    assert x.shape == shape and ts == [7, 6, 5, 4, 3, 2, 1]


def test_same_generator_seed_same_samples():
    schedule = NoiseSchedule.from_config(ScheduleConfig(T=10))
    denoise = gaussian_denoiser(schedule)
    a = sample_ddpm(denoise, schedule, torch.randn(100, 2, generator=torch.Generator().manual_seed(5)),
                    generator=torch.Generator().manual_seed(6))
    b = sample_ddpm(denoise, schedule, torch.randn(100, 2, generator=torch.Generator().manual_seed(5)),
                    generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)


def test_registry_lists_ddpm():
    assert SAMPLERS.get("ddpm") is sample_ddpm


# ---- respacing and the deterministic samplers (oracle: an 8-Gaussian mixture with its exact eps) ----

from toydiff.core.errors import ToydiffError  # noqa: E402
from toydiff.diffusion.oracle import GaussianMixture  # noqa: E402


ANGLES = np.arange(8) * np.pi / 4
EIGHT = GaussianMixture(np.full(8, 1 / 8), 0.8 * np.c_[np.cos(ANGLES), np.sin(ANGLES)], np.full((8, 1), 0.08))
FULL = NoiseSchedule.from_config(ScheduleConfig(name="cosine", T=1000))


def oracle_denoiser(schedule):
    """The exact x0_hat of EIGHT on a (possibly respaced) schedule."""
    return EIGHT.denoiser(schedule)


@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading", "karras"])
def test_respacing_keeps_alpha_bar_at_the_kept_steps(spacing):
    r = FULL.respace(10, spacing)
    kept = r.timesteps[1:]
    assert np.all(np.diff(kept) > 0) and 1 <= kept[0] and kept[-1] <= 1000
    assert np.allclose(r.alpha_bar64, FULL.alpha_bar64[r.timesteps], rtol=1e-10)
    assert (kept[-1] == 1000) == (spacing != "leading")  # only diffusers' leading never starts at t = T
    if spacing == "trailing":
        assert kept.tolist() == list(range(100, 1001, 100))


@pytest.mark.parametrize("schedule, steps", [(FULL, 50), (FULL, 10), (FULL, 200), (FULL, 1000),
                                             (NoiseSchedule.from_config(ScheduleConfig(name="linear", T=1000)), 30),
                                             (NoiseSchedule.from_config(ScheduleConfig(name="cosine", T=20)), 20),
                                             (NoiseSchedule.from_config(ScheduleConfig(name="polynomial", T=10)), 4)])
def test_karras_spacing_is_the_nearest_t_to_karras_sigmas_with_every_step_distinct(schedule, steps):
    """The grid has exactly `steps` distinct t, from T down to 1: each t is the one whose sigma is nearest in log
    sigma (brute force here) to Karras et al.'s sigmas (eq. 5, rho = 7, from min(sigma_T, 80) to sigma_1,
    recomputed here), or where an earlier step took it, the next free t below. (It used to round every t up
    and end at t = 2, merging 50 steps into 49.)"""
    T = schedule.T
    r = schedule.respace(steps, "karras")
    kept = r.timesteps[1:][::-1]  # descending
    assert len(kept) == steps and kept[0] == T and kept[-1] == 1 and np.all(np.diff(kept) < 0)
    sig = np.sqrt((1 - schedule.alpha_bar64[1:]) / schedule.alpha_bar64[1:])
    hi = min(sig[-1], 80.0)
    n = steps if hi == sig[-1] else steps - 1
    karras = [(hi ** (1 / 7) + i / max(n - 1, 1) * (sig[0] ** (1 / 7) - hi ** (1 / 7))) ** 7 for i in range(n)]
    wanted = [T] * (steps - n) + [1 + min(range(T), key=lambda j: abs(np.log(sig[j]) - np.log(s))) for s in karras]
    wanted[0], wanted[-1] = T, 1
    for i in range(1, steps):  # the nearest t if it is free, else the next free t below, leaving room to reach 1
        expect = min(wanted[i], kept[i - 1] - 1)
        assert kept[i] == max(expect, steps - i), (i, kept.tolist(), wanted)


def test_bad_respacing_is_refused():
    with pytest.raises(ToydiffError, match="sampling steps must be in 1..T = 1..1000"):
        FULL.respace(2000)
    with pytest.raises(ToydiffError, match="unknown timestep spacing 'even'"):
        FULL.respace(10, "even")


def test_ddim_with_eta_one_is_the_ddpm_step():
    from toydiff.diffusion.samplers import sample_ddim
    s = FULL.respace(50)
    x_T = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = sample_ddpm(oracle_denoiser(s), s, x_T.clone(), generator=torch.Generator().manual_seed(1))
    b = sample_ddim(oracle_denoiser(s), s, x_T.clone(), generator=torch.Generator().manual_seed(1), eta=1.0)
    assert torch.allclose(a, b, atol=5e-5)  # the schedule's terms are stored in float32
    assert float((a - b).abs().mean()) < 1e-6


def test_euler_on_the_pf_ode_is_ddim_with_eta_zero():
    from toydiff.diffusion.samplers import sample_ddim, sample_euler
    s = FULL.respace(30, "karras")
    x_T = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sample_euler(oracle_denoiser(s), s, x_T.clone()),
                          sample_ddim(oracle_denoiser(s), s, x_T.clone()), atol=1e-8)


def test_orders_of_the_ode_samplers():
    """Path-wise error against a 1000-step Heun solution: halving the step halves Euler's error (order 1)
    and quarters Heun's and DPM-Solver++(2M)'s (order 2)."""
    x_T = torch.randn(1000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = SAMPLERS.get("heun")(oracle_denoiser(FULL), FULL, x_T.clone())
    ratios = {}
    for name in ("euler", "heun", "dpmpp-2m", "dpmpp-3m"):
        err = []
        for steps in (20, 40):
            s = FULL.respace(steps, "karras")
            err.append(float((SAMPLERS.get(name)(oracle_denoiser(s), s, x_T.clone()) - reference).norm(dim=1).mean()))
        ratios[name] = err[0] / err[1]
    assert 1.6 < ratios["euler"] < 2.8, ratios
    assert ratios["heun"] > 3.2 and ratios["dpmpp-2m"] > 3.2, ratios
    assert ratios["dpmpp-3m"] > 8, ratios  # order 3 (12 measured; 2M's 6 on this non-uniform grid)


def test_dpmpp_sde_noise_has_the_exact_variance():
    """With x0_hat held constant, one SDE-DPM-Solver++ step from sigma_s to sigma_t has the closed-form law
    (Lu et al. 2022, eq. for the first-order SDE step): mean (sigma_t/sigma_s) e^{-h} x + (1 - e^{-2h}) x0 and,
    in x~ = x/sqrt(abar) units, variance sigma_t^2 (1 - e^{-2h}); checked on a two-step grid whose last step
    lands on x0_hat."""
    betas = np.array([0.3, 0.5])
    s = NoiseSchedule(betas)
    sig = s.sigmas.tolist()  # [0, sigma_1, sigma_2]
    x0 = torch.tensor([0.7, -0.2], dtype=torch.float64)
    seen = []
    x_T = torch.zeros(200_000, 2, dtype=torch.float64) + 0.4
    SAMPLERS.get("dpmpp-2m-sde")(lambda x, t: x0.expand_as(x), s, x_T, generator=torch.Generator().manual_seed(0),
                                 callback=lambda t, x, x0_hat: seen.append(x.clone()))
    x1 = seen[1] * (1 + sig[1] ** 2) ** 0.5  # x~ after the first step
    h = np.log(sig[2] / sig[1])
    mean = (sig[1] / sig[2]) * np.exp(-h) * 0.4 * (1 + sig[2] ** 2) ** 0.5 + (1 - np.exp(-2 * h)) * x0
    std = sig[1] * np.sqrt(1 - np.exp(-2 * h))
    assert torch.allclose(x1.mean(0), mean, atol=5 * std / np.sqrt(200_000) + 1e-12)
    assert torch.allclose(x1.std(0), torch.full((2,), std, dtype=torch.float64), rtol=0.01)


def test_ode_samplers_refuse_infinite_noise():
    s = NoiseSchedule.from_config(ScheduleConfig(name="polynomial", T=10, beta_max=1.0))
    with pytest.raises(ToydiffError, match="use ddpm or ddim"):
        SAMPLERS.get("heun")(lambda x, t: x, s, torch.randn(4, 2))


@pytest.fixture
def private_cache():
    """The oracle's cases share this module's empty cache (conftest.module_cache) instead of one each: the
    floors are the same for every sampler (seeded), computed by whichever case runs first."""


@pytest.mark.slow
@pytest.mark.parametrize("name, steps, spacing", [("ddpm", 1000, "trailing"), ("ddim", 100, "karras"),
                                                  ("euler", 100, "karras"), ("heun", 50, "karras"),
                                                  ("dpmpp-2m", 50, "karras"), ("dpmpp-3m", 25, "karras"),
                                                  ("dpmpp-2m-sde", 50, "karras"), ("dpmpp-2m-sde-heun", 50, "karras"),
                                                  ("dpmpp-3m-sde", 50, "karras"),
                                                  ("ode", 0, "trailing")])
def test_every_sampler_reaches_the_floor_with_the_oracle(name, steps, spacing):
    """No learning error: each sampler's samples of EIGHT are indistinguishable from iid draws at n = 2000
    (every metric within 3 floor deviations) at the stated number of steps. (Ancestral DDPM is borderline
    at 250-500 steps: one or two metrics at z = 3.1-3.5 depending on the seed.)"""
    from toydiff.core.config import EvalConfig
    from toydiff.data.scaler import Scaler
    from toydiff.evaluation.judge import evaluate
    from toydiff.evaluation.reference import Target
    draw = lambda rng, n: EIGHT.sample(n, rng)  # noqa: E731
    target = Target(draw, Scaler.fit(draw(np.random.default_rng(0), 100_000)), {"dataset": "eight-gaussians"})
    s = FULL.respace(steps, spacing) if steps else FULL
    x = SAMPLERS.get(name)(EIGHT.denoiser(s), s, torch.randn(2000, 2, dtype=torch.float64,
                                                               generator=torch.Generator().manual_seed(1)),
                           generator=torch.Generator().manual_seed(2))
    rep = evaluate(x.numpy(), target, EvalConfig(n=2000, w2_n=1000, draws=20, nll_n=0))
    assert rep["verdict"].startswith("indistinguishable"), rep["verdict"]


def test_adaptive_ode_sampler_follows_the_fine_solution_and_counts_its_evaluations():
    """The adaptive solver lands on the same points as a 1000-step Heun solution of the same ODE."""
    from toydiff.diffusion.samplers import sample_ode
    x_T = torch.randn(1000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = SAMPLERS.get("heun")(oracle_denoiser(FULL), FULL, x_T.clone())
    calls = {"n": 0}
    exact = EIGHT.denoiser(FULL)

    def denoise(x, t):  # t is fractional here: alpha_bar by log-SNR interpolation
        calls["n"] += 1
        return exact(x, t)
    x = sample_ode(denoise, FULL, x_T.clone(), rtol=1e-6, atol=1e-6)
    assert float((x - reference).norm(dim=1).mean()) < 5e-3
    assert 20 < calls["n"] < 2000


def test_alpha_bar_at_fractional_t_interpolates_the_log_snr():
    x = torch.zeros(3, 2)
    t = torch.tensor([10, 11, 10])
    exact = FULL.alpha_bar_at(t, x)[:, 0]
    assert torch.allclose(exact, torch.tensor(FULL.alpha_bar64[[10, 11, 10]], dtype=torch.float32))
    mid = FULL.alpha_bar_at(torch.tensor([10.5, 10.0, 11.0], dtype=torch.float64), x)[:, 0].double()
    lam = FULL.log_snr64
    assert float(mid[0]) == pytest.approx(1 / (1 + math.exp(-(lam[9] + lam[10]) / 2)), rel=1e-6)
    assert torch.allclose(mid[1:], exact[:2].double(), rtol=1e-5)
    assert FULL.t_at_log_snr(float(lam[41])) == pytest.approx(42.0)


def test_ddpm_with_large_variance_matches_its_recursion():
    schedule = NoiseSchedule.from_config(ScheduleConfig(name="cosine", T=50))
    n, gen = 200_000, torch.Generator().manual_seed(0)
    x = sample_ddpm(gaussian_denoiser(schedule), schedule, torch.randn(n, 2, generator=gen), generator=gen,
                    variance="large")
    m, v = recursion(schedule, "large")
    assert v > recursion(schedule, "small")[1]  # beta_t >= beta_tilde_t: more spread
    assert torch.allclose(x.mean(0).double(), torch.tensor([m, m], dtype=torch.float64), atol=5 * math.sqrt(v / n))
    assert torch.allclose(x.var(0).double(), torch.tensor([v, v], dtype=torch.float64), atol=6 * v * math.sqrt(2 / n))
    with pytest.raises(ToydiffError, match="unknown variance 'medium'"):
        sample_ddpm(gaussian_denoiser(schedule), schedule, torch.randn(4, 2), variance="medium")


def test_adaptive_solver_failure_is_a_clear_error():
    from toydiff.diffusion.samplers import sample_ode
    with pytest.raises(ToydiffError, match="tighten the tolerances"):
        sample_ode(EIGHT.denoiser(FULL), FULL, torch.randn(200, 2, dtype=torch.float64), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("v, fixed", [(-1.0, "small"), (1.0, "large")])
def test_learned_variance_spans_small_to_large(v, fixed):
    """v = -1 is beta_tilde_t, v = +1 is beta_t (Nichol and Dhariwal 2021, eq. 15): the same draws as the
    fixed variances, on the full and on a respaced schedule (whose own beta and beta_tilde are interpolated)."""
    for s in (FULL.respace(200), FULL.respace(20, "linspace")):
        x_T = torch.randn(300, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        den = oracle_denoiser(s)
        with_v = lambda x, t: (den(x, t), torch.full_like(x, v))  # noqa: E731
        a = sample_ddpm(with_v, s, x_T.clone(), generator=torch.Generator().manual_seed(1), variance="learned")
        b = sample_ddpm(den, s, x_T.clone(), generator=torch.Generator().manual_seed(1), variance=fixed)
        assert torch.allclose(a, b, atol=1e-5)


def test_learned_log_variance_is_the_log_space_interpolation():
    t = torch.tensor([1, 2, 500, 1000])
    v = torch.tensor([[0.0], [0.5], [-0.3], [2.0]], dtype=torch.float64)
    b, ab = FULL.betas64, FULL.alpha_bar64
    tilde = lambda k: b[k] * (1 - ab[k - 1]) / (1 - ab[k])  # noqa: E731
    expect = [(1 + vv) / 2 * math.log(b[k]) + (1 - vv) / 2 * math.log(tilde(max(k, 2)))
              for k, vv in zip(t.tolist(), v[:, 0].tolist())]
    assert torch.allclose(FULL.learned_log_variance(v, t)[:, 0], torch.tensor(expect, dtype=torch.float64),
                          rtol=1e-6)
