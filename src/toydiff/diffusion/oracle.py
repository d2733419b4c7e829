"""Closed-form oracles: a Gaussian mixture whose density and exact noise predictor are known.

For x0 ~ sum_k w_k N(mu_k, diag(s_k^2)), the noised x_t = sqrt(abar) x0 + sqrt(1 - abar) eps is
again a mixture, sum_k w_k N(sqrt(abar) mu_k, diag(abar s_k^2 + 1 - abar)), so its score and the
Bayes-optimal eps_hat = -sqrt(1 - abar) grad log p_t(x_t) are exact. Measuring a sampler or a
likelihood with the oracle separates their error from any learning error. Flow matching's path is
the same law up to scale (schedules.flow_betas), so the same oracle gives its exact velocity
(`velocity`) and, on a flow grid, its exact denoiser (`denoiser`).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..core.config import DataConfig
from ..data.datasets import DATASETS, moons_mixture_law, params
from ..data.zoo import Mixture
from .parameterization import Prediction, to_x0
from .schedules import NoiseSchedule, flow_scale


class GaussianMixture:
    """Weights (K,), means (K, D), per-axis standard deviations (K, D): a toydiff.data.zoo.Mixture, with its noised
    density and exact denoiser in torch (float64 throughout)."""

    def __init__(self, weights, means, stds):
        self.mixture = Mixture(weights, means, stds)
        self.weights = torch.as_tensor(self.mixture.weights)
        self.means = torch.as_tensor(self.mixture.means)
        self.stds = torch.as_tensor(self.mixture.stds)

    @classmethod
    def of(cls, mixture: Mixture) -> "GaussianMixture":
        return cls(mixture.weights, mixture.means, mixture.stds)

    @property
    def dim(self) -> int:
        return self.mixture.dim

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.mixture.sample(n, rng)[0]

    def _components(self, x: torch.Tensor, alpha_bar: torch.Tensor):
        """Means (N, K, D), variances (N, K, D) of the noised components and log w_k N(x; m_k, v_k) (N, K)."""
        ab = alpha_bar.to(torch.float64).reshape(-1, 1, 1)
        m = ab.sqrt() * self.means.to(x.device)[None]
        v = ab * self.stds.to(x.device)[None] ** 2 + (1 - ab)
        diff = x.to(torch.float64)[:, None, :] - m
        log_n = -0.5 * ((diff**2) / v + torch.log(v) + math.log(2 * math.pi)).sum(-1)
        return diff, v, torch.log(self.weights.to(x.device))[None] + log_n

    def log_prob(self, x: torch.Tensor, alpha_bar: torch.Tensor | float = 1.0) -> torch.Tensor:
        """log p_t(x) (N,) of the mixture noised to alpha_bar (1.0: the data itself)."""
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64).expand(x.shape[0])
        return torch.logsumexp(self._components(x, ab)[2], dim=1)

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The exact eps_hat(x_t) = -sqrt(1 - abar) grad log p_t(x_t); t is unused (abar says it all)."""
        ab = alpha_bar.reshape(-1).expand(x_t.shape[0])
        diff, v, log_w = self._components(x_t, ab)
        r = torch.softmax(log_w, dim=1)[:, :, None]
        score = -(r * diff / v).sum(1)
        return (-(1 - ab.to(torch.float64))[:, None].sqrt() * score).to(x_t.dtype)

    def velocity(self, x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The exact flow-matching velocity E[eps - x0 | x_s] at x_s = (1 - s) x0 + s eps, s in (0, 1) (B,) or
        (1,): in the VP view x_t = x_s / c(s), abar = (1 - s)^2 / c(s)^2, x0_hat from the exact eps, and
        v = (x_s - x0_hat) / s."""
        s = s.to(torch.float64).reshape(-1, 1).expand(x_s.shape[0], 1)
        c = flow_scale(s)
        alpha_bar = ((1 - s) / c) ** 2
        x_t = x_s.to(torch.float64) / c
        x0_hat = to_x0(Prediction.EPS, self.eps(x_t, s[:, 0], alpha_bar[:, 0]).to(torch.float64), x_t, alpha_bar)
        return ((x_s.to(torch.float64) - x0_hat) / s).to(x_s.dtype)

    def scaled(self, shift, scale) -> "GaussianMixture":
        """The law of (x - shift) / scale (per-axis shift and scale (D,)): a Scaler's frame."""
        shift, scale = np.asarray(shift, np.float64), np.asarray(scale, np.float64)
        return GaussianMixture(self.weights.numpy(), (self.means.numpy() - shift) / scale, self.stds.numpy() / scale)

    def denoiser(self, schedule: NoiseSchedule):
        """The exact denoise(x_t, t) -> x0_hat on `schedule` (respaced or not; t may be fractional)."""
        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            alpha_bar = schedule.alpha_bar_at(t, x_t)
            return to_x0(Prediction.EPS, self.eps(x_t, t, alpha_bar), x_t, alpha_bar)
        return denoise


def moons_mixture(noise: float, per_moon: int = 256) -> GaussianMixture:
    """Noisy Two Moons (toydiff.data.datasets.moons) as the mixture data.moons_mixture_law gives: the exact denoiser of the
    moons for every practical purpose: a model that matched it perfectly would sample this."""
    return GaussianMixture.of(moons_mixture_law(noise, per_moon=per_moon))


def oracle_for(cfg: DataConfig) -> Optional[GaussianMixture]:
    """The exact law of the configured dataset as a GaussianMixture (data units), where it is one; else None."""
    if cfg.path:
        return None
    law = DATASETS.get(cfg.name).mixture
    mixture = None if law is None else law(params(cfg))
    return None if mixture is None else GaussianMixture.of(mixture)
