"""CUDA graphs (toydiff.training.graphs) without a GPU: the choice of when to capture, and the bookkeeping around a capture
(the training step's checked replays, the sampling loop's recorded noise) run on the CPU with a stand-in graph
that replays by running the captured Python again. A faulty stand-in shows that a graph computing anything
else is caught and never used. The one CUDA-only assertion (a real capture) skips without a GPU;
benchmarks/gpu.py measures the real thing."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from toydiff.core import config as C
from toydiff.training import graphs
from toydiff import train_run
from toydiff.core.errors import ToydiffError
from toydiff.diffusion.losses import ImportanceTimesteps
from toydiff.methods.ddpm import Denoising, ddpm_timesteps
from toydiff.diffusion.models import build_model
from toydiff.diffusion.schedules import NoiseSchedule
from toydiff.training.loop import capturable, make_state, step_tensors, train

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


class ReplayByRerun:
    """A stand-in for graphs.Graph on the CPU: capture runs nothing, each replay runs the captured function."""

    def __init__(self, fn, stream, generators=()):
        self.fn, self.outputs = fn, None

    def replay(self):
        self.outputs = self.fn()
        return self.outputs


class ReplayNothing(ReplayByRerun):
    """A broken graph: its replays do no work at all, and its output tensor stays as allocated."""

    def replay(self):
        return torch.zeros(0)


class ReplayStaleNoise(ReplayByRerun):
    """A broken graph whose random draws never advance: every replay draws what the capture-time generator
    state gives (a generator that was not registered with the graph)."""

    def __init__(self, fn, stream, generators=()):
        super().__init__(fn, stream, generators)
        self.generators = list(generators)
        self.states = [g.get_state() for g in self.generators]

    def replay(self):
        for g, s in zip(self.generators, self.states):
            g.set_state(s)
        return super().replay()


@pytest.fixture
def on_cpu(monkeypatch):
    """Let the graph paths run on the CPU with the given stand-in for graphs.Graph."""
    def use(graph_class):
        monkeypatch.setattr(graphs, "wanted", lambda mode, device, setting, blocker=None: mode != "off")
        monkeypatch.setattr(graphs, "Graph", graph_class)
    return use


def test_wanted_follows_the_mode_the_device_and_the_blocker():
    assert not graphs.wanted("off", CUDA, "train.cuda_graphs")
    assert graphs.wanted("auto", CUDA, "train.cuda_graphs") and graphs.wanted("on", CUDA, "train.cuda_graphs")
    assert not graphs.wanted("auto", CPU, "train.cuda_graphs")
    assert not graphs.wanted("auto", CUDA, "train.cuda_graphs", "it cannot")
    with pytest.raises(ToydiffError, match="train.cuda_graphs = on, but CUDA graphs need a CUDA device.*auto"):
        graphs.wanted("on", CPU, "train.cuda_graphs")
    with pytest.raises(ToydiffError, match="sample.cuda_graphs = on, but the ode solver picks its steps"):
        graphs.wanted("on", CUDA, "sample.cuda_graphs", "the ode solver picks its steps on the host")
    with pytest.raises(ToydiffError, match="sample.cuda_graphs.*auto, on, off"):
        graphs.wanted("sometimes", CUDA, "sample.cuda_graphs")


def test_same_tells_identical_from_close_from_different():
    a = [torch.tensor([1.0, 2.0])]
    assert graphs.same(a, [torch.tensor([1.0, 2.0])]) == "bit-identical"
    assert graphs.same(a, [torch.tensor([1.0, 2.000001])]) == "within float tolerance"
    assert graphs.same(a, [torch.tensor([1.0, 2.1])]) == ""
    assert graphs.same(a, [torch.tensor([1.0])]) == "" and graphs.same(a, a + a) == ""
    nan = [torch.tensor([float("nan"), 1.0])]
    assert graphs.same(nan, [torch.tensor([float("nan"), 1.0])]) == "within float tolerance"
    assert graphs.same(nan, [torch.tensor([0.0, 1.0])]) == ""


def _training(cfg, timestep_sampling="uniform", steps=40):
    cfg = dataclasses.replace(cfg.train, steps=steps, log_every=10, timestep_sampling=timestep_sampling,
                              warmup_steps=5)
    schedule = NoiseSchedule.from_config(C.ScheduleConfig(T=20))
    torch.manual_seed(0)
    model = build_model(C.ModelConfig(width=16, depth=1), 2, 20)
    state = make_state(model, cfg, ddpm_timesteps(cfg.timestep_sampling, 20), torch.Generator().manual_seed(1))
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(2))
    return state, schedule, x0, cfg


def _trained(cfg, mode, sampling="uniform"):
    state, schedule, x0, tcfg = _training(cfg, sampling)
    rows = train(state, schedule, x0, dataclasses.replace(tcfg, cuda_graphs=mode), Denoising("eps"))
    return state, rows


@pytest.mark.parametrize("sampling", ["uniform", "importance"])
def test_a_correct_graph_is_checked_twice_then_used_and_trains_like_eager(tiny_cfg, on_cpu, sampling):
    eager, eager_rows = _trained(tiny_cfg, "off", sampling)
    on_cpu(ReplayByRerun)
    graphed, rows = _trained(tiny_cfg, "auto", sampling)
    assert graphed.graphs == "captured in a CUDA graph (bit-identical to the eager step where checked)"
    # the capturable optimizer computes its bias corrections on the device, in float32: the same training
    # to float rounding (an error in the bookkeeping, a step run twice or skipped, is far larger)
    assert [r["step"] for r in rows] == [r["step"] for r in eager_rows]
    assert np.allclose([r["loss"] for r in rows], [r["loss"] for r in eager_rows], rtol=1e-4)
    for a, b in zip(step_tensors(graphed), step_tensors(eager)):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6)
    assert graphed.ema._count == eager.ema._count == 40 and int(graphed.ema.n_averaged) == 40


@pytest.mark.parametrize("broken", [ReplayNothing, ReplayStaleNoise])
def test_a_graph_that_computes_anything_else_is_never_used(tiny_cfg, on_cpu, broken):
    """A replay that does nothing fails the first check; one whose noise never advances passes the first (it
    is captured from the very state the check starts at) and fails the second. Either way the eager result
    is kept, and training ends exactly where a correct graph (or the eager steps) would."""
    on_cpu(ReplayByRerun)
    good, good_rows = _trained(tiny_cfg, "auto")
    on_cpu(broken)
    fell_back, rows = _trained(tiny_cfg, "auto")
    assert fell_back.graphs == "eager: the replayed step computed other values than the eager step"
    assert rows == [{**r, "seconds": s["seconds"]} for r, s in zip(good_rows, rows)]
    for a, b in zip(step_tensors(fell_back), step_tensors(good)):
        assert torch.equal(a, b)
    with pytest.raises(ToydiffError, match="train.cuda_graphs = on, but the replayed step computed other values"):
        _trained(tiny_cfg, "on")


def test_a_step_that_cannot_be_captured_runs_eagerly(tiny_cfg, on_cpu, monkeypatch):
    def refuses(fn, stream, generators=()):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")
    on_cpu(refuses)
    state, _ = _trained(tiny_cfg, "auto")
    assert state.graphs == "eager: the step could not be captured (operation not permitted when stream is capturing)"
    with pytest.raises(ToydiffError, match="train.cuda_graphs = on, but the step could not be captured"):
        _trained(tiny_cfg, "on")


def test_a_capturable_optimizer_checkpoints_as_a_plain_one(tiny_cfg):
    state, schedule, x0, cfg = _training(tiny_cfg, steps=10)
    capturable(state.optimizer)
    train(state, schedule, x0, cfg, Denoising("eps"))
    tensors, meta = state.tensors()
    groups = json.loads(meta["param_groups"])
    assert groups[0]["capturable"] is False and isinstance(groups[0]["lr"], float)
    fresh, *_ = _training(tiny_cfg, steps=10)
    fresh.restore(tensors, meta, steps=10)
    assert fresh.optimizer.param_groups[0]["capturable"] is False
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(float(state.optimizer.param_groups[0]["lr"]))
    assert all(torch.equal(a, b) for a, b in zip(step_tensors(fresh), step_tensors(state)))


def test_the_importance_sampler_updates_its_tensors_in_place():
    """A graph replays writes into the tensors it captured: an update that rebinds them would be lost."""
    ts = ImportanceTimesteps(5, history=1)
    moment, seen = ts.second_moment, ts.seen
    ts.update(torch.tensor([1, 2]), torch.tensor([1.0, 2.0]))
    assert ts.second_moment is moment and ts.seen is seen and float(moment[2]) == 4.0


# --- sampling ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, unchanged):
    from conftest import TINY
    cfg = C.with_overrides(C.ExperimentConfig(), TINY + ["model.conditional=true"])
    run = train_run(cfg, tmp_path_factory.mktemp("graphs") / "run")
    unchanged(run.path)
    return run


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp-3m-sde", "ddim"])
def test_replayed_batches_draw_exactly_the_eager_noise(trained, on_cpu, sampler):
    """Three full batches and a partial one: the first full batch runs eagerly and is captured, the next two
    replay with their own noise copied in, the partial one (a shape seen once) runs eagerly."""
    eager = trained.sample(250, seed=4, batch_size=64, sampler=sampler, steps=6, cuda_graphs="off")
    on_cpu(ReplayByRerun)
    replayed = trained.draw(250, seed=4, batch_size=64, sampler=sampler, steps=6, cuda_graphs="auto")
    assert np.array_equal(replayed.samples, eager)
    note = replayed.record["cuda_graphs"]
    assert note == "captured in a CUDA graph per batch shape (bit-identical to the eager loop where checked)"
    assert replayed.record["nfe"] == 6


def test_a_single_batch_is_not_worth_a_capture_unless_asked(trained, on_cpu):
    on_cpu(ReplayByRerun)
    drawn = trained.draw(64, seed=1, batch_size=64, cuda_graphs="auto")
    assert drawn.record["cuda_graphs"].startswith("eager: no batch shape came twice")
    drawn = trained.draw(64, seed=1, batch_size=64, cuda_graphs="on")
    assert drawn.record["cuda_graphs"].startswith("captured")


def test_a_sampling_graph_that_computes_anything_else_is_never_used(trained, on_cpu):
    eager = trained.sample(200, seed=2, batch_size=50, cuda_graphs="off")
    on_cpu(ReplayNothing)
    drawn = trained.draw(200, seed=2, batch_size=50, cuda_graphs="auto")
    assert np.array_equal(drawn.samples, eager)
    assert drawn.record["cuda_graphs"] == \
        "eager: the replayed sampling loop computed other samples than the eager loop"
    with pytest.raises(ToydiffError, match="sample.cuda_graphs = on, but the replayed sampling loop"):
        trained.sample(200, seed=2, batch_size=50, cuda_graphs="on")


def test_graphs_are_refused_where_the_host_steps_the_loop(trained, on_cpu):
    assert trained.plan(trained.settings(sampler="ode")).graph_blocker == "the ode solver picks its steps on the host"
    assert trained.plan(trained.settings(sampler="ddim")).graph_blocker is None
    with pytest.raises(ToydiffError, match="sample.cuda_graphs = on, but CUDA graphs need a CUDA device"):
        trained.sample(10, cuda_graphs="on")


def test_bf16_sampling_runs_the_network_in_bfloat16_and_stays_close(trained):
    full = trained.sample(500, seed=3, sampler="ddim", steps=8)
    half = trained.sample(500, seed=3, sampler="ddim", steps=8, autocast="bf16")
    assert np.isfinite(half).all() and not np.array_equal(half, full)
    spread = full.std(0)
    assert np.abs(half - full).mean(0).max() < 0.05 * spread.max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real CUDA graph needs a GPU (benchmarks/gpu.py)")
def test_a_real_capture_trains_and_samples_like_eager(tiny_cfg, tmp_path):
    cfg = C.with_overrides(tiny_cfg, ["train.device=cuda", "train.steps=60"])
    graphed = train_run(cfg, tmp_path / "on")
    eager = train_run(C.with_overrides(cfg, ["train.cuda_graphs=off"]), tmp_path / "off")
    info = json.loads((graphed.path / "run.json").read_text())
    assert info["cuda_graphs"].startswith("captured")
    assert abs(info["final_loss"] - json.loads((eager.path / "run.json").read_text())["final_loss"]) < 1e-3
    a = graphed.sample(3000, seed=1, batch_size=1000, cuda_graphs="on")
    b = graphed.sample(3000, seed=1, batch_size=1000, cuda_graphs="off")
    assert np.array_equal(a, b)


def test_the_gpu_benchmark_runs_its_smoke_version_on_the_cpu(tmp_path):
    """benchmarks/gpu.py --smoke: every section runs at tiny sizes, the CUDA-only cells say so, and `--device cuda`
    without CUDA is the one-line error with exit code 2 (issue #17 item 5)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks/gpu.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    eager = [r for r in report["sampling"] if r["mode"] == "eager"]
    assert len(eager) == 8 and all(r["samples_per_s"] > 0 and r["of_ceiling"] > 0 for r in eager)
    assert {r["skipped"] for r in report["sampling"] if r["mode"] in ("graphs", "graphs+bf16")} == {"needs CUDA"}
    assert report["training"][0]["eager_ms"] > 0 and report["training"][0]["graphs"] == "needs CUDA"
    assert report["quality"][0]["verdict"]
    large = report["large"]
    assert large["code"] == 0 and large["file_mb"] * 2**20 >= large["n"] * 2 * 4
    assert report["no_cuda"]["code"] == 2 and "CUDA is not available" in report["no_cuda"]["stderr"]
    assert "\n" not in report["no_cuda"]["stderr"] and "Traceback" not in report["no_cuda"]["stderr"]
    assert "| sampling (ddim) |" in (tmp_path / "gpu.md").read_text()


def test_asking_for_graphs_without_cuda_is_one_line_before_anything_is_written(tmp_path, capsys):
    from conftest import TINY
    from toydiff.cli import main

    sets = [a for s in TINY for a in ("--set", s)]
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--device", "cpu", "--out", str(out), "--set", "train.cuda_graphs=on"] + sets) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("toydiff: error: train.cuda_graphs = on, but CUDA graphs need a CUDA device, and this runs on "
                   "cpu; set train.cuda_graphs = auto (or off)")
    assert not out.exists()
    assert main(["run", "--quiet", "--no-eval", "--out", str(out)] + sets) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"}  # the lock is opened
    assert main(["sample", str(out), "--n", "10", "--cuda-graphs", "on"]) == 2
    assert "sample.cuda_graphs = on, but CUDA graphs need a CUDA device" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"} == before
