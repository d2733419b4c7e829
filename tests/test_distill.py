"""`toydiff distill`: few-step students of a trained run (reflow, progressive, consistency)."""

import json

import numpy as np
import pytest
import torch

from toydiff.cli import main
from toydiff.core.config import ScheduleConfig
from toydiff.diffusion.losses import ddim_step, diffusion_loss
from toydiff.methods import consistency, progressive
from toydiff.methods.consistency import Consistency
from toydiff.methods.flow import FlowMatching
from toydiff.methods.progressive import Progressive, progressive_target
from toydiff.diffusion.schedules import NoiseSchedule, flow_betas


def test_the_reflow_loss_pairs_each_row_with_its_own_noise():
    """A reflow batch holds [x0 | eps] per row: the loss is the flow-matching MSE on exactly those pairs (no
    fresh noise), recomputed by hand from the same t draws."""
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(32, 2, generator=g), torch.randn(32, 2, generator=g)
    net = lambda x, t: 0.3 * x - 0.002 * t[:, None]  # noqa: E731
    loss = diffusion_loss(net, NoiseSchedule(flow_betas(100)),
                          torch.cat([x0, eps], 1), FlowMatching("v", coupling="reflow"),
                          torch.Generator().manual_seed(9))
    t = torch.rand(32, generator=torch.Generator().manual_seed(9))[:, None]
    x_t = (1 - t) * x0 + t * eps
    assert float(loss) == pytest.approx(float(((0.3 * x_t - 0.002 * t * 100 - (eps - x0)) ** 2).mean()), rel=1e-6)


def test_the_progressive_target_makes_one_ddim_step_land_where_the_teacher_s_two_do():
    """Salimans and Ho's x~ is the x0 whose one DDIM step from x_t reaches the teacher's two-step endpoint (for
    any teacher: here a nonlinear one), a point-mass teacher's target is the point itself, and the loss is
    max(SNR, 1) |x0_hat - x~|^2 recomputed by hand from the same draws, DDIM written out from its eq. 12."""
    schedule = NoiseSchedule.from_config(ScheduleConfig(T=100))
    grid = schedule.respace(8).timesteps_t
    teacher = lambda x, t: torch.tanh(x) * 0.7 + 0.01 * t[:, None]  # noqa: E731
    g = torch.Generator().manual_seed(4)
    x_t = torch.randn(64, 2, generator=g)
    for t, mid, end in ((8, 7, 6), (2, 1, 0)):
        ab = [schedule.alpha_bar[grid[k]].double() for k in (t, mid, end)]
        tt, tm = torch.full((64,), int(grid[t])), torch.full((64,), int(grid[mid]))
        x = x_t.double()
        x0a = teacher(x, tt)
        x_mid = ab[1].sqrt() * x0a + (1 - ab[1]).sqrt() * (x - ab[0].sqrt() * x0a) / (1 - ab[0]).sqrt()
        x_end = ddim_step(x_mid, teacher(x_mid, tm), ab[1], ab[2])
        target = progressive_target(x, x_end, ab[0], ab[2])
        assert torch.allclose(ddim_step(x, target, ab[0], ab[2]), x_end, atol=1e-9)
        point = torch.tensor([0.3, -1.2], dtype=torch.float64)
        x_end = ddim_step(ddim_step(x, point, ab[0], ab[1]), point, ab[1], ab[2])
        assert torch.allclose(progressive_target(x, x_end, ab[0], ab[2]), point.expand_as(x), atol=1e-9)
    student = lambda net, labels: (lambda x, t: net(x, t))  # noqa: E731
    net = lambda x, t: 0.5 * x - 0.003 * t[:, None]  # noqa: E731
    x0 = torch.randn(32, 2, generator=g)
    loss = diffusion_loss(net, schedule, x0, Progressive(lambda labels: teacher, student, grid),
                          torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)  # the loss's draws, in its order: the step index, then the noise
    i = torch.randint(1, 5, (32,), generator=g)
    eps = torch.randn(32, 2, generator=g)
    t, mid, end = grid[2 * i], grid[2 * i - 1], grid[2 * i - 2]
    ab_t, ab_m, ab_e = (schedule.alpha_bar[s][:, None] for s in (t, mid, end))
    x_t = ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * eps
    x_mid = ab_m.sqrt() * teacher(x_t, t) + (1 - ab_m).sqrt() * (x_t - ab_t.sqrt() * teacher(x_t, t)) / (1 - ab_t).sqrt()
    x0b = teacher(x_mid, mid)
    x_end = ab_e.sqrt() * x0b + (1 - ab_e).sqrt() * (x_mid - ab_m.sqrt() * x0b) / (1 - ab_m).sqrt()
    r = ((1 - ab_e) / (1 - ab_t)).sqrt()
    target = (x_end - r * x_t) / (ab_e.sqrt() - r * ab_t.sqrt())
    weight = (ab_t / (1 - ab_t))[:, 0].clamp_min(1)
    assert float(loss) == pytest.approx(float((weight * ((net(x_t, t) - target) ** 2).mean(1)).mean()), rel=1e-5)


