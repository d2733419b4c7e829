"""Making and continuing runs: the data a run trains on, the config checks, `train_run` and `resume_run`.

    run = toydiff.train_run(ExperimentConfig(), "runs/demo")   # data -> scaler -> model -> weights
    run = toydiff.resume_run("runs/demo")                        # after Ctrl-C or a kill: the same weights

A run directory is staged under a hidden name and published whole; training checkpoints the whole
state (toydiff.training.TrainState) so that a resumed run reaches the uninterrupted weights.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import __version__
from .checkpoint import (WEIGHTS, atomic_write_text, create_run_dir, load_tensors, publish_run_dir, read_manifest,
                         save_csv, save_npy, save_tensors, save_weights, write_manifest)
from .config import ExperimentConfig
from .data import SCALINGS, Scaler, load_dataset, params
from .datafiles import column_index, read_table
from .errors import RunInterrupted, ToydiffError
from .interop import PREFIX
from .models import MODELS, count_parameters
from .parameterization import Prediction
from .runs import (CHECKPOINT, EMA_WEIGHTS, HOLDOUT, LABELS, LOG_HEADER, Run, _build, check_conditioning,
                   check_diffusers, default_names, resolve_spacing, respaced, sampler_with_options)
from .runtime import World, numpy_rng, resolve_device, set_threads, torch_generator
from .schedules import NoiseSchedule
from .training import Interrupted, TrainState, make_state, train


@dataclass
class Data:
    """What a run trains on: x (N, D) and labels (N,) or None, the column names, the label values behind
    the class indices, and (for the user's files) the held-out rows."""
    x: np.ndarray
    labels: Optional[np.ndarray]
    names: list[str]
    classes: list[str]
    holdout: Optional[np.ndarray] = None


def make_data(cfg: ExperimentConfig) -> Data:
    """The zoo dataset's draw, or the user's file split into training rows and held-out rows (data.holdout)."""
    if not cfg.data.path:
        x, labels = load_dataset(cfg.data, cfg.data.n, numpy_rng(cfg.seed, "data"))
        classes = [] if labels is None else [str(k) for k in range(int(labels.max()) + 1)]
        return Data(x, labels, default_names(x.shape[1]), classes)
    table = read_table(cfg.data.path, cfg.data.columns, cfg.data.label_column, cfg.data.drop_missing)
    order = numpy_rng(cfg.seed, "holdout").permutation(len(table.x))
    cut = int(round(cfg.data.holdout * len(order)))
    held, train = order[:cut], order[cut:]
    if len(train) < 2:
        raise ToydiffError(f"data.holdout = {cfg.data.holdout} leaves {len(train)} of the file's {len(order)} rows "
                           "to train on; lower it")
    labels = None if table.labels is None else table.labels[train]
    return Data(table.x[train], labels, table.names, table.classes, table.x[held] if len(held) else None)


def check_config(cfg: ExperimentConfig) -> None:
    """Everything about a config that can fail, checked before anything is written."""
    if not cfg.data.path:
        params(cfg.data)
    MODELS.get(cfg.model.arch)
    if cfg.data.path and cfg.data.name != "moons":
        raise ToydiffError(f"data.path ('{cfg.data.path}') and data.name ('{cfg.data.name}') both name the data; "
                           "keep one")
    if cfg.data.scaling not in SCALINGS:
        raise ToydiffError(f"unknown data.scaling '{cfg.data.scaling}'; choose one of: {', '.join(SCALINGS)}")
    if cfg.schedule.zero_terminal_snr and Prediction.parse(cfg.model.prediction) is Prediction.EPS:
        raise ToydiffError("schedule.zero_terminal_snr leaves x_T pure noise, where an eps prediction says nothing "
                           "about x0; set model.prediction=v (or x0)")
    Prediction.parse(cfg.model.prediction)
    if cfg.model.arch == "guide" and (cfg.model.variance == "learned" or cfg.model.conditional):
        raise ToydiffError("the guide's network has one output and no labels; use model.arch=mlp for "
                           "model.variance=learned or model.conditional=true")
    if cfg.sample.sampler.startswith(PREFIX):
        check_diffusers(cfg.sample.sampler, NoiseSchedule.from_config(cfg.schedule), cfg.sample.steps,
                        cfg.sample.spacing, cfg.sample.variance)
    else:
        sampler_with_options(cfg.sample.sampler, cfg.sample.eta, cfg.sample.variance, cfg.model.variance == "learned")
    if not cfg.model.conditional:
        check_conditioning(0, cfg.sample.label, cfg.sample.guidance)
    spacing = resolve_spacing(cfg.sample.spacing, cfg.sample.sampler)
    if not cfg.sample.sampler.startswith(PREFIX):
        respaced(NoiseSchedule.from_config(cfg.schedule), cfg.sample.steps, spacing)
    resolve_device(cfg.train.device)
    for t in cfg.plot.forward_t:
        if not 0 <= t <= cfg.schedule.T:
            raise ToydiffError(f"plot.forward_t has t = {t}; each t must be in 0..T = 0..{cfg.schedule.T}")
    for t in cfg.plot.field_t:
        if not 1 <= t <= cfg.schedule.T:
            raise ToydiffError(f"plot.field_t has t = {t}; each t must be in 1..T = 1..{cfg.schedule.T}")


def train_run(cfg: ExperimentConfig, out: str | Path, *, progress: bool = False,
              log: Callable[[str], None] = lambda s: None, world: World = World()) -> Run:
    """Make a new run directory at `out` and train the configured model into it. Under torchrun (`world`)
    every process trains, and rank 0 alone makes and writes the directory."""
    check_config(cfg)
    if cfg.train.batch_size % world.size:
        raise ToydiffError(f"the global batch ({cfg.train.batch_size}) must be divisible by the {world.size} "
                           "processes; change train.batch_size")
    device = resolve_device(cfg.train.device)
    threads = set_threads(cfg.train.threads, device, cfg.train.batch_size or cfg.data.n)
    data = make_data(cfg)
    x, labels = data.x, data.labels
    for c in cfg.plot.columns:  # checked now, not after training
        column_index(data.names, c, "plot.columns: the data")
    classes = 0
    if cfg.model.conditional:
        labels = check_labels(labels, x.shape[0])
        classes = int(labels.max()) + 1
        check_conditioning(classes, cfg.sample.label, cfg.sample.guidance)
    scaler = Scaler.fit(x, cfg.data.scaling)
    schedule, model = _build(cfg, x.shape[1], device, classes)
    warning = schedule.terminal_warning()
    if warning:
        log(f"warning: {warning}")
    # built before the run directory exists (AdamW's first construction imports for about a second), so the
    # directory is published just before the first step and a Ctrl-C in between finds the loop's handler
    state = make_state(model, cfg.train, schedule.T, torch_generator(cfg.seed, "train", device), device)
    if not world.is_writer:
        run = Run(Path(out), cfg, scaler, schedule, model, x.astype(np.float32), device,
                  labels if classes else None, data.names, data.holdout)
        return _train(run, state, {}, False, lambda m: None, world)
    staging = create_run_dir(Path(out))
    try:
        path = staging
        atomic_write_text(path / "config.toml", cfg.to_toml())
        atomic_write_text(path / "scaler.json", json.dumps(scaler.to_dict(), indent=2))
        save_npy(path / "train_data.npy", x.astype(np.float32))
        if classes:
            save_npy(path / LABELS, labels)
        if data.holdout is not None:
            save_npy(path / HOLDOUT, data.holdout)
        info = {"toydiff_version": __version__, "created": _dt.datetime.now().isoformat(timespec="seconds"),
                "status": "training", "dim": int(x.shape[1]), "n_train": int(x.shape[0]), "classes": classes,
                "columns": data.names, "class_names": data.classes if classes else [],
                "source": cfg.data.path or cfg.data.name,
                "alpha_bar_T": schedule.alpha_bar_T, "parameters": count_parameters(model),
                "device": str(device), "threads": threads}
        write_manifest(path, info)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # no half-made run directory is left behind
        raise
    path = publish_run_dir(staging, Path(out))
    log(f"training {cfg.model.arch} ({info['parameters']:,} parameters) on {cfg.data.name} "
        f"(n = {x.shape[0]}, D = {x.shape[1]}), T = {schedule.T} {cfg.schedule.name}, "
        f"alpha_bar_T = {schedule.alpha_bar_T:.3g}, {cfg.train.steps} steps on {device}")
    run = Run(path, cfg, scaler, schedule, model, x.astype(np.float32), device, labels if classes else None,
              data.names, data.holdout)
    return _train(run, state, info, progress, log, world)


def resume_run(path: str | Path, *, device: str = "auto", progress: bool = False,
               log: Callable[[str], None] = lambda s: None, world: World = World()) -> Run:
    """Continue training a run from its last checkpoint (weights, EMA, optimizer, RNG and log), to the very
    weights an uninterrupted run reaches (on the same device; bit for bit on CPU)."""
    run = Run.load(path, device=device, weights=False)
    info = read_manifest(run.path)
    set_threads(run.config.train.threads, run.device, run.config.train.batch_size or len(run.data))
    state = make_state(run.model, run.config.train, run.schedule.T,
                       torch_generator(run.config.seed, "train", run.device), run.device)
    if (run.path / CHECKPOINT).is_file():
        tensors, meta = load_tensors(run.path / CHECKPOINT, "checkpoint")
        try:
            state.restore(tensors, meta)
        except (KeyError, ValueError, RuntimeError) as e:
            raise ToydiffError(f"'{run.path / CHECKPOINT}' does not fit the run's configuration ({e}); the run "
                               "directory is damaged") from None
    if state.step >= run.config.train.steps and info.get("status") == "trained":
        log(f"'{run.path}' is already trained ({state.step} steps)")
        return Run.load(run.path, device=device)
    log(f"resuming '{run.path}' at step {state.step} of {run.config.train.steps}")
    return _train(run, state, info, progress, log, world)


def _train(run: Run, state: TrainState, info: dict, progress: bool, log: Callable[[str], None],
           world: World = World()) -> Run:
    """Train `state` to cfg.train.steps, checkpointing the whole state (first, then the plain weights, the log
    and the manifest, each file atomically) every train.checkpoint_every steps, on Ctrl-C and at the end."""
    cfg, path = run.config, run.path

    def checkpoint(st: TrainState) -> None:
        tensors, meta = st.tensors()
        save_tensors(path / CHECKPOINT, tensors, meta)
        save_weights(path / WEIGHTS, st.model, st.step)
        if st.ema is not None:
            save_weights(path / EMA_WEIGHTS, st.ema.module, st.step)
        save_csv(path / "train_log.csv", st.rows, LOG_HEADER)
        write_manifest(path, {**info, "status": "training", "checkpoint_step": st.step})

    resume = f"continue with `toydiff train --resume {path}` (or `toydiff run --resume {path}`)"
    try:
        x0 = torch.as_tensor(run.scaler.transform(run.data), dtype=torch.float32, device=run.device)
        y = None if run.labels is None else torch.as_tensor(run.labels, dtype=torch.long, device=run.device)
        rows = train(state, run.schedule, x0, cfg.train, Prediction.parse(cfg.model.prediction), labels=y,
                     learned_variance=cfg.model.variance == "learned",
                     on_checkpoint=checkpoint if world.is_writer else None, progress=progress, world=world)
    except Interrupted as e:
        raise RunInterrupted(f"interrupted: saved step {e.step} of {cfg.train.steps} in '{path}'; {resume}") from None
    except KeyboardInterrupt:  # before the loop's own handler was in place, or a second Ctrl-C
        raise RunInterrupted(f"interrupted before step {state.step + 1} was saved in '{path}'; {resume}") from None
    if not world.is_writer:
        return dataclasses.replace(run, model=state.model.eval())
    checkpoint(state)
    write_manifest(path, {**info, "status": "trained", "steps": cfg.train.steps, "checkpoint_step": state.step,
                          "processes": world.size,
                          "train_seconds": round(state.seconds, 3), "final_loss": rows[-1]["loss"]})
    log(f"trained in {state.seconds:.1f} s, final loss {rows[-1]['loss']:.4f}")
    sampling_model = state.ema.module.eval() if state.ema is not None and cfg.sample.use_ema else state.model.eval()
    return dataclasses.replace(run, model=sampling_model)


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
