"""Training a run: the data a run trains on, the config checks, training and resuming (the main job that
goes on to samples, figures and the evaluation is toydiff.jobs.experiment).

    run = train_run(cfg, "runs/demo")                   # data -> scaler -> model -> weights
    run = resume_run("runs/demo")                       # after Ctrl-C or a kill: the same weights

A run directory is staged under a hidden name and published whole (toydiff.runs.directory); training
checkpoints the whole state (toydiff.training.state.TrainState) so that a resumed run reaches the
uninterrupted weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .. import methods
from ..core.config import COMPONENTS_AUTO, COMPONENTS_FOUND, ExperimentConfig
from ..core.errors import RunInterrupted, ToydiffError, first_line
from ..core.machine import check_memory
from ..core.runtime import World, numpy_rng, resolve_device, set_threads, torch_generator
from ..data import datasets
from ..data.columns import Column, describe
from ..data.components import describe_components, find_components
from ..data.scaler import Scaler
from ..data.tables import column_index, column_warnings, default_names, read_table
from ..diffusion.losses import Objective
from ..diffusion.models import check as check_model, check_batch_memory, count_parameters, width
from ..diffusion.sampling import VPDiffusion, check_conditioning, make_plan
from ..runs.directory import RunDir
from ..runs.run import Run
from ..training import graphs
from ..training.loop import Interrupted, TrainState, graph_blocker, make_state, train
from .validation import early_stop_record, size, training_rows

Log = Callable[[str], None]


def silent(message: str) -> None:
    pass


@dataclass
class Data:
    """What a run trains on: x (N, D) and labels (N,) or None, the column names, the label values behind
    the class indices, and (for the user's files) the held-out rows."""
    x: np.ndarray
    labels: Optional[np.ndarray]
    names: list[str]
    classes: list[str]
    holdout: Optional[np.ndarray] = None
    holdout_labels: Optional[np.ndarray] = None
    columns: Optional[tuple[Column, ...]] = None  # a user's file: each column's type (toydiff.data.columns)
    label_column: str = ""  # a user's file: the label column's name, and its place among the columns
    label_index: int = 0


def make_data(cfg: ExperimentConfig) -> Data:
    """The zoo dataset's draw, or the user's file split into training rows and held-out rows (data.holdout)."""
    if not cfg.data.path:
        x, labels = datasets.load_dataset(cfg.data, cfg.data.n, numpy_rng(cfg.seed, "data"))
        classes = [] if labels is None else [str(k) for k in range(int(labels.max()) + 1)]
        return Data(x, labels, default_names(x.shape[1]), classes)
    table = read_table(cfg.data.path, cfg.data.columns, cfg.data.label_column, cfg.data.drop_missing,
                       cfg.data.types)
    order = numpy_rng(cfg.seed, "holdout").permutation(len(table.x))
    cut = int(round(cfg.data.holdout * len(order)))
    held, train_rows = order[:cut], order[cut:]
    if len(train_rows) < 2:
        raise ToydiffError(f"data.holdout = {cfg.data.holdout} leaves {len(train_rows)} of the file's {len(order)} "
                           "rows to train on; lower it")
    labels = None if table.labels is None else table.labels[train_rows]
    held_labels = None if table.labels is None or not len(held) else table.labels[held]
    return Data(table.x[train_rows], labels, table.names, table.classes, table.x[held] if len(held) else None,
                held_labels, table.columns, table.label_column, table.label_index)


def validate(cfg: ExperimentConfig, world: World = World()) -> None:
    """Everything about a config that needs more than the config to check, each rule asked of its owner,
    before anything is trained or written (the config checked itself when it was made)."""
    method = methods.of(cfg)
    method.check(cfg)
    if not cfg.data.path:
        datasets.params(cfg.data)
        check_memory(cfg.data.n * max(cfg.data.dim, 2) * 8 * 4, f"data.n = {cfg.data.n:,} points",
                     "lower data.n")
    check_model(cfg.model)
    check_batch_memory(cfg.model, cfg.train.batch_size or cfg.data.n, "train.batch_size", training=True)
    plan = make_plan(cfg.sample, VPDiffusion(method.schedule(cfg)),
                     learned_variance=cfg.model.variance == "learned", classes=None if cfg.model.conditional else 0)
    device = resolve_device(cfg.train.device)
    world.check_batch(cfg.train.batch_size)
    world.check_networks(("model",) + method.others)
    graphs.wanted(cfg.train.cuda_graphs, device, "train.cuda_graphs",
                  graph_blocker(cfg.train, world, 1 + len(method.others)))
    graphs.wanted(cfg.sample.cuda_graphs, device, "sample.cuda_graphs", plan.graph_blocker)


def check_labels(labels: np.ndarray | None, n: int) -> np.ndarray:
    """Class labels (n,) as integers 0..K-1 with K >= 2, or a one-line error."""
    if labels is None:
        raise ToydiffError("model.conditional needs class labels, and this data has none; name a file's label "
                           "column with data.label_column (--label-column), or set model.conditional=false")
    labels = np.asarray(labels)
    if labels.shape != (n,) or labels.dtype.kind not in "iu" or labels.min() < 0:
        raise ToydiffError(f"class labels must be {n} integers >= 0, got shape {labels.shape}, dtype {labels.dtype}")
    if labels.max() < 1:
        raise ToydiffError("class labels must name at least two classes for a conditional model")
    return labels.astype(np.int64)


def expected_pieces(cfg: ExperimentConfig) -> Optional[int]:
    """What model.components asks of find_components: None = one piece, without looking; 0 = as many as the
    training rows fall into; K >= 2 = exactly K. auto (0, the default) looks where the rule was set and measured:
    a built-in dataset (the zoo's known piece counts set the radius; docs/default.md measures the moons),
    an unconditional network with labels to take them (mlp), and a method that draws pieces; a file's table,
    class labels, the guide's network and MeanFlow or consistency training keep one piece."""
    k = cfg.model.components
    if k == COMPONENTS_AUTO:
        takes = not cfg.data.path and cfg.model.arch == "mlp" and not cfg.model.conditional
        return 0 if takes and methods.of(cfg).takes_pieces else None
    return None if k == 1 else 0 if k == COMPONENTS_FOUND else k


def untrained_run(cfg: ExperimentConfig, path: str | Path = ".", device: Optional[torch.device] = None,
                  world: World = World()) -> Run:
    """The run `cfg` describes, before training: its data, fitted scaler, schedule and freshly initialised
    network, in memory (nothing is written). Checks the config first."""
    validate(cfg, world)
    device = device or resolve_device(cfg.train.device)
    data = make_data(cfg)
    for c in cfg.plot.columns:  # checked now, not after training
        column_index(data.names, c, "plot.columns: the data")
    labels, classes = None, 0
    if cfg.model.conditional:
        labels = check_labels(data.labels, data.x.shape[0])
        classes = int(labels.max()) + 1
        check_conditioning(classes, cfg.sample.label, cfg.sample.guidance)
    if data.columns is not None:  # a column constant in the training rows is refused before the scaler meets it
        column_warnings(data.x, data.names, f"the {len(data.x)} training rows")
    scaler = Scaler.fit(data.x, cfg.data.scaling, data.names, data.columns)
    x = data.x.astype(np.float32)
    expected = expected_pieces(cfg)
    found = None if expected is None else find_components(scaler.transform(x), expected)  # in the model's frame
    pieces = found.count if found is not None and found.count > 1 else 0
    schedule, model = methods.of(cfg).build(cfg, scaler.frame_dim, device, classes or pieces)
    return Run(Path(path), cfg, scaler, schedule, model, x, device, labels, data.names,
               data.holdout, data.classes if classes else [], data.holdout_labels if classes else None,
               data.label_column if classes else "", data.label_index if classes else 0, found)


def train_run(cfg: ExperimentConfig, out: str | Path, *, progress: bool = False, log: Log = silent,
              world: World = World(), evaluate: bool = False, extra: Optional[dict] = None) -> Run:
    """Make a new run directory at `out` and train the configured model into it. Under torchrun (`world`)
    every process trains, and rank 0 alone makes and writes the directory. evaluate: the run will be
    evaluated, so what the evaluation needs of a file's held-out rows is checked before training too.
    extra: more keys for its manifest."""
    methods.of(cfg).check_fresh(cfg)
    device = resolve_device(cfg.train.device)
    return start_training(untrained_run(cfg, out, device, world), out, progress=progress, log=log, world=world,
                          evaluate=evaluate, extra=extra, sizing=True)


def start_training(run: Run, out: str | Path, *, progress: bool = False, log: Log = silent,
                   world: World = World(), evaluate: bool = False, extra: Optional[dict] = None,
                   noise: Optional[np.ndarray] = None,
                   objective: Optional[Objective] = None, sizing: bool = False,
                   others: Optional[dict] = None) -> Run:
    """Train an untrained `run` (untrained_run's, or a distilled student's) into a new run directory at `out`:
    warnings, the recipe sized (sizing: where train.sizing asks; toydiff.jobs.validation.size), the training
    state, the directory with its inputs (and `extra` in its manifest, `noise` for a reflow student), then the
    loop (on `objective` instead of the config's, with `others` beside the run's network: a distilled student's)."""
    cfg, device = run.config, run.device
    threads = set_threads(cfg.train.threads, device)
    warnings = [run.schedule.terminal_warning()] + (run.method.warnings(cfg) if objective is None else [])
    if cfg.data.path:
        warnings += column_warnings(run.data, run.names, f"the {len(run.data)} training rows")
    if evaluate:
        from ..evaluation.reference import check_reference
        warnings += check_reference(cfg, run.holdout, run.names, run.data)
    if run.columns is not None:
        log(f"{describe(run.columns)}; numbers scaled by {run.scaler.scaling} (data.scaling)")
    for warning in filter(None, warnings):
        log(f"warning: {warning}")
    if run.components is not None:
        log(describe_components(run.components))
    if sizing:  # every rank of a torchrun job sizes alike (the probes are seeded); rank 0 says so
        run, sized = size(run, progress=progress and world.is_writer, log=log if world.is_writer else silent)
        cfg, extra = run.config, {**(extra or {}), **sized}
    # built before the run directory exists (AdamW's first construction imports for about a second), so the
    # directory is published just before the first step and a Ctrl-C in between finds the loop's handler
    state = make_state(run.model, cfg.train, run.method.timesteps(cfg, device),
                       torch_generator(cfg.seed, "train", device),
                       {**run.method.other_networks(cfg, run.frame_dim, device), **(others or {})})
    if not world.is_writer:
        return _train(run, state, {}, False, silent, world, objective)
    x = run.data
    info = {"created": _dt.datetime.now().isoformat(timespec="seconds"), "dim": int(x.shape[1]),
            "n_train": int(x.shape[0]), "scaling": run.scaler.scaling, "classes": run.classes, "columns": run.names,
            "class_names": run.class_names, "source": cfg.data.path or cfg.data.name,
            **({"column_types": [c.kind for c in run.columns], "label_column": run.label_column,
                "label_index": run.label_index} if run.columns is not None else {}),
            "alpha_bar_T": run.schedule.alpha_bar_T, "parameters": count_parameters(run.model),
            **({"width": width(cfg.model, run.frame_dim)} if cfg.model.arch == "mlp" else {}),
            **({"components": run.components.record()} if run.components is not None else {}),
            "device": str(device), "threads": threads, **(extra or {})}
    staging = RunDir.create(Path(out))
    with staging.writing():  # the lock follows the directory when it is published
        try:
            staging.write_inputs(cfg, run.scaler, x, run.labels, run.holdout, info, run.holdout_labels, noise,
                                 None if run.pieces is None else run.pieces.labels)
            run.path = staging.publish(Path(out)).path
        except BaseException:
            shutil.rmtree(staging.path, ignore_errors=True)  # no half-made run directory is left behind
            raise
        shape = f"{'' if cfg.model.width else 'auto '}width {info['width']}, " if "width" in info else ""
        log(f"training {cfg.model.arch} ({shape}{info['parameters']:,} parameters) on {info['source']} "
            f"(n = {x.shape[0]}, D = {x.shape[1]}), {run.method.describe(cfg, run.schedule)}, {cfg.train.steps} "
            f"steps on {device}")
        return _train(run, state, RunDir(run.path).read_manifest(), progress, log, world, objective)


def resume_run(path: str | Path, *, device: str = "auto", progress: bool = False, log: Log = silent,
               world: World = World()) -> Run:
    """Continue training a run from its last checkpoint (weights, EMA, optimizer, RNG and log), to the very
    weights an uninterrupted run reaches (on the same device; bit for bit on CPU). Rank 0 holds the run
    directory's lock throughout: a second resume of the same run is refused, naming the process that holds it."""
    run = Run.load(path, device=device, weights=False)
    with run.dir.writing() if world.is_writer else contextlib.nullcontext():
        return _resume(run, path, device, progress, log, world)


def _resume(run: Run, path: str | Path, device: str, progress: bool, log: Log, world: World) -> Run:
    info = run.dir.read_manifest()
    student = methods.STUDENTS.get(info["method"]) if info.get("method") in methods.STUDENTS else None
    if student is not None and student.in_memory_teacher and info.get("status") != "trained":
        raise ToydiffError(f"'{path}' is a {info['method']} student cut short; it trains against a teacher held in "
                           f"memory and cannot resume: run `toydiff distill {info.get('teacher')} --method "
                           f"{info['method']}` again")
    set_threads(run.config.train.threads, run.device)
    state = make_state(run.model, run.config.train, run.method.timesteps(run.config, run.device),
                       torch_generator(run.config.seed, "train", run.device),
                       run.method.other_networks(run.config, run.frame_dim, run.device))
    saved = run.dir.load_checkpoint()
    if saved is not None:
        try:
            state.restore(*saved, steps=run.config.train.steps)
        except ToydiffError:
            raise
        except (KeyError, ValueError, RuntimeError) as e:  # a tensor the model's load_state_dict refuses
            raise ToydiffError(f"'{run.dir.checkpoint}' does not fit the run's configuration ({e}); the run "
                               "directory is damaged") from None
    if info.get("status") == "trained" and (state.step >= run.config.train.steps or info.get("stopped_early")):
        log(f"'{run.path}' is already trained ({state.step} steps)")
        return Run.load(run.path, device=device)
    log(f"resuming '{run.path}' at step {state.step} of {run.config.train.steps}")
    if world.is_writer:
        run.dir.write_log(state.rows)  # rows appended after the last checkpoint are logged again from there
    return _train(run, state, info, progress, log, world)


def _train(run: Run, state: TrainState, info: dict, progress: bool, log: Log, world: World = World(),
           objective: Optional[Objective] = None) -> Run:
    """Train `state` to cfg.train.steps, checkpointing the whole state every train.checkpoint_every steps, on
    Ctrl-C and at the end; the loss log grows a row at a time between checkpoints."""
    cfg, rd = run.config, RunDir(run.path)

    def checkpoint(st: TrainState) -> None:
        rd.save_checkpoint(*st.tensors(), st.model, None if st.ema is None else st.ema.module, st.step, st.rows)
        rd.write_manifest({**info, "status": "training", "checkpoint_step": st.step})

    resume = f"continue with `toydiff train --resume {run.path}` (or `toydiff run --resume {run.path}`)"
    writer = world.is_writer
    try:
        x0 = torch.as_tensor(run.scaler.transform(run.data), dtype=torch.float32, device=run.device)
        x0 = run.method.training_rows(cfg, rd, x0)  # a reflow student's rows carry their noise: [x0 | eps]
        own = objective is None
        objective = objective or run.method.objective(run, {k: v.module for k, v in state.others.items()})
        data = training_rows(run, state, objective, x0, own)
        rows = train(state, run.schedule, data.x, cfg.train, objective, labels=data.y,
                     on_log=rd.append_log if writer else None, on_checkpoint=checkpoint if writer else None,
                     progress=progress, world=world, validate=data.validate)
    except Interrupted as e:
        how = "interrupted" if e.signum == signal.SIGINT else f"stopped by {signal.Signals(e.signum).name}"
        raise RunInterrupted(f"{how}: saved step {e.step} of {cfg.train.steps} in '{run.path}'; {resume}",
                             128 + e.signum) from None
    except RuntimeError as e:  # under torchrun: a collective failed because another rank died or froze
        if world.size == 1:
            raise
        raise ToydiffError(f"another process of this torchrun job stopped or stopped answering ({first_line(e)}); "
                           f"'{run.path}' keeps its last checkpoint: {resume} under torchrun") from None
    except KeyboardInterrupt:  # before the loop's own handler was in place, or a second Ctrl-C
        raise RunInterrupted(f"interrupted before step {state.step + 1} was saved in '{run.path}'; {resume}") \
            from None
    if not writer:
        return dataclasses.replace(run, model=state.model.eval())
    checkpoint(state)
    stopped = early_stop_record(state, data.held, cfg, log)
    rd.write_manifest({**info, "status": "trained", "steps": state.step, "checkpoint_step": state.step, **stopped,
                       "processes": world.size, "train_seconds": round(state.seconds, 3),
                       "final_loss": rows[-1]["loss"], **({"cuda_graphs": state.graphs} if state.graphs else {})})
    log(f"trained in {state.seconds:.1f} s, final loss {rows[-1]['loss']:.4f}"
        + (f"; steps {state.graphs}" if state.graphs else ""))
    sampling_model = state.ema.module.eval() if state.ema is not None and cfg.sample.use_ema else state.model.eval()
    return dataclasses.replace(run, model=sampling_model)
