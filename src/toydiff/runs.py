"""A run directory loaded back, and sampling from it.

    run = toydiff.Run.load("runs/demo")     # everything rebuilt from the directory (see toydiff.workflow)
    x = run.sample(1000, seed=1)            # (1000, D) in data units
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import config as config_io
from .checkpoint import WEIGHTS, load_npy, load_weights, read_manifest, save_csv, save_npy
from .config import ExperimentConfig
from .data import Scaler
from .errors import ToydiffError
from .interop import PREFIX, build_scheduler, sample_diffusers
from .models import build_model
from .parameterization import Denoiser, Prediction, clipped
from .runtime import NoiseStream, derive_seed, resolve_device, set_threads
from .samplers import SAMPLERS, VARIANCES
from .schedules import SPACINGS, NoiseSchedule

LOG_HEADER = ["step", "loss", "lr", "seconds"]
EMA_WEIGHTS = "model_ema.safetensors"
LABELS = "train_labels.npy"
CHECKPOINT = "checkpoint.safetensors"
HOLDOUT = "holdout_data.npy"


@dataclass
class Run:
    """A trained model with everything needed to use it, as stored in (or loaded from) a run directory."""

    path: Path
    config: ExperimentConfig
    scaler: Scaler
    schedule: NoiseSchedule
    model: nn.Module
    data: np.ndarray  # (N, D) training data, data units
    device: torch.device
    labels: Optional[np.ndarray] = None  # (N,) class labels in 0..K-1 of a conditional model's training data
    names: Optional[list[str]] = None  # the D column names (x1, x2, ... for the zoo)
    holdout: Optional[np.ndarray] = None  # (H, D) rows of the user's file kept out of training, data units
    _compiled_model: Optional[nn.Module] = field(default=None, init=False, repr=False, compare=False)

    @property
    def dim(self) -> int:
        return self.data.shape[1]

    @property
    def classes(self) -> int:
        """K for a class-conditional model, else 0."""
        return 0 if self.labels is None else int(self.labels.max()) + 1

    def denoiser_for(self, labels: torch.Tensor | None = None, guidance: float = 1.0,
                     model: nn.Module | None = None) -> Denoiser:
        return Denoiser(self.model if model is None else model, self.schedule, self.config.model.prediction,
                        learned_variance=self.config.model.variance == "learned", labels=labels, guidance=guidance)

    @property
    def denoiser(self) -> Denoiser:
        """The unconditional denoiser (a conditional model asked with its null label)."""
        return self.denoiser_for()

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", threads: int = 0, weights: bool = True) -> "Run":
        """Rebuild a run from its directory alone (config, scaler, data, weights); weights=False leaves the
        model at its seeded initialisation (for resuming from the training checkpoint)."""
        path = Path(path)
        info = read_manifest(path)
        cfg = config_io.load(path / "config.toml")
        try:
            scaler = Scaler.from_dict(json.loads((path / "scaler.json").read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ToydiffError(f"cannot read '{path / 'scaler.json'}' ({e}); the run directory is damaged") from None
        data = load_npy(path / "train_data.npy")
        if data.ndim != 2 or data.shape[1] != scaler.shift.shape[0]:
            raise ToydiffError(f"'{path}' is damaged: train_data.npy has shape {data.shape} but the scaler has "
                               f"{scaler.shift.shape[0]} columns")
        labels = None
        if cfg.model.conditional:
            labels = load_npy(path / LABELS)
            if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu" or info.get("classes") != \
                    int(labels.max()) + 1:
                raise ToydiffError(f"'{path}' is damaged: {LABELS} does not match the training data or run.json")
        holdout = load_npy(path / HOLDOUT) if (path / HOLDOUT).is_file() else None
        if holdout is not None and (holdout.ndim != 2 or holdout.shape[1] != data.shape[1]):
            raise ToydiffError(f"'{path}' is damaged: {HOLDOUT} has shape {holdout.shape}, the data {data.shape}")
        names = info.get("columns") or default_names(data.shape[1])
        dev = resolve_device(device)
        set_threads(threads, dev, cfg.sample.batch_size)  # sampling batches (resume_run resets it for training)
        schedule, model = _build(cfg, data.shape[1], dev, 0 if labels is None else int(labels.max()) + 1)
        if weights:
            load_weights(path / WEIGHTS, model)
        if weights and cfg.sample.use_ema and (path / EMA_WEIGHTS).is_file():
            load_weights(path / EMA_WEIGHTS, model)  # sampling uses the moving average when the run has one
        model.eval()
        return cls(path, cfg, scaler, schedule, model, data, dev, labels, names, holdout)

    def sample(self, n: int, *, seed: Optional[int] = None, batch_size: Optional[int] = None,
               sampler: Optional[str] = None, steps: Optional[int] = None, spacing: Optional[str] = None,
               eta: Optional[float] = None, clip: Optional[bool] = None, label: Optional[int] = None,
               guidance: Optional[float] = None, trajectory: bool = False, compile: Optional[bool] = None):
        """Draw n samples in data units, in batches of at most `batch_size` (bounded memory).

        sampler, steps, spacing, eta, clip, label and guidance default to the run's [sample] settings;
        steps < T samples on the respaced schedule. A conditional model samples class `label`, or for
        label = -1 classes drawn in their training proportions, with classifier-free guidance scale
        `guidance`. With trajectory=True, returns (samples, path) where path (steps + 1, n, D) holds
        x_T .. x_0 in the model's scaled frame (the frame of the figures). compile (default sample.compile)
        runs the network through torch.compile (compiled once per Run, again for each new batch shape).
        """
        if n < 1:
            raise ToydiffError(f"the number of samples must be >= 1, got {n}")
        batch_size = self.config.sample.batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise ToydiffError(f"the sampling batch size must be >= 1, got {batch_size}")
        if seed is not None and not 0 <= seed < 2**63:
            raise ToydiffError(f"the sampling seed must be an integer in [0, 2^63), got {seed}")
        cfg = self.config.sample
        name = sampler or cfg.sampler
        label = cfg.label if label is None else label
        guidance = cfg.guidance if guidance is None else guidance
        check_conditioning(self.classes, label, guidance)
        learned = self.config.model.variance == "learned"
        eta = cfg.eta if eta is None else eta
        steps = sampling_steps(cfg.steps if steps is None else steps, self.schedule.T)
        spacing = resolve_spacing(spacing or cfg.spacing, name)
        if name.startswith(PREFIX):  # a diffusers scheduler picks its own timesteps on the full schedule
            schedule, variance = self.schedule, check_diffusers(name, self.schedule, steps, spacing, cfg.variance)
            sample_fn = functools.partial(sample_diffusers, scheduler=name[len(PREFIX):], steps=steps,
                                          spacing=spacing, eta=eta)
        else:
            sample_fn, variance = sampler_with_options(name, eta, cfg.variance, learned)
            # the adaptive solver chooses its own steps over the full schedule
            schedule = self.schedule if name == "ode" else respaced(self.schedule, steps, spacing)
        base_seed = derive_seed(self.config.seed if seed is None else seed, "sample")
        gen = torch.Generator(device=self.device).manual_seed(base_seed)  # diffusers' schedulers draw from it
        bounds = None
        if cfg.clip if clip is None else clip:  # the training data's per-axis range, in the model's frame
            scaled = torch.as_tensor(self.scaler.transform(self.data), dtype=torch.float32, device=self.device)
            bounds = scaled.amin(0), scaled.amax(0)
        compiled = cfg.compile if compile is None else compile
        model = self._compiled() if compiled else self.model
        compile_errors = (torch._dynamo.exc.TorchDynamoException,) if compiled else ()  # () catches nothing
        samples = np.empty((n, self.dim))  # the only O(n) buffer; each batch is written into it in data units
        paths = []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            stream = NoiseStream(base_seed, start, b, self.device)  # each sample's noise, whatever the batches
            labels = self._draw_labels(b, label, stream)
            den = self.denoiser_for(labels, guidance, model)
            base = den.with_variance if variance == "learned" else den
            if bounds is not None:
                base = clipped(base, *bounds)
            denoise = base if schedule is self.schedule else functools.partial(_at_model_t, base, schedule)
            x_T = stream.randn((b, self.dim))
            visited: list[torch.Tensor] = []
            callback = (lambda t, x_t, x0_hat: visited.append(x_t.cpu())) if trajectory else None
            try:
                x0 = sample_fn(denoise, schedule, x_T, generator=gen if name.startswith(PREFIX) else stream,
                               callback=callback)
            except compile_errors as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ToydiffError(f"torch.compile failed ({first}); sample without --compile "
                                   "(sample.compile = false)") from None
            samples[start:start + b] = self.scaler.inverse(x0.cpu().double().numpy())
            if trajectory:
                paths.append(torch.stack(visited + [x0.cpu()]))
        if trajectory:
            return samples, torch.cat(paths, dim=1).numpy()
        return samples

    def _compiled(self) -> nn.Module:
        if self._compiled_model is None:
            self._compiled_model = torch.compile(self.model)
        return self._compiled_model

    def _draw_labels(self, n: int, label: int, stream: NoiseStream) -> torch.Tensor | None:
        """n labels for a conditional model: all `label`, or (-1) drawn with the training classes' frequencies
        (one uniform number per sample, by inverting their cumulative distribution)."""
        if self.labels is None:
            return None
        if label >= 0:
            return torch.full((n,), label, dtype=torch.long, device=self.device)
        cdf = np.cumsum(np.bincount(self.labels, minlength=self.classes)) / len(self.labels)
        u = stream.rand(n).cpu().numpy()
        return torch.as_tensor(np.searchsorted(cdf, u, side="right").clip(max=self.classes - 1), device=self.device)


def _at_model_t(denoise, schedule: NoiseSchedule, x: torch.Tensor, i: torch.Tensor):
    """denoise on a respaced schedule: index i is told to the network as the training t it stands for."""
    return denoise(x, schedule.model_t(i))


def check_conditioning(classes: int, label: int, guidance: float) -> None:
    if classes == 0 and (label != -1 or guidance != 1.0):
        raise ToydiffError("sample.label and sample.guidance need a class-conditional model; train one with "
                           "model.conditional=true")
    if label >= classes > 0:
        raise ToydiffError(f"sample.label = {label}, but the model knows classes 0..{classes - 1}")
    if guidance < 0:
        raise ToydiffError(f"the guidance scale must be >= 0, got {guidance}")


def check_diffusers(name: str, schedule: NoiseSchedule, steps: int, spacing: str, variance: str) -> str:
    """Everything about a `diffusers:NAME` sampler that can fail, checked before sampling; returns the variance."""
    if variance not in ("auto", "small"):
        raise ToydiffError(f"sample.variance = {variance} applies only to toydiff's ddpm sampler, not '{name}'")
    build_scheduler(name[len(PREFIX):], schedule, resolve_spacing(spacing, name))
    return "small"


def sampler_with_options(name: str, eta: float, variance: str = "auto", learned: bool = False):
    """(sampler function, resolved variance): the registered sampler with eta bound for ddim and the variance
    for ddpm (meaningless to the others); variance "auto" is "learned" for a model that learned it, else "small"."""
    fn = SAMPLERS.get(name)
    if variance not in VARIANCES + ("auto",):
        raise ToydiffError(f"unknown sample.variance '{variance}'; choose one of: auto, {', '.join(VARIANCES)}")
    if variance == "learned" and not learned:
        raise ToydiffError("sample.variance = learned needs a model trained with model.variance=learned; "
                           "choose auto, small or large")
    if name == "ddpm":
        if eta:
            raise ToydiffError(f"eta = {eta} applies only to the ddim sampler, not 'ddpm'; set sample.eta = 0")
        variance = ("learned" if learned else "small") if variance == "auto" else variance
        return functools.partial(fn, variance=variance), variance
    if variance not in ("auto", "small"):
        raise ToydiffError(f"sample.variance = {variance} applies only to the ddpm sampler, not '{name}'")
    if name == "ddim":
        if not 0 <= eta <= 1:
            raise ToydiffError(f"eta must be in [0, 1], got {eta}")
        return functools.partial(fn, eta=eta), "small"
    if eta:
        raise ToydiffError(f"eta = {eta} applies only to the ddim sampler, not '{name}'; set sample.eta = 0")
    return fn, "small"


def resolve_spacing(spacing: str, sampler: str) -> str:
    """sample.spacing "auto": trailing t for ddpm and diffusers' schedulers (trailing is what they all accept),
    Karras sigmas for the ODE and SDE solvers, the grids each was measured best on (benchmarks/nfe.py)."""
    if spacing != "auto":
        if spacing not in SPACINGS:
            raise ToydiffError(f"unknown sample.spacing '{spacing}'; choose one of: auto, {', '.join(SPACINGS)}")
        return spacing
    return "trailing" if sampler == "ddpm" or sampler.startswith(PREFIX) else "karras"


def sampling_steps(steps: int, T: int) -> int:
    """The steps a sampler walks for sample.steps: at most T, and 0 means all T (the default 50 walks a T = 10
    schedule whole)."""
    if steps < 0:
        raise ToydiffError(f"sampling steps must be >= 0 (0 = all T), got {steps}")
    return min(steps, T) or T


def respaced(schedule: NoiseSchedule, steps: int, spacing: str) -> NoiseSchedule:
    """The schedule walked in sample.steps = `steps` (sampling_steps): itself when that is all T, else its
    respacing (toydiff.schedules)."""
    steps = sampling_steps(steps, schedule.T)
    if steps == schedule.T:
        return schedule
    return schedule.respace(steps, spacing)


def _build(cfg: ExperimentConfig, dim: int, device: torch.device,
           classes: int = 0) -> tuple[NoiseSchedule, nn.Module]:
    """Schedule and (seeded, freshly initialised) model; every name is checked against its registry."""
    Prediction.parse(cfg.model.prediction)
    schedule = NoiseSchedule.from_config(cfg.schedule, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        model = build_model(cfg.model, dim, cfg.schedule.T, classes)
    return schedule, model.to(device)


def default_names(dim: int) -> list[str]:
    return [f"x{i + 1}" for i in range(dim)]


def save_samples(path: Path, samples: np.ndarray, names: Optional[list[str]] = None) -> None:
    """samples.npy and samples.csv in data units, the CSV headed by the data's column names (x1, x2, ...)."""
    save_npy(path.with_suffix(".npy"), samples.astype(np.float32))
    save_csv(path.with_suffix(".csv"), samples, names or default_names(samples.shape[1]))
