"""Any diffusers scheduler driving a toydiff denoiser: `--sampler diffusers:DPMSolverMultistepScheduler`.

diffusers is an optional extra (`pip install 'toydiff[diffusers]'`). The scheduler is built from
the run's own betas (`trained_betas`, so it walks exactly the trained schedule) with clipping
and thresholding off, and is told the model predicts eps: toydiff's denoiser gives x0_hat,
which parameterization.to_eps turns into the eps every diffusers scheduler understands.

Index conventions: diffusers counts training timesteps 0..T-1, toydiff 1..T (t = 0 is the data),
so diffusers' timestep k is toydiff's t = k + 1 (`alphas_cumprod[k]` = `alpha_bar[k + 1]`). The
scheduler chooses its own timesteps (`set_timesteps(steps)`), so it runs on the full schedule,
with `spacing` passed over as its `timestep_spacing` (karras: `use_karras_sigmas`). Fractional
timesteps (the Karras-sigma schedulers) reach the denoiser as fractional t, interpolated in log-SNR.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..core.errors import ToydiffError, unknown
from .parameterization import Prediction, to_eps
from .samplers import Callback, Denoise
from .schedules import NoiseSchedule

EXCLUDED = ("Flax", "CogVideoX")  # JAX schedulers; video schedulers that shift the SNR of the schedule handed over
INSTALL = "pip install 'toydiff[diffusers]'"


def _module():
    try:
        import diffusers
    except ImportError:
        raise ToydiffError(f"the diffusers samplers need the diffusers package, which is not installed; {INSTALL}") \
            from None
    return diffusers


def compatible_schedulers() -> list[str]:
    """Names of the diffusers schedulers that take a beta schedule and an eps prediction, forward in time."""
    diffusers = _module()
    names = []
    for name in dir(diffusers):
        if not name.endswith("Scheduler") or name.startswith(EXCLUDED):
            continue
        try:
            cls = getattr(diffusers, name)
        except (ImportError, AttributeError, RuntimeError):  # a scheduler whose own extras are missing
            continue
        if _is_compatible(diffusers, cls):
            names.append(name)
    return names


def _is_compatible(diffusers, cls) -> bool:
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin) and hasattr(cls, "step")) \
            or "Inverse" in cls.__name__:  # inverse schedulers run from data to noise
        return False
    params = inspect.signature(cls.__init__).parameters
    required = [p for p in list(inspect.signature(cls.step).parameters.values())[1:]
                if p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD]
    return "trained_betas" in params and "prediction_type" in params and len(required) == 3


def build_scheduler(name: str, schedule: NoiseSchedule, spacing: str = "trailing"):
    """The diffusers scheduler class `name`, configured with the schedule's betas, eps prediction, no clipping."""
    diffusers = _module()
    if not name.endswith("Scheduler") or name not in dir(diffusers):
        raise unknown("diffusers scheduler", name, compatible_schedulers())
    cls = getattr(diffusers, name) if not name.startswith(EXCLUDED) else None
    if cls is None or not _is_compatible(diffusers, cls):
        raise ToydiffError(f"'{name}' is not a diffusers scheduler toydiff can drive (it needs trained_betas and "
                           f"prediction_type); choose one of: {', '.join(compatible_schedulers())}")
    params = inspect.signature(cls.__init__).parameters
    options: dict[str, Any] = {"num_train_timesteps": schedule.T, "trained_betas": schedule.betas64[1:].tolist(),
                               "prediction_type": "epsilon"}
    for key, value in (("clip_sample", False), ("thresholding", False), ("set_alpha_to_one", True),
                       ("steps_offset", 0)):
        if key in params:
            options[key] = value
    if spacing == "karras":
        if "use_karras_sigmas" not in params:
            raise ToydiffError(f"{name} has no Karras sigmas; use spacing trailing, linspace or leading")
        options["use_karras_sigmas"] = True
    elif "timestep_spacing" in params:
        options["timestep_spacing"] = spacing
    elif spacing != "trailing":
        raise ToydiffError(f"{name} chooses its own timesteps; leave the spacing at trailing")
    return cls(**options)


def check_scheduler(name: str, schedule: NoiseSchedule, spacing: str = "trailing", eta: float = 0.0):
    """Everything about driving scheduler `name` that can fail before sampling (the name, the spacing, eta);
    returns the scheduler, built."""
    sched = build_scheduler(name, schedule, spacing)
    if eta and "eta" not in inspect.signature(sched.step).parameters:
        raise ToydiffError(f"{name} has no eta; set sample.eta = 0")
    return sched


@torch.no_grad()
def sample_diffusers(denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, *, scheduler: str,
                     steps: int = 0, spacing: str = "trailing", eta: float = 0.0,
                     generator: torch.Generator | None = None, callback: Callback = None) -> torch.Tensor:
    """The sampler signature of toydiff.diffusion.samplers, with a diffusers scheduler's `step` doing the update.

    `schedule` must be the full training schedule (the scheduler picks its `steps` timesteps itself);
    `denoise(x_t, t)` is called with toydiff's t = diffusers' timestep + 1.
    """
    sched = check_scheduler(scheduler, schedule, spacing, eta)
    step_params = inspect.signature(sched.step).parameters
    extra = {"eta": eta} if "eta" in step_params else {}
    if "generator" in step_params:
        extra["generator"] = generator
    try:
        x = _loop(sched, denoise, schedule, x, steps or schedule.T, extra, callback)
    except (IndexError, AssertionError, ValueError, RuntimeError, ZeroDivisionError) as e:
        raise ToydiffError(f"diffusers' {scheduler} failed on this schedule ({type(e).__name__}: {e}); "
                           "try another spacing (trailing) or more steps") from None
    if not torch.isfinite(x).all():
        raise ToydiffError(f"diffusers' {scheduler} produced non-finite samples on this schedule; try another "
                           "spacing (trailing; PNDMScheduler: leading) or a toydiff sampler")
    return x


def _loop(sched, denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, steps: int, extra: dict,
          callback: Callback) -> torch.Tensor:
    sched.set_timesteps(steps, device=x.device)
    x = x * sched.init_noise_sigma
    for timestep in sched.timesteps:
        x_in = sched.scale_model_input(x, timestep)
        t_value = float(timestep) + 1
        t = torch.full((1,), t_value, device=x.device,
                       dtype=torch.long if t_value.is_integer() else torch.float64)
        x0_hat = denoise(x_in, t)
        eps = to_eps(Prediction.X0, x0_hat, x_in, schedule.alpha_bar_at(t, x_in))
        if callback is not None:
            callback(int(round(t_value)), x_in, x0_hat)
        x = sched.step(eps, timestep, x, **extra).prev_sample
    return x
