"""Samplers: plain functions with one signature, driven by one denoiser interface.

    sampler(denoise, schedule, x_T, *, generator=None, callback=None) -> x_0

`denoise(x_t, t) -> x0_hat` hides what the network predicts (see parameterization.Denoiser);
t is (B,) per sample or (1,) for the whole batch. Every sampler here steps the whole batch at one
t and passes it as (1,): the network then embeds the time once, not once per row, which makes a
sampling step 1.4-2x cheaper than a forward pass with a per-row t (benchmarks/speed.py).
`callback(t, x_t, x0_hat)` sees every step, for trajectories, figures and progress. No sampler
branches on the parameterization, draws a progress bar or touches files. A sampler's options
are its keyword parameters (ddim's `eta`, ddpm's `variance`): toydiff.diffusion.sampling reads them off
the signature, so adding a sampler is its function here and its name in config.SAMPLERS.

t indexes the schedule handed over, which may be a respaced one (`NoiseSchedule.respace`):
the caller's denoiser maps it to the training t (`schedule.model_t`). The ODE samplers work
on x~ = x_t / sqrt(abar_t) and sigma_t = sqrt((1 - abar_t) / abar_t), as k-diffusion does.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..core.config import SAMPLERS as NAMES, VARIANCES
from ..core.errors import ToydiffError
from ..core.registry import Registry
from ..core.runtime import NoiseStream
from .parameterization import Denoise
from .schedules import NoiseSchedule, pf_ode_drift

Callback = Optional[Callable[[int, torch.Tensor, torch.Tensor], None]]
Sampler = Callable[..., torch.Tensor]
SAMPLERS: Registry[Sampler] = Registry("sampler", NAMES)


# Marks a sampler carries (toydiff.diffusion.sampling reads them): what it is, not lists kept elsewhere.
def adaptive(fn: Sampler) -> Sampler:
    """Marks a sampler that chooses its own steps: it calls the denoiser at fractional t and walks the full
    schedule, never a respaced one."""
    fn.adaptive = True
    return fn


def stochastic(fn: Sampler) -> Sampler:
    """Marks a sampler that draws fresh noise after x_T (ddim only at eta > 0, so it is not marked)."""
    fn.stochastic = True
    return fn


def trailing(fn: Sampler) -> Sampler:
    """Marks a sampler whose grid under sample.spacing = auto is trailing t rather than Karras sigmas: the
    grid each sampler was measured best on (benchmarks/nfe.py), or the one its steps were trained for."""
    fn.default_spacing = "trailing"
    return fn


def randn_like(x: torch.Tensor, generator: torch.Generator | NoiseStream | None) -> torch.Tensor:
    """Standard normal noise shaped like x, from a torch.Generator or a per-sample NoiseStream."""
    if isinstance(generator, NoiseStream):
        return generator.randn(tuple(x.shape), x.dtype)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@SAMPLERS.register("ddpm")
@stochastic
@trailing
@torch.no_grad()
def sample_ddpm(denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, *,
                generator: torch.Generator | None = None, callback: Callback = None,
                variance: str = "small") -> torch.Tensor:
    """Implements Algorithm 2 (ancestral sampling) of Ho et al. (2020), with sigma_t^2 = beta_tilde_t
    ("small", the posterior's) or beta_t ("large"); Ho et al. found both about equally good. With
    "learned", denoise returns (x0_hat, v) and sigma_t^2 interpolates the two on the schedule walked
    (Nichol and Dhariwal 2021, eq. 15; on a respaced schedule, its own beta_t and beta_tilde_t).

    The step is written in the posterior-mean form mu = c0_t x0_hat + ct_t x_t (eq. 7),
    which equals the eps form (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) (eq. 11)
    but stays finite when beta_T = 1 (alpha_T = 0).
    """
    if variance not in VARIANCES:
        raise ToydiffError(f"unknown variance '{variance}'; choose one of: {', '.join(VARIANCES)}")
    for t in range(schedule.T, 0, -1):
        t_vec = _index(t, x)
        # 1. predict x0 (and, if learned, the variance) from x_t
        if variance == "learned":
            x0_hat, v = denoise(x, t_vec)
        else:
            x0_hat = denoise(x, t_vec)
        # 2. mean and variance of q(x_{t-1} | x_t, x0_hat), eq. 6-7
        mean, var = schedule.posterior(x0_hat, x, t_vec)
        if callback is not None:
            callback(t, x, x0_hat)
        # 3. x_{t-1} = mu + sigma_t z; no noise on the last step (beta_tilde_1 = 0)
        if t > 1:
            if variance == "large":
                var = schedule.gather(schedule.betas, t_vec, x)
            elif variance == "learned":
                var = schedule.learned_log_variance(v, t_vec).exp()
            z = randn_like(x, generator)
            x = mean + var.sqrt() * z
        else:
            x = mean
    return x


def _index(t: int, x: torch.Tensor) -> torch.Tensor:
    """Step t for the whole batch, as a (1,) tensor that broadcasts against x (B, D)."""
    return torch.full((1,), t, dtype=torch.long, device=x.device)


@SAMPLERS.register("ddim")
@torch.no_grad()
def sample_ddim(denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, *,
                generator: torch.Generator | None = None, callback: Callback = None, eta: float = 0.0) -> torch.Tensor:
    """Implements the generalised step of Song et al. (2021), eq. 12; eta = 0 is deterministic DDIM,
    eta = 1 is the ancestral DDPM step (sigma_t^2 = beta_tilde_t, eq. 16)."""
    ab = schedule.alpha_bar64
    for t in range(schedule.T, 0, -1):
        t_vec = _index(t, x)
        # 1. predicted x0 and the eps it implies
        x0_hat = denoise(x, t_vec)
        eps = (x - ab[t] ** 0.5 * x0_hat) / (1 - ab[t]) ** 0.5
        if callback is not None:
            callback(t, x, x0_hat)
        # 2. sigma_t(eta), eq. 16, and the direction pointing to x_t, eq. 12
        sigma = eta * float(schedule.beta_tilde64[t]) ** 0.5
        x = ab[t - 1] ** 0.5 * x0_hat + max(1 - ab[t - 1] - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * randn_like(x, generator)
    return x


@SAMPLERS.register("consistency")
@stochastic
@trailing
@torch.no_grad()
def sample_consistency(denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, *,
                       generator: torch.Generator | None = None, callback: Callback = None) -> torch.Tensor:
    """Implements multistep consistency sampling (Song et al. 2023, Algorithm 1): x0_hat = f(x_T, T), then
    at each lower grid point t the estimate is noised afresh, x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) z,
    and denoised again: one evaluation a step, the last estimate returned. Made for consistency models
    (`toydiff distill --method consistency`), whose x0_hat maps any x_t to the end of its ODE path; a
    diffusion model's x0_hat is a posterior mean, which this sampler only blurs."""
    x0_hat = x
    for t in range(schedule.T, 0, -1):
        if t < schedule.T:
            ab = schedule.alpha_bar64[t]
            x = ab**0.5 * x0_hat + (1 - ab) ** 0.5 * randn_like(x, generator)
        x0_hat = denoise(x, _index(t, x))
        if callback is not None:
            callback(t, x, x0_hat)
    return x0_hat


