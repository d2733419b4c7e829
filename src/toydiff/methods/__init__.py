"""The methods wing: one object per generative method, each in its own module of this folder.

    method = methods.of(cfg)                          # what trains this configuration
    method.check(cfg)                                 # its rules, one line each (jobs.workflow.validate asks)
    schedule, network = method.build(cfg, dim, device, classes)
    denoiser = method.denoiser(cfg, network, schedule)
    loss = method.objective(run).loss(network, schedule, x0, generator)

Methods (train a run from scratch): ddpm (the VP diffusion, `ddpm`), flow matching (`flow`), MeanFlow
(`meanflow`), consistency training (`consistency`). Students (make a few-step run of a trained one; toydiff
distill): reflow (`reflow`), progressive distillation (`progressive`), consistency distillation
(`consistency`). Each owns what differs between methods: its rules on a configuration, its schedule, network,
denoiser, t sampler and objective, what it logs and warns, and, for a student, how it is made from its teacher.
Nothing outside this folder tests a method's name (tests/test_docs.py greps for it); adding a method is its
module here (found and imported below: its decorator registers it) and its name in core.config.METHODS or
core.config.DISTILL_METHODS.
"""

import importlib
import pkgutil

from ..core.config import ExperimentConfig
from .base import METHODS, STUDENTS, Lesson, Method, Student

for _module in pkgutil.iter_modules(__path__):  # every module of this folder registers its methods on import
    importlib.import_module(f".{_module.name}", __name__)


def of(cfg: ExperimentConfig) -> Method:
    """The method a configuration trains: train.objective's own, or for "denoise" its process's (ddpm, flow)."""
    return METHODS.get(cfg.schedule.process if cfg.train.objective == "denoise" else cfg.train.objective)


def check(cfg: ExperimentConfig) -> None:
    """Every rule of the configuration's method (and of the process it trains on)."""
    of(cfg).check(cfg)


__all__ = ["METHODS", "STUDENTS", "Lesson", "Method", "Student", "of", "check"]
