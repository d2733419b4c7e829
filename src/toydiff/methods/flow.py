"""Flow matching (Lipman et al. 2023; Liu et al. 2023): the straight path x_t = (1 - t) x0 + t eps in continuous t.

    objective = FlowMatching.from_config(cfg)    # prediction, coupling
    loss = objective.loss(model, schedule, x0, generator)

t uniform or logit-normal in (0, 1), the noise paired with the data independently, by minibatch optimal
transport (couple) or, for a reflow student, by the teacher's ODE (each row [x0 | eps]). The path is the VP
process up to scale: its grid is a VP schedule (schedules.flow_betas), so every sampler, the likelihoods and the
exact oracle drive a flow run through FlowDenoiser unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..core.config import COUPLINGS, ExperimentConfig, choose
from ..core.errors import ToydiffError
from ..core.runtime import World
from ..diffusion.losses import TIMESTEP_SAMPLERS, Objective, UniformTimes, UniformTimesteps
from ..diffusion.parameterization import Denoiser, FlowDenoiser, Prediction, flow_network_time, flow_target
from ..diffusion.schedules import NoiseSchedule, flow_betas, flow_scale, flow_time
from .base import Method, check, method


def couple(x0: torch.Tensor, eps: torch.Tensor, coupling: str) -> torch.Tensor:
    """eps reordered to pair with x0 (B, D): unchanged ("independent"), or ("ot") the exact optimal-transport
    assignment between the batch's data and noise under squared Euclidean cost (minibatch OT, Tong et al.
    2024; POT's network simplex: with uniform weights on two equal batches the plan is a permutation)."""
    if choose("train.coupling", coupling, COUPLINGS) == "independent":
        return eps
    if coupling == "reflow":
        raise ToydiffError("the reflow coupling's noise comes with the data (FlowMatching.loss), not from couple")
    import ot

    cost = torch.cdist(x0.double(), eps.double()).pow(2).cpu().numpy()
    plan = ot.emd(ot.unif(len(x0)), ot.unif(len(eps)), cost, numItermax=10**7)
    return eps[torch.as_tensor(plan.argmax(1), device=eps.device)]


def flow_timesteps(kind: str, T: int) -> UniformTimesteps:
    """Continuous t in (0, 1) for train.timestep_sampling: uniform, or the registry's logit-normal."""
    cls = TIMESTEP_SAMPLERS.get(kind)
    return UniformTimes(T) if cls is UniformTimesteps else cls(T)


@dataclass(frozen=True)
class FlowMatching(Objective):
    """Conditional flow matching's regression onto the path's velocity (or its x0 or eps)."""

    prediction: Prediction = Prediction.V  # the network's target: v (the velocity eps - x0) | x0 | eps
    coupling: str = "independent"  # how noise is paired with data: independent | ot | reflow (rows [x0 | eps])

    def __post_init__(self):
        object.__setattr__(self, "prediction", Prediction.parse(self.prediction))
        choose("train.coupling", self.coupling, COUPLINGS)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> "FlowMatching":
        return cls(cfg.model.prediction, cfg.train.coupling)

    def loss(self, model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor,
             generator: Optional[torch.Generator] = None, *, timesteps=None, labels: Optional[torch.Tensor] = None,
             world: World = World(), autocast: bool = False) -> torch.Tensor:
        """Conditional flow matching (Lipman et al. 2023; Liu et al. 2023): t from `timesteps` (continuous, in
        (0, 1); default uniform), eps ~ N(0, I) paired with x0 by the coupling, x_t = (1 - t) x0 + t eps, and the
        MSE between the network at (x_t, t T) and its target (flow_target: the velocity eps - x0 for prediction
        v), per point, then averaged. With coupling "reflow" each row of x0 is [x0 | eps], its noise fixed
        (toydiff.methods.reflow). Several processes and autocast as in the VP diffusion's Denoising.loss."""
        T = schedule.T
        timesteps = timesteps or UniformTimes(T)
        t, weights = timesteps.sample(x0.shape[0], generator, x0.device)
        if self.coupling == "reflow":  # each row carries its own noise, [x0 | eps]
            x0, eps = x0.chunk(2, dim=1)
        else:
            eps = couple(x0, torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype),
                         self.coupling)
        if world.size > 1:
            s = world.shard(x0.shape[0])
            x0, t, weights, eps = x0[s], t[s], weights[s], eps[s]
            labels = None if labels is None else labels[s]
        tt = t[:, None]
        x_t = (1 - tt) * x0 + tt * eps
        with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
            t_net = flow_network_time(t, T)
            out = model(x_t, t_net) if labels is None else model(x_t, t_net, labels)
        per_point = ((out.float() - flow_target(self.prediction, x0, eps)) ** 2).flatten(1).mean(1)
        return (weights * per_point).mean()