@SAMPLERS.register("meanflow")
@trailing
@torch.no_grad()
def sample_meanflow(denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, *,
                    generator: torch.Generator | None = None, callback: Callback = None) -> torch.Tensor:
    """Implements MeanFlow's sampler (Geng et al. 2025, Algorithm 2, in one or more steps): from each grid point t
    to the next, r, x_r = x_t - (t - r) u(x_t, r, t) with u the learned mean velocity over [r, t], one evaluation
    a step. Written as the deterministic DDIM step (eq. 12) on denoise(x_t, t, r), the x0_hat whose straight line
    makes that move (parameterization.MeanFlowDenoiser): only a model trained with train.objective = meanflow
    takes the third argument."""
    ab = schedule.alpha_bar64
    for t in range(schedule.T, 0, -1):
        x0_hat = denoise(x, _index(t, x), _index(t - 1, x))
        eps = (x - ab[t] ** 0.5 * x0_hat) / (1 - ab[t]) ** 0.5
        if callback is not None:
            callback(t, x, x0_hat)
        x = ab[t - 1] ** 0.5 * x0_hat + (1 - ab[t - 1]) ** 0.5 * eps
    return x


def _sigma_grid(schedule: NoiseSchedule) -> list[float]:
    sigmas = schedule.sigmas.tolist()
    if not torch.isfinite(torch.tensor(sigmas[-1])):
        raise ToydiffError("alpha_bar_T = 0 (beta_T = 1) puts x_T at infinite noise, where the probability-flow "
                           "ODE samplers cannot start; use ddpm or ddim, or a schedule with beta_T < 1")
    return sigmas


