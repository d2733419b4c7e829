"""Reliability: resume after Ctrl-C or SIGKILL to the uninterrupted result, the divergence guard."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from toydiff import Run, train_run
from toydiff.core import config as C
from toydiff.core.formats import load_tensors
from toydiff.cli import main
from toydiff.core.errors import RunInterrupted, ToydiffError
from toydiff.jobs.workflow import resume_run

RESUMABLE = ["data.n=256", "schedule.T=50", "model.width=16", "model.depth=1", "train.steps=60",
             "train.batch_size=64", "train.log_every=5", "train.checkpoint_every=10", "train.warmup_steps=5",
             "train.timestep_sampling=importance", "model.conditional=true", "sample.n=64"]


def weights(path):
    return {k: v for k, v in load_tensors(path)[0].items()}


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def interrupt_at_loss_call(monkeypatch, k, sig=signal.SIGINT):
    """Deliver a real signal (SIGINT, or a cluster's SIGTERM) to this process during the k-th loss computation
    (mid-step)."""
    import toydiff.training.loop as tr
    original, calls = tr.diffusion_loss, {"n": 0}

    def loss(*a, **kw):
        calls["n"] += 1
        if calls["n"] == k:
            os.kill(os.getpid(), sig)
        return original(*a, **kw)
    monkeypatch.setattr(tr, "diffusion_loss", loss)


@pytest.mark.parametrize("at, batch, sig", [(3, 64, signal.SIGINT), (27, 64, signal.SIGTERM),
                                            pytest.param(27, 2048, signal.SIGINT, marks=pytest.mark.serial),  # 2 threads
                                            (14, 64, signal.SIGHUP)])
def test_a_stop_signal_checkpoints_the_step_and_resume_reaches_the_uninterrupted_weights(tmp_path, monkeypatch, at,
                                                                                         batch, sig):
    """Ctrl-C, a cluster's SIGTERM and SIGHUP alike (batch 2048 on two threads, before and after the resume)."""
    cfg = C.with_overrides(C.ExperimentConfig(), RESUMABLE + [f"train.batch_size={batch}", "data.n=4096"]
                           + (["train.threads=2"] if batch > 1024 else []))
    whole = train_run(cfg, tmp_path / "whole")
    interrupt_at_loss_call(monkeypatch, at, sig)
    how = "interrupted" if sig == signal.SIGINT else f"stopped by {signal.Signals(sig).name}"
    with pytest.raises(RunInterrupted, match=f"{how}: saved step {at} of 60 .*toydiff train --resume") as caught:
        train_run(cfg, tmp_path / "cut")
    assert caught.value.code == 128 + sig
    monkeypatch.undo()
    assert load_tensors(tmp_path / "cut" / "checkpoint.safetensors")[1]["step"] == str(at)
    resumed = resume_run(tmp_path / "cut")
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert same_weights(whole.path / name, resumed.path / name), name
    assert (whole.path / "train_log.csv").read_text().count("\n") == (resumed.path / "train_log.csv").read_text().count("\n")
    assert np.array_equal(Run.load(whole.path).sample(30, seed=4, label=1), Run.load(resumed.path).sample(30, seed=4, label=1))


def test_resume_of_a_finished_run_changes_nothing_and_cli_refuses_config_flags(tmp_path, capsys):
    cfg = C.with_overrides(C.ExperimentConfig(), RESUMABLE)
    run = train_run(cfg, tmp_path / "r")
    before = (run.path / "model.safetensors").read_bytes()
    resume_run(run.path)
    assert (run.path / "model.safetensors").read_bytes() == before
    assert main(["train", "--resume", str(run.path), "--set", "train.steps=100"]) == 2
    assert "--resume continues the run with its own configuration; drop --set" in capsys.readouterr().err


def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = C.with_overrides(C.ExperimentConfig(), RESUMABLE)
    import toydiff.training.loop as tr
    original, calls = tr.diffusion_loss, {"n": 0}

    def poisoned(*a, **kw):
        calls["n"] += 1
        loss = original(*a, **kw)
        return loss * float("nan") if calls["n"] == 23 else loss
    monkeypatch.setattr(tr, "diffusion_loss", poisoned)
    with pytest.raises(ToydiffError, match="became NaN or infinite at step 23; the run keeps its last good "
                                           "checkpoint. Lower train.lr"):
        train_run(cfg, tmp_path / "nan")
    state = load_tensors(tmp_path / "nan" / "checkpoint.safetensors")
    assert state[1]["step"] == "20" and all(torch.isfinite(v.float()).all() for v in state[0].values())
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "nan" / "model.safetensors").values())


