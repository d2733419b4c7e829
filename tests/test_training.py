"""The training objective's pieces against independent formulas: importance-sampled t, the hybrid loss, labels."""

import math

import numpy as np
import pytest
import torch

from toydiff.core.config import ScheduleConfig
from toydiff.diffusion.losses import ImportanceTimesteps, UniformTimesteps, diffusion_loss, vlb_term
from toydiff.methods.ddpm import Denoising
from toydiff.diffusion.parameterization import Prediction, to_x0, training_target
from toydiff.diffusion.schedules import NoiseSchedule
from toydiff.training.loop import drop_labels

S = NoiseSchedule.from_config(ScheduleConfig(name="cosine", T=20))


def test_importance_sampler_is_uniform_until_every_t_has_its_history():
    ts = ImportanceTimesteps(20, history=3)
    for _ in range(2):
        ts.update(torch.arange(1, 21), torch.rand(20))
    assert torch.allclose(ts.probabilities()[1:], torch.full((20,), 1 / 20))
    t, w = ts.sample(1000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.all((1 <= t) & (t <= 20)) and torch.allclose(w, torch.ones(1000))


def test_importance_sampler_follows_the_root_second_moment_and_stays_unbiased():
    """Losses L_t = t with no noise: after the warm-up p_t = 0.999 t / sum(t) + 0.001 / T, and the weighted
    loss 1 / (T p_t) L_t has the uniform mean (T + 1) / 2 in expectation."""
    T = 20
    ts = ImportanceTimesteps(T, history=2)
    t_all = torch.arange(1, T + 1)
    for _ in range(5):
        ts.update(t_all, t_all.float())
    expect = (0.999 * t_all / t_all.sum() + 0.001 / T).double()
    p = ts.probabilities()
    assert p[0] == 0 and torch.allclose(p[1:], expect.float(), rtol=1e-5)
    t, w = ts.sample(200_000, torch.Generator().manual_seed(0), torch.device("cpu"))
    counts = torch.bincount(t, minlength=T + 1)[1:].double() / len(t)
    assert torch.allclose(counts, expect, atol=3e-3)
    assert float((w * t).mean()) == pytest.approx((T + 1) / 2, rel=0.01)


def test_running_second_moment_is_the_mean_then_an_average_of_weight_one_over_history():
    ts = ImportanceTimesteps(3, history=2)
    ts.update(torch.tensor([1, 1, 2]), torch.tensor([1.0, 3.0, 2.0]))  # t = 1: batch mean of L^2 = 5
    assert torch.allclose(ts.second_moment[1:3], torch.tensor([5.0, 4.0]))
    ts.update(torch.tensor([1]), torch.tensor([0.0]))  # second sighting: running mean (5 + 0) / 2
    ts.update(torch.tensor([1]), torch.tensor([2.0]))  # then weight 1 / history: 2.5 + (4 - 2.5) / 2
    assert float(ts.second_moment[1]) == pytest.approx(3.25)


class Fixed(torch.nn.Module):
    """A 'network' returning a fixed output, to check the loss by hand."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = torch.nn.Parameter(out.clone())

    def forward(self, x_t, t, y=None):
        return self.out.expand(x_t.shape[0], -1)


def test_hybrid_loss_is_mse_plus_lambda_T_vlb_in_bits_with_the_mean_stopped():
    """Recompute the loss from the same draws: MSE on the v target + lambda T L_t / (D log 2), and check that
    the L_vlb part sends no gradient into the prediction's columns."""
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    net = Fixed(torch.tensor([0.1, -0.2, 0.3, -0.5]))
    loss = diffusion_loss(net, S, x0, Denoising(Prediction.V, learned_variance=True, vlb_weight=0.01),
                          torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # replay the draws: t, then eps
    t = torch.randint(1, 21, (256,), generator=g)
    eps, x_t = S.noise(x0, t, g)
    ab = S.gather(S.alpha_bar, t, x0)
    pred, v = net.out[:2].expand(256, 2), net.out[2:].expand(256, 2)
    mse = ((pred - training_target(Prediction.V, x0, eps, ab)) ** 2).mean(1)
    vlb = vlb_term(S, x0, x_t, t, to_x0(Prediction.V, pred, x_t, ab), S.learned_log_variance(v, t))
    assert loss.item() == pytest.approx((mse + 0.01 * 20 * vlb / (2 * math.log(2))).mean().item(), rel=1e-5)
    loss.backward()
    mse_grad = torch.autograd.grad(mse.mean(), net.out)[0]
    assert torch.allclose(net.out.grad[:2], mse_grad[:2], atol=1e-6)  # the prediction learns from the MSE only
    assert float(net.out.grad[2:].abs().sum()) > 0  # the variance from L_vlb


def test_label_dropout_rate_and_null_label():
    labels = torch.randint(0, 2, (100_000,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(labels, 0.1, 2, torch.Generator().manual_seed(1))
    null = dropped == 2
    assert float(null.double().mean()) == pytest.approx(0.1, abs=0.003)
    assert torch.equal(dropped[~null], labels[~null])
    assert drop_labels(labels, 0.0, 2, None) is labels


def test_uniform_timesteps_cover_one_to_T():
    t, w = UniformTimesteps(5).sample(10_000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert set(t.tolist()) == {1, 2, 3, 4, 5} and torch.all(w == 1)
    assert np.allclose(np.bincount(t.numpy())[1:] / 10_000, 0.2, atol=0.02)


def test_learned_variances_tighten_the_elbo_of_a_trained_model(tmp_path):
    """Nichol and Dhariwal (2021)'s point, on the moons at T = 100: the same network's bound with its learned
    variances is well below the bound with the fixed beta_tilde_t (about 1 nat per point, measured), and the
    ddpm sampler uses the learned variance by default (sample.variance = auto)."""
    from toydiff.core import config as C
    from toydiff import train_run
    from toydiff.diffusion.likelihood import elbo_nll, model_eps_fn
    cfg = C.with_overrides(C.ExperimentConfig(), [
        "data.n=2000", "schedule.T=100", "model.width=32", "model.depth=2", "train.steps=1500",
        "train.batch_size=256", "train.warmup_steps=50", "model.variance=learned", "train.timestep_sampling=importance"])
    run = train_run(cfg, tmp_path / "run")
    x = torch.as_tensor(run.scaler.transform(run.data[:1000]), dtype=torch.float32)
    d = run.denoiser
    fixed, learned = (elbo_nll(model_eps_fn(d), run.schedule, x, generator=torch.Generator().manual_seed(0),
                               variance_fn=vf).mean() for vf in (None, lambda x_t, t: d.output(x_t, t)[1]))
    assert float(learned) < float(fixed) - 0.5, (float(learned), float(fixed))
    from toydiff.core.config import SampleConfig
    from toydiff.diffusion.sampling import VPDiffusion, make_plan
    ddpm = SampleConfig(sampler="ddpm")
    assert make_plan(ddpm, VPDiffusion(run.schedule), learned_variance=True).variance == "learned"
    assert make_plan(ddpm, VPDiffusion(run.schedule), learned_variance=False).variance == "small"
    assert np.isfinite(run.sample(200, steps=10)).all()


def test_the_fused_adamw_step_is_torchs_adamw_step():
    """make_optimizer picks the fused kernel on the CPU: one step must equal the reference (per-tensor) AdamW."""
    from toydiff.core.config import TrainConfig
    from toydiff.training.loop import make_optimizer
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused = make_optimizer(a, cfg)
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(3):
        x = torch.randn(8, 5)
        for net, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_bf16_autocast_runs_the_network_in_bfloat16_and_the_loss_in_float32():
    from toydiff.diffusion.models import MLP
    torch.manual_seed(0)
    net, x0 = MLP(2, S.T, width=32, depth=2), torch.randn(256, 2)
    seen = []
    net.inp.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    full = diffusion_loss(net, S, x0, Denoising(Prediction.V), torch.Generator().manual_seed(3)).detach()
    half = diffusion_loss(net, S, x0, Denoising(Prediction.V), torch.Generator().manual_seed(3), autocast=True)
    assert seen == [torch.float32, torch.bfloat16]
    assert half.dtype == torch.float32
    assert abs(half.item() - full.item()) < 0.02 * full.item()  # bfloat16 keeps about 3 significant digits
    half.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in net.parameters())


def test_auto_threads_is_one_thread_on_the_cpu():
    """train.threads = 0 never takes the multi-thread trap (benchmarks/speed.py: 2 threads ran 1.6-3.6x slower
    with one other busy process on a 2-core machine); an explicit count is honoured."""
    from toydiff.core.runtime import set_threads
    before = torch.get_num_threads()
    try:
        assert set_threads(0, torch.device("cpu")) == 1 and torch.get_num_threads() == 1
        assert set_threads(2, torch.device("cpu")) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_log_normal_noise_levels_follow_edm_s_law_on_the_discrete_schedule():
    """Karras et al. (2022): ln sigma ~ N(-1.2, 1.2^2). An independent Monte Carlo oracle: 400,000 draws of
    ln sigma from numpy, each rounded to the step whose ln sigma_t = ln sqrt((1 - abar_t) / abar_t) is nearest;
    the sampler's p_t match those frequencies, and its own draws match p_t (chi-square). Every weight is 1, and
    the run's method builds it from its schedule (train.timestep_sampling = log-normal); flow refuses it."""
    from scipy import stats

    from toydiff.core import config as C
    from toydiff.core.errors import ToydiffError
    from toydiff.diffusion.losses import LogNormalTimesteps
    from toydiff.methods import of

    schedule = NoiseSchedule.from_config(ScheduleConfig(T=200))
    sampler = LogNormalTimesteps(200, schedule.alpha_bar)
    ab = schedule.alpha_bar.double().numpy()[1:]
    log_sigma = 0.5 * np.log((1 - ab) / ab)
    draws = np.random.default_rng(0).normal(-1.2, 1.2, size=400_000)
    nearest = np.concatenate([np.abs(chunk[:, None] - log_sigma[None]).argmin(1)  # brute force, step by step
                              for chunk in np.array_split(draws, 8)])
    freq = np.bincount(nearest + 1, minlength=201) / len(draws)
    p = sampler.p.double().numpy()
    assert p[0] == 0 and p.sum() == pytest.approx(1.0, abs=1e-6)
    assert np.abs(p - freq).max() < 2e-3, np.abs(p - freq).max()
    t, w = sampler.sample(200_000, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert bool((w == 1).all()) and int(t.min()) >= 1 and int(t.max()) <= 200
    counts = np.bincount(t.numpy(), minlength=201)[1:]
    groups = np.array_split(np.arange(200), 20)  # coarse bins so every expected count is large
    observed = [counts[g].sum() for g in groups]
    expected = [p[1:][g].sum() * 200_000 for g in groups]
    assert stats.chisquare(observed, np.array(expected) * sum(observed) / sum(expected)).pvalue > 0.001
    cfg = C.with_overrides(C.ExperimentConfig(), ["train.timestep_sampling=log-normal", "schedule.T=200"])
    assert isinstance(of(cfg).timesteps(cfg), LogNormalTimesteps)
    flow = C.with_overrides(cfg, ["schedule.process=flow"])
    with pytest.raises(ToydiffError, match="log-normal needs the ddpm process's discrete t"):
        of(flow).check(flow)
