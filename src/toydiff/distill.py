"""Few-step students of a trained run: `toydiff distill RUN_DIR --method METHOD --steps K`.

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

progressive (Salimans and Ho 2022): the student starts as a copy of the teacher and learns, round after
round, to take in one deterministic DDIM step the two steps of the previous round's model, halving the
steps from N = K 2^R (the smallest such N >= PROGRESSIVE_START) to K on the trailing grid
(losses.Progressive). It keeps the teacher's process, network and prediction, which must be x0 or v (eps
is ill-conditioned at the high-noise steps a few-step student lives on), trains on the teacher's own
training rows, and samples with `steps` DDIM steps. --train-steps is the total over the R rounds (default
PROGRESSIVE_ROUND_STEPS a round), each round with a fresh optimizer (their recipe) starting from the
previous round's EMA weights; `on_round(steps, model)` sees each round's student. Only the last round is
checkpointed in the run directory: the earlier ones train against teachers held in memory, so a student
cut short is distilled again rather than resumed.

consistency (Song et al. 2023, consistency distillation): the student starts as a copy of the teacher and
learns to give the same x0_hat at neighbouring points of one path of the teacher's ODE (one DDIM step
apart on a CONSISTENCY_GRID-step grid), down to t = 0, where a v or eps network's x0_hat is x_t itself:
the consistency function's boundary condition holds by the parameterization (losses.Consistency). It
samples by multistep consistency sampling (samplers.sample_consistency) in `steps` evaluations.
**Experimental:** on the development table (pinwheel, 6000 steps) it stays far from the data (k-NN AUC
0.90 at 1 to 4 evaluations, against progressive's 0.52 to 0.56; the iCT weighting 1 / (sigma_n - sigma_n-1)
and a 16-step grid did no better than 0.73), so `toydiff distill` says so when it is chosen.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .config import DISTILL_METHODS, DistillConfig, ExperimentConfig, choose
from .errors import ToydiffError
from .losses import CONSISTENCY_GRID, Consistency, Progressive
from .runs import Run, build
from .runtime import NoiseStream, derive_seed, resolve_device, torch_generator
from .training import make_state, train
from .workflow import start_training, validate

TEACHER_SAMPLER = {"sampler": "dpmpp-3m", "steps": 50, "spacing": "karras"}  # deterministic, at the floor
PROGRESSIVE_START = 512  # the first grid: where the teacher's DDIM meets its ODE (dev table, docs/benchmarks.md)
PROGRESSIVE_ROUND_STEPS = 1500  # training steps per round by default (dev table: 2000 beat 860 clearly)


def reflow_config(teacher: ExperimentConfig, steps: int, train_steps: Optional[int] = None) -> ExperimentConfig:
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
                                   eta=0.0), distill=DistillConfig())


def progressive_rounds(steps: int, T: int) -> int:
    """R: the teacher's first grid has steps 2^R >= PROGRESSIVE_START steps (at most T)."""
    rounds = max(1, math.ceil(math.log2(PROGRESSIVE_START / steps)))
    while rounds > 1 and steps * 2**rounds > T:
        rounds -= 1
    if steps * 2**rounds > T:
        raise ToydiffError(f"--steps {steps} leaves no room to halve on the teacher's T = {T} steps; use at most "
                           f"{T // 2}")
    return rounds


