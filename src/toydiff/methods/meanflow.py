"""MeanFlow (Geng et al. 2025): the flow's mean velocity over an interval [r, t], for one-step and few-step
sampling (train.objective = meanflow on schedule.process = flow; samplers.sample_meanflow).

The network takes a second time, the interval h = t - r (models: `intervals`), and MeanFlowDenoiser turns it
into a DDIM step from t to r; without r it is the instantaneous velocity, so every other sampler, the
likelihood ODE and the figures use a MeanFlow run as a flow model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..core.config import COUPLINGS, ExperimentConfig, choose
from ..core.runtime import World
from ..diffusion.losses import Objective, UniformTimes
from ..diffusion.parameterization import Denoiser, MeanFlowDenoiser, flow_network_time
from ..diffusion.schedules import NoiseSchedule
from .base import Method, check, method
from .flow import couple

MEANFLOW_RATIO = 0.25  # share of each batch with r < t (the rest has r = t: flow matching); Geng et al.'s
MEANFLOW_POWER = 0.5  # the adaptive loss weight 1 / (|error|^2 + c)^p, c = 1e-3 (Geng et al.'s best p is 1;
#                      on the development table p = 1 biased the flow itself, docs/benchmarks.md)
MEANFLOW_C = 1e-3


@dataclass(frozen=True)
class MeanFlow(Objective):
    """MeanFlow's regression of the mean velocity u(x_t, r, t) onto its identity's target."""

    coupling: str = "independent"  # independent | ot (couple); a MeanFlow model trains on fresh noise

    def __post_init__(self):
        choose("train.coupling", self.coupling, COUPLINGS)

    def loss(self, model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor,
             generator: Optional[torch.Generator] = None, *, timesteps=None, labels: Optional[torch.Tensor] = None,
             world: World = World(), autocast: bool = False) -> torch.Tensor:
        """MeanFlow (Geng et al. 2025, Algorithm 1): two times from `timesteps`, t the larger and r the smaller, r
        set to t for all but MEANFLOW_RATIO of the batch; x_t = (1 - t) x0 + t eps (eps paired by the coupling)
        and v = eps - x0; the network's u(x_t, r, t) (its interval input h = t - r) and du/dt along (v, dr = 0,
        dt = 1), one forward-mode pass (torch.func.jvp); the target v - (t - r) du/dt without gradient (the
        MeanFlow identity), and the squared error |u - target|^2 weighted adaptively by 1 / (|error|^2 + c)^p,
        also without gradient (MEANFLOW_POWER). Where r = t the target is v: flow matching. Several processes
        as in flow matching; unconditional and float32 (the method's rules)."""
        T = schedule.T
        timesteps = timesteps or UniformTimes(T)
        n = x0.shape[0]
        a, _ = timesteps.sample(n, generator, x0.device)
        b, _ = timesteps.sample(n, generator, x0.device)
        t = torch.maximum(a, b)
        r = torch.where(torch.rand(n, generator=generator, device=x0.device) < MEANFLOW_RATIO, torch.minimum(a, b), t)
        eps = couple(x0, torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype), self.coupling)
        if world.size > 1:
            s = world.shard(n)
            x0, t, r, eps = x0[s], t[s], r[s], eps[s]
        x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
        v = eps - x0

        def u(z: torch.Tensor, time: torch.Tensor, interval: torch.Tensor) -> torch.Tensor:
            return model(z, flow_network_time(time, T), h=flow_network_time(interval, T))
        out, du_dt = torch.func.jvp(u, (x_t, t, t - r), (v, torch.ones_like(t), torch.ones_like(t)))
        target = (v - (t - r)[:, None] * du_dt).detach()
        error = ((out - target) ** 2).sum(1)
        weight = 1.0 / (error.detach() + MEANFLOW_C) ** MEANFLOW_POWER
        return (weight * error).mean()


@method("meanflow")
class MeanFlowMethod(Method):
    """train.objective = meanflow: the flow process, a network with an interval input, its own sampler."""

    samplers = ("meanflow",)
    intervals = True
    takes_pieces = False

    def check(self, cfg: ExperimentConfig) -> None:
        check(cfg.schedule.process == "flow" and cfg.model.prediction == "v" and cfg.model.arch == "mlp",
              "train.objective = meanflow learns the flow's mean velocity: set schedule.process=flow, "
              "model.prediction=v, model.arch=mlp")
        check(not cfg.model.conditional and not cfg.model.pieces_asked and cfg.train.coupling != "reflow"
              and cfg.train.autocast == "none",
              "train.objective = meanflow trains an unconditional model on fresh noise in float32: set "
              "model.conditional=false, model.components=0 (auto) or 1, train.coupling=independent (or ot), "
              "train.autocast=none")
        super().check(cfg)

    def foreign_sampler(self, sampler: str) -> str:
        return (f"sample.sampler = {sampler} steps with a mean velocity, which only a model trained with "
                "train.objective=meanflow has; choose another sampler")

    def denoiser(self, cfg: ExperimentConfig, model: nn.Module, schedule: NoiseSchedule,
                 labels: Optional[torch.Tensor] = None, guidance: float = 1.0) -> Denoiser:
        return MeanFlowDenoiser(model, schedule, cfg.model.prediction, labels=labels, guidance=guidance)

    def objective(self, run, others=None) -> Objective:
        return MeanFlow(run.config.train.coupling)
