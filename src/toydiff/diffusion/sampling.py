"""The sampling plan: which sampler, with which options, on which schedule, handed which denoiser.

    plan = make_plan(cfg.sample, VPDiffusion(schedule), learned_variance=False, classes=0)
    x0 = plan.run(denoiser, x_T, noise=stream, generator=gen, callback=cb)     # one batch

This is the only module that decides how sample settings become a sampler call, and so the
only one that knows which sampler takes which option: a sampler's options are its keyword
parameters (ddim's `eta`, ddpm's `variance`, toydiff.diffusion.samplers), read off its signature here;
a sampler marked `adaptive` picks its own steps on the full schedule; `diffusers:NAME` hands
the steps to a diffusers scheduler (toydiff.diffusion.interop). Config checks ask `make_plan` too
(toydiff.jobs.workflow.validate), so a setting is refused before anything is trained or written.

A generative process enters as the object the plan walks: `VPDiffusion` is the discrete
VP-DDPM process (Ho et al. 2020) on its NoiseSchedule. Another process (a flow-matching path in
continuous time) plugs in beside it by offering the same three things: `T`, `grid(steps,
spacing)` (the NoiseSchedule-shaped grid of noise levels the samplers walk, in VP terms) and
`denoise_on(grid, denoise)` (the network told its own time for each grid index). The samplers
stay unchanged wherever the math allows.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..core.config import DIFFUSERS_PREFIX, SAMPLE_SPACINGS, SampleConfig, choose
from ..core.errors import ToydiffError
from .parameterization import Denoiser, clipped
from .samplers import SAMPLERS, Callback, Denoise, Sampler
from .schedules import NoiseSchedule


def sampling_steps(steps: int, T: int) -> int:
    """The steps a sampler walks for sample.steps: at most T, and 0 means all T (the default 50 walks a T = 10
    schedule whole)."""
    if steps < 0:
        raise ToydiffError(f"sampling steps must be >= 0 (0 = all T), got {steps}")
    return min(steps, T) or T


def resolve_spacing(spacing: str, sampler: str) -> str:
    """sample.spacing "auto": the sampler's own mark (samplers.trailing: ddpm, consistency, meanflow, whose
    intervals were drawn uniform in flow time), trailing t for diffusers' schedulers (what they all accept),
    else Karras sigmas (the ODE and SDE solvers): the grids each was measured best on (benchmarks/nfe.py)."""
    choose("sample.spacing", spacing, SAMPLE_SPACINGS)
    if spacing != "auto":
        return spacing
    if sampler.startswith(DIFFUSERS_PREFIX):
        return "trailing"
    return getattr(SAMPLERS.get(sampler), "default_spacing", "karras")


def check_conditioning(classes: Optional[int], label: int, guidance: float) -> None:
    """sample.label and sample.guidance against the model's classes (0: unconditional; None: a conditional
    model whose classes are not known yet)."""
    if classes == 0 and (label != -1 or guidance != 1.0):
        raise ToydiffError("sample.label and sample.guidance need a class-conditional model; train one with "
                           "model.conditional=true")
    if classes and label >= classes:
        raise ToydiffError(f"sample.label = {label}, but the model knows classes 0..{classes - 1}")
    if guidance < 0:
        raise ToydiffError(f"the guidance scale must be >= 0, got {guidance}")


class VPDiffusion:
    """The discrete variance-preserving process of DDPM on its NoiseSchedule, walked whole or respaced."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule

    @property
    def T(self) -> int:
        return self.schedule.T

    def grid(self, steps: int, spacing: str) -> NoiseSchedule:
        """The schedule walked in `steps` steps (sampling_steps): itself when that is all T, else its respacing."""
        steps = sampling_steps(steps, self.schedule.T)
        return self.schedule if steps == self.schedule.T else self.schedule.respace(steps, spacing)

    def denoise_on(self, grid: NoiseSchedule, denoise: Denoise) -> Denoise:
        """`denoise` called with grid indices: on a respaced grid, index i is told the training t it stands for."""
        return denoise if grid is self.schedule else functools.partial(_at_model_t, denoise, grid)


def _at_model_t(denoise: Denoise, grid: NoiseSchedule, x: torch.Tensor, i: torch.Tensor, *r: torch.Tensor):
    return denoise(x, grid.model_t(i), *(grid.model_t(j) for j in r))  # r: a mean-flow step's end (MeanFlowDenoiser)


def _options(fn: Sampler) -> set[str]:
    return set(inspect.signature(fn).parameters) - {"denoise", "schedule", "x", "generator", "callback"}


def _takers(option: str) -> str:
    """'the ddim sampler': the registered samplers that take `option`, for an error message."""
    names = [n for n in SAMPLERS.names() if option in _options(SAMPLERS.get(n))]
    return f"the {' and '.join(names)} sampler{'s' if len(names) > 1 else ''}"


