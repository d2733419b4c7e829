"""Few-step students of a trained run: `toydiff distill RUN_DIR --method reflow --steps K`.

    from toydiff.distill import distill_run
    student = distill_run("runs/teacher", "runs/student", method="reflow", steps=4)   # a trained Run

reflow (rectified flow, Liu et al. 2023): the teacher's probability-flow ODE maps `pairs` noise draws
z to samples x (deterministically: dpmpp-3m, 50 Karras steps, a solver at the floor for the default
model, docs/benchmarks.md); a flow-matching student learns the straight path between each x and its
own z (train.coupling = reflow), so its paths cross less and fewer Euler steps reach the data. The
student is a complete run directory (its training rows are the teacher's samples, its noise
`train_noise.npy`; the teacher and the method in run.json) that samples with `steps` Euler steps on
the uniform grid by default, and `sample`, `eval`, `plot` and `train --resume` treat it like any
run. A flow teacher's weights start the student (Liu et al. fine-tune); a ddpm teacher's cannot.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .config import DISTILL_METHODS, ExperimentConfig, choose
from .errors import ToydiffError
from .runs import Run, build
from .runtime import NoiseStream, derive_seed, resolve_device
from .workflow import start_training, validate

TEACHER_SAMPLER = {"sampler": "dpmpp-3m", "steps": 50, "spacing": "karras"}  # deterministic, at the floor


def student_config(teacher: ExperimentConfig, steps: int, train_steps: Optional[int] = None) -> ExperimentConfig:
    """The teacher's configuration made a reflow student: the flow process on the teacher's pairs (settings only
    the ddpm process has are reset), sampled with `steps` Euler steps on the uniform grid."""
    return dataclasses.replace(
        teacher,
        schedule=dataclasses.replace(teacher.schedule, process="flow", zero_terminal_snr=False),
        model=dataclasses.replace(teacher.model, variance="fixed",
                                  prediction="v" if teacher.schedule.process == "ddpm" else teacher.model.prediction),
        train=dataclasses.replace(teacher.train, coupling="reflow", loss_weighting="uniform",
                                  timestep_sampling="uniform" if teacher.train.timestep_sampling == "importance"
                                  else teacher.train.timestep_sampling,
                                  steps=train_steps or teacher.train.steps),
        sample=dataclasses.replace(teacher.sample, sampler="euler", steps=steps, spacing="trailing", variance="auto",
                                   eta=0.0))


def distill_run(teacher: str | Path, out: str | Path, *, method: str = "reflow", steps: int = 4,
                pairs: int = 20_000, train_steps: Optional[int] = None, device: str = "auto", progress: bool = False,
                log: Callable[[str], None] = lambda s: None) -> Run:
    """Train a `method` student of the run at `teacher` into a new run directory `out` (see the module)."""
    choose("distill method", method, DISTILL_METHODS)
    if steps < 1:
        raise ToydiffError(f"--steps must be >= 1 (the student's sampling steps), got {steps}")
    if pairs < 2:
        raise ToydiffError(f"--pairs must be >= 2, got {pairs}")
    if train_steps is not None and train_steps < 1:
        raise ToydiffError(f"--train-steps must be >= 1, got {train_steps}")
    t = Run.load(teacher, device=device)
    if t.classes:
        raise ToydiffError("distilling a class-conditional run is not supported yet (its pairs would need a label "
                           "each); distill an unconditional run")
    cfg = student_config(t.config, steps, train_steps)
    validate(cfg)
    seed = derive_seed(cfg.seed, "reflow-pairs")
    log(f"reflow: {pairs} noise -> data pairs from the teacher's ODE ({TEACHER_SAMPLER['sampler']}, "
        f"{TEACHER_SAMPLER['steps']} {TEACHER_SAMPLER['spacing']} steps)")
    x = t.sample(pairs, seed=seed, progress=progress, **TEACHER_SAMPLER)
    # the x_T each sample started from: Run.sample's per-sample stream, whatever its batches
    z = NoiseStream(derive_seed(seed, "sample"), 0, pairs, t.device).randn((pairs, t.dim)).cpu().numpy()
    dev = resolve_device(device)
    schedule, model = build(cfg, t.dim, dev)
    if t.config.schedule.process == "flow" and t.config.model == cfg.model:
        model.load_state_dict(t.model.state_dict())  # fine-tune the teacher's (EMA) weights
    student = Run(Path(out), cfg, t.scaler, schedule, model, x.astype(np.float32), dev, None, t.names, t.holdout,
                  integer_columns=t.integer_columns)
    record = {"teacher": str(t.path.resolve()), "method": method, "pairs": pairs, "teacher_sampler": TEACHER_SAMPLER,
              "source": f"reflow pairs of {t.path}"}
    return start_training(student, out, progress=progress, log=log, extra=record, noise=z.astype(np.float32))
