"""The training loop: batches, the denoising loss, AdamW, learning-rate schedule, logging and checkpoint hooks.

Nothing here knows about files, plots or the command line: the caller passes
`on_log(row)` and `on_checkpoint(step)` callbacks.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from .config import TrainConfig
from .errors import ToydiffError
from .parameterization import Prediction, min_snr_weight, training_target
from .schedules import NoiseSchedule

WEIGHTINGS = ("uniform", "min-snr")


def diffusion_loss(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, prediction: Prediction,
                   generator: torch.Generator | None = None, weighting: str = "uniform",
                   gamma: float = 5.0) -> torch.Tensor:
    """L_simple of Ho et al. (2020), eq. 14: t ~ U{1..T}, eps ~ N(0, I), MSE between the network and its target;
    weighting "min-snr" scales each point's error by min_snr_weight (Hang et al. 2023)."""
    t = torch.randint(1, schedule.T + 1, (x0.shape[0],), generator=generator, device=x0.device)
    eps, x_t = schedule.noise(x0, t, generator)
    alpha_bar = schedule.gather(schedule.alpha_bar, t, x0)
    target = training_target(prediction, x0, eps, alpha_bar)
    if weighting == "uniform":
        return nn.functional.mse_loss(model(x_t, t), target)
    if weighting == "min-snr":
        per_point = ((model(x_t, t) - target) ** 2).flatten(1).mean(1)
        snr = (alpha_bar / (1 - alpha_bar)).flatten(1)[:, 0]
        return (min_snr_weight(prediction, snr, gamma) * per_point).mean()
    raise ToydiffError(f"unknown loss weighting '{weighting}'; choose one of: {', '.join(WEIGHTINGS)}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at a 0-based step: linear warm-up, then constant or cosine decay to 0."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             weight_decay=cfg.weight_decay)


def make_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of the weights with warm-up: at update k the decay is
    min(decay, (1 + k) / (10 + k)), so early averages do not drag the random initialisation along."""
    if decay == 0:
        return None

    def avg(averaged: torch.Tensor, current: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1 + float(k)) / (10 + float(k)))
        return d * averaged + (1 - d) * current

    return AveragedModel(model, avg_fn=avg, use_buffers=True)


def train(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, cfg: TrainConfig, prediction: Prediction,
          *, generator: torch.Generator | None = None,
          on_log: Optional[Callable[[dict], None]] = None,
          on_checkpoint: Optional[Callable[[int], None]] = None,
          ema: AveragedModel | None = None,
          progress: bool = False) -> list[dict]:
    """Train `model` on x0 (N, D), already scaled and on the model's device. Returns the loss-log rows.

    Each row is {step, loss (mean over the rows' steps), lr, seconds}. The loss is read back
    from the device only every cfg.log_every steps. `ema` (make_ema) is updated after every step.
    """
    n = x0.shape[0]
    batch = n if cfg.batch_size == 0 else cfg.batch_size
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    model.train()
    rows: list[dict] = []
    running = torch.zeros((), device=x0.device)
    since = 0
    start = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="train", unit="step", disable=not progress, leave=False)
    for step in range(1, cfg.steps + 1):
        if batch >= n:
            xb = x0
        else:
            xb = x0[torch.randint(0, n, (batch,), generator=generator, device=x0.device)]
        loss = diffusion_loss(model, schedule, xb, prediction, generator, cfg.loss_weighting, cfg.min_snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        running += loss.detach()
        since += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            mean_loss = running.item() / since
            if not math.isfinite(mean_loss):
                raise ToydiffError(f"the training loss became {mean_loss} by step {step}; lower train.lr "
                                   "or choose a schedule whose betas stay well below 1")
            row = {"step": step, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - start}
            rows.append(row)
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            if on_log is not None:
                on_log(row)
            running.zero_()
            since = 0
        if on_checkpoint is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 \
                and step != cfg.steps:
            on_checkpoint(step)
    bar.close()
    model.eval()
    return rows
