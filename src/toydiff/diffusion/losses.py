"""What every training objective shares: the seam a method's objective fills, which t each point is noised to,
the deterministic DDIM step the distillation objectives take, and the variational-bound terms.

    loss = diffusion_loss(model, schedule, x0, objective, generator, timesteps=sampler)   # one training step's

Each method's objective (its loss) lives with the method (toydiff.methods); the training loop (toydiff.training.loop)
calls it through diffusion_loss, and the likelihoods (toydiff.diffusion.likelihood) use the bound's terms from here.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..core.config import TIMESTEP_SAMPLINGS
from ..core.registry import Registry
from ..core.runtime import World
from .schedules import NoiseSchedule

LOG_2PI = math.log(2 * math.pi)
TIMESTEP_SAMPLERS: Registry[type] = Registry("train.timestep_sampling", TIMESTEP_SAMPLINGS)


class Objective:
    """What a training step minimizes: a method's loss (toydiff.methods: the VP diffusion's Denoising, flow
    matching, MeanFlow, consistency, progressive distillation). Frozen dataclasses fill it in.

    A step updates the networks of `updates` in turn, each with its own loss and AdamW: "model" is the run's own
    network (its loss is `loss`); any other name is one of the method's further networks (a critic), which the
    objective holds itself, and whose loss is `update_loss`."""

    updates: tuple[str, ...] = ("model",)

    def loss(self, model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor,
             generator: Optional[torch.Generator] = None, *, timesteps: Optional["UniformTimesteps"] = None,
             labels: Optional[torch.Tensor] = None, world: World = World(), autocast: bool = False) -> torch.Tensor:
        """The scalar loss of one batch x0 (B, D) (B, 2 D for a reflow student's rows [x0 | eps]), scaled, on the
        model's device: t from `timesteps` where the objective draws t, labels (B,) for a conditional network,
        each rank's shard under torchrun (`world`), bfloat16 autocast of the forward where the method allows."""
        raise NotImplementedError

    def update_loss(self, network: str, model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor,
                    generator: Optional[torch.Generator] = None, *, timesteps: Optional["UniformTimesteps"] = None,
                    labels: Optional[torch.Tensor] = None, world: World = World(), autocast: bool = False
                    ) -> torch.Tensor:
        """The loss whose gradient updates the method's network `network` (one of `updates` but "model"), on the
        same batch; `model` is the run's own network, to be used without gradient into it where it should."""
        raise NotImplementedError


def diffusion_loss(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, objective: Objective,
                   generator: Optional[torch.Generator] = None, *, timesteps: Optional["UniformTimesteps"] = None,
                   labels: Optional[torch.Tensor] = None, world: World = World(), autocast: bool = False,
                   network: str = "model") -> torch.Tensor:
    """One training step's loss for `network`: `objective`'s (the one call the training loop makes, whatever the
    method; "model", the run's own network, unless the method trains others beside it)."""
    if network == "model":
        return objective.loss(model, schedule, x0, generator, timesteps=timesteps, labels=labels, world=world,
                              autocast=autocast)
    return objective.update_loss(network, model, schedule, x0, generator, timesteps=timesteps, labels=labels,
                                 world=world, autocast=autocast)


@TIMESTEP_SAMPLERS.register("uniform")
class UniformTimesteps:
    """t ~ U{1..T}, every weight 1: the L_simple of Ho et al. (2020)."""

    def __init__(self, T: int):
        self.T = T

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device):
        t = torch.randint(1, self.T + 1, (n,), generator=generator, device=device)
        return t.to(device), torch.ones(n, device=device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        pass


@TIMESTEP_SAMPLERS.register("importance")
class ImportanceTimesteps(UniformTimesteps):
    """Importance sampling of t by the loss's second moment (Nichol and Dhariwal 2021, sec. 3.3; improved-diffusion's
    LossSecondMomentResampler): p_t proportional to sqrt(E[L_t^2]), mixed with 0.1% uniform, and each point's
    loss weighted by 1 / (T p_t) so the objective's expectation is unchanged. Sampling stays uniform until
    every t has been seen `history` times. E[L_t^2] is a running mean over the first `history` batches that
    contain t and an exponential average with weight 1 / history after (improved-diffusion keeps the last 10
    losses; this keeps the bookkeeping on the device, with no host synchronisation).
    """

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 0.001, device: torch.device | str = "cpu"):
        super().__init__(T)
        self.history, self.uniform_prob = history, uniform_prob
        self.second_moment = torch.zeros(T + 1, device=device)
        self.seen = torch.zeros(T + 1, device=device)

    def probabilities(self) -> torch.Tensor:
        """p_t for t = 0..T (p_0 = 0)."""
        uniform = torch.ones_like(self.second_moment)
        uniform[0] = 0
        uniform = uniform / self.T
        root = self.second_moment.sqrt()
        root[0] = 0
        p = root / root.sum().clamp_min(1e-30) * (1 - self.uniform_prob) + self.uniform_prob * uniform
        ready = (self.seen[1:] >= self.history).all()
        return torch.where(ready, p, uniform)

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device):
        p = self.probabilities()
        t = torch.multinomial(p, n, replacement=True, generator=generator)
        return t.to(device), (1.0 / (self.T * p[t])).to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        t, losses = t.to(self.second_moment.device), losses.detach().float()
        ok = torch.isfinite(losses)  # a diverging step must not poison p_t (the training loop reports it)
        sums = torch.zeros_like(self.second_moment).index_add_(0, t, torch.where(ok, losses, 0.0) ** 2)
        counts = torch.zeros_like(self.seen).index_add_(0, t, ok.float())
        hit = counts > 0
        self.seen += hit.float()
        rate = 1.0 / self.seen.clamp(1, self.history)
        batch_mean = sums / counts.clamp_min(1)
        # in place: a CUDA graph replaying this update keeps reading and writing the same tensors
        self.second_moment.copy_(torch.where(hit, self.second_moment + rate * (batch_mean - self.second_moment),
                                             self.second_moment))


