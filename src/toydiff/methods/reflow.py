"""Reflow (rectified flow, Liu et al. 2023): a flow-matching student of the pairs its teacher's ODE makes
(`toydiff distill RUN --method reflow`).

The teacher's probability-flow ODE maps `pairs` noise draws z to samples x (deterministically: dpmpp-3m, 50
Karras steps, a solver at the floor for the default model, docs/benchmarks.md); the student learns the straight
path between each x and its own z (train.coupling = reflow: FlowMatching's rows [x0 | eps]), so its paths cross
less and fewer Euler steps reach the data. The student is a complete run directory (its training rows are the
teacher's samples, its noise `train_noise.npy`) that samples with `steps` Euler steps on the uniform grid. A flow
teacher's weights start the student (Liu et al. fine-tune); a ddpm teacher's cannot.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from ..core.config import DistillConfig, ExperimentConfig
from ..core.runtime import derive_seed
from .base import Lesson, Log, Student, student, teacher_record

TEACHER_SAMPLER = {"sampler": "dpmpp-3m", "steps": 50, "spacing": "karras"}  # deterministic, at the floor


@student("reflow")
class Reflow(Student):
    """A flow-matching student of the teacher's ODE pairs (see the module); of a model of pieces, each pair
    keeps the piece its sample was drawn in, and the student is conditioned on it as the teacher was; of a
    class-conditional teacher, each pair keeps its class, drawn in the classes' training shares at the
    teacher's sample.guidance, so the student's map is already guided and it samples at guidance 1."""

    def config(self, teacher: ExperimentConfig, steps: int, train_steps: Optional[int]) -> ExperimentConfig:
        """The teacher's configuration made a reflow student: the flow process on the teacher's pairs (settings
        only the ddpm process has are reset), sampled with `steps` Euler steps on the uniform grid."""
        return dataclasses.replace(
            teacher,
            schedule=dataclasses.replace(teacher.schedule, process="flow", zero_terminal_snr=False),
            model=dataclasses.replace(teacher.model, variance="fixed",
                                      prediction="v" if teacher.schedule.process == "ddpm"
                                      else teacher.model.prediction),
            train=dataclasses.replace(teacher.train, coupling="reflow", loss_weighting="uniform",
                                      timestep_sampling="auto" if teacher.train.timestep_sampling in
                                      ("importance", "log-normal") else teacher.train.timestep_sampling,
                                      steps=train_steps or teacher.train.steps),
            sample=dataclasses.replace(teacher.sample, sampler="euler", steps=steps, spacing="trailing",
                                       variance="auto", eta=0.0, guidance=1.0), distill=DistillConfig())

    def lesson(self, teacher, student, steps: int, pairs: int, progress: bool, log: Log, on_round=None) -> Lesson:
        """The teacher's ODE samples of `pairs` stored noise draws; the student starts from the teacher's weights
        where their processes and networks agree."""
        seed = derive_seed(student.config.seed, "reflow-pairs")
        log(f"reflow: {pairs} noise -> data pairs from the teacher's ODE ({TEACHER_SAMPLER['sampler']}, "
            f"{TEACHER_SAMPLER['steps']} {TEACHER_SAMPLER['spacing']} steps)")
        # every class in its training share (a conditional teacher), at the teacher's own guidance
        drawn = teacher.draw(pairs, seed=seed, progress=progress, label=-1, **TEACHER_SAMPLER)
        z = teacher.initial_noise(pairs, seed=seed, label=-1)  # the x_T each sample started from, whatever its batches
        same_network = teacher.config.model == student.config.model and not teacher.method.intervals
        if teacher.method.process(teacher.config) is student.method and same_network:
            student.model.load_state_dict(teacher.model.state_dict())  # fine-tune the teacher's (EMA) weights
        record = teacher_record(teacher, "reflow", pairs=pairs, teacher_sampler=TEACHER_SAMPLER,
                                source=f"reflow pairs of {teacher.path}")
        return Lesson(record, data=drawn.samples.astype(np.float32), noise=z.cpu().numpy().astype(np.float32),
                      pieces=drawn.pieces, labels=drawn.labels)
