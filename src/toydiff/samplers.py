"""Samplers: plain functions with one signature, driven by one denoiser interface.

    sampler(denoise, schedule, x_T, *, generator=None, callback=None) -> x_0

`denoise(x_t, t) -> x0_hat` hides what the network predicts (see parameterization.Denoiser);
`callback(t, x_t, x0_hat)` sees every step, for trajectories and figures. No sampler
branches on the parameterization, draws a progress bar or touches files.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .registry import Registry
from .schedules import NoiseSchedule

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Optional[Callable[[int, torch.Tensor, torch.Tensor], None]]
Sampler = Callable[..., torch.Tensor]
SAMPLERS: Registry[Sampler] = Registry("sampler")


@SAMPLERS.register("ddpm")
@torch.no_grad()
def sample_ddpm(denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, *,
                generator: torch.Generator | None = None, callback: Callback = None) -> torch.Tensor:
    """Implements Algorithm 2 (ancestral sampling) of Ho et al. (2020), with sigma_t^2 = beta_tilde_t.

    The step is written in the posterior-mean form mu = c0_t x0_hat + ct_t x_t (eq. 7),
    which equals the eps form (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) (eq. 11)
    but stays finite when beta_T = 1 (alpha_T = 0).
    """
    for t in range(schedule.T, 0, -1):
        t_vec = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        # 1. predict x0 from x_t
        x0_hat = denoise(x, t_vec)
        # 2. mean and variance of q(x_{t-1} | x_t, x0_hat), eq. 6-7
        mean, var = schedule.posterior(x0_hat, x, t_vec)
        if callback is not None:
            callback(t, x, x0_hat)
        # 3. x_{t-1} = mu + sigma_t z; no noise on the last step (beta_tilde_1 = 0)
        if t > 1:
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = mean + var.sqrt() * z
        else:
            x = mean
    return x
