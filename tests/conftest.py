"""What every test shares: tiny settings, and no state hidden outside the test.

No hidden state: toydiff writes one thing outside a run directory, the noise-floor cache (runtime.cache_dir,
moved by TOYDIFF_CACHE). Each test module gets an empty cache of its own for its module-scoped fixtures, and
each test another, so no outcome depends on the user's ~/.cache, on an earlier run or on the test order (which
is random: pytest-randomly, its seed printed at the top). A test that needs a warm cache warms its own.

Parallel runs: `make test` runs the suite on pytest-xdist workers, each pinned to a core of its own (a test
then sees one core, as on a one-core machine, and never fights the other worker for it); tests marked
`serial` (they need both cores, or time a process) run afterwards, alone.

Shared fixtures stay as they were made: a module fixture that several tests read (a trained run, say)
registers its folder with `unchanged`; a test that changes it, instead of working on a copy, fails the module
at teardown whatever the order, not only in the orders where a later test happens to notice.
"""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from toydiff.core import config as C

torch.set_num_threads(1)  # tiny networks: one thread is fastest on small CPUs (see runtime.set_threads)

TINY = ["data.n=256", "schedule.T=8", "model.width=16", "model.depth=1", "train.steps=30", "train.batch_size=64",
        "train.log_every=10", "train.checkpoint_every=20", "train.warmup_steps=0", "sample.n=64", "eval.nll_n=50"]


def pytest_configure(config):
    """An xdist worker (PYTEST_XDIST_WORKER = gw0, gw1, ...) keeps to one core, and so do the processes it
    starts (they inherit the affinity)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and hasattr(os, "sched_setaffinity"):
        from threadpoolctl import threadpool_limits

        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})
        threadpool_limits(1)  # BLAS and OpenMP pools made before the pinning (numpy is imported by plugins)


@pytest.fixture
def tiny_cfg() -> C.ExperimentConfig:
    """A config that trains in well under a second."""
    return C.with_overrides(C.ExperimentConfig(), TINY)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="module", autouse=True)
def module_cache(tmp_path_factory):
    """An empty floor cache for the module's own fixtures (autouse: set up before any other module fixture)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TOYDIFF_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(autouse=True)
def private_cache(tmp_path):
    """An empty floor cache for each test, never the user's ~/.cache. Its own MonkeyPatch, so a test that calls
    monkeypatch.undo() does not undo it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TOYDIFF_CACHE", str(tmp_path / "cache"))
        yield


def file_hashes(root: Path) -> dict[str, str]:
    """Every file below root (its path relative to root) and the SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _contents(root: Path) -> dict[str, str]:
    """file_hashes without the OS lock files, which readers take too."""
    return {k: v for k, v in file_hashes(root).items() if Path(k).name != ".lock"}


@pytest.fixture(scope="module")
def unchanged():
    """watch(path) -> path: the folder must hold the same files, byte for byte, when the module's tests end."""
    watched: dict[Path, dict[str, str]] = {}

    def watch(path):
        watched[Path(path)] = _contents(Path(path))
        return path
    yield watch
    changed = [str(p) for p, before in watched.items() if _contents(p) != before]
    assert not changed, f"a test changed the shared fixture folder {changed}; a test that writes must use a copy"
