"""The only place that converts between eps, x0 and v predictions (and the training target of each).

With x_t = sqrt(abar) x0 + sqrt(1 - abar) eps and v = sqrt(abar) eps - sqrt(1 - abar) x0
(Salimans and Ho 2022), any one of eps, x0 and v determines the other two given x_t,
except that eps says nothing about x0 where abar = 0 (beta_T = 1): there x_T is pure
noise, the best estimate of x0 is its mean, and the Scaler has put the data's mean
near 0, so x0_hat = 0 is used.

`Denoiser` wraps a network and a schedule into the one interface every sampler calls:
denoise(x_t, t) -> x0_hat, whatever the network predicts.

EDM's preconditioning (Karras et al. 2022, Table 1) is the prediction "edm": the network F sees c_in x and
x0_hat = c_skip x + c_out F, with c_skip = s^2 / (sigma^2 + s^2), c_out = sigma s / sqrt(sigma^2 + s^2) and
c_in = 1 / sqrt(sigma^2 + s^2) in their VE frame (x_VE = x_t / sqrt(abar), sigma^2 = (1 - abar) / abar,
s = EDM_SIGMA_DATA). Written in the VP frame with d = 1 - abar + abar s^2 (the variance of x_t for data of
variance s^2): the network sees x_t / sqrt(d), and x0_hat = (s^2 sqrt(abar) / d) x_t + s sqrt((1 - abar) / d) F.
The MSE on F is EDM's loss with its weight lambda(sigma) = 1 / c_out^2; at s = 1 it is v prediction, F = -v.

Flow matching's straight path x_s = (1 - s) x0 + s eps (continuous s in [0, 1]) has its own
conversions (flow_target, flow_to_x0): there v is the path's velocity dx_s/ds = eps - x0 (Lipman
et al. 2023; Liu et al. 2023), the flow's counterpart of the VP v above (itself the velocity of the
VP path in its angle). `FlowDenoiser` is the same interface over the flow's grid (schedules.flow_betas).
"""

from __future__ import annotations

from enum import Enum
from typing import Callable

import torch
from torch import nn

from ..core.errors import ToydiffError, unknown
from .schedules import NoiseSchedule, flow_scale, flow_time


Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # denoise(x_t, t) -> x0_hat: what samplers call
EDM_SIGMA_DATA = 0.5  # s: the data's standard deviation EDM's preconditioning assumes (Karras et al. 2022; the
#                       zoo's min-max frame [-1, 1] is about that)

class Prediction(str, Enum):
    EPS = "eps"  # the noise (Ho et al. 2020)
    X0 = "x0"  # the clean data
    V = "v"  # the velocity sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans and Ho 2022)
    EDM = "edm"  # the preconditioned F of Karras et al. (2022): x0_hat = c_skip x_t + c_out F(c_in x_t)

    @classmethod
    def parse(cls, name: "Prediction | str") -> "Prediction":
        """A Prediction from itself or its name ("eps", "x0", "v")."""
        try:
            return cls(name)
        except ValueError:
            raise unknown("prediction", name, [p.value for p in cls]) from None


