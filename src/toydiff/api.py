"""The Python API, in one screen.

    import toydiff
    result = toydiff.run(schedule={"T": 100}, train={"steps": 2000}, out="runs/demo")  # the main job
    print(result.verdict)                      # "indistinguishable from data at n = 5000 (...)" or what is off
    run = toydiff.load("runs/demo")            # any run directory, loaded back
    x = run.sample(1000, seed=1)               # (1000, D) in data units
    report = toydiff.evaluate(run, x)          # each metric beside its noise floor (also writes metrics.json)
    figs = toydiff.plot(run, x)                # name -> matplotlib Figure; nothing written

Configuration is a toydiff.ExperimentConfig, a plain dict shaped like the TOML file, section
keyword arguments (schedule={"T": 100}, seed=3) or any mix of them over a preset; all are checked
like a TOML file, and names are checked against their vocabularies (with a "did you mean").
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from .core import config as config_io
from .core.config import ExperimentConfig
from .core.errors import ToydiffError
from .core.progress import message_log
from .jobs.experiment import Experiment, finish, run_experiment
from .jobs.workflow import resume_run, validate
from .runs.directory import RunDir, new_run_path, teacher_path
from .runs.run import Run

IF_EXISTS = ("error", "replace", "reuse")


def make_config(config: ExperimentConfig | dict | None = None, preset: str = "default",
                **sections: Any) -> ExperimentConfig:
    """The preset, then `config` (a config or a TOML-shaped dict), then the section keyword arguments over it."""
    cfg = config_io.preset(preset)
    if config is not None:
        cfg = config_io.merged(cfg, config if isinstance(config, dict) else config.to_dict())
    return config_io.merged(cfg, sections) if sections else cfg


def run(config: ExperimentConfig | dict | None = None, out: str | Path | None = None, *, preset: str = "default",
        if_exists: str = "error", figures: bool = True, evaluate: bool = True, progress: bool = True,
        quiet: bool = False, **sections: Any) -> Experiment:
    """Train, sample, draw and evaluate, in a new run directory `out` (default runs/NAME-TIMESTAMP).

    if_exists says what an existing `out` means, so a notebook cell can be run again: "error" (the default)
    refuses it; "replace" deletes it first (only a toydiff run directory, never another folder); "reuse" keeps
    a run made with this same configuration, resuming its training if it was interrupted and redoing only
    what is missing (samples, figures, metrics), and refuses one made with another configuration.
    """
    cfg = make_config(config, preset, **sections)
    config_io.choose("if_exists", if_exists, IF_EXISTS)
    log = message_log(quiet)
    show = progress and not quiet
    out = Path(out) if out is not None else new_run_path(preset if preset != "default" else None, cfg)
    existing = RunDir(out)
    occupied = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if occupied and if_exists != "error":
        if not existing.is_run():
            raise ToydiffError(f"'{out}' exists and is not a toydiff run directory; toydiff will not "
                               f"{'replace' if if_exists == 'replace' else 'reuse'} it: choose another out")
        if if_exists == "replace":
            validate(cfg)  # a config that cannot run must not cost the run it would replace
            with existing.writing():  # never a run another process is writing
                shutil.rmtree(out)
            if cfg.distill.method != "none" and RunDir(teacher_path(out)).is_run():
                shutil.rmtree(teacher_path(out))  # a [distill] recipe's teacher goes with its student
        elif if_exists == "reuse":
            return _reuse(cfg, existing, figures=figures, evaluate=evaluate, progress=show, log=log)
    return run_experiment(cfg, out, figures=figures, evaluate=evaluate, progress=show, log=log)


def _reuse(cfg: ExperimentConfig, rd: RunDir, *, figures: bool, evaluate: bool, progress: bool, log) -> Experiment:
    made = RunDir(teacher_path(rd.path)) if cfg.distill.method != "none" else rd  # a student's config is its own
    stored, wanted = made.read_config().to_dict(), cfg.to_dict()
    if stored != wanted:
        differ = [f"{s}.{k}" for s, v in wanted.items() if isinstance(v, dict) for k in v if stored[s][k] != v[k]]
        differ += [s for s, v in wanted.items() if not isinstance(v, dict) and stored[s] != v]
        raise ToydiffError(f"'{rd.path}' was made with another configuration ({', '.join(differ[:4])} differ); "
                           "use if_exists='replace', or another out")
    if rd.read_manifest().get("status") != "trained":
        run_ = resume_run(rd.path, progress=progress, log=log)
    else:
        run_ = Run.load(rd.path)
    samples, report = rd.read_samples(), rd.read_metrics() if evaluate else None
    paths = rd.figure_paths() if figures else {}
    if samples is None or len(samples) < cfg.sample.n or (evaluate and report is None) or (figures and not paths):
        return finish(run_, figures=figures, evaluate=evaluate, progress=progress, log=log)
    log(f"reusing '{rd.path}' (trained, sampled{' and evaluated' if report else ''})")
    return Experiment(run_, samples, paths, report)


def load(path: str | Path, device: str = "auto") -> Run:
    """A run directory, loaded back: Run.sample, .plan, .denoiser, .config, .data, ..."""
    return Run.load(path, device=device)


def evaluate(run: Run | str | Path, samples: Optional[np.ndarray] = None, *, n: Optional[int] = None,
             draws: Optional[int] = None, data: str | Path | None = None, columns: Sequence[str] = (),
             progress: bool = True, quiet: bool = False) -> dict:
    """Judge samples (default: the run's stored samples, drawn afresh when they are fewer than eval.n) against
    fresh data of the run's distribution, each metric beside its noise floor; the report (dict) is also
    written to the run's metrics.json. n and draws override eval.n and eval.draws; `data` judges against
    a file's rows instead (columns matched by name, or chosen with `columns`). Holds the run directory's
    lock while it reads and writes there."""
    run = run if isinstance(run, Run) else Run.load(run)
    with run.dir.writing():
        return _evaluate(run, samples, n, draws, data, columns, progress, quiet)


def _evaluate(run: Run, samples: Optional[np.ndarray], n: Optional[int], draws: Optional[int],
              data: str | Path | None, columns: Sequence[str], progress: bool, quiet: bool) -> dict:
    from .evaluation.judge import evaluate_run
    from .evaluation.reference import file_reference

    spec = dataclasses.replace(run.config.eval, **{k: v for k, v in (("n", n), ("draws", draws)) if v is not None})
    sampling = None  # how the samples were drawn, where known (their NFE goes in the report)
    if samples is None:
        samples, sampling = run.dir.read_samples(), run.dir.read_sampling()
        if samples is None or len(samples) < spec.n:
            drawn = run.draw(spec.n, progress=progress and not quiet)  # the stored ones are too few
            samples, sampling = drawn.samples, drawn.record
    log = message_log(quiet)
    target = file_reference(run, data, columns, log) if data is not None else None
    return evaluate_run(run, samples, log=log, spec=spec, target=target, progress=progress and not quiet,
                        sampling=sampling)


def evaluate_samples(samples: np.ndarray | str | Path, dataset: str = "moons", *, n: Optional[int] = None,
                     draws: Optional[int] = None, settings: Sequence[str] = (), report: str | Path | None = None,
                     progress: bool = True, quiet: bool = False) -> dict:
    """Judge any generator's samples (an (n, D) array, or a CSV / .npy / ... file of them) against a dataset of
    the zoo, each metric beside its noise floor: what `toydiff eval --samples FILE --dataset NAME` does.
    `settings` are --set overrides of its [data] and [eval] sections (data.noise=0.1, eval.z_max=4); n and
    draws override eval.n and eval.draws; `report` writes a one-page HTML report there. Nothing else is
    written."""
    from .data.tables import read_table
    from .evaluation.judge import judge_samples

    page = Path(report) if report is not None else None
    if page is not None and page.suffix != ".html":
        raise ToydiffError(f"the report is an .html page, not '{page}'")
    cfg = config_io.samples_config(dataset, settings, n, draws)
    name = str(samples) if isinstance(samples, (str, Path)) else None
    x = read_table(samples).x if name is not None else samples
    rep, target = judge_samples(x, cfg, log=message_log(quiet), progress=progress and not quiet)
    if page is not None:
        from .pictures.figures import samples_over_data
        from .pictures.report import samples_page
        from .core.files import atomic_write_text

        facts = {"samples": name or "an array", "rows": len(x), "dataset": cfg.data.name,
                 "data settings": ", ".join(settings) or None}
        atomic_write_text(page, samples_page(f"samples judged against {cfg.data.name}", rep,
                                             samples_over_data(np.asarray(x, dtype=float), target), facts))
    return rep


def plot(run: Run | str | Path, samples: Optional[np.ndarray] = None) -> dict[str, Figure]:
    """The run's figures as matplotlib Figures (name -> Figure), for its stored samples by default."""
    from .pictures.figures import make_figures

    run = run if isinstance(run, Run) else Run.load(run)
    if samples is None:
        samples = run.dir.read_samples()
        if samples is None:
            samples = run.sample(run.config.sample.n)
    return make_figures(run, samples)