def progressive_config(teacher: ExperimentConfig, steps: int, train_steps: Optional[int], rounds: int
                       ) -> ExperimentConfig:
    """The teacher's configuration as a progressive student's last round: train_steps / rounds steps
    (PROGRESSIVE_ROUND_STEPS by default), sampled with `steps` deterministic DDIM steps on the trailing grid
    (the one its rounds halved)."""
    per_round = max(1, train_steps // rounds) if train_steps else PROGRESSIVE_ROUND_STEPS
    return dataclasses.replace(
        teacher,
        train=dataclasses.replace(teacher.train, steps=per_round,
                                  warmup_steps=min(teacher.train.warmup_steps, per_round // 10),
                                  checkpoint_every=min(teacher.train.checkpoint_every, per_round)),
        sample=dataclasses.replace(teacher.sample, sampler="ddim", steps=steps, spacing="trailing", eta=0.0),
        distill=DistillConfig())


def consistency_config(teacher: ExperimentConfig, steps: int, train_steps: Optional[int]) -> ExperimentConfig:
    """The teacher's configuration as a consistency student: trained train_steps (the teacher's by default),
    sampled by multistep consistency sampling in `steps` steps on the trailing grid."""
    return dataclasses.replace(
        teacher, train=dataclasses.replace(teacher.train, steps=train_steps or teacher.train.steps),
        sample=dataclasses.replace(teacher.sample, sampler="consistency", steps=steps, spacing="trailing",
                                   variance="auto", eta=0.0), distill=DistillConfig())


def check(cfg: ExperimentConfig, method: str, steps: int) -> None:
    """Refuse, before anything is trained, a teacher configuration `method` (a valid name) cannot distill to
    `steps` >= 1 steps."""
    if cfg.model.conditional:
        raise ToydiffError("distilling a class-conditional run is not supported yet (its pairs would need a label "
                           "each); distill an unconditional run")
    if method == "progressive" and cfg.model.prediction == "eps":
        raise ToydiffError("progressive distillation needs a teacher that predicts x0 or v: an eps-prediction "
                           "student cannot take the high-noise steps of a few-step grid (Salimans and Ho 2022); "
                           "train the teacher with model.prediction=v")
    if method == "progressive":
        progressive_rounds(steps, cfg.schedule.T)
    if method == "consistency" and cfg.model.prediction == "x0":
        raise ToydiffError("consistency distillation needs a teacher that predicts v or eps: their x0_hat is x_t "
                           "itself at zero noise (the consistency function's boundary condition), an x0 "
                           "network's is not; train the teacher with model.prediction=v")


def distill_run(teacher: str | Path, out: str | Path, *, method: str = "reflow", steps: int = DistillConfig.steps,
                pairs: int = DistillConfig.pairs, train_steps: Optional[int] = None, device: str = "auto",
                progress: bool = False, log: Callable[[str], None] = lambda s: None,
                on_round: Optional[Callable[[int, torch.nn.Module], None]] = None) -> Run:
    """Train a `method` student of the run at `teacher` into a new run directory `out` (see the module)."""
    choose("distill method", method, DISTILL_METHODS)
    if train_steps is not None and train_steps < 1:
        raise ToydiffError(f"--train-steps must be >= 1, got {train_steps}")
    DistillConfig(method=method, steps=steps, train_steps=train_steps or 0, pairs=pairs)  # the ranges, by their owner
    t = Run.load(teacher, device=device)
    check(t.config, method, steps)
    if method == "progressive":
        return _progressive(t, out, steps, train_steps, device, progress, log, on_round)
    if method == "consistency":
        return _consistency(t, out, steps, train_steps, device, progress, log)
    cfg = reflow_config(t.config, steps, train_steps)
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


def _teacher_copy(t: Run, cfg: ExperimentConfig, out: str | Path, device: str) -> Run:
    """The student run of `cfg` at `out`, in memory: the teacher's training rows, scaler and (EMA) weights."""
    validate(cfg)
    dev = resolve_device(device)
    schedule, model = build(cfg, t.dim, dev)
    model.load_state_dict(t.model.state_dict())
    return Run(Path(out), cfg, t.scaler, schedule, model, t.data, dev, None, t.names, t.holdout,
               integer_columns=t.integer_columns)


def _progressive(t: Run, out: str | Path, steps: int, train_steps: Optional[int], device: str, progress: bool,
                 log: Callable[[str], None], on_round: Optional[Callable[[int, torch.nn.Module], None]]) -> Run:
    rounds = progressive_rounds(steps, t.schedule.T)
    cfg = progressive_config(t.config, steps, train_steps, rounds)
    student = _teacher_copy(t, cfg, out, device)
    schedule, model, dev = student.schedule, student.model, student.device
    x0 = torch.as_tensor(t.scaler.transform(t.data), dtype=torch.float32, device=dev)

    def round_objective(n: int) -> Progressive:
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        return Progressive(teacher=student.denoiser_for(model=teacher), grid=schedule.respace(n).timesteps_t,
                           student=lambda net: student.denoiser_for(model=net))
    for r in range(rounds - 1):  # in memory; the last round trains in the run directory
        n = steps * 2 ** (rounds - r)
        log(f"progressive round {r + 1} of {rounds}: {n} -> {n // 2} DDIM steps, {cfg.train.steps} training steps")
        state = make_state(model, cfg.train, schedule.T, torch_generator(cfg.seed, f"progressive-{r}", dev), dev)
        train(state, schedule, x0, cfg.train, round_objective(n), progress=progress)
        if state.ema is not None:
            model.load_state_dict(state.ema.module.state_dict())
        if on_round is not None:
            on_round(n // 2, model.eval())
    log(f"progressive round {rounds} of {rounds}: {2 * steps} -> {steps} DDIM steps, {cfg.train.steps} training "
        "steps")
    record = {"teacher": str(t.path.resolve()), "method": "progressive", "rounds": rounds,
              "teacher_steps": steps * 2**rounds, "source": f"progressive distillation of {t.path}"}
    return start_training(student, out, progress=progress, log=log, extra=record, objective=round_objective(2 * steps))


def _consistency(t: Run, out: str | Path, steps: int, train_steps: Optional[int], device: str, progress: bool,
                 log: Callable[[str], None]) -> Run:
    if t.dir.read_manifest().get("method") == "consistency":
        raise ToydiffError(f"'{t.path}' is already a consistency student; distill the run it came from")
    cfg = consistency_config(t.config, steps, train_steps)
    student = _teacher_copy(t, cfg, out, device)
    teacher = copy.deepcopy(student.model).eval().requires_grad_(False)
    objective = Consistency(teacher=t.denoiser_for(model=teacher), student=lambda net: student.denoiser_for(model=net),
                            grid=student.schedule.respace(CONSISTENCY_GRID).timesteps_t)
    log(f"consistency distillation on the teacher's {CONSISTENCY_GRID}-step DDIM grid, {cfg.train.steps} steps")
    log("warning: consistency distillation is experimental here: measured far from the data at this budget "
        "(docs/benchmarks.md); --method progressive is the few-step student that works")
    record = {"teacher": str(t.path.resolve()), "method": "consistency", "grid": CONSISTENCY_GRID,
              "source": f"consistency distillation of {t.path}"}
    return start_training(student, out, progress=progress, log=log, extra=record, objective=objective)
