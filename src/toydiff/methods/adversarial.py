"""An adversarial few-step student (issue #29): a critic beside the distillation loss (`distill.critic`).

A few-step student regresses onto its teacher's deterministic map, and a continuous map from one Gaussian onto
separate pieces leaves samples between and around them (Salmona et al. 2022). A critic judges what the student
actually draws, its whole few-step chain from fresh noise, against the training rows, and the student is pushed
where the critic takes its samples for data: the pattern of adversarial diffusion distillation (Sauer et al.
2023) and DMD2 (Yin et al. 2024), with the student's own distillation loss kept as the anchor, so that it
stays its teacher's map and drops no mode.

    loss(student) = distillation loss + weight * E softplus(-D(G(z)))                 (non-saturating)
    loss(critic)  = E softplus(-D(x)) + E softplus(D(G(z))) + R1_GAMMA / 2 * E |grad_x D(x)|^2 on the rows

R1 (Mescheder et al. 2018) penalizes the critic's gradient on the data, which keeps the game from
oscillating. The critic is a small MLP trained beside the student (its own AdamW, in the training state and
its checkpoints, never in what samples): the student samples as it would without it, in the same network
evaluations. A student recipe takes a critic when it can run its sampler with gradients (`Student.chain`).

**Experimental: measured without effect here.** On the circles (seed 0, the fast preset's 4-step progressive
student, 3 draws of 5000) the share of samples off the support was 0.20-0.26% without a critic, 0.22-0.24% with
weight 0.1 and 0.24-0.26% with 0.5; on the 8 Gaussians 0.24-0.26% without, 0.20-0.28% with 0.1. The critic's logit
stayed flat (about 0 on and off the support, its loss 2 ln 2, chance, the whole time): trained alone on 20,000
student samples against the rows for 2000-3000 steps (R1 gamma 0.01 to 1, with or without Fourier features of its
input), it never told the off-support samples apart, and without R1 it learnt the training rows instead. A tenth of
a percent of stray samples is too rare a signal for a logistic critic, and the teacher's own 512-step ODE, which
the student copies, already puts 0.08% (moons) to 0.10% (circles) off the support.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ExperimentConfig
from ..core.runtime import World, derive_seed
from ..diffusion.losses import Objective
from ..diffusion.schedules import NoiseSchedule

R1_GAMMA = 1.0  # the R1 penalty's gamma (Mescheder et al. 2018), on data in the model's frame ([-1, 1] for the zoo)
CRITIC_WIDTH = 128  # hidden units of the critic's three layers
CRITIC = "critic"  # its name among the training state's networks
EXPERIMENTAL = ("measured without effect on the samples off the support (toydiff.methods.adversarial): the critic "
                "does not learn to see them")

Chain = Callable[[nn.Module, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]  # (network, x_T, labels) -> x_0


def make_critic(cfg: ExperimentConfig, dim: int, device: torch.device) -> nn.Module:
    """A fresh critic D: R^dim -> R (a logit: data high), seeded by the config's seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init-critic"))
        critic = nn.Sequential(nn.Linear(dim, CRITIC_WIDTH), nn.SiLU(), nn.Linear(CRITIC_WIDTH, CRITIC_WIDTH),
                               nn.SiLU(), nn.Linear(CRITIC_WIDTH, CRITIC_WIDTH), nn.SiLU(),
                               nn.Linear(CRITIC_WIDTH, 1))
    return critic.to(device)


@dataclass(frozen=True)
class Adversarial(Objective):
    """The anchor's loss plus `weight` times the critic's non-saturating loss on the student's chain, and the
    critic's own logistic loss with R1 (see the module). chain(network, x_T, labels): the student's sampler from
    x_T with gradients into the network; the fresh x_T of each update come from the training generator."""

    anchor: Objective
    critic: nn.Module
    chain: Chain
    weight: float
    gamma: float = R1_GAMMA

    updates = (CRITIC, "model")  # the critic first, on the student as it stands, then the student

    def _fake(self, model: nn.Module, x0: torch.Tensor, labels: Optional[torch.Tensor],
              generator: Optional[torch.Generator]) -> torch.Tensor:
        x_T = torch.randn(x0.shape, generator=generator, device=x0.device)
        return self.chain(model, x_T, labels)

    def loss(self, model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor,
             generator: Optional[torch.Generator] = None, *, timesteps=None, labels: Optional[torch.Tensor] = None,
             world: World = World(), autocast: bool = False) -> torch.Tensor:
        anchor = self.anchor.loss(model, schedule, x0, generator, timesteps=timesteps, labels=labels, world=world,
                                  autocast=autocast)
        return anchor + self.weight * F.softplus(-self.critic(self._fake(model, x0, labels, generator))).mean()

    def update_loss(self, network: str, model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor,
                    generator: Optional[torch.Generator] = None, *, timesteps=None,
                    labels: Optional[torch.Tensor] = None, world: World = World(), autocast: bool = False
                    ) -> torch.Tensor:
        with torch.no_grad():
            fake = self._fake(model, x0, labels, generator)
        real = x0.detach().requires_grad_(True)
        d_real = self.critic(real)
        (grad,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
        return (F.softplus(-d_real).mean() + F.softplus(self.critic(fake)).mean()
                + self.gamma / 2 * grad.pow(2).sum(1).mean())
