"""Flow matching as a second process: its loss, coupling, grid, exact velocity and samplers, checked against
formulas written out here (not against the code's own output)."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from toydiff.cli import main
from toydiff.core.config import ExperimentConfig, with_overrides
from toydiff.core.errors import ToydiffError
from toydiff.diffusion.losses import diffusion_loss
from toydiff.methods.flow import FlowMatching, couple, flow_timesteps
from toydiff.diffusion.oracle import GaussianMixture
from toydiff.diffusion.parameterization import FlowDenoiser
from toydiff.diffusion.samplers import SAMPLERS
from toydiff.diffusion.schedules import FLOW_T_MAX, NoiseSchedule, flow_betas


class Affine(nn.Module):
    """A network whose output is an explicit function of (x, t), to recompute the loss by hand."""

    def forward(self, x, t):
        return 0.5 * x + 0.001 * t[:, None]


@pytest.mark.parametrize("kind", ["uniform", "logit-normal"])
@pytest.mark.parametrize("prediction", ["v", "x0", "eps"])
def test_the_flow_matching_loss_is_recomputed_by_hand(kind, prediction):
    """Same draws, written out: t (uniform, or sigmoid of a normal), eps ~ N(0, I), x_t = (1 - t) x0 + t eps,
    the network told t T, and the MSE against eps - x0 (v), x0 or eps."""
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    T = 1000
    loss = diffusion_loss(Affine(), NoiseSchedule(flow_betas(T)), x0,
                          FlowMatching(prediction), torch.Generator().manual_seed(7),
                          timesteps=flow_timesteps(kind, T))
    g = torch.Generator().manual_seed(7)
    u = torch.rand(64, generator=g) if kind == "uniform" else torch.sigmoid(torch.randn(64, generator=g))
    eps = torch.randn(64, 3, generator=g)
    x_t = (1 - u[:, None]) * x0 + u[:, None] * eps
    out = 0.5 * x_t + 0.001 * (u * T)[:, None]
    target = {"v": eps - x0, "x0": x0, "eps": eps}[prediction]
    assert float(loss) == pytest.approx(float(((out - target) ** 2).mean()), rel=1e-6)


def test_the_ot_coupling_is_the_cheapest_pairing():
    """On 7 points the exact minibatch OT pairing costs what the best of all 5040 permutations costs (brute
    force), never more than the identity pairing, and only reorders the noise."""
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        x0, eps = torch.randn(7, 2, generator=g) * 2 + 1, torch.randn(7, 2, generator=g)
        paired = couple(x0, eps, "ot")
        cost = lambda e: float(((x0 - e) ** 2).sum())  # noqa: E731
        best = min(cost(eps[list(p)]) for p in itertools.permutations(range(7)))
        assert cost(paired) == pytest.approx(best, rel=1e-9) and cost(paired) <= cost(eps) + 1e-12
        assert sorted(map(tuple, paired.tolist())) == sorted(map(tuple, eps.tolist()))
    assert torch.equal(couple(x0, eps, "independent"), eps)


def test_the_flow_grid_is_the_straight_path_in_the_vp_view():
    """x_t = (1 - t) x0 + t eps is c(t) times sqrt(abar) x0 + sqrt(1 - abar) eps with abar = (1 - t)^2 / c^2,
    c = sqrt((1 - t)^2 + t^2), on the grid t_k = FLOW_T_MAX k / T; the denoiser reads t back off abar."""
    T = 50
    s = NoiseSchedule(flow_betas(T))
    t = FLOW_T_MAX * np.arange(T + 1) / T
    assert np.allclose(s.alpha_bar64, (1 - t) ** 2 / ((1 - t) ** 2 + t**2), rtol=1e-12, atol=1e-300)
    den = FlowDenoiser(nn.Identity(), s, "x0")
    x = torch.randn(4, 2, dtype=torch.float64)
    for k in (1, 17, T):
        x_s, tt = den.flow_input(x, torch.tensor([k]))
        assert float(tt) == pytest.approx(t[k], rel=1e-9)
        assert torch.allclose(x_s, x * math.sqrt((1 - t[k]) ** 2 + t[k] ** 2))


def _closed_form_velocity(w, mu, sd, x, s):
    """E[eps - x0 | x_s] for a 1-D mixture sum_k w_k N(mu_k, sd_k^2), written out: x_s | k ~ N((1 - s) mu_k,
    (1 - s)^2 sd_k^2 + s^2), E[x0 | x_s, k] and E[eps | x_s, k] by Gaussian conditioning."""
    var = (1 - s) ** 2 * sd**2 + s**2
    dev = x[:, None] - (1 - s) * mu[None]
    logp = np.log(w)[None] - 0.5 * dev**2 / var - 0.5 * np.log(2 * np.pi * var)
    r = np.exp(logp - logp.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    e_x0 = mu[None] + (1 - s) * sd**2 / var * dev
    e_eps = s / var * dev
    return (r * (e_eps - e_x0)).sum(1)


def test_the_oracle_gives_the_exact_flow_velocity_of_a_gaussian_mixture():
    w, mu, sd = np.array([0.3, 0.7]), np.array([-1.5, 2.0]), np.array([0.4, 0.8])
    oracle = GaussianMixture(w, mu[:, None], sd[:, None])
    x = np.linspace(-3, 3, 41)
    for s in (0.05, 0.3, 0.5, 0.9, 0.999):
        v = oracle.velocity(torch.as_tensor(x[:, None]), torch.tensor([s], dtype=torch.float64))[:, 0].numpy()
        assert np.allclose(v, _closed_form_velocity(w, mu, sd, x, s), rtol=1e-9, atol=1e-9)


def test_euler_on_the_exact_velocity_of_a_point_mass_lands_in_one_step():
    """The straight path's velocity field of a point mass is constant along each path, so one Euler step
    from pure noise lands on the point exactly (a curved VP path would not)."""
    mu = np.array([[0.7, -0.3]])
    oracle = GaussianMixture([1.0], mu, [[1e-9, 1e-9]])
    grid = NoiseSchedule(flow_betas(1000)).respace(1)
    x_T = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x0 = SAMPLERS.get("euler")(oracle.denoiser(grid), grid, x_T)
    assert torch.allclose(x0, torch.as_tensor(mu).expand(256, 2), atol=1e-6)


class OracleVelocity(nn.Module):
    """The exact flow velocity as a 'network' f(x_s, s T): what a perfectly trained v-prediction model outputs."""

    def __init__(self, oracle, T):
        super().__init__()
        self.oracle, self.T = oracle, T

    def forward(self, x, t):
        return self.oracle.velocity(x, t / self.T)


@pytest.mark.parametrize("sampler", ["euler", "heun", "ddim", "ddpm", "dpmpp-2m", "dpmpp-3m", "dpmpp-2m-sde",
                                     "dpmpp-3m-sde", "ode"])
def test_every_sampler_drives_a_flow_model_unchanged(sampler):
    """A flow 'network' that outputs the exact velocity, behind FlowDenoiser on the flow grid: every sampler
    (100 steps; the adaptive one its own) draws the mixture's two modes in their weights, means and spreads."""
    w, mu, sd = np.array([0.3, 0.7]), np.array([[-1.5, 0.0], [2.0, 1.0]]), np.array([[0.3, 0.3], [0.5, 0.5]])
    oracle = GaussianMixture(w, mu, sd)
    T = 1000
    schedule = NoiseSchedule(flow_betas(T))
    grid = schedule if sampler == "ode" else schedule.respace(100, "trailing")
    den = FlowDenoiser(OracleVelocity(oracle, T), schedule, "v")
    denoise = den if grid is schedule else (lambda x, i: den(x, grid.model_t(i)))
    x_T = torch.randn(6000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x = SAMPLERS.get(sampler)(denoise, grid, x_T, generator=torch.Generator().manual_seed(6)).numpy()
    first = x[:, 0] < 0.25
    assert abs(first.mean() - 0.3) < 0.03
    for k, mask in enumerate((first, ~first)):
        assert np.allclose(x[mask].mean(0), mu[k], atol=0.06), sampler
        assert np.allclose(x[mask].std(0), sd[k], rtol=0.12), sampler


@pytest.mark.parametrize("overrides, message", [
    (["model.variance=learned"], "model.variance = learned belongs to the ddpm process"),
    (["train.timestep_sampling=importance"], "train.timestep_sampling = importance needs the ddpm process"),
    (["train.loss_weighting=min-snr"], "flow matching trains with uniform weights"),
    (["schedule.zero_terminal_snr=true"], "schedule.zero_terminal_snr rescales the ddpm process's betas"),
    (["model.prediction=edm"], "model.prediction = edm is EDM's preconditioning of the ddpm process"),
    (["train.timestep_sampling=log-normal"], "train.timestep_sampling = log-normal needs the ddpm process"),
])
def test_settings_that_belong_to_ddpm_are_refused_for_the_flow_process(overrides, message):
    """The flow method's rules (toydiff.methods.flow), asked by validate before anything runs."""
    from toydiff.jobs.workflow import validate
    with pytest.raises(ToydiffError, match=message):
        validate(with_overrides(ExperimentConfig(), ["schedule.process=flow"] + overrides))


def test_flow_settings_on_the_ddpm_process_are_a_one_line_error(tmp_path, capsys):
    for flag, message in (("train.coupling=ot", "train.coupling = ot pairs data and noise for flow matching"),
                          ("train.timestep_sampling=logit-normal", "logit-normal draws flow matching's continuous t")):
        assert main(["run", "--out", str(tmp_path / "r"), "--set", flag]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "schedule.process=flow" in err
        assert not (tmp_path / "r").exists()
    assert main(["run", "--out", str(tmp_path / "r"), "--set", "schedule.process=flows"]) == 2
    assert "did you mean 'flow'" in capsys.readouterr().err


@pytest.mark.slow
def test_a_flow_run_trains_samples_evaluates_and_records_its_nfe(tmp_path):
    """`toydiff run --set schedule.process=flow` end to end (few steps): the run directory is complete, the
    samples come from the flow model and metrics.json records the samples' network evaluations."""
    import json

    import toydiff
    out = tmp_path / "flow"
    assert main(["run", "--quiet", "--out", str(out), "--set", "schedule.process=flow", "--set", "train.steps=300",
                 "--set", "train.coupling=ot", "--set", "train.batch_size=256", "--set", "sample.sampler=euler",
                 "--set", "sample.steps=8", "--set", "sample.spacing=trailing", "--set", "eval.n=500",
                 "--set", "eval.draws=4", "--set", "eval.nll_n=50"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["nfe"] == 8 and report["sampling"]["sampler"] == "euler"
    assert json.loads((out / "samples.json").read_text())["nfe"] == 8
    run = toydiff.load(out)
    assert run.config.schedule.process == "flow" and isinstance(run.denoiser, FlowDenoiser)
    drawn = run.draw(2000, sampler="heun", steps=5, spacing="trailing")
    x = drawn.samples
    assert drawn.record["nfe"] == 9  # Heun: 2 S - 1 evaluations
    assert np.isfinite(x).all() and np.abs(x.mean(0) - [0.5, 0.25]).max() < 0.3  # the moons' centre
    assert np.isfinite(report["likelihood"]["values"]["ode_nll"]["nats"])
    from toydiff.pictures.figures import forward_panels  # drawn in the flow's own frame: x_t = (1 - t) x0 + t eps
    T = run.schedule.T
    (_, data), (_, mid), (_, noise) = forward_panels(run, (0, T // 2, T), run.scaler.transform(run.data[:500]))
    s = FLOW_T_MAX / 2
    eps = (noise - (1 - FLOW_T_MAX) * data) / FLOW_T_MAX
    assert np.allclose(mid, (1 - s) * data + s * eps, atol=1e-4)
