"""MeanFlow (train.objective = meanflow; Geng et al. 2025): its loss recomputed by hand, its sampler and denoiser
driven by the exact mean velocity of Gaussian data (closed form written out here), and the run that trains it."""

import json

import pytest
import torch
from torch import nn

from toydiff.cli import main
from toydiff.diffusion.losses import diffusion_loss
from toydiff.methods.meanflow import MEANFLOW_C, MEANFLOW_POWER, MEANFLOW_RATIO, MeanFlow
from toydiff.diffusion.parameterization import MeanFlowDenoiser
from toydiff.diffusion.samplers import SAMPLERS
from toydiff.diffusion.sampling import VPDiffusion
from toydiff.diffusion.schedules import NoiseSchedule, flow_betas

T = 100
M, S = torch.tensor([0.6, -0.4], dtype=torch.float64), 0.3  # the data: N(M, S^2 I)


class ExactMeanFlow(nn.Module):
    """u(z, r, t) of data N(M, S^2 I) on the path x_t = (1 - t) x0 + t eps: the marginal at t is N(mu_t, sd_t^2 I),
    mu_t = (1 - t) M, sd_t^2 = (1 - t)^2 S^2 + t^2, and the flow's ODE is the affine map between marginals,
    x_r = mu_r + (sd_r / sd_t) (z - mu_t), so the mean velocity over [r, t] is (z - x_r) / (t - r), and at r = t
    the instantaneous velocity d/dt of that map. Called like a mean-flow network: times in units of T."""

    @staticmethod
    def moments(t):
        return (1 - t)[:, None] * M, (((1 - t) ** 2 * S**2 + t**2) ** 0.5)[:, None]

    def velocity(self, z, t):
        mu, sd = self.moments(t)
        dsd = (-(1 - t) * S**2 + t)[:, None] / sd  # d sd_t / dt
        return -M + dsd / sd * (z - mu)

    def forward(self, z, t_net, h=None):
        t = (t_net / T).double().expand(z.shape[0])
        if h is None:
            return self.velocity(z, t)
        r = t - (h / T).double().expand(z.shape[0])
        mu_t, sd_t = self.moments(t)
        mu_r, sd_r = self.moments(r)
        x_r = mu_r + sd_r / sd_t * (z - mu_t)
        return torch.where((t > r)[:, None], (z - x_r) / (t - r).clamp_min(1e-12)[:, None], self.velocity(z, t))


def test_the_exact_mean_velocity_satisfies_the_meanflow_identity():
    """u(z, r, t) = v(z, t) - (t - r) du/dt along the flow (dz/dt = v, r fixed): the identity the loss's target
    rests on, checked on the closed form with torch.func.jvp as the loss takes it."""
    net = ExactMeanFlow()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, 2, generator=g, dtype=torch.float64)
    t = 0.2 + 0.75 * torch.rand(256, generator=g, dtype=torch.float64)
    r = t * torch.rand(256, generator=g, dtype=torch.float64)
    v = net.velocity(z, t)
    u, du_dt = torch.func.jvp(lambda z_, t_, h_: net(z_, t_ * T, h=h_ * T), (z, t, t - r),
                              (v, torch.ones_like(t), torch.ones_like(t)))
    assert torch.allclose(u, v - (t - r)[:, None] * du_dt, atol=1e-8)


def test_one_meanflow_step_on_the_exact_mean_velocity_draws_the_data():
    """sample_meanflow through MeanFlowDenoiser on the flow's grid: one step of the exact mean velocity maps noise
    to N(M, S^2 I) (the flow's whole ODE in one evaluation), where one Euler step of the instantaneous velocity
    (the same denoiser without r) does not."""
    schedule = NoiseSchedule(flow_betas(T))
    process = VPDiffusion(schedule)
    grid = process.grid(1, "trailing")
    denoise = process.denoise_on(grid, MeanFlowDenoiser(ExactMeanFlow(), schedule, "v"))
    x_T = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = SAMPLERS.get("meanflow")(denoise, grid, x_T.clone())
    assert torch.allclose(x.mean(0), M, atol=0.004) and torch.allclose(x.std(0), torch.full((2,), S).double(),
                                                                       atol=0.004)
    euler = SAMPLERS.get("euler")(denoise, grid, x_T.clone())
    assert (euler.std(0) - S).abs().min() > 0.1  # a curved path: the instantaneous velocity overshoots


