"""Consistency models (Song et al. 2023): a network whose x0_hat is the end of the probability-flow ODE path
through x_t, sampled by multistep consistency sampling (samplers.sample_consistency).

Two ways to train one, both the same objective (Consistency): consistency training from scratch
(train.objective = consistency: the method below) and consistency distillation of a trained run (the student
below: `toydiff distill RUN --method consistency`). **Experimental:** on the development table (pinwheel, 6000
steps) both stay far from the data (k-NN AUC 0.90 at 1 to 4 evaluations, against progressive's 0.52 to 0.56;
the iCT weighting 1 / (sigma_n - sigma_n-1) and a 16-step grid did no better than 0.73), so both say so.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..core.config import DistillConfig, ExperimentConfig
from ..core.runtime import World
from ..diffusion.losses import Objective, ddim_step
from ..diffusion.parameterization import Denoise
from ..diffusion.schedules import NoiseSchedule, append_dims
from .base import Lesson, Log, Method, Student, check, method, student, teacher_record

CONSISTENCY_GRID = 64  # N of consistency training and distillation: the grid whose neighbours must agree
EXPERIMENTAL = "measured far from the data at this budget (docs/benchmarks.md)"


@dataclass(frozen=True)
class Consistency(Objective):
    """Consistency distillation (Song et al. 2023, Algorithm 2): the student's consistency function f (its
    x0_hat) must agree at neighbouring points t_n > t_n-1 of an N-step grid on one path of the frozen
    teacher's ODE (one DDIM step between them), down to t_0 = 0, where f is the identity (the target there is
    the teacher's endpoint itself). Without a teacher it is consistency training (their Algorithm 3): the
    DDIM step is taken with the data point itself as x0_hat, so x_t-n-1 is the same draw of noise one grid
    point lower (the one-sample estimate of the teacher's step; train.objective = consistency). A v or eps
    network's x0_hat = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar) tends to x_t as abar -> 1 whatever it
    outputs, so f stays continuous at the boundary and well-conditioned at low noise (Karras et al.'s c_skip
    and c_out play that part in Song et al.).
    teacher(labels): its denoise(x_t, t) -> x0_hat for the batch's labels (None: unconditional; a model of
    pieces: each row's piece, model.components); None: consistency training. student(network, labels): the
    student's denoiser around a network, for the same labels. grid: (N + 1,) the t_0 = 0 < t_1 < ... < t_N on
    the training schedule."""

    teacher: Optional[Callable[[Optional[torch.Tensor]], Denoise]]
    student: Callable[[nn.Module, Optional[torch.Tensor]], Denoise]
    grid: torch.Tensor

    def loss(self, model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor,
             generator: Optional[torch.Generator] = None, *, timesteps=None, labels: Optional[torch.Tensor] = None,
             world: World = World(), autocast: bool = False) -> torch.Tensor:
        """Song et al. (2023), Algorithm 2 with the squared L2 distance and lambda = 1: n ~ U{1..N}, x_{t_n} from
        q(x_t | x0), the teacher's DDIM step to x^_{t_n-1}, and |f(x_{t_n}, t_n) - f-(x^_{t_n-1}, t_n-1)|^2 with
        the target f- the student itself without gradient (Song and Dhariwal 2024 drop the EMA target)."""
        grid = self.grid.to(x0.device)
        i = torch.randint(1, grid.numel(), (x0.shape[0],), generator=generator, device=x0.device)
        t, s = grid[i], grid[i - 1]
        _, x_t = schedule.noise(x0, t, generator)
        ab_t, ab_s = schedule.gather(schedule.alpha_bar, t, x0), schedule.gather(schedule.alpha_bar, s, x0)
        f = self.student(model, labels)
        with torch.no_grad():
            x_s = ddim_step(x_t, x0 if self.teacher is None else self.teacher(labels)(x_t, t), ab_t, ab_s)
            # f(x, 0) = x: the boundary condition, exact whatever the network (a flow network never sees s = 0)
            target = torch.where(append_dims(s == 0, x_s.ndim), x_s, f(x_s, s))
        return ((f(x_t, t) - target) ** 2).flatten(1).mean(1).mean()


@method("consistency")
class ConsistencyTraining(Method):
    """train.objective = consistency: consistency training on either process (its schedule and denoiser)."""

    takes_pieces = False

    def check(self, cfg: ExperimentConfig) -> None:
        check(cfg.model.prediction != "x0", "train.objective = consistency needs model.prediction = v or eps: "
              "their x0_hat is x_t itself at zero noise (the consistency function's boundary condition)")
        check(cfg.model.variance == "fixed" and not cfg.model.conditional and not cfg.model.pieces_asked
              and cfg.train.coupling != "reflow",
              "train.objective = consistency trains an unconditional model with fixed variances on independent "
              "noise: set model.variance=fixed, model.conditional=false, model.components=0 (auto) or 1, "
              "train.coupling=independent")
        check(cfg.sample.sampler == "consistency", "a consistency-trained model's x0_hat is the end of its ODE "
              "path, not a posterior mean: set sample.sampler=consistency")
        super().check(cfg)

    def objective(self, run, others=None) -> Objective:
        return Consistency(teacher=None, student=lambda net, y: run.denoiser_for(y, model=net),
                           grid=run.schedule.respace(CONSISTENCY_GRID).timesteps_t)

    def warnings(self, cfg: ExperimentConfig) -> list[str]:
        return [f"consistency training is experimental here: {EXPERIMENTAL}"]


@student("consistency")
class ConsistencyDistillation(Student):
    """The student starts as a copy of the teacher and learns to give the same x0_hat at neighbouring points of
    one path of the teacher's ODE (one DDIM step apart on a CONSISTENCY_GRID-step grid), down to t = 0, where a
    v or eps network's x0_hat is x_t itself: the boundary condition holds by the parameterization. It samples by
    multistep consistency sampling in `steps` evaluations. Of a model of pieces (model.components), each row
    keeps its piece and teacher and student are conditioned on it, as the teacher was trained."""

    in_memory_teacher = True

    def check(self, cfg: ExperimentConfig, steps: int) -> None:
        super().check(cfg, steps)
        check(cfg.model.prediction != "x0", "consistency distillation needs a teacher that predicts v or eps: their "
              "x0_hat is x_t itself at zero noise (the consistency function's boundary condition), an x0 network's "
              "is not; train the teacher with model.prediction=v")

    def config(self, teacher: ExperimentConfig, steps: int, train_steps: Optional[int]) -> ExperimentConfig:
        """The teacher's configuration, trained train_steps (the teacher's by default), sampled by multistep
        consistency sampling in `steps` steps on the trailing grid."""
        return dataclasses.replace(
            teacher, train=dataclasses.replace(teacher.train, steps=train_steps or teacher.train.steps),
            sample=dataclasses.replace(teacher.sample, sampler="consistency", steps=steps, spacing="trailing",
                                       variance="auto", eta=0.0), distill=DistillConfig())

    def lesson(self, teacher, student, steps: int, pairs: int, progress: bool, log: Log,
               on_round=None) -> Lesson:
        check(teacher.dir.read_manifest().get("method") != "consistency",
              f"'{teacher.path}' is already a consistency student; distill the run it came from")
        student.model.load_state_dict(teacher.model.state_dict())
        frozen = copy.deepcopy(student.model).eval().requires_grad_(False)
        objective = Consistency(teacher=lambda y: teacher.denoiser_for(y, model=frozen),
                                student=lambda net, y: student.denoiser_for(y, model=net),
                                grid=student.schedule.respace(CONSISTENCY_GRID).timesteps_t)
        log(f"consistency distillation on the teacher's {CONSISTENCY_GRID}-step DDIM grid, "
            f"{student.config.train.steps} steps")
        log(f"warning: consistency distillation is experimental here: {EXPERIMENTAL}; --method progressive is the "
            "few-step student that works")
        return Lesson(teacher_record(teacher, "consistency", grid=CONSISTENCY_GRID,
                                     source=f"consistency distillation of {teacher.path}"), objective)
