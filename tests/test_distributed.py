"""Multi-process training through torchrun: DistributedDataParallel over gloo on the CPU."""

import subprocess
import sys

import pytest
from safetensors.torch import load_file

from toydiff.cli import main

pytestmark = pytest.mark.serial  # two torchrun ranks: both cores

SETS = ["data.n=512", "schedule.T=50", "model.width=32", "model.depth=1", "train.steps=60", "train.batch_size=128",
        "train.log_every=10", "train.checkpoint_every=20", "train.timestep_sampling=importance",
        "model.conditional=true"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """Each rank trains on its half of one shared global batch and DDP averages the gradients, so the weights
    equal a single process's: to 1e-5 (measured 1.2e-7 after 60 steps; only the order of float sums differs)."""
    sets = [a for s in SETS for a in ("--set", s)]
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(["train", "--quiet", "--out", str(single)] + sets) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "toydiff",
                           "train", "--quiet", "--out", str(multi)] + sets, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("run directory:") == 1  # rank 0 alone reports and writes
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(single / name), load_file(multi / name)
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst < 1e-5, (name, worst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi", "single"]  # no stray directories


@pytest.mark.slow
def test_a_global_batch_the_processes_cannot_share_is_refused(tmp_path):
    sets = [a for s in SETS[:-1] + ["train.batch_size=127"] for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "toydiff",
                           "train", "--quiet", "--out", str(tmp_path / "r")] + sets, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "the global batch (127) must be divisible by the 2 processes" in proc.stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written
