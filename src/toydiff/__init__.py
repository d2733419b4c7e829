"""toydiff: train, sample, measure and picture denoising diffusion models on low-dimensional data.

    import toydiff
    result = toydiff.run(schedule={"T": 100}, out="runs/demo")   # train, sample, figures, evaluation
    print(result.verdict)
    run = toydiff.load("runs/demo")                               # a run directory, loaded back
    x = run.sample(1000, seed=1)                                  # (1000, D) in data units
    report = toydiff.evaluate(run, x)                             # each metric beside its noise floor

The names below are imported on first use, so `import toydiff` (and the `toydiff` command's
--help and --version) does not pay for torch, scikit-learn or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .core.version import __version__

# public name -> the module that owns it
_API = {
    "run": "api", "load": "api", "evaluate": "api", "evaluate_samples": "api", "plot": "api", "make_config": "api",
    "Experiment": "jobs.experiment", "train_run": "jobs.workflow", "resume_run": "jobs.workflow",
    "Run": "runs.run", "ExperimentConfig": "core.config", "ToydiffError": "core.errors",
    "NoiseSchedule": "diffusion.schedules",
}
__all__ = ["Experiment", "ExperimentConfig", "NoiseSchedule", "Run", "ToydiffError", "__version__", "evaluate",
           "evaluate_samples", "load", "make_config", "plot", "resume_run", "run", "train_run"]

if TYPE_CHECKING:  # pragma: no cover
    from .core.config import ExperimentConfig
    from .core.errors import ToydiffError
    from .runs.run import Run
    from .diffusion.schedules import NoiseSchedule
    from .api import evaluate, evaluate_samples, load, make_config, plot, run
    from .jobs.experiment import Experiment
    from .jobs.workflow import resume_run, train_run


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'toydiff' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