@method("flow")
class FlowMatchingMethod(Method):
    """schedule.process = flow: the straight path, trained with FlowMatching, sampled through FlowDenoiser."""

    denoises = True

    def process(self, cfg: ExperimentConfig) -> Method:
        return self

    def check_process(self, cfg: ExperimentConfig) -> None:
        check(not cfg.schedule.zero_terminal_snr, "schedule.zero_terminal_snr rescales the ddpm process's betas; "
              "the flow path has none (set schedule.zero_terminal_snr=false)")
        check(cfg.model.prediction != "edm", "model.prediction = edm is EDM's preconditioning of the ddpm process; "
              "flow matching predicts v (or x0, eps): set model.prediction=v")
        check(cfg.model.variance != "learned", "model.variance = learned belongs to the ddpm process (its reverse "
              "steps' variances); flow matching's sampler is an ODE: set model.variance=fixed")
        check(cfg.train.timestep_sampling not in ("importance", "log-normal"), f"train.timestep_sampling = "
              f"{cfg.train.timestep_sampling} needs the ddpm process's discrete t; with schedule.process=flow choose "
              "uniform or logit-normal")
        check(cfg.train.loss_weighting == "uniform", "train.loss_weighting = min-snr weighs the ddpm process's SNR; "
              "flow matching trains with uniform weights (train.loss_weighting=uniform)")

    def check_fresh(self, cfg: ExperimentConfig) -> None:
        check(cfg.train.coupling != "reflow", "train.coupling = reflow trains on the noise-data pairs of a teacher's "
              "ODE; make them with `toydiff distill TEACHER_RUN --method reflow`")

    def training_rows(self, cfg: ExperimentConfig, run_dir, x0: torch.Tensor) -> torch.Tensor:
        """A reflow student's rows carry their own noise, [x0 | eps] (train_noise.npy: the teacher's pairs)."""
        if cfg.train.coupling != "reflow":
            return x0
        return torch.cat([x0, torch.as_tensor(run_dir.read_train_noise(x0.shape), device=x0.device)], dim=1)

    def schedule(self, cfg: ExperimentConfig, device: torch.device | str = "cpu") -> NoiseSchedule:
        return NoiseSchedule(flow_betas(cfg.schedule.T), device=device)

    def denoiser(self, cfg: ExperimentConfig, model: nn.Module, schedule: NoiseSchedule,
                 labels: Optional[torch.Tensor] = None, guidance: float = 1.0) -> Denoiser:
        return FlowDenoiser(model, schedule, cfg.model.prediction, labels=labels, guidance=guidance)

    def timesteps(self, cfg: ExperimentConfig, device: torch.device | str = "cpu") -> UniformTimesteps:
        return flow_timesteps(self.timestep_sampling(cfg), cfg.schedule.T)

    def timestep_sampling(self, cfg: ExperimentConfig) -> str:
        """auto: uniform t."""
        return "uniform" if cfg.train.timestep_sampling == "auto" else cfg.train.timestep_sampling

    def objective(self, run, others=None) -> Objective:
        return FlowMatching.from_config(run.config)

    def describe(self, cfg: ExperimentConfig, schedule: NoiseSchedule) -> str:
        return f"flow matching ({self.timestep_sampling(cfg)} t, {cfg.train.coupling} coupling)"

    def frame_scale(self, cfg: ExperimentConfig, schedule: NoiseSchedule, t: int) -> float:
        """x_t = (1 - t) x0 + t eps is c(t) times the VP view its schedule and denoiser work in; t = 0 is the data."""
        return 1.0 if t == 0 else float(flow_scale(flow_time(schedule, torch.tensor([t]))))

    def schedule_panel(self, cfg: ExperimentConfig, schedule: NoiseSchedule):
        return f"flow matching (this run), $T={schedule.T}$", schedule.betas64, 1 - schedule.alpha_bar64
