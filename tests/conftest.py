import numpy as np
import pytest
import torch

from toydiff import config as C

torch.set_num_threads(1)  # tiny networks: one thread is fastest on small CPUs (see runtime.set_threads)

TINY = ["data.n=256", "schedule.T=8", "model.width=16", "model.depth=1", "train.steps=30", "train.batch_size=64",
        "train.log_every=10", "train.checkpoint_every=20", "train.warmup_steps=0", "sample.n=64", "eval.nll_n=50"]


@pytest.fixture
def tiny_cfg() -> C.ExperimentConfig:
    """A config that trains in well under a second."""
    return C.with_overrides(C.ExperimentConfig(), TINY)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Noise floors are cached; tests keep theirs private, never in the user's ~/.cache."""
    monkeypatch.setenv("TOYDIFF_CACHE", str(tmp_path / "cache"))
