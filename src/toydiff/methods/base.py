"""The seam every generative method offers, and the registries of methods and of students.

A `Method` is what trains a run from scratch (toydiff run, toydiff train): the VP diffusion, flow matching,
MeanFlow, consistency training. A `Student` is a recipe that makes a few-step run out of a trained one
(toydiff distill, a preset's [distill]): reflow, progressive distillation, consistency distillation. Each is
one object in its own module of this folder; the objects hold no state (everything comes from the config),
and the defaults below are the ones most methods share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from ..core.config import METHODS as METHOD_NAMES, DISTILL_METHODS, ExperimentConfig
from ..core.errors import ToydiffError
from ..core.registry import Registry
from ..core.runtime import derive_seed
from ..diffusion.losses import Objective, UniformTimesteps
from ..diffusion.models import build_model
from ..diffusion.parameterization import Denoiser
from ..diffusion.schedules import NoiseSchedule

Log = Callable[[str], None]
# "Run" and "RunDir" in the annotations below are toydiff.runs.run.Run and toydiff.runs.directory.RunDir, handed in by the
# layers above: the wing sits below them and never builds one
METHODS: Registry["Method"] = Registry("method", METHOD_NAMES)
STUDENTS: Registry["Student"] = Registry("distill method", DISTILL_METHODS)


def _joining(registry: Registry):
    """A class decorator factory: @deco(name) makes the class's one instance, named `name`, join `registry`."""
    def deco(name: str):
        def add(cls: type) -> type:
            cls.name = name
            registry.register(name)(cls())
            return cls
        return add
    return deco


method = _joining(METHODS)  # @method("ddpm"): a Method subclass, under a name of config.METHODS
student = _joining(STUDENTS)  # @student("reflow"): a Student subclass, under a name of config.DISTILL_METHODS


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ToydiffError(message)


class Method:
    """A generative method: the rules it puts on a configuration, the schedule its samplers walk, the network it
    trains and the denoiser around it, its t sampler and training objective, and what it says while training.

    A method that trains on another's process (consistency training on the VP diffusion or on flow matching)
    takes that process's schedule, denoiser and t sampler from `process(cfg)`."""

    name = ""  # its name in METHODS (set by @method)
    samplers: tuple[str, ...] = ()  # samplers that need this method's networks (no other method may use them)
    intervals = False  # its network takes a second time (a mean velocity's interval: models.build_model)
    others: tuple[str, ...] = ()  # the networks it trains beside the run's own (a critic): other_networks
    takes_pieces = True  # its network can be conditioned on each row's piece (model.components = 0 finds them)
    denoises = False  # its objective is a denoising loss of the run's network alone, which held-back rows can
    #                   measure: early stopping (train.validation) watches it

    @property
    def validates(self) -> bool:
        """Whether early stopping can watch its loss on held-back rows."""
        return self.denoises and not self.others

    def process(self, cfg: ExperimentConfig) -> "Method":
        """The method whose process (schedule, denoiser, t) this one trains on: schedule.process's."""
        return METHODS.get(cfg.schedule.process)

    def check(self, cfg: ExperimentConfig) -> None:
        """Refuse, in one line with the fix, a configuration this method cannot train or sample: the rules of the
        process it trains on, and its sampler's."""
        self.process(cfg).check_process(cfg)
        self.check_sampler(cfg, cfg.sample.sampler)
        check(cfg.train.validation <= 0 or self.validates,
              f"train.validation stops training on the held-back rows' denoising loss, and the {self.name} method "
              "has none to watch; set train.validation = 0")

    def check_process(self, cfg: ExperimentConfig) -> None:
        """The rules the process itself puts on any method trained on it."""

    def check_fresh(self, cfg: ExperimentConfig) -> None:
        """The rules for a run trained from scratch rather than made a student (toydiff distill)."""
        process = self.process(cfg)
        if process is not self:
            process.check_fresh(cfg)

    def check_sampler(self, cfg: ExperimentConfig, sampler: str) -> None:
        """A sampler that only another method's networks can drive is refused (meanflow's mean-velocity steps)."""
        for name in METHODS.names():
            owner = METHODS.get(name)
            if sampler in owner.samplers and owner is not self:
                raise ToydiffError(owner.foreign_sampler(sampler))

    def foreign_sampler(self, sampler: str) -> str:
        return f"sample.sampler = {sampler} needs a model trained by the {self.name} method"

    def schedule(self, cfg: ExperimentConfig, device: torch.device | str = "cpu") -> NoiseSchedule:
        return self.process(cfg).schedule(cfg, device)

    def build(self, cfg: ExperimentConfig, dim: int, device: torch.device, classes: int = 0
              ) -> tuple[NoiseSchedule, nn.Module]:
        """The schedule and a freshly initialised network (seeded by the config's seed) on `device`."""
        schedule = self.schedule(cfg, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, "init"))
            model = build_model(cfg.model, dim, cfg.schedule.T, classes, intervals=self.intervals)
        return schedule, model.to(device)

    def other_networks(self, cfg: ExperimentConfig, dim: int, device: torch.device) -> dict[str, nn.Module]:
        """The networks it trains beside the run's own, by name (`others`), freshly initialised from the config's
        seed; they live in the training state (its checkpoint) only, never in what samples."""
        return {}

    def denoiser(self, cfg: ExperimentConfig, model: nn.Module, schedule: NoiseSchedule,
                 labels: Optional[torch.Tensor] = None, guidance: float = 1.0) -> Denoiser:
        """The network as denoise(x_t, t) -> x0_hat (toydiff.diffusion.parameterization)."""
        return self.process(cfg).denoiser(cfg, model, schedule, labels, guidance)

    def timestep_sampling(self, cfg: ExperimentConfig) -> str:
        """train.timestep_sampling with auto resolved (by the process the method trains on)."""
        process = self.process(cfg)
        if process is self:
            raise NotImplementedError
        return process.timestep_sampling(cfg)

    def timesteps(self, cfg: ExperimentConfig, device: torch.device | str = "cpu") -> UniformTimesteps:
        """The t sampler of train.timestep_sampling (its state is part of the training state)."""
        return self.process(cfg).timesteps(cfg, device)

    def training_rows(self, cfg: ExperimentConfig, run_dir: "RunDir", x0: torch.Tensor) -> torch.Tensor:
        """The rows a training step draws its batch from: the scaled training data x0 (N, D) itself, unless the
        method pairs each row with something stored beside it in the run directory."""
        process = self.process(cfg)
        return x0 if process is self else process.training_rows(cfg, run_dir, x0)

    def objective(self, run: "Run", others: Optional[dict[str, nn.Module]] = None) -> Objective:
        """What a training step of `run` minimizes (losses.diffusion_loss calls it); `others`: the training
        state's modules of the method's further networks (other_networks), which its objective updates too."""
        raise NotImplementedError

    def describe(self, cfg: ExperimentConfig, schedule: NoiseSchedule) -> str:
        """The process in the training log's first line."""
        return self.process(cfg).describe(cfg, schedule)

    def warnings(self, cfg: ExperimentConfig) -> list[str]:
        """Warnings for a run about to train (the schedule's own are added by the caller)."""
        return []

    def frame_scale(self, cfg: ExperimentConfig, schedule: NoiseSchedule, t: int) -> float:
        """What x_t is drawn in (the figures): the factor from the VP view the samplers use to the process's own
        frame; 1 for the VP diffusion."""
        process = self.process(cfg)
        return 1.0 if process is self else process.frame_scale(cfg, schedule, t)

    def schedule_panel(self, cfg: ExperimentConfig, schedule: NoiseSchedule) -> Optional[tuple[str, Any, Any]]:
        """This run's schedule as a panel (title, betas, 1 - alpha_bar) of the schedules figure, when it is none
        of the beta schedules drawn there (None: it is)."""
        process = self.process(cfg)
        return None if process is self else process.schedule_panel(cfg, schedule)