def _ve_denoiser(denoise: Denoise, sigmas: list[float]):
    """x0_hat as a function of the variance-exploding x~ = x_t / sqrt(abar_t) at grid index t."""
    def x0(x_ve: torch.Tensor, t: int) -> torch.Tensor:
        return denoise(x_ve / (1 + sigmas[t] ** 2) ** 0.5, _index(t, x_ve))
    return x0


def _karras_ode(denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, callback: Callback,
                second_order: bool) -> torch.Tensor:
    """Euler or Heun steps on the probability-flow ODE over the schedule's sigmas.

    Euler is dx~/dsigma = (x~ - x0_hat) / sigma, one step x~ + (sigma' - sigma) d. Heun's trapezoid is taken
    in s = sigma / (1 + sigma) on y = x~ / (1 + sigma) = (1 - s) x0 + s eps, where dy/ds = (y - x0_hat) / s
    (for a flow-matching model, its own time and velocity). Its Euler part is the same step (both are exact
    for a constant x0_hat), but its correction stays bounded from any sigma_T, where the trapezoid in sigma
    multiplies the second prediction's error by sigma_T / sigma' (from the flow grid's sigma_T = 1e4, a
    5-step Heun landed samples 4 units off Two Moons; measured) and VP grids start at sigma_T ~ 1e2..1e4."""
    sigmas = _sigma_grid(schedule)
    x0_of = _ve_denoiser(denoise, sigmas)
    x = x * (1 + sigmas[-1] ** 2) ** 0.5
    for t in range(schedule.T, 0, -1):
        x0_hat = x0_of(x, t)
        if callback is not None:
            callback(t, x / (1 + sigmas[t] ** 2) ** 0.5, x0_hat)
        d = (x - x0_hat) / sigmas[t]
        x_euler = x + (sigmas[t - 1] - sigmas[t]) * d
        if not second_order or sigmas[t - 1] == 0:  # the last step to sigma = 0 stays Euler (no division by 0)
            x = x_euler
        else:
            s, s_next = sigmas[t] / (1 + sigmas[t]), sigmas[t - 1] / (1 + sigmas[t - 1])
            y, y_euler = x / (1 + sigmas[t]), x_euler / (1 + sigmas[t - 1])
            v, v_next = (y - x0_hat) / s, (y_euler - x0_of(x_euler, t - 1)) / s_next
            x = (y + (s_next - s) * (v + v_next) / 2) * (1 + sigmas[t - 1])
    return x


@SAMPLERS.register("euler")
@torch.no_grad()
def sample_euler(denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, *,
                 generator: torch.Generator | None = None, callback: Callback = None) -> torch.Tensor:
    """Implements Algorithm 1 (Euler steps) of Karras et al. (2022) on the probability-flow ODE
    dx~/dsigma = (x~ - x0_hat) / sigma, over the schedule's sigmas. On this grid it equals DDIM with eta = 0."""
    return _karras_ode(denoise, schedule, x, callback, second_order=False)


@SAMPLERS.register("heun")
@torch.no_grad()
def sample_heun(denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, *,
                generator: torch.Generator | None = None, callback: Callback = None) -> torch.Tensor:
    """Heun steps (Algorithm 2 of Karras et al. 2022, no churn), the trapezoid taken in s = sigma / (1 + sigma)
    (see _karras_ode): 2 S - 1 evaluations for S steps."""
    return _karras_ode(denoise, schedule, x, callback, second_order=True)


