"""Run directories: train -> save -> load -> identical samples; determinism; damaged and foreign directories."""

import json

import numpy as np
import pytest
import torch

from toydiff import Run, train_run
from toydiff.core import config as C
from toydiff.core.errors import ToydiffError


@pytest.fixture
def trained(tiny_cfg, tmp_path):
    return train_run(tiny_cfg, tmp_path / "run")


def test_run_directory_is_self_describing(trained):
    files = {p.name for p in trained.path.iterdir()}
    assert {"run.json", "config.toml", "scaler.json", "train_data.npy", "model.safetensors", "train_log.csv"} <= files
    info = json.loads((trained.path / "run.json").read_text())
    assert info["format"] == "toydiff-run" and info["version"] == 1 and info["status"] == "trained"
    assert info["alpha_bar_T"] == pytest.approx(trained.schedule.alpha_bar_T)
    log = (trained.path / "train_log.csv").read_text().splitlines()
    assert log[0] == "step,loss,lr,seconds,val_loss" and len(log) == 1 + 3  # log_every = 10 over 30 steps


def test_save_load_gives_identical_samples(trained):
    loaded = Run.load(trained.path, device="cpu")
    assert loaded.config == trained.config
    a = trained.sample(100, seed=3)
    b = loaded.sample(100, seed=3)
    assert np.array_equal(a, b)


def test_same_seed_same_weights_and_samples(tiny_cfg, tmp_path):
    a, b = train_run(tiny_cfg, tmp_path / "a"), train_run(tiny_cfg, tmp_path / "b")
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert np.array_equal(a.sample(50, seed=1), b.sample(50, seed=1))
    assert not np.array_equal(a.sample(50, seed=1), a.sample(50, seed=2))


def test_samples_come_back_in_data_units(trained):
    x = trained.sample(500, seed=0)
    assert x.shape == (500, 2)
    # the moons span about [-1, 2] x [-0.5, 1] in data units, not [-1, 1]^2
    assert x[:, 0].max() > 1.2


def test_trajectory_runs_from_x_T_to_x_0(trained):
    x, path = trained.sample(10, seed=0, trajectory=True)
    assert path.shape == (trained.schedule.T + 1, 10, 2)
    assert np.allclose(trained.scaler.inverse(path[-1]), x, atol=1e-5)
    x, path = trained.sample(10, seed=0, sampler="ode", trajectory=True, progress=True)  # the solver's own steps:
    assert path.shape == (2, 10, 2)  # only x_1, where it stops, and x_0
    assert np.allclose(trained.scaler.inverse(path[-1]), x, atol=1e-5)


def test_a_draw_returns_its_record_beside_the_samples(trained):
    """Run.draw says how its samples were drawn (no side channel on the run); Run.sample is its samples."""
    drawn = trained.draw(40, seed=3, sampler="ddim", steps=4)
    assert np.array_equal(drawn.samples, trained.sample(40, seed=3, sampler="ddim", steps=4))
    assert drawn.record == {"sampler": "ddim", "steps": 4, "spacing": drawn.record["spacing"], "nfe": 4}
    assert drawn.trajectory is None and not hasattr(trained, "last_sampling")
    assert trained.draw(10, seed=3, trajectory=True).trajectory.shape == (trained.schedule.T + 1, 10, 2)


def test_sampling_in_batches_keeps_count(trained):
    assert trained.sample(130, seed=0, batch_size=50).shape == (130, 2)


@pytest.mark.parametrize("dim", [1, 5])
def test_other_dimensions_train_and_sample(tiny_cfg, tmp_path, dim):
    run = train_run(C.with_overrides(tiny_cfg, ["data.name=gmm", f"data.dim={dim}"]), tmp_path / "d")
    assert Run.load(run.path).sample(20, seed=0).shape == (20, dim)


def test_bad_sample_count_is_refused(trained):
    with pytest.raises(ToydiffError, match="number of samples must be in 1..100,000,000"):
        trained.sample(0)


def test_existing_run_directory_is_never_overwritten(trained, tiny_cfg):
    before = {p.name: p.read_bytes() for p in trained.path.iterdir() if p.is_file()}
    with pytest.raises(ToydiffError, match="already exists and is not empty"):
        train_run(tiny_cfg, trained.path)
    assert before == {p.name: p.read_bytes() for p in trained.path.iterdir() if p.is_file()}


