"""Training state for any set of networks: a method with a critic beside its model (tests/critic_method.py) trains
two networks a step, saves both in its checkpoint, and resumes bit for bit after a stop signal or a SIGKILL; a
checkpoint without the critic, or with a network the method does not train, and torchrun, are refused in one
line; a one-network checkpoint keeps the keys it always had."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from toydiff.core import config as C
from toydiff import train_run
from toydiff.core.errors import RunInterrupted, ToydiffError
from toydiff.core.runtime import World
from toydiff.core.formats import load_tensors, save_tensors
from toydiff.jobs.workflow import resume_run, validate

from critic_method import installed

SETS = ["data.n=256", "schedule.T=50", "model.width=16", "model.depth=1", "train.steps=40", "train.batch_size=64",
        "train.log_every=5", "train.checkpoint_every=10", "train.warmup_steps=5", "sample.n=64"]
HERE = Path(__file__).parent


def checkpoint(run_dir):
    return load_tensors(Path(run_dir) / "checkpoint.safetensors")


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def cfg():
    return C.with_overrides(C.ExperimentConfig(), SETS)


def test_a_one_network_checkpoint_keeps_its_keys(cfg, tmp_path):
    tensors, meta = checkpoint(train_run(C.with_overrides(cfg, ["train.steps=3"]), tmp_path / "r").path)
    assert not any(k.startswith("nets/") for k in list(tensors) + list(meta))
    assert {"param_groups", "scheduler"} <= set(meta) and any(k.startswith("optim/0/") for k in tensors)


def test_both_networks_train_and_the_checkpoint_holds_both(cfg, tmp_path):
    with installed():
        run = train_run(cfg, tmp_path / "r")
    tensors, meta = checkpoint(run.path)
    critic = {k: v for k, v in tensors.items() if k.startswith("nets/critic/model/")}
    assert set(critic) == {f"nets/critic/model/{k}" for k in ("0.weight", "0.bias", "2.weight", "2.bias")}
    assert any(k.startswith("nets/critic/optim/0/exp_avg") for k in tensors)
    assert {"nets/critic/param_groups", "nets/critic/scheduler"} <= set(meta)
    from critic_method import CriticDDPM
    start = CriticDDPM().other_networks(run.config, 2, torch.device("cpu"))["critic"].state_dict()
    assert not torch.equal(start["0.weight"], critic["nets/critic/model/0.weight"])
    assert "critic" not in str(sorted(load_tensors(run.path / "model.safetensors")[0]))  # sampling never sees it


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_two_network_run_resumes_to_the_uninterrupted_weights(cfg, tmp_path, sig):
    import toydiff.training.loop as tr

    with installed():
        whole = train_run(cfg, tmp_path / "whole")
        original, calls = tr.diffusion_loss, {"n": 0}

        def loss(*a, **kw):  # a real signal during the 29th loss: step 15's model update (two losses a step)
            calls["n"] += 1
            if calls["n"] == 29:
                os.kill(os.getpid(), sig)
            return original(*a, **kw)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tr, "diffusion_loss", loss)
            with pytest.raises(RunInterrupted, match="saved step 15 of 40"):
                train_run(cfg, tmp_path / "cut")
        resumed = resume_run(tmp_path / "cut")
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert same_tensors(load_tensors(whole.path / name)[0], load_tensors(resumed.path / name)[0]), name
    assert same_tensors(checkpoint(whole.path)[0], checkpoint(resumed.path)[0])  # the critic and both AdamWs too


@pytest.mark.slow
def test_a_killed_two_network_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """SIGKILL of a real process (the command line with the critic method) once its first checkpoint is on disk,
    then `train --resume` in another: the weights and the whole checkpoint of a run never killed."""
    sets = [a for s in SETS + ["train.steps=400", "train.checkpoint_every=50"] for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}

    def cli(*argv, **kw):
        return [sys.executable, "-m", "critic_method", *argv]
    assert subprocess.run(cli("train", "--quiet", "--out", str(tmp_path / "whole"), *sets), env=env,
                          timeout=300).returncode == 0
    proc = subprocess.Popen(cli("train", "--quiet", "--out", str(tmp_path / "cut"), *sets), env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "cut" / "checkpoint.safetensors").exists():
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    step = int(checkpoint(tmp_path / "cut")[1]["step"])
    assert 0 < step < 400  # killed mid-run
    assert subprocess.run(cli("train", "--resume", str(tmp_path / "cut"), "--quiet"), env=env,
                          timeout=300).returncode == 0
    assert same_tensors(checkpoint(tmp_path / "whole")[0], checkpoint(tmp_path / "cut")[0])
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert same_tensors(load_tensors(tmp_path / "whole" / name)[0], load_tensors(tmp_path / "cut" / name)[0])


@pytest.mark.parametrize("change, needle", [
    ("drop the critic", "has no state for the critic network"),
    ("a ghost network", "holds networks this run's method does not train: ghost"),
    ("the critic's optimizer cut", "critic network's optimizer state is incomplete"),
])
def test_a_checkpoint_that_does_not_fit_the_method_s_networks_is_one_line(cfg, tmp_path, change, needle):
    with installed():
        run = train_run(C.with_overrides(cfg, ["train.steps=20"]), tmp_path / "r")
        cfg_text = (run.path / "config.toml").read_text()
        (run.path / "config.toml").write_text(cfg_text.replace("steps = 20\n", "steps = 40\n"))
        tensors, meta = checkpoint(run.path)
        if change == "drop the critic":
            tensors = {k: v for k, v in tensors.items() if not k.startswith("nets/critic/")}
            meta = {k: v for k, v in meta.items() if not k.startswith("nets/critic/")}
        elif change == "a ghost network":
            tensors = {**tensors, "nets/ghost/model/w": torch.zeros(2)}
        else:
            tensors = {k: v for k, v in tensors.items() if not k.startswith("nets/critic/optim/1/")}
        save_tensors(run.path / "checkpoint.safetensors", tensors, {k: v for k, v in meta.items()
                                                                      if k not in ("format", "version")})
        before = (run.path / "checkpoint.safetensors").read_bytes()
        with pytest.raises(ToydiffError, match=needle) as caught:
            resume_run(run.path)
    assert "\n" not in str(caught.value)
    assert (run.path / "checkpoint.safetensors").read_bytes() == before  # nothing was written


def test_a_two_network_method_refuses_torchrun_and_is_not_captured_in_a_graph(cfg):
    from toydiff.training.loop import graph_blocker

    with installed():
        with pytest.raises(ToydiffError, match="trains several networks .* cannot run under torchrun") as caught:
            validate(cfg, World(0, 2))
        assert "\n" not in str(caught.value)
    validate(cfg, World(0, 2))  # the one-network method takes the same world
    assert "updates several networks in turn" in graph_blocker(cfg.train, World(), networks=2)
    assert graph_blocker(cfg.train, World()) is None