@SAMPLERS.register("dpmpp-2m")
@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, *,
                    generator: torch.Generator | None = None, callback: Callback = None) -> torch.Tensor:
    """Implements DPM-Solver++(2M), Algorithm 2 of Lu et al. (2022): multistep, second order, one evaluation a step,
    in log-sigma time (lambda = -log sigma) on the variance-exploding x~."""
    sigmas = _sigma_grid(schedule)
    x0_of = _ve_denoiser(denoise, sigmas)
    x = x * (1 + sigmas[-1] ** 2) ** 0.5
    old, h_last = None, None
    for t in range(schedule.T, 0, -1):
        x0_hat = x0_of(x, t)
        if callback is not None:
            callback(t, x / (1 + sigmas[t] ** 2) ** 0.5, x0_hat)
        if sigmas[t - 1] == 0:  # the last step lands on the prediction itself
            x = x0_hat
            break
        h = math.log(sigmas[t]) - math.log(sigmas[t - 1])
        if old is None:
            d = x0_hat  # 1. first step: DPM-Solver++(1), i.e. DDIM
        else:
            r = h_last / h  # 2. second-order correction from the previous prediction, eq. (2M)
            d = (1 + 1 / (2 * r)) * x0_hat - (1 / (2 * r)) * old
        x = (sigmas[t - 1] / sigmas[t]) * x - math.expm1(-h) * d
        old, h_last = x0_hat, h
    return x


def _dpmpp_multistep(denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, order: int, eta: float,
                     generator: torch.Generator | None, callback: Callback, solver: str = "heun") -> torch.Tensor:
    """DPM-Solver++ multistep of order 2 or 3 in k-diffusion's exponential-integrator form, on x~ with
    lambda = -log sigma; eta = 0 solves the probability-flow ODE, eta > 0 the SDE (Lu et al. 2022, sec. 5).

    With h = lambda_{i+1} - lambda_i and h_eta = (1 + eta) h, one step is
        x~ <- (sigma_{i+1} / sigma_i) e^{-eta h} x~ + (1 - e^{-h_eta}) D_0 + phi_2 D_1 - phi_3 D_2
             + sigma_{i+1} sqrt(1 - e^{-2 eta h}) z,
    phi_2 = 1 - (1 - e^{-h_eta}) / h_eta, phi_3 = phi_2 / h_eta - 1/2, and D_0 = x0_hat, D_1, D_2 the first
    and second divided differences (in lambda) of the last three x0 predictions (fewer on the first steps).
    solver "midpoint" replaces the second-order coefficient phi_2 by (1 - e^{-h_eta}) / 2 (Lu et al.'s
    SDE-DPM-Solver++(2M) as written in the paper; "heun" is k-diffusion's other choice).
    """
    sigmas = _sigma_grid(schedule)
    x0_of = _ve_denoiser(denoise, sigmas)
    x = x * (1 + sigmas[-1] ** 2) ** 0.5
    history: list[tuple[torch.Tensor, float]] = []  # (x0_hat, h) of the previous steps, newest first
    for t in range(schedule.T, 0, -1):
        x0_hat = x0_of(x, t)
        if callback is not None:
            callback(t, x / (1 + sigmas[t] ** 2) ** 0.5, x0_hat)
        if sigmas[t - 1] == 0:  # the last step lands on the prediction itself
            return x0_hat
        h = math.log(sigmas[t]) - math.log(sigmas[t - 1])
        h_eta = h * (1 + eta)
        # 1. first-order (DDIM-like) part: exact for a constant x0_hat
        x = (sigmas[t - 1] / sigmas[t]) * math.exp(-eta * h) * x - math.expm1(-h_eta) * x0_hat
        phi_2 = math.expm1(-h_eta) / h_eta + 1  # 1 - (1 - e^{-h_eta}) / h_eta
        phi_3 = phi_2 / h_eta - 0.5
        if order >= 3 and len(history) >= 2:
            # 2a. third order: divided differences of the last three predictions
            (x0_1, h_1), (x0_2, h_2) = history[0], history[1]
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (x0_hat - x0_1) / r0, (x0_1 - x0_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi_2 * d1 - phi_3 * d2
        elif history:
            # 2b. second order from the previous prediction
            x0_1, h_1 = history[0]
            coef = phi_2 if solver == "heun" else -0.5 * math.expm1(-h_eta)
            x = x + coef * (x0_hat - x0_1) / (h_1 / h)
        # 3. the SDE's fresh noise
        if eta > 0:
            z = randn_like(x, generator)
            x = x + sigmas[t - 1] * (-math.expm1(-2 * eta * h)) ** 0.5 * z
        history = [(x0_hat, h)] + history[:1]
    return x


@SAMPLERS.register("dpmpp-3m")
@torch.no_grad()
def sample_dpmpp_3m(denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, *,
                    generator: torch.Generator | None = None, callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022): third-order multistep on the probability-flow ODE, one evaluation a step."""
    return _dpmpp_multistep(denoise, schedule, x, 3, 0.0, generator, callback)


@SAMPLERS.register("dpmpp-2m-sde")
@stochastic
@torch.no_grad()
def sample_dpmpp_2m_sde(denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, *,
                        generator: torch.Generator | None = None, callback: Callback = None) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022) in its midpoint form: second-order multistep on the reverse SDE,
    the form diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++") and k-diffusion's
    sample_dpmpp_2m_sde use by default (tests/test_interop.py checks it step for step)."""
    return _dpmpp_multistep(denoise, schedule, x, 2, 1.0, generator, callback, solver="midpoint")


@SAMPLERS.register("dpmpp-2m-sde-heun")
@stochastic
@torch.no_grad()
def sample_dpmpp_2m_sde_heun(denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, *,
                             generator: torch.Generator | None = None, callback: Callback = None) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) with the "heun" second-order coefficient phi_2 (k-diffusion's and diffusers'
    solver_type="heun"); toydiff's dpmpp-2m-sde before it took the midpoint form."""
    return _dpmpp_multistep(denoise, schedule, x, 2, 1.0, generator, callback, solver="heun")