def test_a_consistency_function_is_the_identity_at_zero_noise_by_construction():
    """A consistency student's f is its x0_hat: for a v or eps network (the ones distillation accepts),
    f(x, t = 0) = x exactly whatever the network outputs (Song et al. 2023's boundary condition), and the
    loss's target at t_0 = 0 is the teacher's DDIM endpoint itself, for a flow network too (which is never
    asked at s = 0): a student that outputs that endpoint at t_1 has zero loss there."""
    from toydiff.diffusion.parameterization import Denoiser

    net = lambda x, t: 5 * torch.sin(3 * x) + t[:, None]  # noqa: E731
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(1))
    schedule = NoiseSchedule.from_config(ScheduleConfig(T=100))
    for prediction in ("v", "eps"):
        assert torch.equal(Denoiser(net, schedule, prediction)(x, torch.zeros(50, dtype=torch.long)), x)
    flow = NoiseSchedule(flow_betas(100))
    grid = torch.tensor([0, 50])  # one pair: t_1 = 50 -> t_0 = 0
    teacher = lambda x, t: torch.tanh(x)  # noqa: E731  its DDIM step to t = 0 lands on tanh(x_t)
    oracle = lambda model: (lambda x, t: torch.tanh(x) if int(t[0]) == 50 else net(x, t))  # noqa: E731
    loss = diffusion_loss(None, flow, x, Consistency(lambda labels: teacher, lambda model, labels: oracle(model), grid),
                          torch.Generator().manual_seed(0))
    assert float(loss) == 0.0


def test_consistency_sampling_with_the_exact_consistency_function_draws_the_data_in_any_number_of_steps():
    """For data N(m, s^2 I) the probability-flow ODE maps x_t to x0 = m + s (x_t - sqrt(abar) m) /
    sqrt(abar s^2 + 1 - abar) (closed form): multistep consistency sampling with that f draws exactly
    N(m, s^2) after 1 step and after 5 (the fresh noise keeps each intermediate x_t on its marginal)."""
    from toydiff.diffusion.samplers import SAMPLERS

    m, s = torch.tensor([0.4, -0.7], dtype=torch.float64), 0.3
    g = torch.Generator().manual_seed(0)
    for steps in (1, 5):
        grid = NoiseSchedule.from_config(ScheduleConfig(T=200)).respace(steps)

        def exact(x, t):
            ab = grid.alpha_bar64[int(t[0])]
            return m + s * (x - ab**0.5 * m) / (ab * s**2 + 1 - ab) ** 0.5
        x_T = torch.randn(200_000, 2, generator=g, dtype=torch.float64)
        sample = SAMPLERS.get("consistency")(exact, grid, x_T, generator=g)
        assert torch.allclose(sample.mean(0), m, atol=0.003)
        assert torch.allclose(sample.std(0), torch.full((2,), s, dtype=torch.float64), atol=0.003)


