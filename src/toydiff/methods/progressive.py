"""Progressive distillation (Salimans and Ho 2022): a student that takes in one deterministic DDIM step the two
its teacher takes, round after round, down to `steps` steps (`toydiff distill RUN --method progressive`).

The student starts as a copy of the teacher and halves the steps from N = K 2^R (the smallest such N >=
PROGRESSIVE_START) to K on the trailing grid. It keeps the teacher's process, network and prediction, which must
be x0 or v (eps is ill-conditioned at the high-noise steps a few-step student lives on), trains on the teacher's
own training rows, and samples with `steps` DDIM steps. --train-steps is the total over the R rounds (default
PROGRESSIVE_ROUND_STEPS a round), each round with a fresh optimizer (their recipe) starting from the previous
round's EMA weights; `on_round(steps, model)` sees each round's student. Only the last round is checkpointed in
the run directory: the earlier ones train against teachers held in memory, so a student cut short is distilled
again rather than resumed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..core.config import DistillConfig, ExperimentConfig
from ..core.errors import ToydiffError
from ..core.runtime import World, torch_generator
from ..diffusion.losses import Objective, ddim_step
from ..diffusion.parameterization import Denoise
from ..diffusion.schedules import NoiseSchedule
from ..training.loop import make_state, train
from .base import Lesson, Log, Student, check, student, teacher_record

PROGRESSIVE_START = 512  # the first grid: where the teacher's DDIM meets its ODE (dev table, docs/benchmarks.md)
PROGRESSIVE_ROUND_STEPS = 1500  # training steps per round by default (dev table: 2000 beat 860 clearly)


def progressive_target(x_t: torch.Tensor, x_s: torch.Tensor, ab_t: torch.Tensor, ab_s: torch.Tensor) -> torch.Tensor:
    """The x0 whose single DDIM step from x_t (alpha_bar ab_t) lands on x_s (ab_s): Salimans and Ho's
    x~ = (x_s - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t), alpha = sqrt(ab),
    sigma = sqrt(1 - ab); at ab_s = 1 (the data) it is x_s itself."""
    ratio = ((1 - ab_s) / (1 - ab_t)).sqrt()
    return (x_s - ratio * x_t) / (ab_s.sqrt() - ratio * ab_t.sqrt())


@dataclass(frozen=True)
class Progressive(Objective):
    """One round of progressive distillation (Salimans and Ho 2022, Algorithm 2): the student learns to take
    in one deterministic DDIM step the two its frozen teacher takes on an N-step grid.

    teacher(labels): the teacher's denoise(x_t, t) -> x0_hat (frozen, no gradient) for the batch's labels (None:
    unconditional; a model of pieces: each row's piece, model.components). student(network, labels): the
    student's denoiser around a network (the training loop's, which may be wrapped), for the same labels.
    grid: (N + 1,) the teacher's t_0 = 0 < t_1 < ... < t_N on the training schedule (a respaced grid's
    timesteps), N even."""

    teacher: Callable[[Optional[torch.Tensor]], Denoise]
    student: Callable[[nn.Module, Optional[torch.Tensor]], Denoise]
    grid: torch.Tensor

    def loss(self, model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor,
             generator: Optional[torch.Generator] = None, *, timesteps=None, labels: Optional[torch.Tensor] = None,
             world: World = World(), autocast: bool = False) -> torch.Tensor:
        """Salimans and Ho (2022), Algorithm 2: each point noised to a random even grid point t_2i, the teacher's
        two DDIM steps t_2i -> t_2i-1 -> t_2i-2 give the target x~ (progressive_target), and the student's x0_hat
        at t_2i meets it in the truncated-SNR weighted squared error max(SNR_t, 1) |x0_hat - x~|^2 (their
        'truncated SNR' weighting, which keeps the high-noise steps a few-step student lives on in play)."""
        grid = self.grid.to(x0.device)
        i = torch.randint(1, (grid.numel() - 1) // 2 + 1, (x0.shape[0],), generator=generator, device=x0.device)
        t, mid, end = grid[2 * i], grid[2 * i - 1], grid[2 * i - 2]
        eps, x_t = schedule.noise(x0, t, generator)
        ab_t, ab_mid, ab_end = (schedule.gather(schedule.alpha_bar, s, x0) for s in (t, mid, end))
        teacher = self.teacher(labels)
        with torch.no_grad():
            x_mid = ddim_step(x_t, teacher(x_t, t), ab_t, ab_mid)
            x_end = ddim_step(x_mid, teacher(x_mid, mid), ab_mid, ab_end)
            target = progressive_target(x_t, x_end, ab_t, ab_end)
        x0_hat = self.student(model, labels)(x_t, t)
        weight = (ab_t / (1 - ab_t)).flatten(1)[:, 0].clamp_min(1.0)
        return (weight * ((x0_hat - target) ** 2).flatten(1).mean(1)).mean()


def progressive_rounds(steps: int, T: int) -> int:
    """R: the teacher's first grid has steps 2^R >= PROGRESSIVE_START steps (at most T)."""
    rounds = max(1, math.ceil(math.log2(PROGRESSIVE_START / steps)))
    while rounds > 1 and steps * 2**rounds > T:
        rounds -= 1
    if steps * 2**rounds > T:
        raise ToydiffError(f"--steps {steps} leaves no room to halve on the teacher's T = {T} steps; use at most "
                           f"{T // 2}")
    return rounds


