"""eps / x0 / v conversions: from (x0, eps) build x_t, then every kind must give back x0 and eps."""

import math

import pytest
import torch

from toydiff.core.errors import ToydiffError
from toydiff.diffusion.parameterization import Prediction, to_eps, to_x0, training_target


@pytest.mark.parametrize("kind", list(Prediction))
@pytest.mark.parametrize("alpha_bar", [0.999, 0.5, 1e-3])
@pytest.mark.parametrize("shape", [(7, 1), (7, 2), (7, 5)])
def test_round_trip(kind, alpha_bar, shape):
    torch.manual_seed(0)
    x0, eps = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    ab = torch.full((shape[0], 1), alpha_bar, dtype=torch.float64)
    x_t = math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * eps
    pred = training_target(kind, x0, eps, ab)
    assert torch.allclose(to_x0(kind, pred, x_t, ab), x0, atol=1e-9)
    assert torch.allclose(to_eps(kind, pred, x_t, ab), eps, atol=1e-9)


def test_v_target_is_salimans_ho():
    x0, eps, ab = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.25]]), torch.tensor([[0.36]])
    v = training_target(Prediction.V, x0, eps, ab)
    assert torch.allclose(v, 0.6 * eps - 0.8 * x0)


def test_eps_at_zero_alpha_bar_gives_the_mean_not_nan():
    """At abar = 0 (beta_T = 1) eps carries no information on x0: x0_hat is the scaled data's mean, 0."""
    x_t, eps = torch.randn(4, 2), torch.randn(4, 2)
    x0 = to_x0(Prediction.EPS, eps, x_t, torch.zeros(4, 1))
    assert torch.equal(x0, torch.zeros(4, 2))


def test_unknown_prediction_lists_the_choices():
    with pytest.raises(ToydiffError, match="unknown prediction 'score'; choose one of: eps, x0, v, edm"):
        Prediction.parse("score")


def test_min_snr_weights_are_hang_et_al():
    from toydiff.diffusion.parameterization import min_snr_weight
    snr = torch.tensor([0.5, 5.0, 20.0])
    # x0 target: min(SNR, 5); eps target: min(SNR, 5) / SNR; v target: min(SNR, 5) / (SNR + 1)
    assert torch.allclose(min_snr_weight(Prediction.X0, snr, 5.0), torch.tensor([0.5, 5.0, 5.0]))
    assert torch.allclose(min_snr_weight(Prediction.EPS, snr, 5.0), torch.tensor([1.0, 1.0, 0.25]))
    assert torch.allclose(min_snr_weight(Prediction.V, snr, 5.0), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))
    assert min_snr_weight(Prediction.EPS, torch.tensor([0.0]), 5.0).item() == 1.0


@pytest.mark.parametrize("kind", [k for k in Prediction if k != Prediction.EDM])  # EDM: its own test below
def test_min_snr_loss_is_the_weighted_mse_by_hand(kind):
    from toydiff.core.config import ScheduleConfig
    from toydiff.diffusion.schedules import NoiseSchedule
    from toydiff.diffusion.losses import diffusion_loss
    from toydiff.methods.ddpm import Denoising
    s = NoiseSchedule.from_config(ScheduleConfig(T=50))
    net = torch.nn.Linear(2, 2)
    model = lambda x, t: net(x) + t[:, None].float() / 50  # noqa: E731
    x0 = torch.randn(64, 2)
    uniform = diffusion_loss(model, s, x0, Denoising(kind), torch.Generator().manual_seed(0))
    weighted = diffusion_loss(model, s, x0, Denoising(kind, "min-snr", 5.0), torch.Generator().manual_seed(0))
    # the same draws, by hand
    g = torch.Generator().manual_seed(0)
    t = torch.randint(1, 51, (64,), generator=g)
    eps = torch.randn(64, 2, generator=g)
    ab = torch.tensor(s.alpha_bar64, dtype=torch.float32)[t][:, None]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    target = {Prediction.EPS: eps, Prediction.X0: x0, Prediction.V: ab.sqrt() * eps - (1 - ab).sqrt() * x0}[kind]
    err = ((model(x_t, t) - target) ** 2).mean(1)
    snr = (ab / (1 - ab))[:, 0]
    w = {Prediction.EPS: snr.clamp(max=5) / snr, Prediction.X0: snr.clamp(max=5),
         Prediction.V: snr.clamp(max=5) / (snr + 1)}[kind]
    assert torch.allclose(uniform, err.mean(), rtol=1e-5)
    assert torch.allclose(weighted, (w * err).mean(), rtol=1e-4)