class UniformTimes(UniformTimesteps):
    """Flow matching's continuous t ~ U(0, 1) (train.timestep_sampling = uniform under the flow process)."""

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device):
        return torch.rand(n, generator=generator, device=device), torch.ones(n, device=device)


@TIMESTEP_SAMPLERS.register("log-normal")
class LogNormalTimesteps(UniformTimesteps):
    """EDM's noise levels (Karras et al. 2022, Table 1: ln sigma ~ N(P_MEAN, P_STD^2)) on the discrete VP
    schedule: t is drawn with the probability that ln sigma falls nearer ln sigma_t than any other step's, sigma_t
    = sqrt((1 - abar_t) / abar_t) the VP step's noise-to-signal ratio (the VE sigma of the same x_t / sqrt(abar)).
    Every weight is 1: like EDM, it changes which noise levels the loss sees, on purpose (it is not an
    importance sampler of the uniform objective). alpha_bar: (T + 1,), abar_0 = 1."""

    P_MEAN, P_STD = -1.2, 1.2  # Karras et al. (2022), for data of standard deviation 0.5 (the zoo in [-1, 1])

    def __init__(self, T: int, alpha_bar: torch.Tensor, device: torch.device | str = "cpu"):
        super().__init__(T)
        ab = alpha_bar.double().cpu()[1:]
        log_sigma = 0.5 * torch.log((1 - ab) / ab)  # increasing in t
        edges = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), (log_sigma[1:] + log_sigma[:-1]) / 2,
                           torch.tensor([math.inf], dtype=torch.float64)])
        cdf = torch.special.ndtr((edges - self.P_MEAN) / self.P_STD)
        # p_0 = 0; on the training device, where the step's generator draws from it
        self.p = torch.cat([torch.zeros(1, dtype=torch.float64), cdf[1:] - cdf[:-1]]).float().to(device)

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device):
        t = torch.multinomial(self.p, n, replacement=True, generator=generator)
        return t.to(device), torch.ones(n, device=device)


@TIMESTEP_SAMPLERS.register("logit-normal")
class LogitNormalTimes(UniformTimesteps):
    """Flow matching's continuous t = sigmoid(u), u ~ N(0, 1) (Esser et al. 2024): more of the batch at middle
    times, where the velocity is hardest to learn (flow only; config refuses it for ddpm)."""

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device):
        return torch.sigmoid(torch.randn(n, generator=generator, device=device)), torch.ones(n, device=device)


def ddim_step(x_t: torch.Tensor, x0_hat: torch.Tensor, ab_t: torch.Tensor, ab_s: torch.Tensor) -> torch.Tensor:
    """The deterministic DDIM step (Song et al. 2021, eq. 12 with eta = 0) from alpha_bar ab_t to ab_s, per row."""
    eps = (x_t - ab_t.sqrt() * x0_hat) / (1 - ab_t).sqrt()
    return ab_s.sqrt() * x0_hat + (1 - ab_s).sqrt() * eps


def normal_kl(mean_1: torch.Tensor, log_var_1: torch.Tensor, mean_2: torch.Tensor,
              log_var_2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_1, e^log_var_1) || N(mean_2, e^log_var_2)) per coordinate (diagonal Gaussians), nats."""
    return 0.5 * (log_var_2 - log_var_1 + torch.exp(log_var_1 - log_var_2)
                  + (mean_1 - mean_2) ** 2 * torch.exp(-log_var_2) - 1)


def vlb_term(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, x0_hat: torch.Tensor,
             log_var: torch.Tensor) -> torch.Tensor:
    """L_{t-1} of the variational bound per point (B,), nats summed over dimensions, for p(x_{t-1} | x_t) =
    N(posterior mean at x0_hat, e^log_var): KL(q(x_{t-1} | x_t, x0) || p) for t >= 2, and the continuous
    Gaussian decoder -log p(x0 | x_1) for t = 1 (Ho et al. 2020, eq. 5)."""
    mean_q, _ = schedule.posterior(x0, x_t, t)
    mean_p, _ = schedule.posterior(x0_hat, x_t, t)
    log_var_q = schedule.gather(schedule.log_beta_tilde_clipped, t, x0)  # exact for t >= 2, finite at t = 1
    kl = normal_kl(mean_q, log_var_q, mean_p, log_var).sum(1)
    decoder = 0.5 * ((x0 - mean_p) ** 2 * torch.exp(-log_var) + log_var + LOG_2PI).sum(1)
    return torch.where(t == 1, decoder, kl)
