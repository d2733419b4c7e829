"""The training loop: batches, AdamW, learning-rate schedule, EMA, stop signals, logging and checkpoint hooks,
and on CUDA the step captured as a graph. The objective is the method's (toydiff.methods, through
losses.diffusion_loss), the state the loop advances (and a checkpoint holds) toydiff.training.state's.

Nothing here knows about files, plots or the command line: the caller passes
`on_log(row)` and `on_checkpoint(state)` callbacks.
"""

from __future__ import annotations

import copy
import functools
import math
import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, Optional

import torch
from torch import nn

from ..core.config import TrainConfig
from ..core.errors import ToydiffError
from ..core.progress import Progress
from ..core.runtime import World
from ..diffusion.losses import Objective, UniformTimesteps, diffusion_loss
from ..diffusion.schedules import NoiseSchedule
from . import graphs
from .state import Network, TrainState, step_tensors

__all__ = ["EMA", "Interrupted", "TrainState", "capturable", "make_optimizer", "make_state", "step_tensors", "train"]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at a 0-based step: linear warm-up, then constant or cosine decay to 0."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (one pass per tensor) on the CPU and CUDA, else the multi-tensor (foreach)
    update. torch's default on the CPU is the per-tensor loop: for the default 26-tensor MLP one update took
    0.65 ms there, foreach 0.36 ms and fused 0.11 ms, against a whole training step of about 3.7 ms."""
    device = next(model.parameters()).device.type
    kind = {"fused": True} if device in FUSED_ADAMW_DEVICES else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             weight_decay=cfg.weight_decay, **kind)


def capturable(optimizer: torch.optim.Optimizer) -> None:
    """A fused AdamW made capturable in a CUDA graph (toydiff.training.graphs): its learning rate a device tensor, which
    the LR schedule fills before each replay, and its bias corrections computed on the device. A checkpoint
    stays a plain optimizer's (TrainState.tensors), so a run resumes with or without graphs."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        if not torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(group["lr"], device=group["params"][0].device)


def graph_blocker(cfg: TrainConfig, world: World, networks: int = 1) -> Optional[str]:
    """Why this training's step cannot be captured in a CUDA graph, or None (toydiff.training.graphs.wanted)."""
    if world.size > 1:
        return "several processes (torchrun) exchange their gradients outside the graph"
    if networks > 1:
        return "a method that updates several networks in turn is not captured yet (no GPU has checked one)"
    if cfg.coupling == "ot":
        return "train.coupling = ot pairs each batch with its noise on the host (POT)"
    return None


class EMA(nn.Module):
    """An exponential moving average of a model's parameters and buffers, with warm-up: the first update copies
    the model; after k updates the next one averages with decay min(decay, (1 + k) / (10 + k)), so early
    averages do not drag the random initialisation along.

    One fused `torch._foreach_lerp_` over the cached tensor lists per update (AveragedModel walks the
    modules and averages tensor by tensor: 14% of a training step here). The state dict has
    AveragedModel's keys (module.*, n_averaged)."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model)
        self.decay = decay
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))
        self._mine = list(self.module.parameters()) + list(self.module.buffers())
        self._source = list(model.parameters()) + list(model.buffers())
        self._count = 0  # n_averaged on the host: no device synchronisation per step
        # this update's weight 1 - decay_k, filled by the host before the device work (a CUDA graph replays
        # `apply` with whatever it holds); a lerp by weight 1 is the first update's copy
        self._weight = torch.ones((), device=self._mine[0].device if self._mine else "cpu")
        self._weights = [self._weight] * len(self._mine)  # foreach_lerp's tensor weights: one per tensor

    def begin(self) -> None:
        """Host part before `update`: its weight (1 for the first update, else 1 - decay_k)."""
        k = self._count
        self._weight.fill_(1.0 if k == 0 else 1 - min(self.decay, (1 + k) / (10 + k)))

    @torch.no_grad()
    def update(self) -> None:
        """Device part: mine <- mine + weight (source - mine), every tensor in one foreach call (not nn.Module's
        `apply`, which this must not shadow)."""
        torch._foreach_lerp_(self._mine, self._source, self._weights)

    def end(self) -> None:
        self._count += 1
        self.n_averaged.fill_(self._count)

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The averaged tensors an update writes."""
        return self._mine

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._count = int(self.n_averaged)


def make_ema(model: nn.Module, decay: float) -> EMA | None:
    """The EMA of `model` for train.ema_decay, or None when it is 0 (off)."""
    return EMA(model, decay) if decay else None


def drop_labels(labels: torch.Tensor, p: float, null: int, generator: torch.Generator | None) -> torch.Tensor:
    """Each label replaced by the null label with probability p (Ho and Salimans 2022, Algorithm 1)."""
    if p == 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null), labels)