@student("progressive")
class ProgressiveDistillation(Student):
    """Rounds of halving in memory, the last one in the run directory (see the module)."""

    in_memory_teacher = True
    takes_critic = True

    def check(self, cfg: ExperimentConfig, steps: int) -> None:
        super().check(cfg, steps)
        check(cfg.model.prediction != "eps", "progressive distillation needs a teacher that predicts x0 or v: an "
              "eps-prediction student cannot take the high-noise steps of a few-step grid (Salimans and Ho 2022); "
              "train the teacher with model.prediction=v")
        progressive_rounds(steps, cfg.schedule.T)

    def config(self, teacher: ExperimentConfig, steps: int, train_steps: Optional[int]) -> ExperimentConfig:
        """The teacher's configuration as the student's last round: train_steps / rounds steps
        (PROGRESSIVE_ROUND_STEPS by default), sampled with `steps` deterministic DDIM steps on the trailing grid
        (the one its rounds halved)."""
        rounds = progressive_rounds(steps, teacher.schedule.T)
        per_round = max(1, train_steps // rounds) if train_steps else PROGRESSIVE_ROUND_STEPS
        return dataclasses.replace(
            teacher,
            train=dataclasses.replace(teacher.train, steps=per_round,
                                      warmup_steps=min(teacher.train.warmup_steps, per_round // 10),
                                      checkpoint_every=min(teacher.train.checkpoint_every, per_round)),
            sample=dataclasses.replace(teacher.sample, sampler="ddim", steps=steps, spacing="trailing", eta=0.0),
            distill=DistillConfig())

    def chain(self, student, steps: int):
        """The student's sampler, `steps` deterministic DDIM steps on the trailing grid, with gradients."""
        schedule = student.schedule
        grid = schedule.respace(steps).timesteps_t

        def run(network: nn.Module, x: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
            denoise = student.denoiser_for(labels, model=network)
            for k in range(steps, 0, -1):
                t, s = (grid[i].to(x.device).expand(x.shape[0]) for i in (k, k - 1))
                x = ddim_step(x, denoise(x, t), schedule.gather(schedule.alpha_bar, t, x),
                              schedule.gather(schedule.alpha_bar, s, x))
            return x
        return run

    def lesson(self, teacher, student, steps: int, pairs: int, progress: bool, log: Log,
               on_round: Optional[Callable[[int, nn.Module], None]] = None) -> Lesson:
        """The rounds but the last, in memory; the last one is the lesson (in the run directory)."""
        rounds = progressive_rounds(steps, teacher.schedule.T)
        cfg, schedule, model, dev = student.config, student.schedule, student.model, student.device
        model.load_state_dict(teacher.model.state_dict())
        x0 = torch.as_tensor(teacher.scaler.transform(teacher.data), dtype=torch.float32, device=dev)
        y = None if teacher.row_labels is None else torch.as_tensor(teacher.row_labels, device=dev)

        def round_objective(n: int) -> Progressive:
            frozen = copy.deepcopy(model).eval().requires_grad_(False)
            return Progressive(teacher=lambda y: student.denoiser_for(y, model=frozen),
                               grid=schedule.respace(n).timesteps_t, student=lambda net, y: student.denoiser_for(y, model=net))
        for r in range(rounds - 1):
            n = steps * 2 ** (rounds - r)
            log(f"progressive round {r + 1} of {rounds}: {n} -> {n // 2} DDIM steps, {cfg.train.steps} training "
                "steps")
            state = make_state(model, cfg.train, student.method.timesteps(cfg, dev),
                               torch_generator(cfg.seed, f"progressive-{r}", dev))
            train(state, schedule, x0, cfg.train, round_objective(n), labels=y, progress=progress)
            if state.ema is not None:
                model.load_state_dict(state.ema.module.state_dict())
            if on_round is not None:
                on_round(n // 2, model.eval())
        log(f"progressive round {rounds} of {rounds}: {2 * steps} -> {steps} DDIM steps, {cfg.train.steps} "
            "training steps")
        record = teacher_record(teacher, "progressive", rounds=rounds, teacher_steps=steps * 2**rounds,
                                source=f"progressive distillation of {teacher.path}")
        return Lesson(record, round_objective(2 * steps))
