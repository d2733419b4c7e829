"""The main job behind `toydiff run`, `toydiff study`, the benchmarks and `toydiff.run`: train (toydiff.jobs.workflow),
distill when the config asks for a few-step student (toydiff.jobs.distill), then sample, draw and judge.

    result = run_experiment(cfg, "runs/demo")           # a run directory with samples, figures, metrics
    result = finish(run)                                # everything after training, for a run already trained
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.config import ExperimentConfig
from ..core.runtime import World
from ..runs.directory import teacher_path
from ..runs.run import Run
from .distill import check as check_distill, distill_run
from .workflow import Log, silent, resume_run, train_run


@dataclass
class Experiment:
    """What the main job made: the trained run, its samples (data units), the figures written and the
    evaluation report (metrics.json's content; None when not evaluated)."""

    run: Run
    samples: np.ndarray
    figures: dict[str, Path] = field(default_factory=dict)
    report: Optional[dict] = None

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def verdict(self) -> Optional[str]:
        return None if self.report is None else self.report["verdict"]


def run_experiment(cfg: Optional[ExperimentConfig], out: str | Path, *, resume: bool = False, device: str = "auto",
                   figures: bool = True, evaluate: bool = True, progress: bool = False, log: Log = silent,
                   world: World = World()) -> Optional[Experiment]:
    """The main job: train `cfg` into a new run directory `out` (or, with resume, continue the run at `out`
    with its own configuration), then draw sample.n samples, write them and the figures, and judge them
    against the data's noise floors (metrics.json). Under torchrun only rank 0 goes past training (the other
    ranks get None).

    With a [distill] method the configured run is a teacher, trained at runs.directory.teacher_path(out) (its manifest
    names its student), and `out` is its few-step student, distilled on rank 0 (toydiff.jobs.distill) and the run
    that is sampled, drawn and judged; resuming the teacher goes on to its student."""
    if resume:
        run = resume_run(out, device=device, progress=progress, log=log, world=world)
    elif cfg.distill.method != "none":
        # before the teacher trains (it validates the rest)
        check_distill(cfg, cfg.distill.method, cfg.distill.steps, cfg.distill.critic)
        run = train_run(cfg, teacher_path(out), progress=progress, log=log, world=world, evaluate=evaluate,
                        extra={"student": str(Path(out).resolve())})
    else:
        run = train_run(cfg, out, progress=progress, log=log, world=world, evaluate=evaluate)
    world.close()  # training is the only collective work; rank 0 goes on alone
    if not world.is_writer:
        return None
    recipe, student = run.config.distill, run.dir.read_manifest().get("student")
    if recipe.method != "none" and student is None:  # trained by `toydiff train`, which trains only
        log(f"'{run.path}' has a [distill] recipe but no student directory recorded; make its student with "
            f"`toydiff distill {run.path} --method {recipe.method} --steps {recipe.steps}`")
    elif recipe.method != "none":
        log(f"teacher trained in '{run.path}'; distilling its {recipe.method} student")
        run = distill_run(run.path, student, method=recipe.method, steps=recipe.steps,
                          pairs=recipe.pairs, train_steps=recipe.train_steps or None, critic=recipe.critic,
                          device=str(run.device),
                          progress=progress, log=log)
    return finish(run, figures=figures, evaluate=evaluate, progress=progress, log=log)


def finish(run: Run, *, figures: bool = True, evaluate: bool = True, progress: bool = False,
           log: Log = silent) -> Experiment:
    """Everything after training: samples (written), figures (written), evaluation (metrics.json), holding the
    run directory's lock."""
    with run.dir.writing():
        return _finish(run, figures, evaluate, progress, log)


def _finish(run: Run, figures: bool, evaluate: bool, progress: bool, log: Log) -> Experiment:
    cfg = run.config
    plan = run.plan()
    log(f"sampling {cfg.sample.n} points with {cfg.sample.sampler} ({plan.steps} of T = {run.schedule.T} steps)")
    drawn = run.draw(cfg.sample.n, progress=progress)
    samples, sampling = drawn.samples, drawn.record  # how these samples were drawn (the figures sample again)
    run.dir.write_samples(samples, run.table_text(samples, drawn.labels), sampling)
    result = Experiment(run, samples)
    if figures:
        from ..pictures.figures import write_figures
        log("drawing figures")
        result.figures = write_figures(run, samples)
    if evaluate:
        from ..evaluation.judge import evaluate_run
        from ..evaluation.scores import memorization_warning
        result.report = evaluate_run(run, samples, log=log, progress=progress, sampling=sampling)
        warning = memorization_warning(result.report, len(run.data))
        if warning:
            log(f"warning: {warning}")
    return result