def test_bad_config_writes_nothing(tiny_cfg, tmp_path):
    """An unknown name is refused when the config is made; a rule that needs the dataset, by train_run before
    it writes anything."""
    with pytest.raises(ToydiffError, match="unknown dataset 'nope'"):
        C.with_overrides(tiny_cfg, ["data.name=nope"])
    cfg = C.with_overrides(tiny_cfg, ["data.dim=3"])
    with pytest.raises(ToydiffError, match="data.dim applies only to datasets of any dimension"):
        train_run(cfg, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_missing_and_foreign_directories(tmp_path):
    with pytest.raises(ToydiffError, match="does not exist"):
        Run.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ToydiffError, match="is not a toydiff run directory \\(no run.json\\)"):
        Run.load(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "run.json").write_text('{"format": "something-else"}')
    with pytest.raises(ToydiffError, match="no 'toydiff-run' format tag"):
        Run.load(tmp_path / "other")


def test_newer_format_version_is_refused(trained):
    info = json.loads((trained.path / "run.json").read_text())
    (trained.path / "run.json").write_text(json.dumps({**info, "version": 99}))
    with pytest.raises(ToydiffError, match="format version 99.*upgrade toydiff"):
        Run.load(trained.path)


def test_weights_of_another_architecture_are_refused(trained, tmp_path, tiny_cfg):
    other = train_run(C.with_overrides(tiny_cfg, ["model.width=8"]), tmp_path / "other")
    (trained.path / "model.safetensors").write_bytes((other.path / "model.safetensors").read_bytes())
    with pytest.raises(ToydiffError, match="do not fit the run's configured model"):
        Run.load(trained.path)


def test_a_pickle_where_weights_belong_is_refused_unexecuted(trained, tmp_path):
    import pickle
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    (trained.path / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ToydiffError, match="is not a safetensors file"):
        Run.load(trained.path)
    assert not marker.exists()


def test_ema_weights_are_the_warmed_up_moving_average(tiny_cfg, tmp_path):
    """Replay training with the same seeds and average by hand: the stored EMA must match."""
    from toydiff.core.formats import load_weights
    from toydiff.diffusion.models import build_model
    cfg = C.with_overrides(tiny_cfg, ["train.ema_decay=0.9", "train.steps=12", "train.checkpoint_every=0"])
    run = train_run(cfg, tmp_path / "ema")
    assert (run.path / "model_ema.safetensors").is_file()
    # replay: same init, same batches, a hand-written EMA
    import toydiff.training.loop as tr
    from toydiff import methods
    from toydiff.methods.ddpm import Denoising
    from toydiff.core.runtime import derive_seed, torch_generator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        model = build_model(cfg.model, 2, cfg.schedule.T)
    shadow = {k: v.clone() for k, v in model.state_dict().items()}
    k = {"n": 0}
    x0 = torch.as_tensor(run.scaler.transform(run.data.astype(np.float64)), dtype=torch.float32)
    original_step = torch.optim.AdamW.step

    def step_and_average(self, *a, **kw):
        """After the n-th optimizer step: copy at n = 1, then decay min(0.9, (1 + k) / (10 + k)) with k = n - 1."""
        out = original_step(self, *a, **kw)
        k["n"] += 1
        d = min(0.9, k["n"] / (9 + k["n"]))
        for name, v in model.state_dict().items():
            shadow[name] = v.clone() if k["n"] == 1 else d * shadow[name] + (1 - d) * v
        return out
    torch.optim.AdamW.step = step_and_average
    try:
        state = tr.make_state(model, cfg.train, methods.of(cfg).timesteps(cfg),
                              torch_generator(cfg.seed, "train"))
        tr.train(state, run.schedule, x0, cfg.train, Denoising.from_config(cfg))
    finally:
        torch.optim.AdamW.step = original_step
    stored = build_model(cfg.model, 2, cfg.schedule.T)
    load_weights(run.path / "model_ema.safetensors", stored)
    for name, v in stored.state_dict().items():
        assert torch.allclose(v, shadow[name], atol=1e-6), name
    assert not torch.allclose(stored.state_dict()["out.2.weight"], model.state_dict()["out.2.weight"])


def test_clipping_keeps_samples_in_the_training_datas_box(trained):
    """ddpm's last step returns x0_hat itself, so clipped samples lie inside the data's per-axis range."""
    lo, hi = trained.data.min(0), trained.data.max(0)
    free = trained.sample(2000, seed=0, clip=False)
    boxed = trained.sample(2000, seed=0, clip=True)
    assert np.all(boxed >= lo - 1e-5) and np.all(boxed <= hi + 1e-5)
    assert np.any(free < lo) or np.any(free > hi)  # a barely trained model strays, so clipping did something


