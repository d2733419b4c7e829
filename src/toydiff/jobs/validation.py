"""The training rows held back from training, their denoising loss, and the two things it chooses for a file:
the training length (early stopping, in the loop: toydiff.training.loop.early_stop) and, before that, the recipe
(`size`: the network's width and weight decay).

    held = held_back(cfg, n, can=True)                   # which rows; None where there are none
    run, record = size(run, log=print)                   # the run rebuilt with the chosen width and decay

Sizing (train.sizing) trains each candidate recipe briefly, in memory: a probe is the first PROBE_SHARE of
train.steps of the run that recipe makes (its learning-rate schedule over train.steps, its patience in steps,
its seeds), so the candidates are compared paired: the same initialisation seed, batches, t and noise, and the
held-back rows' loss on the same fixed t and noise. The run then trains the lowest candidate's recipe from its
first step, as if it had been configured so: its
config.toml holds the chosen model.width and train.weight_decay (a run of that config reproduces it), and
run.json its `sizing` record (each candidate's loss and step). The candidates change one thing at a time from
what the rules give, and what the user set is kept:

    the auto width (toydiff.diffusion.models.width)    when model.width = 0 (auto)
    half that width                                     when model.width = 0
    weight decay SIZING_DECAY                            when train.weight_decay = 0 (the default)

auto: on for a user's file whose auto width is at most SIZING_MAX_WIDTH (frames of up to 32 coordinates, where
a probe takes seconds), off for the zoo (fresh draws cannot be memorized) and for wider frames (the 2,000 x 64
table's width-256 network trains at 19 steps/s here: three probes would take minutes).
"""

from __future__ import annotations

import dataclasses
import signal
from typing import Callable, Optional

import numpy as np
import torch

from ..core.config import ExperimentConfig, with_overrides
from ..core.errors import RunInterrupted, ToydiffError
from ..core.runtime import derive_seed, numpy_rng, torch_generator
from ..diffusion.losses import Objective
from ..diffusion.models import width
from ..runs.run import Run
from ..training.loop import Interrupted, TrainState, best_row, make_state, train

Log = Callable[[str], None]

VALIDATION_AUTO = 0.1  # train.validation = -1 (auto): the share of a user's file's training rows held back
VALIDATION_POINTS = 4096  # (row, t, noise) triples a validation loss averages: the held-back rows, repeated
PROBE_SHARE = 0.25  # a sizing probe trains this share of train.steps
SIZING_DECAY = 0.1  # the weight decay sizing tries (benchmarks/early_stopping.py measured it beside 0)
SIZING_MAX_WIDTH = 128  # train.sizing = auto sizes a file whose auto width is at most this
SIZING_Z = 2.0  # a candidate replaces the rules' recipe only with a held-back loss lower by this many standard errors
ROW_POINTS = 64  # (t, noise) draws per held-back row behind its own loss (at least; VALIDATION_POINTS in all)


def held_back(cfg: ExperimentConfig, n: int, can: bool) -> Optional[np.ndarray]:
    """The training rows held back for early stopping (train.validation; auto: VALIDATION_AUTO of a user's file,
    none of the zoo's fresh draws), drawn with the run's seed, or None. can: the objective is the run's own
    denoising loss (Method.validates; a distilled student trains on its teacher's lesson: never)."""
    share = cfg.train.validation if cfg.train.validation >= 0 else (VALIDATION_AUTO if cfg.data.path else 0.0)
    if share == 0 or not can:  # a method that cannot is refused by its check when validation is asked of it
        return None
    k = int(round(share * n))
    if k < 1 or n - k < 2:
        return None
    return np.sort(numpy_rng(cfg.seed, "validation").permutation(n)[:k])