def test_edm_preconditioning_is_karras_et_al_table_1_and_its_loss_their_weighted_one():
    """Written in EDM's own VE frame (x = x0 + sigma n, sigma^2 = (1 - abar) / abar, sigma_data s = 0.5):
    D(x; sigma) = c_skip x + c_out F(c_in x, .) with c_skip = s^2 / (sigma^2 + s^2), c_out = sigma s /
    sqrt(sigma^2 + s^2), c_in = 1 / sqrt(sigma^2 + s^2), and the loss lambda(sigma) |D - x0|^2 with lambda =
    (sigma^2 + s^2) / (sigma s)^2 (their eq. 2 and Table 1). toydiff's VP-frame denoiser and its training loss on the
    same draws equal them; and with s = 1 the preconditioning is v prediction, F = -v."""
    from toydiff.core.config import ScheduleConfig
    from toydiff.diffusion import parameterization as P
    from toydiff.diffusion.losses import diffusion_loss
    from toydiff.diffusion.schedules import NoiseSchedule
    from toydiff.methods.ddpm import Denoising

    sched = NoiseSchedule.from_config(ScheduleConfig(T=50))
    net = torch.nn.Linear(2, 2).double()
    F = lambda x, t: torch.tanh(net(x)) + t[:, None].double() / 50  # noqa: E731
    g = torch.Generator().manual_seed(3)
    x0, n = torch.randn(64, 2, generator=g, dtype=torch.float64), torch.randn(64, 2, generator=g, dtype=torch.float64)
    t = torch.randint(1, 51, (64,), generator=g)
    ab = torch.as_tensor(sched.alpha_bar64)[t][:, None]
    sigma, s = ((1 - ab) / ab).sqrt(), 0.5
    x_ve = x0 + sigma * n
    c_skip, c_out, c_in = s**2 / (sigma**2 + s**2), sigma * s / (sigma**2 + s**2).sqrt(), 1 / (sigma**2 + s**2).sqrt()
    D = c_skip * x_ve + c_out * F(c_in * x_ve, t)
    x_t = ab.sqrt() * x_ve  # the same point in the VP frame
    ours = P.Denoiser(F, sched, "edm")(x_t, t)
    assert torch.allclose(ours, D, atol=1e-6)
    # the loss, on the loss's own draws (t, then the noise), in float32 as training runs
    net32 = net.float()
    F32 = lambda x, t: torch.tanh(net32(x)) + t[:, None].float() / 50  # noqa: E731
    x0 = x0.float()
    loss = diffusion_loss(F32, sched, x0, Denoising("edm"), torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    t = torch.randint(1, 51, (64,), generator=g)
    n = torch.randn(64, 2, generator=g)
    ab = torch.tensor(sched.alpha_bar64, dtype=torch.float32)[t][:, None]
    sigma = ((1 - ab) / ab).sqrt()
    x_ve = x0 + sigma * n
    D = s**2 / (sigma**2 + s**2) * x_ve + sigma * s / (sigma**2 + s**2).sqrt() * F32(x_ve / (sigma**2 + s**2).sqrt(), t)
    lam = (sigma**2 + s**2) / (sigma * s) ** 2
    assert float(loss.detach()) == pytest.approx(float((lam * (D - x0) ** 2).mean().detach()), rel=1e-4)
    x_t, v = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    ab = torch.full((8, 1), 0.3, dtype=torch.float64)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(P, "EDM_SIGMA_DATA", 1.0)
        assert torch.allclose(P.to_x0(Prediction.EDM, -v, x_t, ab), P.to_x0(Prediction.V, v, x_t, ab), atol=1e-12)
        assert torch.allclose(P.network_input(Prediction.EDM, x_t, ab), x_t, atol=1e-12)