@SAMPLERS.register("dpmpp-3m-sde")
@stochastic
@torch.no_grad()
def sample_dpmpp_3m_sde(denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, *,
                        generator: torch.Generator | None = None, callback: Callback = None) -> torch.Tensor:
    """The third-order multistep DPM-Solver++ on the reverse SDE (eta = 1), as k-diffusion's sample_dpmpp_3m_sde."""
    return _dpmpp_multistep(denoise, schedule, x, 3, 1.0, generator, callback)


@SAMPLERS.register("ode")
@adaptive
@torch.no_grad()
def sample_ode(denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, *,
               generator: torch.Generator | None = None, callback: Callback = None,
               rtol: float = 1e-4, atol: float = 1e-4, method: str = "dopri5") -> torch.Tensor:
    """The probability-flow ODE (Song et al. 2021) with torchdiffeq's adaptive solver, in log-SNR time:
    dx/dlambda = 0.5 (1 - abar) x - 0.5 sqrt(1 - abar) eps_hat, from lambda_T to lambda_1, then the
    prediction x0_hat(x_1, 1). The solver picks its own steps (and so the NFE) for the tolerance, from the
    error estimate of the whole batch, so a sample moves slightly with the batch it is in (4e-3 measured at
    the default tolerances, tests/test_sampler_contract.py); the denoiser is called at fractional t, so
    this runs on the full (not respaced) schedule."""
    from torchdiffeq import odeint

    lam = schedule.log_snr64
    def f(lam_now: torch.Tensor, x_now: torch.Tensor) -> torch.Tensor:
        t = torch.full((1,), schedule.t_at_log_snr(float(lam_now)), dtype=torch.float64, device=x.device)
        ab = torch.sigmoid(lam_now.to(torch.float64)).item()
        x0_hat = denoise(x_now, t)
        eps = (x_now - ab**0.5 * x0_hat) / (1 - ab) ** 0.5
        return pf_ode_drift(x_now, eps, ab)

    span = torch.tensor([lam[-1], lam[0]], dtype=torch.float64, device=x.device)
    try:
        x1 = odeint(f, x, span, rtol=rtol, atol=atol, method=method)[-1]
    except AssertionError as e:  # torchdiffeq's step-size controller gave up ("underflow in dt")
        raise ToydiffError(f"the adaptive ODE solver failed at rtol = {rtol:g}, atol = {atol:g} ({e}); "
                           "tighten the tolerances (1e-3 or below) or use dpmpp-2m") from None
    x0_hat = denoise(x1, _index(1, x1))
    if callback is not None:
        callback(1, x1, x0_hat)
    return x0_hat