def edm_scalings(alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM's (c_skip, c_out, c_in) in the VP frame, each multiplying x_t or F directly (see the module)."""
    s2 = EDM_SIGMA_DATA ** 2
    d = 1 - alpha_bar + alpha_bar * s2
    return s2 * alpha_bar.sqrt() / d, EDM_SIGMA_DATA * ((1 - alpha_bar) / d).sqrt(), d.rsqrt()


def network_input(kind: Prediction, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """What the network is given of x_t: x_t itself, or EDM's c_in x_t."""
    return x_t * edm_scalings(alpha_bar)[2] if kind == Prediction.EDM else x_t


def training_target(kind: Prediction, x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """What the network should output for x_t made from (x0, eps); alpha_bar broadcasts against x0."""
    if kind == Prediction.EDM:
        c_skip, c_out, _ = edm_scalings(alpha_bar)
        return (x0 - c_skip * (alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps)) / c_out
    if kind == Prediction.EPS:
        return eps
    if kind == Prediction.X0:
        return x0
    if kind == Prediction.V:
        return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0
    raise unknown("prediction", kind, [p.value for p in Prediction])


def min_snr_weight(kind: Prediction, snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for an MSE on `kind`'s target: the x0-space weight
    min(SNR, gamma) divided by what the target's MSE already weighs x0 errors by (SNR for eps, SNR + 1 for v)."""
    clipped_snr = snr.clamp(max=gamma)
    if kind == Prediction.X0:
        return clipped_snr
    if kind == Prediction.EPS:
        return torch.where(snr > 0, clipped_snr / snr.clamp_min(1e-30), torch.ones_like(snr))
    if kind == Prediction.V:
        return clipped_snr / (snr + 1)
    if kind == Prediction.EDM:  # c_out^2 = s^2 / (1 + SNR s^2)
        return clipped_snr * EDM_SIGMA_DATA ** 2 / (1 + snr * EDM_SIGMA_DATA ** 2)
    raise unknown("prediction", kind, [p.value for p in Prediction])


def to_x0(kind: Prediction, pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x0_hat from a network output."""
    if kind == Prediction.X0:
        return pred
    if kind == Prediction.EPS:
        # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), taken as 0 (the data's mean) where abar = 0.
        inv_sqrt = torch.where(alpha_bar > 0, alpha_bar.clamp_min(1e-30).rsqrt(), torch.zeros_like(alpha_bar))
        return (x_t - (1 - alpha_bar).sqrt() * pred) * inv_sqrt
    if kind == Prediction.V:
        return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * pred
    if kind == Prediction.EDM:
        c_skip, c_out, _ = edm_scalings(alpha_bar)
        return c_skip * x_t + c_out * pred
    raise unknown("prediction", kind, [p.value for p in Prediction])


def to_eps(kind: Prediction, pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """eps_hat from a network output (t >= 1, so 1 - abar > 0)."""
    if kind == Prediction.EPS:
        return pred
    if kind == Prediction.X0:
        return (x_t - alpha_bar.sqrt() * pred) / (1 - alpha_bar).sqrt()
    if kind == Prediction.V:
        return (1 - alpha_bar).sqrt() * x_t + alpha_bar.sqrt() * pred
    if kind == Prediction.EDM:
        return (x_t - alpha_bar.sqrt() * to_x0(kind, pred, x_t, alpha_bar)) / (1 - alpha_bar).sqrt()
    raise unknown("prediction", kind, [p.value for p in Prediction])


def flow_network_time(s: torch.Tensor, T: int) -> torch.Tensor:
    """What a flow-matching network is told of flow time s in [0, 1]: s T, the scale its time embedding expects
    of the ddpm process's t in 1..T (training and sampling both ask here)."""
    return s * T


def flow_target(kind: Prediction, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """What a flow-matching network should output for x_s made from (x0, eps): the velocity eps - x0, x0 or eps."""
    if kind == Prediction.V:
        return eps - x0
    if kind == Prediction.X0:
        return x0
    if kind == Prediction.EPS:
        return eps
    raise unknown("prediction", kind, [p.value for p in Prediction])


def flow_to_x0(kind: Prediction, pred: torch.Tensor, x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x0_hat from a flow-matching network's output at x_s = (1 - s) x0 + s eps (s broadcasts against x_s)."""
    if kind == Prediction.V:
        return x_s - s * pred
    if kind == Prediction.X0:
        return pred
    if kind == Prediction.EPS:  # undefined at s = 1 (pure noise), which the grid never reaches (FLOW_T_MAX)
        return (x_s - s * pred) / (1 - s)
    raise unknown("prediction", kind, [p.value for p in Prediction])


class Denoiser:
    """denoise(x_t (B, D), t (B,) or (1,) in 1..T) -> x0_hat (B, D), for a network of any prediction kind.

    t is an integer step, or a fractional one for the continuous-time ODE solvers.
    learned_variance: the network's output is [prediction, v] (2 D columns), v setting the variance
    (NoiseSchedule.learned_log_variance); `with_variance` returns both.
    labels (B,): condition a class-conditional network on them; with guidance w != 1 each call also
    evaluates the unconditional (null-label) prediction, in the same batch, and returns
    pred_u + w (pred_c - pred_u) (classifier-free guidance, Ho and Salimans 2022, in diffusers'
    convention: w = 1 is purely conditional). eps, x0 and v are affine in the prediction at fixed
    x_t, so guiding any of them guides all three identically. Without labels a conditional network
    is asked for its unconditional prediction.
    """

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, prediction: Prediction | str, *,
                 learned_variance: bool = False, labels: torch.Tensor | None = None, guidance: float = 1.0):
        self.model = model
        self.schedule = schedule
        self.prediction = Prediction.parse(prediction)
        self.learned_variance = learned_variance
        self.labels = labels
        self.guidance = guidance
        self.calls = 0  # network evaluations so far (a guided call evaluates both branches in one batch: 1)
        if labels is None and guidance != 1.0:
            raise ToydiffError("classifier-free guidance needs class labels to guide towards; "
                               "train with model.conditional=true, or set sample.guidance=1")

    def output(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network's (guided) prediction (B, D) and its variance output v (B, D), or None."""
        self.calls += 1
        if self.labels is None:
            out = self.model(x_t, t)
        elif self.guidance == 1.0:
            out = self.model(x_t, t, self.labels)
        else:
            null = torch.full_like(self.labels, self.model.classes)
            t_both = t if t.shape[0] == 1 else torch.cat([t, t])  # a (1,) t is shared by both halves
            both = self.model(torch.cat([x_t, x_t]), t_both, torch.cat([self.labels, null]))
            cond, uncond = both.chunk(2)
            d = x_t.shape[1]
            guided = uncond[:, :d] + self.guidance * (cond[:, :d] - uncond[:, :d])
            out = torch.cat([guided, cond[:, d:]], dim=1)  # the variance follows the conditional branch
        if self.learned_variance:
            pred, v = out.chunk(2, dim=1)
            return pred, v
        return out, None

    def predict(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(prediction, variance output or None, alpha_bar at t): the network asked at x_t as its kind wants it."""
        alpha_bar = self.schedule.alpha_bar_at(t, x_t)
        pred, v = self.output(network_input(self.prediction, x_t, alpha_bar), t)
        return pred, v, alpha_bar

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        pred, _, alpha_bar = self.predict(x_t, t)
        return to_x0(self.prediction, pred, x_t, alpha_bar)

    def with_variance(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, v): the prediction and the learned-variance output, for ddpm's variance = "learned"."""
        if not self.learned_variance:
            raise ToydiffError("this model did not learn its variances (model.variance = fixed); "
                               "sample with variance small or large")
        pred, v, alpha_bar = self.predict(x_t, t)
        return to_x0(self.prediction, pred, x_t, alpha_bar), v

    def eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t, t): the predicted noise (the vector field of the guide's Fig. 4 is its negative)."""
        pred, _, alpha_bar = self.predict(x_t, t)
        return to_eps(self.prediction, pred, x_t, alpha_bar)


class FlowDenoiser(Denoiser):
    """A flow-matching network behind the same interface: denoise(x_t, t) with x_t and t those of the VP view of
    the flow's grid (schedule = flow_betas). Each call reads the flow time s off the log-SNR (flow_time; a
    fractional t interpolates the log-SNR, so the adaptive solver is served too), hands the network the flow's
    own x_s = c(s) x_t and its time as s T (the scale the network's embedding expects of t), and converts its
    output (velocity, x0 or eps) to x0_hat. No learned variances: the flow is sampled as an ODE."""

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, prediction: Prediction | str, *,
                 labels: torch.Tensor | None = None, guidance: float = 1.0, learned_variance: bool = False):
        if learned_variance:
            raise ToydiffError("a flow-matching model has no learned variances; train with model.variance=fixed")
        super().__init__(model, schedule, prediction, labels=labels, guidance=guidance)

    def flow_input(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_s, s): the flow's state and time (s shaped to broadcast against x_s) at VP grid point t."""
        s = flow_time(self.schedule, t.to(x_t.device))
        s = s.to(x_t.dtype).reshape(s.shape + (1,) * (x_t.ndim - s.ndim))
        return flow_scale(s) * x_t, s

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_s, s = self.flow_input(x_t, t)
        pred = self.output(x_s, flow_network_time(s.flatten(1)[:, 0], self.schedule.T))[0]
        return flow_to_x0(self.prediction, pred, x_s, s)

    def with_variance(self, x_t: torch.Tensor, t: torch.Tensor):
        raise ToydiffError("a flow-matching model did not learn variances; sample with variance small or large")

    def eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The VP view's eps_hat (the same noise the flow's x_s mixes in): (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar)."""
        alpha_bar = self.schedule.alpha_bar_at(t, x_t)
        return (x_t - alpha_bar.sqrt() * self(x_t, t)) / (1 - alpha_bar).sqrt()


class MeanFlowDenoiser(FlowDenoiser):
    """A mean-flow network u(x_s, r, s) (train.objective = meanflow; Geng et al. 2025) behind the interface, with
    an optional third argument: denoise(x_t, t, r) is the x0_hat whose straight line through x_s moves, from
    grid point t to grid point r < t, exactly as the mean velocity over [r, t] does, x_r = x_s - (s - r) u, so
    a DDIM step from t to r on it is MeanFlow's step (samplers.sample_meanflow). Without r it is the
    instantaneous velocity u(x_s, s, s), the flow-matching v, and every other sampler, the likelihood ODE and the
    figures use the network as a flow model."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        x_s, s = self.flow_input(x_t, t)
        s_net = flow_network_time(s.flatten(1)[:, 0], self.schedule.T)
        h = None
        if r is not None:
            s_r = flow_time(self.schedule, r.to(x_t.device)).to(x_t.dtype)
            h = s_net - flow_network_time(s_r, self.schedule.T)
        self.calls += 1
        return flow_to_x0(Prediction.V, self.model(x_s, s_net, h=h), x_s, s)


def clipped(denoise, low: torch.Tensor, high: torch.Tensor):
    """denoise with x0_hat clamped per axis to [low, high] (D,): the training data's own range in the
    model's frame, taken from the fitted scaler, never a blanket [-1, 1]. A (x0_hat, v) output keeps its v."""
    def clamp(x0_hat: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(x0_hat, high.to(x0_hat)), low.to(x0_hat))

    def inner(x_t: torch.Tensor, t: torch.Tensor, *r: torch.Tensor):
        out = denoise(x_t, t, *r)
        return (clamp(out[0]), out[1]) if isinstance(out, tuple) else clamp(out)
    return inner