# the signals that stop training at a step boundary with a checkpoint: Ctrl-C, and the SIGTERM a cluster
# (Slurm, Kubernetes) sends before its SIGKILL, and SIGHUP (the terminal or ssh session went away)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    """Training stopped at a step boundary by a stop signal (STOP_SIGNALS), after `on_checkpoint` saved that step."""

    def __init__(self, step: int, signum: int = signal.SIGINT):
        super().__init__(f"interrupted at step {step} by {signal.Signals(signum).name}")
        self.step, self.signum = step, signum


def make_state(model: nn.Module, cfg: TrainConfig, timesteps: UniformTimesteps, generator: torch.Generator,
               others: Optional[dict[str, nn.Module]] = None) -> TrainState:
    """A fresh TrainState: AdamW, warm-up + decay, EMA (if cfg.ema_decay) and `timesteps`, the t sampler (the
    method's: Method.timesteps; its statistics are part of the state); each of the method's `others` (a critic)
    with an AdamW and schedule of its own, no EMA."""
    net = _network(model, cfg)
    others = {name: _network(m, cfg) for name, m in (others or {}).items()}
    return TrainState(model, net.optimizer, net.scheduler, make_ema(model, cfg.ema_decay), timesteps, generator,
                      others=others)


def _network(model: nn.Module, cfg: TrainConfig) -> Network:
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg=cfg))
    return Network(model, optimizer, scheduler)