def test_sample_steps_is_a_most_and_spacing_auto_follows_the_sampler(trained):
    """sample.steps >= T walks the whole schedule (the default 50 on a T = 8 run); auto spacing is trailing
    for ddpm and diffusers' schedulers, Karras sigmas for the ODE / SDE solvers."""
    from toydiff.diffusion.sampling import resolve_spacing, sampling_steps
    assert trained.schedule.T == 8
    assert [sampling_steps(s, 8) for s in (0, 1, 7, 8, 9, 50)] == [8, 1, 7, 8, 8, 8]
    for sampler in ("ddpm", "dpmpp-3m-sde"):
        whole = trained.sample(50, seed=2, sampler=sampler, steps=0)
        assert np.array_equal(trained.sample(50, seed=2, sampler=sampler, steps=50), whole)
        assert np.array_equal(trained.sample(50, seed=2, sampler=sampler, steps=8), whole)
        assert not np.array_equal(trained.sample(50, seed=2, sampler=sampler, steps=4), whole)
    assert resolve_spacing("auto", "ddpm") == "trailing"
    assert resolve_spacing("auto", "diffusers:DDIMScheduler") == "trailing"
    assert {resolve_spacing("auto", s) for s in ("ddim", "euler", "heun", "dpmpp-2m", "dpmpp-3m-sde")} == {"karras"}
    assert resolve_spacing("linspace", "dpmpp-2m") == "linspace"
    with pytest.raises(ToydiffError, match="unknown sample.spacing 'even'; choose one of: auto, trailing"):
        resolve_spacing("even", "ddpm")
    with pytest.raises(ToydiffError, match="steps must be >= 0"):
        trained.sample(5, steps=-1)


@pytest.mark.slow
def test_compiled_sampling_draws_the_eager_samples(trained):
    """sample(compile=True) runs the same network through torch.compile: same samples to float32 rounding."""
    eager = trained.sample(300, seed=4, sampler="dpmpp-3m-sde", steps=6)
    compiled = trained.sample(300, seed=4, sampler="dpmpp-3m-sde", steps=6, compile=True)
    assert np.allclose(compiled, eager, rtol=1e-4, atol=1e-4)


def test_a_failing_torch_compile_is_one_clear_error(trained, monkeypatch):
    def broken(model):
        def fail(*args, **kwargs):
            raise torch._dynamo.exc.TorchDynamoException("no C++ compiler found\ndetails")
        return fail
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(ToydiffError, match=r"torch.compile failed \(no C\+\+ compiler found\); sample without "):
        trained.sample(10, compile=True)


def test_samples_streamed_into_a_memory_map_equal_the_in_memory_ones_in_one_batchs_memory(tmp_path):
    """`toydiff sample --out FILE.npy` writes each batch into a memory-mapped .npy: the same float32 values as
    drawing in memory and saving, while Python allocates about one batch, not the n x D buffer."""
    import tracemalloc

    from toydiff.cli import main
    from toydiff.core.files import npy_writer
    run = train_run(C.with_overrides(C.ExperimentConfig(), ["data.n=256", "schedule.T=20", "model.width=16",
                                                            "model.depth=1", "train.steps=5"]), tmp_path / "r")
    n = 400_000
    tracemalloc.start()
    with npy_writer(tmp_path / "streamed.npy", (n, 2)) as into:
        run.sample(n, seed=3, batch_size=8192, sampler="ddim", steps=5, into=into)
    streamed_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    in_memory = run.sample(n, seed=3, batch_size=8192, sampler="ddim", steps=5)
    memory_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(np.load(tmp_path / "streamed.npy"), in_memory.astype(np.float32))
    assert streamed_peak < 8 * n and memory_peak > 8 * n * 2, (streamed_peak, memory_peak)  # 6.4 MB of float64
    assert not list(tmp_path.glob(".*.tmp"))
    assert main(["sample", str(tmp_path / "r"), "--n", "1000", "--seed", "3", "--sampler", "ddim", "--steps", "5",
                 "--out", str(tmp_path / "cli.npy"), "--quiet"]) == 0
    assert np.array_equal(np.load(tmp_path / "cli.npy"), in_memory[:1000].astype(np.float32))