@pytest.mark.parametrize("teacher", [lambda x, t: torch.tanh(x) * 0.7, None], ids=["distillation", "training"])
def test_the_consistency_loss_is_the_distance_between_neighbours_on_one_path(teacher):
    """Recomputed by hand from the same draws: n ~ U{1..N}, x_tn from q(x_t | x0), then x_tn-1 by the teacher's DDIM
    step (distillation) or, without a teacher, by the same noise one grid point lower (consistency training),
    and |f(x_tn, t_n) - f(x_tn-1, t_n-1)|^2 with f the student's x0_hat (v prediction), the target at t_0 = 0
    the point itself."""
    from toydiff.diffusion.parameterization import Denoiser

    schedule = NoiseSchedule.from_config(ScheduleConfig(T=100))
    grid = schedule.respace(10).timesteps_t
    net = lambda x, t: 0.5 * x - 0.003 * t[:, None]  # noqa: E731
    student = lambda model, labels: Denoiser(model, schedule, "v")  # noqa: E731
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    objective = Consistency(None if teacher is None else lambda labels: teacher, student, grid)
    loss = diffusion_loss(net, schedule, x0, objective, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    i = torch.randint(1, 11, (64,), generator=g)
    eps = torch.randn(64, 2, generator=g)
    t, s = grid[i], grid[i - 1]
    ab_t, ab_s = schedule.alpha_bar[t][:, None], schedule.alpha_bar[s][:, None]
    x_t = ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * eps
    if teacher is None:
        x_s = ab_s.sqrt() * x0 + (1 - ab_s).sqrt() * eps
    else:
        x0_t = teacher(x_t, t)
        x_s = ab_s.sqrt() * x0_t + (1 - ab_s).sqrt() * (x_t - ab_t.sqrt() * x0_t) / (1 - ab_t).sqrt()
    f = lambda x, tt, ab: ab.sqrt() * x - (1 - ab).sqrt() * net(x, tt)  # noqa: E731  x0 from v
    target = torch.where((s == 0)[:, None], x_s, f(x_s, s, ab_s))
    assert (s == 0).any()
    assert float(loss) == pytest.approx(float(((f(x_t, t, ab_t) - target) ** 2).mean()), rel=1e-5)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, unchanged):
    out = tmp_path_factory.mktemp("teacher") / "flow"
    assert main(["train", "--quiet", "--out", str(out), "--set", "schedule.process=flow", "--set", "train.steps=400",
                 "--set", "train.batch_size=256", "--set", "eval.n=500", "--set", "eval.draws=4",
                 "--set", "eval.nll_n=0"]) == 0  # a student inherits the teacher's [eval]: a quick one
    return unchanged(out)


@pytest.mark.slow
def test_a_reflow_student_is_a_complete_run_that_walks_straighter_paths(teacher, tmp_path):
    """The student's training rows are the teacher's ODE samples of its stored noise (recomputed here through
    the teacher's own plan), its run directory records the teacher, it samples in 4 evaluations by default,
    resumes like any run, and on the same noise its 4 Euler steps land nearer the teacher's ODE endpoints
    than the teacher's own 4 Euler steps do (the straightening reflow is for)."""
    import toydiff
    from toydiff.methods.reflow import TEACHER_SAMPLER

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
    assert t.pieces.count == 2  # the default's teacher draws the moons' two pieces: each pair keeps its own
    plan = t.plan(t.settings(**TEACHER_SAMPLER))
    x = t.scaler.inverse(plan.run(t.denoiser_for(torch.as_tensor(s.pieces.labels[:200])), z.clone(),
                                  noise=None).double().numpy())
    assert np.allclose(x, s.data[:200], atol=1e-4)
    # on fresh noise: the teacher's ODE endpoint, its own 4 Euler steps, and the student's 4 Euler steps
    fresh = torch.randn(2000, 2, generator=torch.Generator().manual_seed(11))
    pieces = torch.arange(2000) % 2
    endpoint = plan.run(t.denoiser_for(pieces), fresh.clone(), noise=None)
    few = t.settings(sampler="euler", steps=4, spacing="trailing")
    teacher_4 = t.plan(few).run(t.denoiser_for(pieces), fresh.clone(), noise=None)
    student_4 = s.plan().run(s.denoiser_for(pieces), fresh.clone(), noise=None)
    err = lambda a: float((a - endpoint).norm(dim=1).mean())  # noqa: E731
    assert err(student_4) < 0.6 * err(teacher_4), (err(student_4), err(teacher_4))
    assert main(["train", "--resume", str(out), "--quiet"]) == 0  # already trained: resumes to the same end