def train(state: TrainState, schedule: NoiseSchedule, x0: torch.Tensor, cfg: TrainConfig,
          objective: Objective, *, labels: torch.Tensor | None = None,
          on_log: Optional[Callable[[dict], None]] = None,
          on_checkpoint: Optional[Callable[[TrainState], None]] = None,
          progress: bool = False, world: World = World(),
          validate: Optional[Callable[[], float]] = None) -> list[dict]:
    """Train state.model on x0 (N, D), already scaled and on the model's device, from state.step to cfg.steps.
    Returns the loss-log rows.

    objective: what each step minimizes (a method's: Method.objective, or a distilled student's).
    labels (N,) in 0..K-1 train a class-conditional model (model.classes = K), dropped to the null label K
    with probability cfg.label_dropout. Each row is {step, loss (mean over the rows' steps), lr, seconds}.
    The loss is read back from the device only every cfg.log_every steps, where a non-finite loss or
    gradient norm (tracked on the device every step) stops training before the next checkpoint could save
    it; the progress display moves every step. Ctrl-C, SIGTERM or SIGHUP finishes the current step, calls
    on_checkpoint and raises Interrupted. With several processes (`world`, under torchrun) the model trains as
    DistributedDataParallel on shards of one shared global batch, and the ranks agree to stop at the next
    log row (one small all-reduce there), so every rank stops at the same step. On CUDA (cfg.cuda_graphs) the
    step's device work is captured in a CUDA graph after two eager steps and replayed, its first two replays
    checked against the eager step (toydiff.training.graphs.Stepper); state.graphs says how the steps ran.
    validate: the held-back rows' loss of the sampling weights, logged with each row (val_loss); training stops
    early (state.stopped_early) at the first row where it has not improved for cfg.patience of cfg.steps
    (`early_stop`, read off the rows, so a resumed run stops where the uninterrupted one does), and the
    sampling weights return to those of the best row (state.best, kept in every checkpoint).
    """
    model, optimizer, ema, generator = state.model, state.optimizer, state.ema, state.generator
    nets = state.networks()
    state.stopped_early = validate is not None and state.step < cfg.steps and early_stop(state.rows, cfg)
    if state.stopped_early:  # resumed from the checkpoint of the very row that stopped it
        state.restore_best()
        return state.rows
    if set(objective.updates) != set(nets):
        raise ToydiffError(f"the objective updates the networks {', '.join(objective.updates)}, but the training "
                           f"state holds {', '.join(nets)}")
    world.check_networks(list(nets))
    n = x0.shape[0]
    batch = n if cfg.batch_size == 0 else cfg.batch_size
    world.check_batch(batch)
    net = model if world.size == 1 else nn.parallel.DistributedDataParallel(model)
    # once: .parameters() walks the module tree every call
    params = {name: list(nets[name].module.parameters()) for name in objective.updates}
    for each in nets.values():
        each.module.train()
    device = x0.device
    running = torch.tensor(state.running, device=device)
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # the first step with a non-finite loss / grad
    step_t = torch.tensor(state.step, dtype=torch.long, device=device)  # the step, counted on the device
    capture = graphs.wanted(cfg.cuda_graphs, device, "train.cuda_graphs", graph_blocker(cfg, world, len(nets)))
    if capture:
        capturable(optimizer)

    def work() -> None:
        """One step's device work, with no host synchronisation and no Python number that changes from step to
        step (the learning rate and the EMA weight are device tensors the host fills): a CUDA graph's body."""
        if batch >= n:
            xb, yb = x0, labels
        else:
            idx = torch.randint(0, n, (batch,), generator=generator, device=device)
            xb, yb = x0[idx], None if labels is None else labels[idx]
        if yb is not None:
            yb = drop_labels(yb, cfg.label_dropout, model.classes, generator)
        finite, logged = None, None
        for name in objective.updates:  # each network in turn, its own loss, gradient and AdamW step
            loss = diffusion_loss(net, schedule, xb, objective, generator, timesteps=state.timesteps, labels=yb,
                                  world=world, autocast=cfg.autocast == "bf16", network=name)
            nets[name].optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(params[name], cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            ok = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
            finite = ok if finite is None else finite & ok
            nets[name].optimizer.step()
            if name == "model":
                logged = loss.detach()  # the log follows the run's own network's loss
        step_t.add_(1)
        first_bad.copy_(torch.where((first_bad == 0) & ~finite, step_t, first_bad))
        if ema is not None:
            ema.update()
        running.add_(logged)

    def changed() -> list[torch.Tensor]:  # everything `work` writes, for the stepper's checks
        return step_tensors(state) + [running, first_bad, step_t]

    stream = graphs.side_stream(device) if capture else None
    stepper = graphs.Stepper(work, changed, [generator], stream, "train.cuda_graphs", strict=cfg.cuda_graphs == "on") \
        if capture else work
    start = time.perf_counter() - state.seconds
    bar = Progress(cfg.steps, "train", "step", enabled=progress, initial=state.step)
    with _stop_flag() as stop, graphs.on(stream):
        for step in range(state.step + 1, cfg.steps + 1):
            if ema is not None:
                ema.begin()
            stepper()
            for each in nets.values():
                each.scheduler.step()
            if ema is not None:
                ema.end()
            state.step, state.since = step, state.since + 1
            bar.update()
            is_checkpoint = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0 and step != cfg.steps
            stopping = stop.is_set() if world.size == 1 else (step % cfg.log_every == 0 and world.any(stop.is_set()))
            if step % cfg.log_every == 0 or step == cfg.steps or is_checkpoint or stopping:
                _check_finite(int(first_bad), cfg)
            if step % cfg.log_every == 0 or step == cfg.steps:
                mean_loss = world.mean(running).item() / state.since
                row = {"step": step, "loss": mean_loss, "lr": float(optimizer.param_groups[0]["lr"]),
                       "seconds": time.perf_counter() - start}
                if validate is not None:
                    row["val_loss"] = validate()
                    if row is best_row(state.rows + [row]):
                        state.keep_best()
                state.rows.append(row)
                state.stopped_early = validate is not None and step < cfg.steps and early_stop(state.rows, cfg)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                if on_log is not None:
                    on_log(row)
                running.zero_()
                state.since = 0
            if on_checkpoint is not None and (is_checkpoint or stopping):
                state.running, state.seconds = running.item(), time.perf_counter() - start
                on_checkpoint(state)
            if stopping:
                bar.close()
                raise Interrupted(step, stop.signum or signal.SIGTERM)
            if state.stopped_early:
                break
    graphs.join(stream)
    bar.close()
    if validate is not None:  # early stopping's choice: the sampling weights of the best validation row
        state.restore_best()
    if capture:
        state.graphs = stepper.note
    state.running, state.seconds = running.item(), time.perf_counter() - start
    for each in nets.values():
        each.module.eval()
    return state.rows


def early_stop(rows: list[dict], cfg: TrainConfig) -> bool:
    """Whether the validation loss of the log `rows` has not improved for cfg.patience of cfg.steps (at least two
    log rows) since its best row."""
    scored = [r for r in rows if "val_loss" in r]
    if not scored:
        return False
    best = min(scored, key=lambda r: r["val_loss"])
    return scored[-1]["step"] - best["step"] >= max(cfg.patience * cfg.steps, 2 * cfg.log_every)


def best_row(rows: list[dict]) -> Optional[dict]:
    """The log row of the lowest validation loss, or None without one."""
    scored = [r for r in rows if "val_loss" in r]
    return min(scored, key=lambda r: r["val_loss"]) if scored else None


def _check_finite(first_bad: int, cfg: TrainConfig) -> None:
    if first_bad:
        raise ToydiffError(f"the training loss or its gradient became NaN or infinite at step {first_bad}; the run "
                           f"keeps its last good checkpoint. Lower train.lr (now {cfg.lr:g}), keep train.grad_clip "
                           "on, or choose a schedule whose betas stay well below 1")


class _StopFlag(threading.Event):
    signum: int = 0  # the first stop signal received


@contextmanager
def _stop_flag():
    """A flag a stop signal (STOP_SIGNALS) sets: the loop stops at the end of the step; a second one interrupts
    at once (KeyboardInterrupt)."""
    stop = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.signum = signum
        stop.set()

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
