"""toydiff: train, sample, measure and picture denoising diffusion models on low-dimensional data."""

__version__ = "0.1.0"

from .config import ExperimentConfig  # noqa: E402
from .errors import ToydiffError  # noqa: E402
from .runs import Run  # noqa: E402
from .schedules import NoiseSchedule  # noqa: E402
from .workflow import resume_run, train_run  # noqa: E402

__all__ = ["ExperimentConfig", "NoiseSchedule", "Run", "ToydiffError", "resume_run", "train_run", "__version__"]
