"""Likelihoods: the variational bound (ELBO) and the exact probability-flow ODE likelihood.

Both work with an `eps_fn(x_t, t, alpha_bar) -> eps_hat` (t may be fractional for the ODE,
alpha_bar broadcasts against x_t), so a trained network (`model_eps_fn`) and a closed-form
oracle (`oracle.GaussianMixture.eps`) are measured the same way. All values are negative
log-likelihoods in nats per data point, in the frame of x (the model's scaled frame);
`Scaler.log_abs_det` converts them to data units:  nll_data = nll_scaled - log_abs_det.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .losses import LOG_2PI, vlb_term
from .parameterization import Prediction, to_eps, to_x0
from .schedules import NoiseSchedule, pf_ode_drift

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def model_eps_fn(denoiser) -> EpsFn:
    """The EpsFn of a parameterization.Denoiser (alpha_bar handed over, as the ODE's continuous time has it)."""
    return lambda x, t, alpha_bar: to_eps(denoiser.prediction, denoiser.output(x, t)[0], x, alpha_bar)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor | float) -> torch.Tensor:
    """-log N(x; mean, var I), summed over the last dimension."""
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    return 0.5 * (((x - mean) ** 2) / var + torch.log(var) + LOG_2PI).sum(-1)


@torch.no_grad()
def elbo_nll(eps_fn: EpsFn, schedule: NoiseSchedule, x0: torch.Tensor,
             generator: torch.Generator | None = None, variance_fn=None,
             on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Upper bound on -log p(x0) per point (N,), Ho et al. (2020) eq. 5 with a continuous Gaussian decoder:

        L_T = KL(q(x_T | x0) || N(0, I))
        L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)),  t = 2..T, one x_t ~ q(x_t | x0) each
        L_0 = -log N(x0; x0_hat(x_1, 1), sigma_1^2 I)

    with p(x_{t-1} | x_t) = N(posterior mean at x0_hat, sigma_t^2 I), the sampler's step. Fixed variances:
    sigma_t^2 = beta_tilde_t, and beta_1 for the decoder (beta_tilde_1 = 0), Ho et al.'s sigma_1^2 = beta_1;
    they leave the bound loose even for a perfect denoiser (0.8 nats per point for a 2-D Gaussian at
    T = 1000, tests/test_likelihood.py). variance_fn(x_t, t) -> v (N, D), a learned variance
    (NoiseSchedule.learned_log_variance), tightens it (Nichol and Dhariwal 2021). The ODE likelihood is exact.
    on_step() is called after each of the T terms (progress).
    """
    d = x0.shape[1]
    ab_T = float(schedule.alpha_bar64[-1])
    # 1. prior term, in closed form: 0.5 sum(ab x0^2 + (1 - ab) - 1 - log(1 - ab))
    total = 0.5 * (ab_T * (x0.double() ** 2).sum(1) - d * ab_T - d * math.log1p(-ab_T))
    for t in range(1, schedule.T + 1):
        t_vec = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = schedule.q_sample(x0, t_vec, eps)
        alpha_bar = schedule.gather(schedule.alpha_bar, t_vec, x0)
        x0_hat = to_x0(Prediction.EPS, eps_fn(x_t, t_vec, alpha_bar), x_t, alpha_bar)
        # 2. sigma_t^2: learned, or beta_1 for the decoder and beta_tilde_t above it
        if variance_fn is not None:
            log_var = schedule.learned_log_variance(variance_fn(x_t, t_vec), t_vec)
        else:
            fixed = schedule.betas64[1] if t == 1 else float(schedule.beta_tilde64[t])
            log_var = torch.full_like(x0, math.log(fixed))
        # 3. the decoder term at t = 1, the KL above it
        total = total + vlb_term(schedule, x0, x_t, t_vec, x0_hat, log_var).double()
        if on_step is not None:
            on_step()
    return total


def ode_nll(eps_fn: EpsFn, schedule: NoiseSchedule, x0: torch.Tensor, *, exact_divergence: bool | None = None,
            generator: torch.Generator | None = None, rtol: float = 1e-5, atol: float = 1e-5,
            method: str = "dopri5", on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """-log p(x) per point (N,) through the probability-flow ODE (Song et al. 2021), in nats.

    The discrete schedule is made continuous by linear interpolation of the log-SNR lambda
    between integer t, so alpha_bar(lambda) = sigmoid(lambda) and, with x = sqrt(abar)(x0 + sigma eps),

        dx / dlambda = 0.5 (1 - abar) x - 0.5 sqrt(1 - abar) eps_hat(x, t(lambda)),

    integrated from lambda_1 (t = 1, where x is taken to be the data point) to lambda_T, where
    x ~ N(0, I). log p(x) = log N(x_T; 0, I) + int div f dlambda. The divergence is exact (D
    backward passes) for D <= 8, else Hutchinson's estimator with one seeded Rademacher probe.
    on_step() is called at every evaluation of the drift (progress; the solver picks how many).
    """
    lam = schedule.log_snr64
    n, d = x0.shape
    exact = d <= 8 if exact_divergence is None else exact_divergence
    probe = None
    if not exact:
        probe = torch.randint(0, 2, x0.shape, generator=generator, device=x0.device).to(x0.dtype) * 2 - 1

    def f(lam_now: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        x = state[0]
        t = schedule.t_at_log_snr(float(lam_now))
        alpha_bar = torch.sigmoid(lam_now.to(x.dtype)).expand(n, 1)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            eps = eps_fn(x, torch.full((n,), t, dtype=x.dtype, device=x.device), alpha_bar)
            if exact:
                div_eps = sum(torch.autograd.grad(eps[:, i].sum(), x, retain_graph=i < d - 1)[0][:, i]
                              for i in range(d))
            else:
                div_eps = (torch.autograd.grad((eps * probe).sum(), x)[0] * probe).sum(1)
        if on_step is not None:
            on_step()
        dx = pf_ode_drift(x, eps, alpha_bar)
        div = 0.5 * (1 - alpha_bar[:, 0]) * d - 0.5 * (1 - alpha_bar[:, 0]).sqrt() * div_eps  # its divergence
        return dx.detach(), div.detach()

    from torchdiffeq import odeint  # imported where the ODE is solved, not by everything that imports this module

    span = torch.tensor([lam[0], lam[-1]], dtype=x0.dtype, device=x0.device)
    xs, integral = odeint(f, (x0, torch.zeros(n, dtype=x0.dtype, device=x0.device)), span,
                          rtol=rtol, atol=atol, method=method)
    x_T, delta = xs[-1], integral[-1]
    return (gaussian_nll(x_T, torch.zeros_like(x_T), 1.0) - delta).double()

