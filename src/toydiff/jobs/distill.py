"""Few-step students of a trained run: `toydiff distill RUN_DIR --method METHOD --steps K`.

    from toydiff.jobs.distill import distill_run
    student = distill_run("runs/teacher", "runs/student", method="reflow", steps=4)   # a trained Run

The recipes are the methods wing's students (toydiff.methods: reflow, progressive, consistency): each says what
it refuses of its teacher, the configuration it trains with and what it learns. This is the job around them:
load the teacher, check it, make the student in memory (the teacher's rows, scaler and held-out rows, the
student's own network), let the recipe prepare it, and train it into a complete run directory (its teacher and
method in run.json) that `sample`, `eval`, `plot` and `train --resume` treat like any run.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Callable, Optional

import torch

from .. import methods
from ..core.config import DISTILL_METHODS, DistillConfig, ExperimentConfig, choose
from ..core.errors import ToydiffError
from ..core.runtime import resolve_device
from ..methods.adversarial import CRITIC, EXPERIMENTAL, R1_GAMMA, Adversarial, make_critic
from ..runs.run import Run
from .workflow import start_training, validate


def check(cfg: ExperimentConfig, method: str, steps: int, critic: float = 0.0) -> None:
    """Refuse, before anything is trained, a teacher configuration `method` (a valid name) cannot distill to
    `steps` >= 1 steps (with a critic of weight `critic`)."""
    check_critic(method, critic)
    methods.STUDENTS.get(method).check(cfg, steps)


def check_critic(method: str, critic: float) -> None:
    """Refuse a critic (distill.critic > 0) beside a student that cannot run its sampler with gradients."""
    if critic and not methods.STUDENTS.get(method).takes_critic:
        takers = [name for name in DISTILL_METHODS if methods.STUDENTS.get(name).takes_critic]
        raise ToydiffError(f"a critic needs a student whose sampler runs with gradients ({', '.join(takers)}), "
                           f"not {method}; use --method {takers[0]}, or no critic")


def distill_run(teacher: str | Path, out: str | Path, *, method: str = "reflow", steps: int = DistillConfig.steps,
                pairs: int = DistillConfig.pairs, train_steps: Optional[int] = None,
                critic: float = DistillConfig.critic, device: str = "auto",
                progress: bool = False, log: Callable[[str], None] = lambda s: None,
                on_round: Optional[Callable[[int, torch.nn.Module], None]] = None) -> Run:
    """Train a `method` student of the run at `teacher` into a new run directory `out` (see the module)."""
    choose("distill method", method, DISTILL_METHODS)
    if train_steps is not None and train_steps < 1:
        raise ToydiffError(f"--train-steps must be >= 1, got {train_steps}")
    DistillConfig(method=method, steps=steps, train_steps=train_steps or 0, pairs=pairs, critic=critic)  # the ranges
    recipe = methods.STUDENTS.get(method)
    check_critic(method, critic)
    t = Run.load(teacher, device=device)
    recipe.check(t.config, steps)
    cfg = recipe.config(t.config, steps, train_steps)
    validate(cfg)
    dev = resolve_device(device)
    schedule, model = methods.of(cfg).build(cfg, t.frame_dim, dev, t.classes or (0 if t.pieces is None
                                                                                  else t.pieces.count))
    # a class-conditional teacher's student is conditioned on the same classes; a model of pieces' student draws
    # the teacher's pieces
    student = Run(Path(out), cfg, t.scaler, schedule, model, t.data, dev, t.labels, t.names, t.holdout,
                  t.class_names, t.holdout_labels, t.label_column, t.label_index, components=t.components)
    lesson = recipe.lesson(t, student, steps, pairs, progress, log, on_round)
    if lesson.data is not None:
        student.data = lesson.data
    if lesson.pieces is not None:  # its own rows' pieces; the shares it draws them by stay the teacher's
        student.components = dataclasses.replace(t.components, labels=lesson.pieces)
    if lesson.labels is not None:  # its own rows' classes
        student.labels = lesson.labels
    if critic:
        net = make_critic(cfg, t.frame_dim, dev)
        log(f"a critic beside the {method} loss (weight {critic:g}, R1 {R1_GAMMA:g}) judges the student's "
            f"{steps}-step samples against the training rows")
        log(f"warning: a critic is experimental here: {EXPERIMENTAL}")
        lesson = dataclasses.replace(lesson, record={**lesson.record, "critic": critic}, others={CRITIC: net},
                                     objective=Adversarial(lesson.objective, net, recipe.chain(student, steps), critic))
    return start_training(student, out, progress=progress, log=log, extra=lesson.record, noise=lesson.noise,
                          objective=lesson.objective, others=lesson.others)