@pytest.mark.slow
def test_a_progressive_student_takes_in_k_steps_what_its_teacher_takes_in_2k(teacher, tmp_path, monkeypatch):
    """One round (the first grid set to 8 steps): on a fixed noise batch the student's 4 DDIM steps land nearer
    the teacher's 8 DDIM steps than the teacher's own 4 do; the run records its teacher and rounds, samples in 4
    evaluations, and cannot be resumed once cut short (its teachers were in memory)."""
    import toydiff

    monkeypatch.setattr(progressive, "PROGRESSIVE_START", 8)
    out = tmp_path / "student"
    assert main(["distill", str(teacher), "--out", str(out), "--method", "progressive", "--steps", "4",
                 "--train-steps", "1500", "--quiet"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["method"] == "progressive" and info["rounds"] == 1 and info["teacher_steps"] == 8
    assert json.loads((out / "metrics.json").read_text())["nfe"] == 4
    t, s = toydiff.load(teacher), toydiff.load(out)
    assert s.config.sample.sampler == "ddim" and s.config.sample.steps == 4
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    ddim = lambda run, k: run.plan(run.settings(sampler="ddim", steps=k, spacing="trailing")).run(  # noqa: E731
        run.denoiser, z.clone(), noise=None)
    teacher_8, teacher_4, student_4 = ddim(t, 8), ddim(t, 4), ddim(s, 4)
    err = lambda a: float((a - teacher_8).norm(dim=1).mean())  # noqa: E731
    assert err(student_4) < 0.2 * err(teacher_4), (err(student_4), err(teacher_4))
    manifest = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**manifest, "status": "training"}))
    with pytest.raises(toydiff.ToydiffError, match="cannot resume"):
        toydiff.resume_run(out)