def validation_loss(run: Run, state: TrainState, objective: Objective, x: torch.Tensor,
                    y: Optional[torch.Tensor]) -> Callable[[], float]:
    """The loss of the held-back rows x (their labels y) under the weights sampling uses (state.sampling_module),
    on the same t and noise every time (a fixed seed), so its changes are the weights' alone."""
    repeats = max(1, -(-VALIDATION_POINTS // len(x)))
    x, y = x.repeat(repeats, 1), None if y is None else y.repeat(repeats)
    seed = derive_seed(run.config.seed, "validation")

    def validate() -> float:
        net = state.sampling_module
        was = net.training
        net.eval()
        with torch.no_grad():
            value = objective.loss(net, run.schedule, x, torch.Generator(x.device).manual_seed(seed), labels=y)
        net.train(was)
        return float(value)
    return validate


@dataclasses.dataclass
class Rows:
    """What the loop trains on: the scaled rows x and their labels y (the class, or the piece of a model of
    pieces) with the held-back rows taken out, which rows those were, and their loss (None without any)."""
    x: torch.Tensor
    y: Optional[torch.Tensor]
    held: Optional[np.ndarray]
    validate: Optional[Callable[[], float]]


def training_rows(run: Run, state: TrainState, objective: Objective, x0: torch.Tensor, own: bool) -> Rows:
    """The run's scaled rows x0 split into those the steps draw from and those held back to watch (own: the
    objective is the run's own method's, which may validate)."""
    y = None if run.labels is None and run.pieces is None else _labels(run)  # a model of pieces: conditioned on them
    held = held_back(run.config, len(x0), own and run.method.validates)
    if held is None:
        return Rows(x0, y, None, None)
    state.use_ema = run.config.sample.use_ema
    keep = np.setdiff1d(np.arange(len(x0)), held)
    validate = validation_loss(run, state, objective, x0[held], None if y is None else y[held])
    return Rows(x0[keep], None if y is None else y[keep], held, validate)


def early_stop_record(state: TrainState, held: Optional[np.ndarray], cfg: ExperimentConfig, log: Log) -> dict:
    """run.json's record of early stopping, and its line in the log."""
    best = best_row(state.rows)
    if held is None or best is None:
        return {}
    how = (f"stopped early at step {state.step} of {cfg.train.steps}" if state.stopped_early
           else f"trained all {cfg.train.steps} steps")
    log(f"validation: {how}; the loss of the {len(held)} held-back training rows was lowest at step "
        f"{best['step']} ({best['val_loss']:.4f})")
    return {"stopped_early": state.stopped_early, "validation": {
        "rows": int(len(held)), "best_step": int(best["step"]), "best_loss": float(best["val_loss"]),
        "patience_steps": int(max(cfg.train.patience * cfg.train.steps, 2 * cfg.train.log_every))}}


def candidates(cfg: ExperimentConfig, dim: int) -> list[tuple[int, float]]:
    """The (width, weight decay) recipes sizing compares, the rules' own first."""
    w, decay = width(cfg.model, dim), cfg.train.weight_decay
    found = [(w, decay)]
    if not cfg.model.width and w // 2 >= 8:
        found.append((w // 2, decay))
    if not decay:
        found.append((w, SIZING_DECAY))
    return found


def _wanted(run: Run) -> bool:
    """Whether train.sizing sizes this run (auto: a file's small frame), or a one-line error for `on` where it
    cannot."""
    cfg = run.config
    if cfg.train.sizing == "off":
        return False
    can = held_back(cfg, len(run.data), run.method.validates) is not None
    if cfg.train.sizing == "on":
        if cfg.model.arch != "mlp" or not can or len(candidates(cfg, run.frame_dim)) < 2:
            raise ToydiffError("train.sizing = on compares widths and weight decays of the mlp on the held-back "
                               "rows' loss, and this run has " + (
                                   "the guide's fixed network" if cfg.model.arch != "mlp" else
                                   "no held-back rows (set train.validation > 0)" if not can else
                                   "both model.width and train.weight_decay set") + "; set train.sizing = off")
        return True
    return bool(cfg.data.path) and can and cfg.model.arch == "mlp" and len(candidates(cfg, run.frame_dim)) > 1 \
        and width(cfg.model, run.frame_dim) <= SIZING_MAX_WIDTH


def size(run: Run, *, progress: bool = False, log: Log = lambda m: None) -> tuple[Run, dict]:
    """The untrained `run` with the recipe of the lowest held-back loss (a new network, its config's width and
    weight decay set), and run.json's `sizing` record; the run itself and {} where train.sizing does not size."""
    if not _wanted(run):
        return run, {}
    cfg = run.config
    log_every = cfg.train.log_every
    probe_steps = min(cfg.train.steps, max(log_every, round(PROBE_SHARE * cfg.train.steps / log_every) * log_every))
    # a probe is the first probe_steps of the run its recipe makes: the same learning-rate schedule (over
    # train.steps) and the same patience in steps, so where that run stops early within them it stops too
    patience = min(1.0, cfg.train.patience * cfg.train.steps / probe_steps)
    x0 = torch.as_tensor(run.scaler.transform(run.data), dtype=torch.float32, device=run.device)
    tried, per_row = [], []
    for w, decay in candidates(cfg, run.frame_dim):
        probe = _with_recipe(run, w, decay)
        state = make_state(probe.model, probe.config.train, probe.method.timesteps(probe.config, run.device),
                           torch_generator(cfg.seed, "train", run.device))
        objective = probe.method.objective(probe, {})
        rows = training_rows(probe, state, objective, x0, own=True)
        log(f"sizing: probing width {w}, weight decay {decay:g} for {probe_steps} of {cfg.train.steps} steps")
        try:
            train(state, run.schedule, rows.x, dataclasses.replace(probe.config.train, steps=probe_steps,
                                                                   patience=patience),
                  objective, labels=rows.y, progress=progress, validate=rows.validate)
        except (Interrupted, KeyboardInterrupt) as e:
            signum = getattr(e, "signum", signal.SIGINT)
            raise RunInterrupted(f"{'interrupted' if signum == signal.SIGINT else signal.Signals(signum).name} "
                                 "while sizing the recipe, before anything was written; run the command again "
                                 "(or set train.sizing = off)", 128 + signum) from None
        best = best_row(state.rows)
        if best is None:  # no log row in so short a probe: nothing to compare
            log(f"sizing: a probe of {probe_steps} steps logs no validation loss (train.log_every = "
                f"{log_every}); the rules' recipe is kept")
            return run, {}
        per_row.append(row_losses(probe, state.sampling_module, objective, x0[rows.held],
                                  None if rows.y is None else _labels(probe)[rows.held]))
        tried.append({"width": w, "weight_decay": decay, "loss": float(best["val_loss"]), "step": int(best["step"])})
    chosen = compare(tried, per_row)
    better = chosen is not tried[0]
    log("sizing: held-back loss " + ", ".join(
        f"{c['loss']:.4f} (width {c['width']}, weight decay {c['weight_decay']:g}"
        + (f"; {100 * c['difference']:+.1f}%, z = {c['z']:.1f}" if c is not tried[0] else "") + ")" for c in tried)
        + (f"; chosen width {chosen['width']}, weight decay {chosen['weight_decay']:g}" if better else
           f"; none lower by {SIZING_Z:g} standard errors over the {len(per_row[0])} rows: the rules' recipe kept")
        + " (train.sizing)")
    sized = _with_recipe(run, chosen["width"], chosen["weight_decay"], "train.sizing=off")
    return sized, {"sizing": {"probe_steps": probe_steps, "candidates": tried,
                              "chosen": {"width": chosen["width"], "weight_decay": chosen["weight_decay"]}}}


def compare(tried: list[dict], per_row: list[np.ndarray]) -> dict:
    """The recipe sizing chooses: the first (the rules') unless another's held-back loss is lower row by row by
    SIZING_Z standard errors (a paired t statistic over the rows), then the lowest of those. Each candidate's
    record gains its mean difference (relative to the rules' mean loss) and that statistic."""
    for c, losses in zip(tried, per_row):
        d = losses - per_row[0]
        c["difference"] = float(d.mean() / per_row[0].mean())
        se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else np.inf
        c["z"] = float(np.clip(d.mean() / max(se, 1e-12), -1e6, 1e6))  # a difference equal on every row: +-1e6
    better = [c for c in tried[1:] if c["z"] < -SIZING_Z]
    return min(better, key=lambda c: c["loss"]) if better else tried[0]


def row_losses(run: Run, net: torch.nn.Module, objective: Objective, x: torch.Tensor, y: Optional[torch.Tensor]
               ) -> np.ndarray:
    """Each held-back row's own denoising loss (K,) under `net`, over ROW_POINTS of (t, noise) per row drawn from
    the row's own seed: the same draws for every candidate, so candidates differ row by row by their weights
    alone (a paired comparison)."""
    repeats = max(ROW_POINTS, VALIDATION_POINTS // len(x))
    out = np.empty(len(x))
    was = net.training
    net.eval()
    with torch.no_grad():
        for i in range(len(x)):
            g = torch.Generator(x.device).manual_seed(derive_seed(run.config.seed, f"sizing row {i}"))
            out[i] = float(objective.loss(net, run.schedule, x[i:i + 1].repeat(repeats, 1), g,
                                          labels=None if y is None else y[i:i + 1].repeat(repeats)))
    net.train(was)
    return out


def _labels(run: Run) -> torch.Tensor:
    """The class (or piece) of each training row, as the network is conditioned on it."""
    return torch.as_tensor(run.row_labels, dtype=torch.long, device=run.device)


def _with_recipe(run: Run, w: int, decay: float, *more: str) -> Run:
    """`run` with a fresh network of width w (seeded as the run's), trained with weight decay `decay`: the config
    says so, explicitly (and the sized run's says train.sizing = off: it is the choice)."""
    cfg = with_overrides(run.config, [f"model.width={w}", f"train.weight_decay={decay}", *more])
    _, model = run.method.build(cfg, run.frame_dim, run.device, run.classes or (run.pieces.count if run.pieces else 0))
    return dataclasses.replace(run, config=cfg, model=model)
