"""The VP diffusion of DDPM (Ho et al. 2020): the guide's method and toydiff's default.

    objective = Denoising.from_config(cfg)      # prediction, weighting, learned variances
    loss = objective.loss(model, schedule, x0, generator, timesteps=sampler)

L_simple, optionally min-SNR weighted (Hang et al. 2023), plus lambda L_vlb for learned variances (Nichol and
Dhariwal 2021); t uniform or importance-sampled on the discrete schedule of train.timestep_sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..core.config import WEIGHTINGS, ExperimentConfig, choose
from ..core.errors import ToydiffError
from ..core.runtime import World
from ..diffusion.losses import (TIMESTEP_SAMPLERS, ImportanceTimesteps, LogNormalTimesteps, Objective,
                                UniformTimesteps, vlb_term)
from ..diffusion.parameterization import (Denoiser, Prediction, min_snr_weight, network_input, to_x0,
                                          training_target)
from ..diffusion.schedules import NoiseSchedule
from .base import Method, check, method


def ddpm_timesteps(kind: str, T: int, device: torch.device | str = "cpu",
                   alpha_bar: Optional[torch.Tensor] = None) -> UniformTimesteps:
    """The discrete t sampler of train.timestep_sampling for T steps (uniform, importance, or log-normal on the
    schedule's alpha_bar)."""
    cls = TIMESTEP_SAMPLERS.get(kind)
    if cls is LogNormalTimesteps:
        if alpha_bar is None:
            raise ToydiffError("train.timestep_sampling = log-normal needs the schedule's alpha_bar")
        return cls(T, alpha_bar, device)
    return cls(T, device=device) if cls is ImportanceTimesteps else cls(T)


@dataclass(frozen=True)
class Denoising(Objective):
    """What the network is trained to output and how each point's error counts."""

    prediction: Prediction = Prediction.EPS  # the network's target: eps | x0 | v (a name is accepted)
    weighting: str = "uniform"  # uniform (L_simple) | min-snr
    gamma: float = 5.0  # min-snr: the SNR at which the weight is capped
    learned_variance: bool = False  # the network also outputs v; L_hybrid = L_simple + vlb_weight L_vlb
    vlb_weight: float = 0.001

    def __post_init__(self):
        object.__setattr__(self, "prediction", Prediction.parse(self.prediction))
        choose("loss weighting", self.weighting, WEIGHTINGS)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> "Denoising":
        return cls(cfg.model.prediction, cfg.train.loss_weighting, cfg.train.min_snr_gamma,
                   cfg.model.variance == "learned", cfg.train.vlb_weight)

    def loss(self, model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor,
             generator: Optional[torch.Generator] = None, *, timesteps: Optional[UniformTimesteps] = None,
             labels: Optional[torch.Tensor] = None, world: World = World(), autocast: bool = False) -> torch.Tensor:
        """L_simple of Ho et al. (2020), eq. 14: t ~ U{1..T} (or `timesteps`' importance sampler), eps ~ N(0, I),
        the MSE between the network and its target, per point, then:

        - weighting "min-snr" scales each point's error by min_snr_weight (Hang et al. 2023);
        - learned_variance adds lambda T L_t (in bits per dimension, with the mean's gradient stopped): the
          hybrid loss L_simple + lambda L_vlb of Nichol and Dhariwal (2021, sec. 3.1), lambda = vlb_weight;
        - labels (B,) condition the network; they are already dropped to the null label where wanted;
        - with several processes (`world`), every rank draws the whole batch's t and eps and computes the loss
          on its own shard; the importance sampler sees every rank's losses;
        - autocast runs the network's forward under bfloat16 autocast; t, eps, x_t, the target and the loss stay
          float32 (the schedule's alpha_bar spans 1e-9..1, far below bfloat16's 3 significant digits' reach);
          autocast's weight-cast cache is off, as a CUDA graph of the step needs (each weight is cast once).
        """
        timesteps = timesteps or UniformTimesteps(schedule.T)
        t, weights = timesteps.sample(x0.shape[0], generator, x0.device)
        eps, x_t = schedule.noise(x0, t, generator)
        if world.size > 1:
            s = world.shard(x0.shape[0])
            x0, t, weights, eps, x_t = x0[s], t[s], weights[s], eps[s], x_t[s]
            labels = None if labels is None else labels[s]
        alpha_bar = schedule.gather(schedule.alpha_bar, t, x0)
        target = training_target(self.prediction, x0, eps, alpha_bar)
        with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
            x_in = network_input(self.prediction, x_t, alpha_bar)  # x_t, or EDM's c_in x_t
            out = model(x_in, t) if labels is None else model(x_in, t, labels)
        out = out.float()
        pred, v = out.chunk(2, dim=1) if self.learned_variance else (out, None)
        per_point = ((pred - target) ** 2).flatten(1).mean(1)
        if self.weighting == "min-snr":
            snr = (alpha_bar / (1 - alpha_bar)).flatten(1)[:, 0]
            per_point = min_snr_weight(self.prediction, snr, self.gamma) * per_point
        if self.learned_variance:
            x0_hat = to_x0(self.prediction, pred.detach(), x_t, alpha_bar)  # L_vlb trains the variance only
            vlb = vlb_term(schedule, x0, x_t, t, x0_hat, schedule.learned_log_variance(v, t))
            per_point = per_point + self.vlb_weight * schedule.T * vlb / (x0.shape[1] * math.log(2))
        timesteps.update(world.gather(t), world.gather(per_point.detach()))
        return (weights * per_point).mean()


@method("ddpm")
class VPDiffusionMethod(Method):
    """The discrete VP process of the configured beta schedule, trained with Denoising."""

    denoises = True

    def process(self, cfg: ExperimentConfig) -> Method:
        return self

    def check_process(self, cfg: ExperimentConfig) -> None:
        check(cfg.train.timestep_sampling != "logit-normal", "train.timestep_sampling = logit-normal draws flow "
              "matching's continuous t; set schedule.process=flow, or choose uniform or importance")
        check(cfg.train.coupling == "independent", f"train.coupling = {cfg.train.coupling} pairs data and noise for "
              "flow matching; set schedule.process=flow, or train.coupling=independent")
        check(not (cfg.schedule.zero_terminal_snr and cfg.model.prediction == "eps"), "schedule.zero_terminal_snr "
              "leaves x_T pure noise, where an eps prediction says nothing about x0; set model.prediction=v (or x0)")

    def schedule(self, cfg: ExperimentConfig, device: torch.device | str = "cpu") -> NoiseSchedule:
        return NoiseSchedule.from_config(cfg.schedule, device)

    def denoiser(self, cfg: ExperimentConfig, model: nn.Module, schedule: NoiseSchedule,
                 labels: Optional[torch.Tensor] = None, guidance: float = 1.0) -> Denoiser:
        return Denoiser(model, schedule, cfg.model.prediction, learned_variance=cfg.model.variance == "learned",
                        labels=labels, guidance=guidance)

    def timestep_sampling(self, cfg: ExperimentConfig) -> str:
        """auto: EDM's log-normal noise levels for a built-in dataset (measured on the development tables and the
        moons, docs/default.md); uniform, the guide's, for a file's table (whose recipe was measured with it)
        and for the guide's network."""
        kind = cfg.train.timestep_sampling
        if kind != "auto":
            return kind
        return "uniform" if cfg.data.path or cfg.model.arch == "guide" else "log-normal"

    def timesteps(self, cfg: ExperimentConfig, device: torch.device | str = "cpu") -> UniformTimesteps:
        kind = self.timestep_sampling(cfg)
        return ddpm_timesteps(kind, cfg.schedule.T, device, self.schedule(cfg).alpha_bar if kind == "log-normal"
                              else None)

    def objective(self, run, others=None) -> Objective:
        return Denoising.from_config(run.config)

    def describe(self, cfg: ExperimentConfig, schedule: NoiseSchedule) -> str:
        return (f"T = {schedule.T} {cfg.schedule.name}, alpha_bar_T = {schedule.alpha_bar_T:.3g}, "
                f"{self.timestep_sampling(cfg)} t")
