"""Beta schedules and the NoiseSchedule: the forward process q(x_t | x_0) and the posterior q(x_{t-1} | x_t, x_0).

Timestep convention (the guide's and Ho et al.'s): t runs 1..T and t = 0 is the data.
Every per-step array has T + 1 entries and is indexed by t directly; entry 0 holds
beta_0 = 0, alpha_bar_0 = 1 so that formulas at t = 1 need no special case.
All schedule math is done in float64; the tensors are stored in float32.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..core.config import SCHEDULES, SPACINGS, ScheduleConfig, choose
from ..core.errors import ToydiffError
from ..core.registry import Registry

BetaFn = Callable[[ScheduleConfig], np.ndarray]
BETA_SCHEDULES: Registry[BetaFn] = Registry("schedule", SCHEDULES)
# alpha_bar_T above this leaves x_T visibly different from N(0, I).
ALPHA_BAR_T_WARN = 1e-2


@BETA_SCHEDULES.register("linear")
def linear_betas(cfg: ScheduleConfig) -> np.ndarray:
    """beta_t evenly spaced from beta_start (t = 1) to beta_end (t = T) (Ho et al. 2020)."""
    return np.linspace(cfg.beta_start, cfg.beta_end, cfg.T, dtype=np.float64)


@BETA_SCHEDULES.register("polynomial")
def polynomial_betas(cfg: ScheduleConfig) -> np.ndarray:
    """beta_t = (beta_max * t / T) ** power: the guide's linspace(0, beta_max, T + 1) ** power without its 0."""
    t = np.arange(1, cfg.T + 1, dtype=np.float64)
    return (cfg.beta_max * t / cfg.T) ** cfg.power


@BETA_SCHEDULES.register("cosine")
def cosine_betas(cfg: ScheduleConfig) -> np.ndarray:
    """alpha_bar(t) = cos^2((t / T + s) / (1 + s) * pi / 2), betas clipped at max_beta (Nichol and Dhariwal 2021, eq. 17)."""
    t = np.arange(cfg.T + 1, dtype=np.float64)
    f = np.cos((t / cfg.T + cfg.cosine_s) / (1 + cfg.cosine_s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], cfg.max_beta)