@pytest.mark.slow
def test_sigkill_at_random_moments_always_resumes_to_the_uninterrupted_result(tmp_path):
    """A real `toydiff train` process killed (SIGKILL) at random moments, then resumed until it finishes:
    the run directory always loads, and the final weights equal an uninterrupted run's, bit for bit."""
    # 1000 steps: about 3 s of training after run.json appears here, so a kill within 1.5 s of it always lands
    # mid-run (at 400 steps the first run ended 1.27 s after run.json, exactly when the first kill came)
    settings = RESUMABLE[:-3] + ["train.steps=1000", "train.checkpoint_every=7", "sample.n=64"]
    sets = [a for s in settings for a in ("--set", s)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = tmp_path / "whole"
    assert main(["train", "--quiet", "--out", str(whole)] + sets) == 0
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "toydiff", "train", "--quiet"]
    rng, kills, first = random.Random(0), 0, True
    while True:
        args = cmd + (["--out", str(cut)] + sets if first else ["--resume", str(cut)])
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < 4:
            deadline = time.time() + 60
            while not (cut / "run.json").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.5))
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        if first and not (cut / "run.json").exists():
            continue  # killed before the run directory was published: nothing exists, start again
        first = False
        Run.load(cut, weights=(cut / "model.safetensors").exists())  # loadable after every kill
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()
        kills += 1
    assert kills == 4
    for name in ("model.safetensors", "model_ema.safetensors", "checkpoint.safetensors"):
        assert same_weights(whole / name, cut / name) if name != "checkpoint.safetensors" else \
            load_tensors(cut / name)[1]["step"] == "1000"


@pytest.mark.parametrize("sampler, extra", [("ddpm", {}), ("ddim", {"eta": 1.0}), ("dpmpp-3m-sde", {}),
                                            ("euler", {})])
def test_samples_do_not_depend_on_the_batch_size(tmp_path, sampler, extra):
    """Per-sample noise streams: the same seed gives the same samples in one batch or many (labels, x_T and
    every step's noise are drawn per sample), and the same again on a second call."""
    cfg = C.with_overrides(C.ExperimentConfig(), RESUMABLE[:-1] + ["train.steps=20"])
    run = train_run(cfg, tmp_path / "r")
    kw = dict(seed=5, sampler=sampler, steps=10, label=-1, **extra)
    one = run.sample(2500, batch_size=2500, **kw)
    for batch in (700, 1024, 1):
        if batch == 1:
            part = run.sample(5, batch_size=1, **kw)  # one row: another matmul kernel, float32 rounding apart
            assert np.allclose(part, one[:5], rtol=1e-6, atol=1e-6)
            continue
        assert np.array_equal(run.sample(2500, batch_size=batch, **kw), one)  # bit for bit on this CPU
    assert np.array_equal(run.sample(2500, batch_size=2500, **kw), one)


def test_noise_stream_blocks_are_independent_of_the_batch_start():
    from toydiff.core.runtime import NoiseStream
    whole = NoiseStream(7, 0, 3000).randn((3000, 2))
    assert torch.equal(NoiseStream(7, 1000, 1500).randn((1500, 2)), whole[1000:2500])
    stream = NoiseStream(7, 2000, 10)
    stream.randn((10, 2))
    assert not torch.equal(stream.randn((10, 2)), whole[2000:2010])  # the next draw is fresh noise
    z = NoiseStream(3, 0, 200_000).randn((200_000,))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01


def test_noise_stream_blocks_never_share_a_seed_within_a_job():
    """torch's CPU generator keeps 32 bits of a seed: the blocks of a job must differ in those bits."""
    from toydiff.core.runtime import NoiseStream
    assert torch.equal(torch.randn(4, generator=torch.Generator().manual_seed(5)),
                       torch.randn(4, generator=torch.Generator().manual_seed(5 + 2**32)))  # the truncation
    for seed in (0, 1, 2**62 + 12345):
        seeds = [g.initial_seed() % 2**32 for g in NoiseStream(seed, 0, 4096 * NoiseStream.BLOCK)._generators]
        assert len(set(seeds)) == len(seeds) == 4096


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_on_the_command_line_exits_128_plus_it_with_how_to_resume(tmp_path, sig):
    settings = RESUMABLE[:-3] + ["train.steps=100000", "train.checkpoint_every=1000"]
    sets = [a for s in settings for a in ("--set", s)]
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "toydiff", "train", "--quiet", "--out", str(out)] + sets,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not (out / "run.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 128 + sig and err.count("\n") == 1, err
    assert f"continue with `toydiff train --resume {out}`" in err
    step = int(load_tensors(out / "checkpoint.safetensors")[1]["step"])
    assert 0 < step < 100000 and f"saved step {step} of 100000" in err