def test_without_an_interval_the_denoiser_is_the_flow_s_posterior_mean():
    """MeanFlowDenoiser(x_t, t) asks the network for u(x, t, t), the flow-matching velocity: for Gaussian data the
    exact x0_hat is E[x0 | x_s] = M + S^2 (1 - s) (x_s - mu_s) / sd_s^2, written out here."""
    schedule = NoiseSchedule(flow_betas(T))
    denoise = MeanFlowDenoiser(ExactMeanFlow(), schedule, "v")
    x_t = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([37])
    x_s, s = denoise.flow_input(x_t, t)
    s = s.flatten()[0]
    mu, sd2 = (1 - s) * M, (1 - s) ** 2 * S**2 + s**2
    assert torch.allclose(denoise(x_t, t), M + S**2 * (1 - s) * (x_s - mu) / sd2, atol=1e-9)


class Affine(nn.Module):
    """u = 0.5 z + 0.002 t_net - 0.003 h_net: du/dt along (v, dr = 0, dt = 1) is 0.5 v + (0.002 - 0.003) T."""

    def forward(self, z, t, h=None):
        return 0.5 * z + 0.002 * t[:, None] - 0.003 * (0 if h is None else h)[:, None]


def test_the_meanflow_loss_is_recomputed_by_hand():
    """Same draws: t = max and r = min of two uniform times, r = t outside MEANFLOW_RATIO of the batch, eps ~ N(0, I),
    target v - (t - r) du/dt, and the adaptive weight 1 / (|error|^2 + c)^p, both without gradient."""
    x0 = torch.randn(512, 2, generator=torch.Generator().manual_seed(3))
    schedule = NoiseSchedule(flow_betas(T))
    loss = diffusion_loss(Affine(), schedule, x0, MeanFlow(),
                          torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(8)
    a, b = torch.rand(512, generator=g), torch.rand(512, generator=g)
    interval = torch.rand(512, generator=g) < MEANFLOW_RATIO
    eps = torch.randn(512, 2, generator=g)
    t = torch.maximum(a, b)
    r = torch.where(interval, torch.minimum(a, b), t)
    assert 0.15 < interval.float().mean() < 0.35
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    v = eps - x0
    u = 0.5 * x_t + 0.002 * T * t[:, None] - 0.003 * T * (t - r)[:, None]
    target = v - (t - r)[:, None] * (0.5 * v + (0.002 - 0.003) * T)
    error = ((u - target) ** 2).sum(1)
    assert float(loss) == pytest.approx(float((error / (error + MEANFLOW_C) ** MEANFLOW_POWER).mean()), rel=1e-5)


def test_a_meanflow_run_samples_in_one_step_and_is_a_flow_model_to_the_other_samplers(tmp_path, capsys):
    """`toydiff run` with train.objective = meanflow: nfe 1 by its own sampler; the other samplers (and the
    likelihood ODE) drive its instantaneous velocity; what cannot work is refused before anything is written."""
    import toydiff

    out = tmp_path / "mf"
    assert main(["run", "--quiet", "--out", str(out), "--set", "schedule.process=flow", "--set",
                 "train.objective=meanflow", "--set", "sample.sampler=meanflow", "--set", "sample.steps=1",
                 "--set", "train.steps=40", "--set", "train.batch_size=128", "--set", "data.n=300",
                 "--set", "eval.n=300", "--set", "eval.draws=3", "--set", "eval.nll_n=50"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["nfe"] == 1
    run = toydiff.load(out)
    drawn = run.draw(50, sampler="euler", steps=4)
    assert drawn.samples.shape == (50, 2) and drawn.record["nfe"] == 4
    capsys.readouterr()
    for settings, message in ((["schedule.process=ddpm"], "set schedule.process=flow"),
                              (["model.conditional=true"], "model.conditional=false"),
                              (["train.objective=denoise"], "only a model trained with train.objective=meanflow")):
        argv = ["run", "--out", str(tmp_path / "bad"), "--set", "schedule.process=flow", "--set",
                "train.objective=meanflow", "--set", "sample.sampler=meanflow"]
        for s in settings:
            argv += ["--set", s]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "bad").exists()
    flow = tmp_path / "flow"
    assert main(["train", "--quiet", "--out", str(flow), "--set", "schedule.process=flow", "--set", "train.steps=2"]) == 0
    assert main(["sample", str(flow), "--sampler", "meanflow", "--n", "10"]) == 2
    assert "only a model trained with train.objective=meanflow" in capsys.readouterr().err