class Student:
    """A few-step student of a trained run: what it refuses of its teacher, the configuration it trains with, and
    what it learns from the teacher (toydiff.jobs.distill runs the job: loading the teacher, its copy, training it in
    the run directory).

    in_memory_teacher: the student trains against a teacher held in memory, so one cut short cannot resume."""

    name = ""  # its name in STUDENTS (set by @student)
    in_memory_teacher = False
    takes_critic = False  # it can run its sampler with gradients (chain): distill.critic (methods.adversarial)

    def check(self, cfg: ExperimentConfig, steps: int) -> None:
        """Refuse, before anything is trained, a teacher configuration this recipe cannot distill to `steps`."""

    def config(self, teacher: ExperimentConfig, steps: int, train_steps: Optional[int]) -> ExperimentConfig:
        raise NotImplementedError

    def chain(self, student: "Run", steps: int) -> Callable[[nn.Module, torch.Tensor, Optional[torch.Tensor]],
                                                               torch.Tensor]:
        """Its sampler as chain(network, x_T, labels) -> x_0 with gradients into the network (takes_critic)."""
        raise NotImplementedError

    def lesson(self, teacher: "Run", student: "Run", steps: int, pairs: int, progress: bool, log: Log,
               on_round: Optional[Callable[[int, nn.Module], None]] = None) -> "Lesson":
        """Prepare `student` (its config's fresh network, on the teacher's rows, in memory) for the training in its
        run directory: its starting weights, and what it trains on there."""
        raise NotImplementedError


@dataclass
class Lesson:
    """What a student trains on in its run directory."""

    record: dict  # its manifest's entries: the teacher, the method and what the recipe did
    objective: Optional[Objective] = None  # None: its config's own method's
    data: Optional[np.ndarray] = None  # its training rows (data units), when they are not the teacher's
    noise: Optional[np.ndarray] = None  # each row's own noise (reflow's pairs: train_noise.npy)
    pieces: Optional[np.ndarray] = None  # each of those rows' piece, for a student of a model of pieces
    labels: Optional[np.ndarray] = None  # each of those rows' class, for a student of a class-conditional run
    others: dict = field(default_factory=dict)  # networks it trains beside the student (a critic), by name


def teacher_record(teacher: "Run", method: str, **more: Any) -> dict:
    """The student's manifest entries that name its teacher."""
    return {"teacher": str(Path(teacher.path).resolve()), "method": method, **more}