@pytest.mark.slow
def test_a_consistency_student_maps_noise_to_the_end_of_its_teacher_s_ode_in_one_step(teacher, tmp_path):
    """The student's one evaluation f(x_T, T) lands nearer the teacher's ODE endpoint (its DDIM on the
    distillation grid) than the teacher's own one-step DDIM does; the run records its teacher, samples by
    multistep consistency sampling in 2 evaluations, and a student is not distilled again."""
    import toydiff

    out = tmp_path / "student"
    assert main(["distill", str(teacher), "--out", str(out), "--method", "consistency", "--steps", "2",
                 "--train-steps", "1500", "--quiet"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["method"] == "consistency" and info["grid"] == consistency.CONSISTENCY_GRID
    assert json.loads((out / "metrics.json").read_text())["nfe"] == 2
    t, s = toydiff.load(teacher), toydiff.load(out)
    assert s.config.sample.sampler == "consistency"
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    ddim = lambda k: t.plan(t.settings(sampler="ddim", steps=k, spacing="trailing")).run(  # noqa: E731
        t.denoiser, z.clone(), noise=None)
    endpoint, one_step = ddim(consistency.CONSISTENCY_GRID), ddim(1)
    student = s.plan(s.settings(steps=1)).run(s.denoiser, z.clone(), noise=None)
    err = lambda a: float((a - endpoint).norm(dim=1).mean())  # noqa: E731
    assert err(student) < 0.5 * err(one_step), (err(student), err(one_step))
    assert main(["distill", str(out), "--out", str(tmp_path / "again"), "--method", "consistency"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "distill.steps must be >= 1"),
    (["--method", "reflw"], "did you mean 'reflow'"),
    (["--pairs", "1"], "distill.pairs must be >= 2"), (["--pairs", "1000000000"], "distill.pairs must be at most"),
    (["--train-steps", "0"], "--train-steps must be >= 1"),
    (["--method", "progressive", "--steps", "600"], "no room to halve"),
    (["--critic", "0.5"], "a critic needs a student whose sampler runs with gradients (progressive), not reflow"),
    (["--method", "consistency", "--critic", "1"], "not consistency; use --method progressive"),
    (["--method", "progressive", "--critic", "-1"], "distill.critic must be in [0, 100]"),
])
def test_bad_distill_input_is_a_one_line_error_and_writes_nothing(teacher, tmp_path, capsys, args, message):
    assert main(["distill", str(teacher), "--out", str(tmp_path / "s")] + args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "s").exists()


def test_what_cannot_be_distilled_is_refused(tmp_path, capsys):
    assert main(["distill", str(tmp_path / "nope"), "--out", str(tmp_path / "s")]) == 2
    assert "does not exist" in capsys.readouterr().err
    for prediction, method, message in (("eps", "progressive", "predicts x0 or v"),
                                        ("x0", "consistency", "predicts v or eps")):
        run = tmp_path / prediction
        assert main(["train", "--quiet", "--out", str(run), "--set", f"model.prediction={prediction}",
                     "--set", "train.steps=2", "--set", "schedule.T=64"]) == 0
        assert main(["distill", str(run), "--out", str(tmp_path / "s"), "--method", method]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
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


QUICK = ["--set", "train.steps=60", "--set", "train.batch_size=128", "--set", "data.n=500", "--set", "schedule.T=64",
         "--set", "eval.n=300", "--set", "eval.draws=3", "--set", "eval.nll_n=0"]


def test_a_run_with_a_distill_recipe_trains_its_teacher_beside_it_and_is_the_student(tmp_path):
    """`toydiff run` with [distill] (the fast preset's way): the configured run trains as the teacher at
    OUT-teacher, whose manifest names its student; OUT is the progressive student, which records the teacher,
    samples in distill.steps evaluations and carries no recipe of its own (it is not distilled again)."""
    import toydiff

    out = tmp_path / "fast"
    assert main(["run", "--quiet", "--out", str(out), "--set", "distill.method=progressive", "--set", "distill.steps=2",
                 "--set", "distill.train_steps=50"] + QUICK) == 0
    teacher = tmp_path / "fast-teacher"
    assert json.loads((teacher / "run.json").read_text())["student"] == str(out.resolve())
    info = json.loads((out / "run.json").read_text())
    assert info["method"] == "progressive" and info["teacher"] == str(teacher.resolve()) and info["rounds"] == 5
    assert json.loads((out / "metrics.json").read_text())["nfe"] == 2
    student = toydiff.load(out)
    assert student.config.distill.method == "none" and student.config.sample.steps == 2
    assert toydiff.load(teacher).config.distill.method == "progressive"


def test_resuming_a_teacher_goes_on_to_its_student(tmp_path):
    """A teacher whose student was never made (the command cut short after training) makes it on resume."""
    from toydiff.core.config import ExperimentConfig, merged
    from toydiff.runs.directory import teacher_path
    from toydiff.jobs.experiment import run_experiment
    from toydiff.jobs.workflow import train_run

    out = tmp_path / "fast"
    cfg = merged(ExperimentConfig(), {
        "train": {"steps": 30, "batch_size": 128}, "data": {"n": 300}, "schedule": {"process": "flow", "T": 64},
        "eval": {"n": 300, "draws": 3, "nll_n": 0}, "distill": {"method": "reflow", "pairs": 300,
                                                                 "train_steps": 20}})
    train_run(cfg, teacher_path(out), extra={"student": str(out.resolve())})
    assert not out.exists()
    result = run_experiment(None, teacher_path(out), resume=True, figures=False)
    assert result.path == out.resolve() and json.loads((out / "run.json").read_text())["method"] == "reflow"
    assert json.loads((out / "metrics.json").read_text())["nfe"] == 4


@pytest.mark.parametrize("setting, message", [
    ("model.prediction=eps", "predicts x0 or v"),
    ("distill.steps=0", "distill.steps must be >= 1"),
    ("distill.method=progresive", "did you mean 'progressive'"),
    ("distill.steps=40", "no room to halve"),
    ("distill.critic=nan", "distill.critic must be a finite number"),
])
def test_a_recipe_that_cannot_be_distilled_is_refused_before_the_teacher_trains(tmp_path, capsys, setting, message):
    out = tmp_path / "fast"
    assert main(["run", "--out", str(out), "--set", "distill.method=progressive", "--set", setting] + QUICK) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists() and not (tmp_path / "fast-teacher").exists()


def test_the_fast_preset_is_a_few_step_recipe():
    from toydiff.core.config import preset
    cfg = preset("fast")
    assert cfg.distill.method == "progressive" and cfg.distill.steps <= 4 and cfg.model.prediction in ("v", "x0")


def test_a_consistency_trained_run_samples_by_consistency_sampling(tmp_path, capsys):
    """`toydiff run --set train.objective=consistency` (the settings in either order) trains with no teacher,
    warns that it is experimental, and its samples record the sampler's evaluations; a sampler that reads
    x0_hat as a posterior mean, or an x0 network, is refused before anything is written."""
    out = tmp_path / "ct"
    for first, second in (("train.objective=consistency", "sample.sampler=consistency"),
                          ("sample.sampler=consistency", "train.objective=consistency")):
        assert main(["config", "--set", first, "--set", second]) == 0
    capsys.readouterr()
    assert main(["run", "--out", str(out), "--set", "train.objective=consistency", "--set",
                 "sample.sampler=consistency", "--set", "sample.steps=2"] + QUICK) == 0
    assert "consistency training is experimental" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["nfe"] == 2
    for setting, message in (("sample.sampler=euler", "set sample.sampler=consistency"),
                             ("model.prediction=x0", "needs model.prediction = v or eps")):
        assert main(["run", "--out", str(tmp_path / "bad"), "--set", "train.objective=consistency",
                     "--set", "sample.sampler=consistency", "--set", setting]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "bad").exists()


def test_the_python_api_reuses_or_replaces_a_recipe_s_two_run_directories(tmp_path):
    """toydiff.run with a [distill] recipe: if_exists="reuse" compares the teacher's configuration (the student's
    is its own) and keeps the student; "replace" deletes the teacher with its student."""
    import toydiff

    sections = dict(train={"steps": 30, "batch_size": 128}, data={"n": 300}, schedule={"process": "flow", "T": 64},
                    eval={"n": 300, "draws": 3, "nll_n": 0},
                    distill={"method": "reflow", "pairs": 300, "train_steps": 20})
    out = tmp_path / "fast"
    first = toydiff.run(out=out, quiet=True, figures=False, **sections)
    again = toydiff.run(out=out, quiet=True, figures=False, if_exists="reuse", **sections)
    assert again.path == first.path and again.report == first.report
    with pytest.raises(toydiff.ToydiffError, match="another configuration"):
        toydiff.run(out=out, quiet=True, figures=False, if_exists="reuse", seed=1, **sections)
    stamp = (tmp_path / "fast-teacher" / "run.json").stat().st_mtime_ns
    toydiff.run(out=out, quiet=True, figures=False, if_exists="replace", **sections)
    assert (tmp_path / "fast-teacher" / "run.json").stat().st_mtime_ns != stamp


def test_the_critic_s_losses_are_the_non_saturating_game_with_r1_recomputed_by_hand():
    """On a fixed batch: the student's loss is its anchor's plus weight * mean softplus(-D(G(z))), the critic's is
    mean softplus(-D(x)) + mean softplus(D(G(z))) + gamma / 2 * mean |grad_x D(x)|^2, G(z) the chain from fresh
    noise drawn from the same generator; the student's gradient reaches the network through the whole chain."""
    from toydiff.core.config import ExperimentConfig
    from toydiff.methods.adversarial import Adversarial, make_critic

    class Anchor:
        def loss(self, model, schedule, x0, generator=None, **kw):
            return (model(x0, None) ** 2).mean()

    critic = make_critic(ExperimentConfig(), 2, torch.device("cpu"))
    net = torch.nn.Linear(2, 2)
    model = lambda x, t: net(x)  # noqa: E731
    chain = lambda m, x, labels: m(torch.tanh(m(x, None)), None)  # noqa: E731  two "steps"
    objective = Adversarial(Anchor(), critic, chain, weight=0.3, gamma=2.0)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    student = objective.loss(model, None, x0, torch.Generator().manual_seed(5))
    judge = objective.update_loss("critic", model, None, x0, torch.Generator().manual_seed(5))
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(5))
    fake = net(torch.tanh(net(z)))
    sp = lambda v: torch.log1p(torch.exp(v))  # noqa: E731  softplus written out
    expected = (net(x0) ** 2).mean() + 0.3 * sp(-critic(fake)).mean()
    assert float(student.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    real = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(real).sum(), real)
    by_hand = sp(-critic(x0)).mean() + sp(critic(fake.detach())).mean() + 1.0 * (grad ** 2).sum(1).mean()
    assert float(judge.detach()) == pytest.approx(float(by_hand.detach()), rel=1e-5)
    net.zero_grad()
    (0.3 * sp(-critic(fake)).mean()).backward(retain_graph=True)
    through_chain = net.weight.grad.clone()
    net.zero_grad()
    (student - (net(x0) ** 2).mean()).backward()
    assert torch.allclose(net.weight.grad, through_chain, atol=1e-6) and through_chain.abs().sum() > 0
    # the critic's loss moves the critic only: the fake is detached from the student
    net.zero_grad()
    objective.update_loss("critic", model, None, x0, torch.Generator().manual_seed(5)).backward()
    assert net.weight.grad is None or float(net.weight.grad.abs().sum()) == 0.0


def test_a_progressive_student_trained_with_a_critic_samples_as_its_chain_and_keeps_the_critic_out(tmp_path):
    """The chain the critic judges is the student's own sampler (its 4 DDIM steps, the same points on the same
    noise and pieces); the critic trains beside it (in the checkpoint, named in run.json), never in what
    samples; the student draws in 4 evaluations."""
    from safetensors.torch import load_file

    from toydiff import Run
    from toydiff.methods import STUDENTS

    teacher = tmp_path / "t"
    assert main(["train", "--quiet", "--out", str(teacher), "--set", "schedule.T=200", "--set", "train.steps=200",
                 "--set", "train.batch_size=256", "--set", "data.n=2000"]) == 0
    out = tmp_path / "s"
    assert main(["distill", str(teacher), "--out", str(out), "--method", "progressive", "--steps", "4",
                 "--train-steps", "300", "--critic", "0.5", "--quiet", "--no-eval"]) == 0
    s = Run.load(out)
    info = json.loads((out / "run.json").read_text())
    assert info["critic"] == 0.5 and info["method"] == "progressive"
    assert not any("critic" in k for k in load_file(out / "model.safetensors"))
    assert any(k.startswith("nets/critic/") for k in load_file(out / "checkpoint.safetensors"))
    z = torch.randn(300, 2, generator=torch.Generator().manual_seed(2))
    pieces = torch.arange(300) % 2
    with torch.no_grad():
        chained = STUDENTS.get("progressive").chain(s, 4)(s.model, z.clone(), pieces)
    sampled = s.plan().run(s.denoiser_for(pieces), z.clone(), noise=None)
    assert torch.allclose(chained, sampled, atol=1e-5)
    assert json.loads((out / "samples.json").read_text())["nfe"] == 4
