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

from toydiff.config import ScheduleConfig
from toydiff.samplers import SAMPLERS, sample_ddpm
from toydiff.schedules import NoiseSchedule

MU, S = 0.3, 0.5


def gaussian_denoiser(schedule):
    def denoise(x_t, t):
        ab = schedule.gather(schedule.alpha_bar, t, x_t).double()
        gain = ab.sqrt() * S**2 / (ab * S**2 + 1 - ab)  # Cov(x0, x_t) / Var(x_t)
        return (MU + gain * (x_t.double() - ab.sqrt() * MU)).to(x_t.dtype)
    return denoise


def recursion(schedule):
    """Mean and variance of the ancestral sampler's output, by hand."""
    m, v = 0.0, 1.0
    for t in range(schedule.T, 0, -1):
        ab, ab_prev, beta = schedule.alpha_bar64[t], schedule.alpha_bar64[t - 1], schedule.betas64[t]
        gain = math.sqrt(ab) * S**2 / (ab * S**2 + 1 - ab)
        c0 = math.sqrt(ab_prev) * beta / (1 - ab)
        ct = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
        a, b = c0 * gain + ct, c0 * (MU - gain * math.sqrt(ab) * MU)
        sigma2 = (1 - ab_prev) / (1 - ab) * beta
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
