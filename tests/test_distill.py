"""`toydiff distill`: few-step students of a trained run (reflow so far)."""

import json

import numpy as np
import pytest
import torch

from toydiff.cli import main
from toydiff.config import ScheduleConfig
from toydiff.losses import Objective, diffusion_loss
from toydiff.schedules import NoiseSchedule


def test_the_reflow_loss_pairs_each_row_with_its_own_noise():
    """A reflow batch holds [x0 | eps] per row: the loss is the flow-matching MSE on exactly those pairs (no
    fresh noise), recomputed by hand from the same t draws."""
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(32, 2, generator=g), torch.randn(32, 2, generator=g)
    net = lambda x, t: 0.3 * x - 0.002 * t[:, None]  # noqa: E731
    loss = diffusion_loss(net, NoiseSchedule.from_config(ScheduleConfig(process="flow", T=100)),
                          torch.cat([x0, eps], 1), Objective("v", process="flow", coupling="reflow"),
                          torch.Generator().manual_seed(9))
    t = torch.rand(32, generator=torch.Generator().manual_seed(9))[:, None]
    x_t = (1 - t) * x0 + t * eps
    assert float(loss) == pytest.approx(float(((0.3 * x_t - 0.002 * t * 100 - (eps - x0)) ** 2).mean()), rel=1e-6)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "flow"
    assert main(["train", "--quiet", "--out", str(out), "--set", "schedule.process=flow", "--set", "train.steps=400",
                 "--set", "train.batch_size=256", "--set", "eval.n=500", "--set", "eval.draws=4",
                 "--set", "eval.nll_n=0"]) == 0  # a student inherits the teacher's [eval]: a quick one
    return out


@pytest.mark.slow
def test_a_reflow_student_is_a_complete_run_that_walks_straighter_paths(teacher, tmp_path):
    """The student's training rows are the teacher's ODE samples of its stored noise (recomputed here through
    the teacher's own plan), its run directory records the teacher, it samples in 4 evaluations by default,
    resumes like any run, and on the same noise its 4 Euler steps land nearer the teacher's ODE endpoints
    than the teacher's own 4 Euler steps do (the straightening reflow is for)."""
    import toydiff
    from toydiff.distill import TEACHER_SAMPLER

    out = tmp_path / "student"
    assert main(["distill", str(teacher), "--out", str(out), "--steps", "4", "--pairs", "3000", "--train-steps",
                 "400", "--quiet"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["teacher"] == str(teacher.resolve()) and info["method"] == "reflow" and info["pairs"] == 3000
    report = json.loads((out / "metrics.json").read_text())
    assert report["nfe"] == 4
    t, s = toydiff.load(teacher), toydiff.load(out)
    assert s.config.train.coupling == "reflow" and s.config.sample.steps == 4
    z = torch.as_tensor(np.load(out / "train_noise.npy")[:200])
    plan = t.plan(t.settings(**TEACHER_SAMPLER))
    x = t.scaler.inverse(plan.run(t.denoiser, z.clone(), noise=None).double().numpy())
    assert np.allclose(x, s.data[:200], atol=1e-4)
    # on fresh noise: the teacher's ODE endpoint, its own 4 Euler steps, and the student's 4 Euler steps
    fresh = torch.randn(2000, 2, generator=torch.Generator().manual_seed(11))
    endpoint = plan.run(t.denoiser, fresh.clone(), noise=None)
    few = t.settings(sampler="euler", steps=4, spacing="trailing")
    teacher_4 = t.plan(few).run(t.denoiser, fresh.clone(), noise=None)
    student_4 = s.plan().run(s.denoiser, fresh.clone(), noise=None)
    err = lambda a: float((a - endpoint).norm(dim=1).mean())  # noqa: E731
    assert err(student_4) < 0.6 * err(teacher_4), (err(student_4), err(teacher_4))
    assert main(["train", "--resume", str(out), "--quiet"]) == 0  # already trained: resumes to the same end


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--method", "reflw"], "did you mean 'reflow'"),
    (["--pairs", "1"], "--pairs must be >= 2"),
    (["--train-steps", "0"], "--train-steps must be >= 1"),
])
def test_bad_distill_input_is_a_one_line_error_and_writes_nothing(teacher, tmp_path, capsys, args, message):
    assert main(["distill", str(teacher), "--out", str(tmp_path / "s")] + args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "s").exists()


def test_what_cannot_be_distilled_is_refused(tmp_path, capsys):
    assert main(["distill", str(tmp_path / "nope"), "--out", str(tmp_path / "s")]) == 2
    assert "does not exist" in capsys.readouterr().err
    cond = tmp_path / "cond"
    assert main(["train", "--quiet", "--out", str(cond), "--set", "model.conditional=true", "--set", "train.steps=2",
                 "--set", "schedule.T=4"]) == 0
    assert main(["distill", str(cond), "--out", str(tmp_path / "s")]) == 2
    assert "class-conditional run is not supported yet" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path / "r"), "--set", "schedule.process=flow",
                 "--set", "train.coupling=reflow"]) == 2
    assert "toydiff distill TEACHER_RUN --method reflow" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


def test_a_reflow_run_without_its_noise_is_a_damaged_run(teacher, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["distill", str(teacher), "--out", str(out), "--pairs", "300", "--train-steps", "20", "--no-eval",
                 "--quiet"]) == 0
    (out / "checkpoint.safetensors").unlink()  # nothing saved: resume trains from the start, and needs the pairs
    (out / "train_noise.npy").unlink()
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train_noise.npy" in err and "toydiff distill" in err