@BETA_SCHEDULES.register("sigmoid")
def sigmoid_betas(cfg: ScheduleConfig) -> np.ndarray:
    """alpha_bar(t) = (sigmoid(-(start + (end - start) t / T) / tau) rescaled to run from 1 to 0 (Jabri et al.
    2023, the sigmoid schedule), betas clipped at max_beta."""
    s, e, tau = cfg.sigmoid_start, cfg.sigmoid_end, cfg.sigmoid_tau
    t = np.arange(cfg.T + 1, dtype=np.float64) / cfg.T
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    v_start, v_end = sig(s / tau), sig(e / tau)
    alpha_bar = (v_end - sig((t * (e - s) + s) / tau)) / (v_end - v_start)
    return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], cfg.max_beta)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Algorithm 1 of Lin et al. (2023): shift and scale sqrt(alpha_bar) so that it ends at exactly 0 (zero
    terminal SNR, beta_T = 1) while keeping its first value."""
    sqrt_ab = np.sqrt(np.cumprod(1 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    return 1 - np.concatenate([[ab[0]], ab[1:] / ab[:-1]])


FLOW_T_MAX = 1 - 1e-4  # flow: the grid's last time; t = 1 (pure noise) lies at infinite noise in the VP view


def flow_betas(T: int) -> np.ndarray:
    """Flow matching's straight path on the time grid t_k = FLOW_T_MAX k / T, written as a VP schedule.

    x_t = (1 - t) x0 + t eps is c(t) (sqrt(abar) x0 + sqrt(1 - abar) eps) with c(t) = sqrt((1 - t)^2 + t^2)
    and abar(t) = (1 - t)^2 / c(t)^2: the same law up to the scale c(t), so every sampler, respacing and
    likelihood of the VP process walks the flow path unchanged, told t through the log-SNR (flow_time);
    the network sees the flow's own x_t and t (parameterization.FlowDenoiser). Its sigma = t / (1 - t).
    The grid stops at FLOW_T_MAX, where x_t differs from pure noise by 1e-4 x0, since sigma is infinite at t = 1."""
    t = FLOW_T_MAX * np.arange(T + 1) / T
    alpha_bar = (1 - t) ** 2 / ((1 - t) ** 2 + t**2)
    return 1 - alpha_bar[1:] / alpha_bar[:-1]


def flow_time(schedule: "NoiseSchedule", t: torch.Tensor) -> torch.Tensor:
    """The flow time s (float64, t's shape) of grid point t (integer, or fractional: the log-SNR interpolated)
    of a flow schedule (flow_betas): sigma = e^(-lambda / 2) = s / (1 - s), so s = sigmoid(-lambda_t / 2)
    (from lambda, not alpha_bar: 1 - alpha_bar cancels badly at small s). Grid point 0 is the data: s = 0."""
    s = torch.sigmoid(-0.5 * schedule.log_snr_at(t))
    return torch.where(t > 0, s, torch.zeros_like(s))


def flow_scale(t: torch.Tensor) -> torch.Tensor:
    """c(t) = sqrt((1 - t)^2 + t^2): the flow's x_t is c(t) times the VP process's x_t (flow_betas)."""
    return ((1 - t) ** 2 + t**2).sqrt()


def pf_ode_drift(x: torch.Tensor, eps: torch.Tensor, alpha_bar) -> torch.Tensor:
    """dx/dlambda of the probability-flow ODE (Song et al. 2021) in log-SNR time lambda = log(abar / (1 - abar)):
    0.5 (1 - abar) x - 0.5 sqrt(1 - abar) eps_hat. Shared by the adaptive sampler and the likelihood ODE."""
    return 0.5 * (1 - alpha_bar) * x - 0.5 * (1 - alpha_bar) ** 0.5 * eps


def append_dims(a: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dimensions in all, to broadcast a per-sample scalar against x."""
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


class NoiseSchedule:
    """Betas and every quantity derived from them, indexed by t = 0..T.

    alpha_t = 1 - beta_t, alpha_bar_t = prod_{s <= t} alpha_s (Ho et al. 2020, eq. 4),
    posterior q(x_{t-1} | x_t, x_0) = N(mean_coef_x0_t x_0 + mean_coef_xt_t x_t, beta_tilde_t I) (eq. 6-7).
    """

    def __init__(self, betas: np.ndarray | torch.Tensor, device: torch.device | str = "cpu",
                 timesteps: np.ndarray | None = None):
        b = np.asarray(betas.cpu() if isinstance(betas, torch.Tensor) else betas, dtype=np.float64).reshape(-1)
        if b.size < 1:
            raise ToydiffError("a noise schedule needs at least one step (T >= 1)")
        bad = np.flatnonzero(~((b > 0) & (b <= 1)))
        if bad.size:
            t = int(bad[0]) + 1
            raise ToydiffError(f"beta_{t} = {b[t - 1]:.6g} is outside (0, 1]; every beta must be in (0, 1] "
                               "(check the schedule's beta_start, beta_end, beta_max and power)")
        self.T = b.size
        # the training schedule's t behind each index (a respaced schedule skips some): what the model is told
        self.timesteps = np.arange(self.T + 1) if timesteps is None else np.asarray(timesteps, dtype=np.int64)
        self._full = timesteps is None or np.array_equal(self.timesteps, np.arange(self.T + 1))
        self.betas64 = np.concatenate([[0.0], b])
        alphas = 1.0 - self.betas64
        alpha_bar = np.cumprod(alphas)
        alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
        one_minus = 1.0 - alpha_bar
        with np.errstate(divide="ignore", invalid="ignore"):
            beta_tilde = np.where(one_minus > 0, self.betas64 * (1 - alpha_bar_prev) / one_minus, 0.0)
            coef_x0 = np.where(one_minus > 0, np.sqrt(alpha_bar_prev) * self.betas64 / one_minus, 1.0)
            coef_xt = np.where(one_minus > 0, np.sqrt(alphas) * (1 - alpha_bar_prev) / one_minus, 0.0)
        self.alpha_bar64 = alpha_bar
        self.beta_tilde64 = beta_tilde  # on the host: a sampler's per-step scalars never wait for the device
        self._log_snr: torch.Tensor | None = None  # log_snr_at's table, on the device it was last asked on
        self.device = torch.device(device)
        self.timesteps_t = torch.as_tensor(self.timesteps, device=self.device)
        as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=self.device)  # noqa: E731
        self.betas = as_t(self.betas64)
        self.alphas = as_t(alphas)
        self.alpha_bar = as_t(alpha_bar)
        self.alpha_bar_prev = as_t(alpha_bar_prev)
        self.sqrt_alpha_bar = as_t(np.sqrt(alpha_bar))
        self.sqrt_one_minus_alpha_bar = as_t(np.sqrt(one_minus))
        self.beta_tilde = as_t(beta_tilde)
        self.posterior_coef_x0 = as_t(coef_x0)
        self.posterior_coef_xt = as_t(coef_xt)
        # log beta_tilde_t with beta_tilde_1 = 0 replaced by beta_tilde_2 (improved-diffusion's "clipped" log
        # variance): the lower end of a learned variance; a one-step schedule falls back on beta_1
        tilde_1 = beta_tilde[2] if self.T > 1 else self.betas64[1]
        with np.errstate(divide="ignore"):
            self.log_beta_tilde_clipped = as_t(np.log(np.concatenate([[tilde_1, tilde_1], beta_tilde[2:]])))
            self.log_betas = as_t(np.log(self.betas64))

    @classmethod
    def from_config(cls, cfg: ScheduleConfig, device: torch.device | str = "cpu") -> "NoiseSchedule":
        """The configured beta schedule (a flow run's grid is its method's: flow_betas, toydiff.methods.flow)."""
        betas = BETA_SCHEDULES.get(cfg.name)(cfg)
        if cfg.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas, device=device)

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        if torch.device(device) == self.device:
            return self
        return NoiseSchedule(self.betas64[1:], device, self.timesteps)

    def respace(self, steps: int, spacing: str = "trailing") -> "NoiseSchedule":
        """The schedule on `steps` of the T timesteps (Nichol and Dhariwal 2021, section 4).

        beta'_k = 1 - abar_{t_k} / abar_{t_{k-1}} keeps alpha_bar at every kept t, so a model trained
        on the full schedule denoises on the new one, told the original t (`model_t`).
        Spacing: trailing = T/S, 2T/S, ..., T (starts at t = T; Lin et al. 2023), linspace = evenly
        from 1 to T, leading = 1, 1 + T/S, ... (diffusers' default; never reaches t = T), karras =
        T and the t nearest to Karras et al.'s (2022, eq. 5) sigmas, rho = 7, from min(sigma_T, 80) to sigma_1:
        dense at low noise, where the ODE samplers need their steps. Steps whose t coincide merge.
        """
        if not 1 <= steps <= self.T:
            raise ToydiffError(f"sampling steps must be in 1..T = 1..{self.T}, got {steps}")
        choose("timestep spacing", spacing, SPACINGS)
        if spacing == "trailing":
            kept = np.round(np.arange(steps, 0, -1) * self.T / steps)[::-1]
        elif spacing == "linspace":
            kept = np.round(np.linspace(1, self.T, steps))
        elif spacing == "leading":
            kept = np.arange(steps) * (self.T // steps) + 1
        else:  # karras
            kept = self._karras_t(steps)
        kept = np.unique(kept.astype(np.int64))
        ab = self.alpha_bar64[np.concatenate([[0], kept])]
        return NoiseSchedule(1 - ab[1:] / ab[:-1], self.device, np.concatenate([[0], self.timesteps[kept]]))

    def _karras_t(self, steps: int, rho: float = 7.0, sigma_max: float = 80.0) -> np.ndarray:
        """`steps` distinct t from T down to 1, each the t whose sigma is nearest (in log sigma) to Karras et
        al.'s (2022, eq. 5) sigma_i = (s_max^(1/rho) + i / (n - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho,
        s_min = sigma_1. With sigma_T <= sigma_max the n = steps sigmas run from sigma_T; above it the grid is
        t = T, then n = steps - 1 sigmas from sigma_max. Where the dense low-noise end maps two sigmas to one
        t, the later ones move down to the next free t (so a 50-step grid has 50 steps and ends at t = 1)."""
        sig = np.sqrt((1 - self.alpha_bar64[1:]) / np.maximum(self.alpha_bar64[1:], 1e-300))  # sigma_t, t = 1..T
        if steps == 1:
            return np.array([self.T])
        top = min(sig[-1], sigma_max)
        n = steps if top == sig[-1] else steps - 1
        ramp = np.linspace(0, 1, n)
        targets = (top ** (1 / rho) + ramp * (sig[0] ** (1 / rho) - top ** (1 / rho))) ** rho
        t = np.abs(np.log(sig)[None, :] - np.log(targets)[:, None]).argmin(1) + 1  # nearest in log sigma
        t = np.concatenate([[self.T], t])[-steps:] if n < steps else t
        t[0], t[-1] = self.T, 1
        k = np.arange(steps)
        t = np.clip(t, steps - k, self.T - k)  # room for the steps before and after position k
        for i in range(1, steps):
            t[i] = min(t[i], t[i - 1] - 1)
        return t

    @property
    def log_snr64(self) -> np.ndarray:
        """lambda_t = log(abar_t / (1 - abar_t)) for t = 1..T, abar clipped to [1e-10, 1 - 1e-10]."""
        ab = np.clip(self.alpha_bar64[1:], 1e-10, 1 - 1e-10)
        return np.log(ab) - np.log1p(-ab)

    def t_at_log_snr(self, lam: float) -> float:
        """The fractional t whose log-SNR is lam, lambda being linear in t between integer steps."""
        lam_t = self.log_snr64[::-1]  # increasing, for np.interp
        return float(np.interp(lam, lam_t, np.arange(self.T, 0, -1, dtype=np.float64)))

    def alpha_bar_at(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """alpha_bar for a per-sample t (B,), or (1,) for the batch, shaped to broadcast against x; a fractional
        t (clamped to [1, T]) interpolates the log-SNR linearly, so alpha_bar = sigmoid(lambda(t)) (the
        continuous-time view of the ODEs)."""
        if not t.is_floating_point():
            return self.gather(self.alpha_bar, t, x)
        return append_dims(torch.sigmoid(self.log_snr_at(t)).to(x.dtype), x.ndim)

    def log_snr_at(self, t: torch.Tensor) -> torch.Tensor:
        """lambda_t (float64, t's shape) for integer t in 1..T, or fractional t interpolated linearly."""
        if self._log_snr is None or self._log_snr.device != t.device:  # made once per device: no copy per step
            self._log_snr = torch.as_tensor(self.log_snr64, device=t.device, dtype=torch.float64)
        lam = self._log_snr
        if not t.is_floating_point():
            return lam[t.clamp(1, self.T) - 1]
        tt = t.to(torch.float64).clamp(1, self.T)
        lo = tt.floor().long().clamp(max=self.T - 1) if self.T > 1 else tt.floor().long()
        hi = (lo + 1).clamp(max=self.T)
        w = tt - lo
        return (1 - w) * lam[lo - 1] + w * lam[hi - 1]

    def model_t(self, i: torch.Tensor) -> torch.Tensor:
        """The training schedule's t for indices i of this (possibly respaced) schedule; a fractional i
        (the adaptive ODE solver) is passed through, which only a schedule that was not respaced allows."""
        if i.is_floating_point():
            if not self._full:
                raise ToydiffError("fractional t needs the full schedule; the adaptive solver cannot run respaced")
            return i
        return self.timesteps_t.to(i.device)[i]

    @property
    def sigmas(self) -> torch.Tensor:
        """sigma_t = sqrt((1 - abar_t) / abar_t), t = 0..T: the noise level of x_t / sqrt(abar_t) (Karras et al. 2022)."""
        with np.errstate(divide="ignore"):
            return torch.as_tensor(np.sqrt((1 - self.alpha_bar64) / self.alpha_bar64), dtype=torch.float64)

    @property
    def alpha_bar_T(self) -> float:
        return float(self.alpha_bar64[-1])

    def terminal_warning(self) -> str | None:
        """A sentence when x_T ~ q(x_T | x_0) is not close to the N(0, I) that sampling starts from."""
        if self.alpha_bar_T <= ALPHA_BAR_T_WARN:
            return None
        return (f"alpha_bar_T = {self.alpha_bar_T:.3g} > {ALPHA_BAR_T_WARN:g}: x_T keeps "
                f"{math.sqrt(self.alpha_bar_T):.0%} of the data's scale, so sampling from N(0, I) starts off the "
                "forward process; raise T or the final betas")

    def gather(self, a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """a[t] for a per-sample t (B,) or a shared t (1,), shaped to broadcast against x (B, ...), in x's dtype."""
        return append_dims(a[t.to(a.device)].to(device=x.device, dtype=x.dtype), x.ndim)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, a draw from q(x_t | x_0) (Ho et al. 2020, eq. 4)."""
        return self.gather(self.sqrt_alpha_bar, t, x0) * x0 + self.gather(self.sqrt_one_minus_alpha_bar, t, x0) * eps

    def noise(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None):
        """(eps, x_t) with fresh eps ~ N(0, I): the guide's `get_x_t`."""
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return eps, self.q_sample(x0, t, eps)

    def q_step(self, x_prev: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps, a draw from q(x_t | x_{t-1}) (Ho et al. 2020, eq. 2)."""
        beta = self.gather(self.betas, t, x_prev)
        return torch.sqrt(1 - beta) * x_prev + torch.sqrt(beta) * eps

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 6-7); variance is (B, 1, ...)."""
        mean = self.gather(self.posterior_coef_x0, t, x_t) * x0 + self.gather(self.posterior_coef_xt, t, x_t) * x_t
        return mean, self.gather(self.beta_tilde, t, x_t)

    def learned_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log sigma_t^2 = frac log beta_t + (1 - frac) log beta_tilde_t, frac = (v + 1) / 2, for a network's
        variance output v (B, D) (Nichol and Dhariwal 2021, eq. 15); beta_tilde_1 is clipped to beta_tilde_2."""
        frac = (v + 1) / 2
        return frac * self.gather(self.log_betas, t, v) + (1 - frac) * self.gather(self.log_beta_tilde_clipped, t, v)