@dataclass(frozen=True)
class Plan:
    """A sampler with its options bound, the grid it walks and how its denoiser is made."""

    sampler: str  # the name asked for
    fn: Callable[..., torch.Tensor]  # the sampler: fn(denoise, grid, x_T, generator=, callback=) -> x_0
    process: VPDiffusion
    grid: NoiseSchedule  # what the sampler walks: the respaced schedule, or the full one
    steps: int  # the steps asked for (the grid's T, or the adaptive solver's full schedule)
    spacing: str  # resolved from "auto"
    variance: str  # ddpm's sigma_t^2 (small | large | learned), resolved from "auto"; "small" where meaningless
    own_generator: bool  # a diffusers scheduler draws its noise from a torch.Generator, not the per-sample stream

    @property
    def adaptive(self) -> bool:
        """Whether the sampler picks its own steps (the adaptive ODE solver)."""
        return getattr(self.fn, "adaptive", False)

    @property
    def evaluations_per_batch(self) -> Optional[int]:
        """Network calls (steps) per batch, or None where the solver decides (the adaptive ODE)."""
        return None if self.adaptive else (self.steps if self.own_generator else self.grid.T)

    @property
    def graph_blocker(self) -> Optional[str]:
        """Why this plan's loop cannot be captured in a CUDA graph (toydiff.training.graphs), or None."""
        if self.adaptive:
            return f"the {self.sampler} solver picks its steps on the host"
        if self.own_generator:
            return f"the {self.sampler} scheduler steps on the host"
        return None

    def denoise(self, denoiser: Denoiser, bounds: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> Denoise:
        """The function the sampler calls: x0_hat (with the learned variance for ddpm's "learned"), clamped to
        `bounds` (low, high) when given, told the training t of each grid index."""
        base = denoiser.with_variance if self.variance == "learned" else denoiser
        if bounds is not None:
            base = clipped(base, *bounds)
        return self.process.denoise_on(self.grid, base)

    def run(self, denoiser: Denoiser, x_T: torch.Tensor, *, noise, generator: Optional[torch.Generator] = None,
            bounds=None, callback: Callback = None) -> torch.Tensor:
        """One batch from x_T to x_0. `noise` (a runtime.NoiseStream) gives each sample its own noise; a diffusers
        scheduler draws from `generator` instead."""
        return self.fn(self.denoise(denoiser, bounds), self.grid, x_T,
                       generator=generator if self.own_generator else noise, callback=callback)


def make_plan(settings: SampleConfig, process: VPDiffusion, *, learned_variance: bool = False,
              classes: Optional[int] = 0) -> Plan:
    """The plan for these sample settings on `process`, with every setting that cannot apply refused here:
    eta or variance for a sampler without them, a learned variance the model lacks, a label or guidance for
    an unconditional model (classes 0; None: conditional, classes not known yet), a respacing or a diffusers
    scheduler the schedule does not allow."""
    check_conditioning(classes, settings.label, settings.guidance)
    name, eta, variance = settings.sampler, settings.eta, settings.variance
    steps = sampling_steps(settings.steps, process.T)
    spacing = resolve_spacing(settings.spacing, name)
    if variance == "learned" and not learned_variance:
        raise ToydiffError("sample.variance = learned needs a model trained with model.variance=learned; "
                           "choose auto, small or large")
    if name.startswith(DIFFUSERS_PREFIX):
        from .interop import check_scheduler, sample_diffusers

        if variance not in ("auto", "small"):
            raise ToydiffError(f"sample.variance = {variance} applies only to {_takers('variance')}, not '{name}'")
        scheduler = name[len(DIFFUSERS_PREFIX):]
        check_scheduler(scheduler, process.schedule, spacing, eta)
        fn = functools.partial(sample_diffusers, scheduler=scheduler, steps=steps, spacing=spacing, eta=eta)
        return Plan(name, fn, process, process.schedule, steps, spacing, "small", own_generator=True)
    fn = SAMPLERS.get(name)
    options = _options(fn)
    bound: dict = {}
    if "variance" in options:
        variance = ("learned" if learned_variance else "small") if variance == "auto" else variance
        bound["variance"] = variance
    elif variance not in ("auto", "small"):
        raise ToydiffError(f"sample.variance = {variance} applies only to {_takers('variance')}, not '{name}'")
    else:
        variance = "small"
    if "eta" in options:
        bound["eta"] = eta
    elif eta:
        raise ToydiffError(f"eta = {eta} applies only to {_takers('eta')}, not '{name}'; set sample.eta = 0")
    grid = process.schedule if getattr(fn, "adaptive", False) else process.grid(steps, spacing)
    return Plan(name, functools.partial(fn, **bound) if bound else fn, process, grid, steps, spacing, variance,
                own_generator=False)
