"""The training objective: which t each point is noised to, the denoising loss and the variational-bound terms.

    objective = Objective.from_config(cfg)                  # prediction, weighting, learned variances
    loss = diffusion_loss(model, schedule, x0, objective, generator, timesteps=sampler)

L_simple of Ho et al. (2020), optionally min-SNR weighted (Hang et al. 2023), plus lambda L_vlb for
learned variances (Nichol and Dhariwal 2021); t uniform or importance-sampled. The training loop
(toydiff.training) and the likelihoods (toydiff.likelihood) both use the bound's terms from here.
For schedule.process = flow the same call trains conditional flow matching (flow_matching_loss):
continuous t, uniform or logit-normal, noise paired with the data independently or by minibatch
optimal transport (couple). Distilled students train through the same call with a `Progressive`
objective (progressive_loss; toydiff.distill runs the rounds) or a `Consistency` one (consistency_loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .config import COUPLINGS, PROCESSES, TIMESTEP_SAMPLINGS, WEIGHTINGS, ExperimentConfig, choose
from .errors import ToydiffError
from .parameterization import (Denoise, Prediction, flow_network_time, flow_target, min_snr_weight, to_x0,
                               training_target)
from .registry import Registry
from .runtime import World
from .schedules import NoiseSchedule, append_dims

LOG_2PI = math.log(2 * math.pi)
CONSISTENCY_GRID = 64  # N of consistency training and distillation: the grid whose neighbours must agree
MEANFLOW_RATIO = 0.25  # MeanFlow: share of each batch with r < t (the rest has r = t: flow matching); Geng et al.'s
MEANFLOW_POWER = 0.5  # MeanFlow's adaptive loss weight 1 / (|error|^2 + c)^p, c = 1e-3 (Geng et al.'s best p is 1;
#                      on the development table p = 1 biased the flow itself, docs/benchmarks.md)
MEANFLOW_C = 1e-3
TIMESTEP_SAMPLERS: Registry[type] = Registry("train.timestep_sampling", TIMESTEP_SAMPLINGS)


@TIMESTEP_SAMPLERS.register("uniform")
class UniformTimesteps:
    """t ~ U{1..T}, every weight 1: the L_simple of Ho et al. (2020)."""

    def __init__(self, T: int):
        self.T = T

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device):
        t = torch.randint(1, self.T + 1, (n,), generator=generator, device=device)
        return t, torch.ones(n, device=device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        pass


@TIMESTEP_SAMPLERS.register("importance")
class ImportanceTimesteps(UniformTimesteps):
    """Importance sampling of t by the loss's second moment (Nichol and Dhariwal 2021, sec. 3.3; improved-diffusion's
    LossSecondMomentResampler): p_t proportional to sqrt(E[L_t^2]), mixed with 0.1% uniform, and each point's
    loss weighted by 1 / (T p_t) so the objective's expectation is unchanged. Sampling stays uniform until
    every t has been seen `history` times. E[L_t^2] is a running mean over the first `history` batches that
    contain t and an exponential average with weight 1 / history after (improved-diffusion keeps the last 10
    losses; this keeps the bookkeeping on the device, with no host synchronisation).
    """

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 0.001, device: torch.device | str = "cpu"):
        super().__init__(T)
        self.history, self.uniform_prob = history, uniform_prob
        self.second_moment = torch.zeros(T + 1, device=device)
        self.seen = torch.zeros(T + 1, device=device)

    def probabilities(self) -> torch.Tensor:
        """p_t for t = 0..T (p_0 = 0)."""
        uniform = torch.ones_like(self.second_moment)
        uniform[0] = 0
        uniform = uniform / self.T
        root = self.second_moment.sqrt()
        root[0] = 0
        p = root / root.sum().clamp_min(1e-30) * (1 - self.uniform_prob) + self.uniform_prob * uniform
        ready = (self.seen[1:] >= self.history).all()
        return torch.where(ready, p, uniform)

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device):
        p = self.probabilities()
        t = torch.multinomial(p, n, replacement=True, generator=generator)
        return t.to(device), (1.0 / (self.T * p[t])).to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        t, losses = t.to(self.second_moment.device), losses.detach().float()
        ok = torch.isfinite(losses)  # a diverging step must not poison p_t (the training loop reports it)
        sums = torch.zeros_like(self.second_moment).index_add_(0, t, torch.where(ok, losses, 0.0) ** 2)
        counts = torch.zeros_like(self.seen).index_add_(0, t, ok.float())
        hit = counts > 0
        self.seen += hit.float()
        rate = 1.0 / self.seen.clamp(1, self.history)
        batch_mean = sums / counts.clamp_min(1)
        # in place: a CUDA graph replaying this update keeps reading and writing the same tensors
        self.second_moment.copy_(torch.where(hit, self.second_moment + rate * (batch_mean - self.second_moment),
                                             self.second_moment))


class UniformTimes(UniformTimesteps):
    """Flow matching's continuous t ~ U(0, 1) (train.timestep_sampling = uniform under the flow process)."""

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device):
        return torch.rand(n, generator=generator, device=device), torch.ones(n, device=device)


@TIMESTEP_SAMPLERS.register("logit-normal")
class LogitNormalTimes(UniformTimesteps):
    """Flow matching's continuous t = sigmoid(u), u ~ N(0, 1) (Esser et al. 2024): more of the batch at middle
    times, where the velocity is hardest to learn (flow only; config refuses it for ddpm)."""

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device):
        return torch.sigmoid(torch.randn(n, generator=generator, device=device)), torch.ones(n, device=device)


def timestep_sampler(kind: str, T: int, device: torch.device | str = "cpu", process: str = "ddpm"):
    """The t sampler of train.timestep_sampling for T steps; for the flow process, continuous t in (0, 1)."""
    cls = TIMESTEP_SAMPLERS.get(kind)
    if choose("schedule.process", process, PROCESSES) == "flow":
        return UniformTimes(T) if cls is UniformTimesteps else cls(T)
    return cls(T, device=device) if cls is ImportanceTimesteps else cls(T)


def couple(x0: torch.Tensor, eps: torch.Tensor, coupling: str) -> torch.Tensor:
    """eps reordered to pair with x0 (B, D): unchanged ("independent"), or ("ot") the exact optimal-transport
    assignment between the batch's data and noise under squared Euclidean cost (minibatch OT, Tong et al.
    2024; POT's network simplex: with uniform weights on two equal batches the plan is a permutation)."""
    if choose("train.coupling", coupling, COUPLINGS) == "independent":
        return eps
    if coupling == "reflow":
        raise ToydiffError("the reflow coupling's noise comes with the data (flow_matching_loss), not from couple")
    import ot

    cost = torch.cdist(x0.double(), eps.double()).pow(2).cpu().numpy()
    plan = ot.emd(ot.unif(len(x0)), ot.unif(len(eps)), cost, numItermax=10**7)
    return eps[torch.as_tensor(plan.argmax(1), device=eps.device)]


@dataclass(frozen=True)
class Objective:
    """What the network is trained to output and how each point's error counts."""

    prediction: Prediction = Prediction.EPS  # the network's target: eps | x0 | v (a name is accepted)
    weighting: str = "uniform"  # uniform (L_simple) | min-snr
    gamma: float = 5.0  # min-snr: the SNR at which the weight is capped
    learned_variance: bool = False  # the network also outputs v; L_hybrid = L_simple + vlb_weight L_vlb
    vlb_weight: float = 0.001
    process: str = "ddpm"  # ddpm | flow (flow_matching_loss)
    coupling: str = "independent"  # flow: how noise is paired with data (couple)
    mean_flow: bool = False  # flow: learn the mean velocity over [r, t] (meanflow_loss; train.objective = meanflow)

    def __post_init__(self):
        object.__setattr__(self, "prediction", Prediction.parse(self.prediction))
        choose("loss weighting", self.weighting, WEIGHTINGS)
        choose("schedule.process", self.process, PROCESSES)
        choose("train.coupling", self.coupling, COUPLINGS)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> "Objective":
        return cls(cfg.model.prediction, cfg.train.loss_weighting, cfg.train.min_snr_gamma,
                   cfg.model.variance == "learned", cfg.train.vlb_weight, cfg.schedule.process, cfg.train.coupling,
                   cfg.train.objective == "meanflow")


@dataclass(frozen=True)
class Progressive:
    """One round of progressive distillation (Salimans and Ho 2022, Algorithm 2): the student learns to take
    in one deterministic DDIM step the two its frozen teacher takes on an N-step grid.

    teacher: the teacher's denoise(x_t, t) -> x0_hat (frozen, no gradient). student: the student's denoiser
    around a network (called with the training loop's network, which may be wrapped). grid: (N + 1,) the
    teacher's t_0 = 0 < t_1 < ... < t_N on the training schedule (a respaced grid's timesteps), N even."""

    teacher: Denoise
    student: Callable[[nn.Module], Denoise]
    grid: torch.Tensor


def ddim_step(x_t: torch.Tensor, x0_hat: torch.Tensor, ab_t: torch.Tensor, ab_s: torch.Tensor) -> torch.Tensor:
    """The deterministic DDIM step (Song et al. 2021, eq. 12 with eta = 0) from alpha_bar ab_t to ab_s, per row."""
    eps = (x_t - ab_t.sqrt() * x0_hat) / (1 - ab_t).sqrt()
    return ab_s.sqrt() * x0_hat + (1 - ab_s).sqrt() * eps


def progressive_target(x_t: torch.Tensor, x_s: torch.Tensor, ab_t: torch.Tensor, ab_s: torch.Tensor) -> torch.Tensor:
    """The x0 whose single DDIM step from x_t (alpha_bar ab_t) lands on x_s (ab_s): Salimans and Ho's
    x~ = (x_s - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t), alpha = sqrt(ab),
    sigma = sqrt(1 - ab); at ab_s = 1 (the data) it is x_s itself."""
    ratio = ((1 - ab_s) / (1 - ab_t)).sqrt()
    return (x_s - ratio * x_t) / (ab_s.sqrt() - ratio * ab_t.sqrt())


def progressive_loss(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, objective: Progressive,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Salimans and Ho (2022), Algorithm 2: each point noised to a random even grid point t_2i, the teacher's
    two DDIM steps t_2i -> t_2i-1 -> t_2i-2 give the target x~ (progressive_target), and the student's x0_hat
    at t_2i meets it in the truncated-SNR weighted squared error max(SNR_t, 1) |x0_hat - x~|^2 (their
    'truncated SNR' weighting, which keeps the high-noise steps a few-step student lives on in play)."""
    grid = objective.grid.to(x0.device)
    i = torch.randint(1, (grid.numel() - 1) // 2 + 1, (x0.shape[0],), generator=generator, device=x0.device)
    t, mid, end = grid[2 * i], grid[2 * i - 1], grid[2 * i - 2]
    eps, x_t = schedule.noise(x0, t, generator)
    ab_t, ab_mid, ab_end = (schedule.gather(schedule.alpha_bar, s, x0) for s in (t, mid, end))
    with torch.no_grad():
        x_mid = ddim_step(x_t, objective.teacher(x_t, t), ab_t, ab_mid)
        x_end = ddim_step(x_mid, objective.teacher(x_mid, mid), ab_mid, ab_end)
        target = progressive_target(x_t, x_end, ab_t, ab_end)
    x0_hat = objective.student(model)(x_t, t)
    weight = (ab_t / (1 - ab_t)).flatten(1)[:, 0].clamp_min(1.0)
    return (weight * ((x0_hat - target) ** 2).flatten(1).mean(1)).mean()


@dataclass(frozen=True)
class Consistency:
    """Consistency distillation (Song et al. 2023, Algorithm 2): the student's consistency function f (its
    x0_hat) must agree at neighbouring points t_n > t_n-1 of an N-step grid on one path of the frozen
    teacher's ODE (one DDIM step between them), down to t_0 = 0, where f is the identity (the target there is
    the teacher's endpoint itself). Without a teacher it is consistency training (their Algorithm 3): the
    DDIM step is taken with the data point itself as x0_hat, so x_t-n-1 is the same draw of noise one grid
    point lower (the one-sample estimate of the teacher's step; train.objective = consistency). A v or eps network's x0_hat = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar)
    tends to x_t as abar -> 1 whatever it outputs, so f stays continuous at the boundary and well-conditioned
    at low noise (Karras et al.'s c_skip and c_out play that part in Song et al.).
    teacher: its denoise(x_t, t) -> x0_hat. student: the student's denoiser around a network. grid:
    (N + 1,) the t_0 = 0 < t_1 < ... < t_N on the training schedule."""

    teacher: Optional[Denoise]
    student: Callable[[nn.Module], Denoise]
    grid: torch.Tensor


def consistency_loss(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, objective: Consistency,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Song et al. (2023), Algorithm 2 with the squared L2 distance and lambda = 1: n ~ U{1..N}, x_{t_n} from
    q(x_t | x0), the teacher's DDIM step to x^_{t_n-1}, and |f(x_{t_n}, t_n) - f-(x^_{t_n-1}, t_n-1)|^2 with
    the target f- the student itself without gradient (Song and Dhariwal 2024 drop the EMA target)."""
    grid = objective.grid.to(x0.device)
    i = torch.randint(1, grid.numel(), (x0.shape[0],), generator=generator, device=x0.device)
    t, s = grid[i], grid[i - 1]
    _, x_t = schedule.noise(x0, t, generator)
    ab_t, ab_s = schedule.gather(schedule.alpha_bar, t, x0), schedule.gather(schedule.alpha_bar, s, x0)
    f = objective.student(model)
    with torch.no_grad():
        x_s = ddim_step(x_t, x0 if objective.teacher is None else objective.teacher(x_t, t), ab_t, ab_s)
        # f(x, 0) = x: the boundary condition, exact whatever the network (a flow network never sees s = 0)
        target = torch.where(append_dims(s == 0, x_s.ndim), x_s, f(x_s, s))
    return ((f(x_t, t) - target) ** 2).flatten(1).mean(1).mean()


def diffusion_loss(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor,
                   objective: Objective | Progressive | Consistency | Prediction | str,
                   generator: torch.Generator | None = None, *, timesteps: UniformTimesteps | None = None,
                   labels: torch.Tensor | None = None, world: World = World(), autocast: bool = False) -> torch.Tensor:
    """L_simple of Ho et al. (2020), eq. 14: t ~ U{1..T} (or `timesteps`' importance sampler), eps ~ N(0, I),
    the MSE between the network and its target, per point, then (`objective`; a bare prediction means
    Objective(prediction)):

    - weighting "min-snr" scales each point's error by min_snr_weight (Hang et al. 2023);
    - learned_variance adds lambda T L_t (in bits per dimension, with the mean's gradient stopped): the
      hybrid loss L_simple + lambda L_vlb of Nichol and Dhariwal (2021, sec. 3.1), lambda = vlb_weight;
    - labels (B,) condition the network; they are already dropped to the null label where wanted;
    - with several processes (`world`), every rank draws the whole batch's t and eps and computes the loss on
      its own shard; the importance sampler sees every rank's losses;
    - autocast runs the network's forward under bfloat16 autocast; t, eps, x_t, the target and the loss stay
      float32 (the schedule's alpha_bar spans 1e-9..1, far below bfloat16's 3 significant digits' reach);
      autocast's weight-cast cache is off, as a CUDA graph of the step needs (each weight is cast once anyway).
    """
    if isinstance(objective, Progressive):
        return progressive_loss(model, schedule, x0, objective, generator)
    if isinstance(objective, Consistency):
        return consistency_loss(model, schedule, x0, objective, generator)
    obj = objective if isinstance(objective, Objective) else Objective(objective)
    if obj.process == "flow" and obj.mean_flow:
        return meanflow_loss(model, schedule.T, x0, obj, generator, timesteps=timesteps, world=world)
    if obj.process == "flow":
        return flow_matching_loss(model, schedule.T, x0, obj, generator, timesteps=timesteps, labels=labels,
                                  world=world, autocast=autocast)
    timesteps = timesteps or UniformTimesteps(schedule.T)
    t, weights = timesteps.sample(x0.shape[0], generator, x0.device)
    eps, x_t = schedule.noise(x0, t, generator)
    if world.size > 1:
        s = world.shard(x0.shape[0])
        x0, t, weights, eps, x_t = x0[s], t[s], weights[s], eps[s], x_t[s]
        labels = None if labels is None else labels[s]
    alpha_bar = schedule.gather(schedule.alpha_bar, t, x0)
    target = training_target(obj.prediction, x0, eps, alpha_bar)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
        out = model(x_t, t) if labels is None else model(x_t, t, labels)
    out = out.float()
    pred, v = out.chunk(2, dim=1) if obj.learned_variance else (out, None)
    per_point = ((pred - target) ** 2).flatten(1).mean(1)
    if obj.weighting == "min-snr":
        snr = (alpha_bar / (1 - alpha_bar)).flatten(1)[:, 0]
        per_point = min_snr_weight(obj.prediction, snr, obj.gamma) * per_point
    if obj.learned_variance:
        x0_hat = to_x0(obj.prediction, pred.detach(), x_t, alpha_bar)  # L_vlb trains the variance only
        vlb = vlb_term(schedule, x0, x_t, t, x0_hat, schedule.learned_log_variance(v, t))
        per_point = per_point + obj.vlb_weight * schedule.T * vlb / (x0.shape[1] * math.log(2))
    timesteps.update(world.gather(t), world.gather(per_point.detach()))
    return (weights * per_point).mean()


def flow_matching_loss(model: nn.Module, T: int, x0: torch.Tensor, objective: Objective,
                       generator: torch.Generator | None = None, *, timesteps=None, labels: torch.Tensor | None = None,
                       world: World = World(), autocast: bool = False) -> torch.Tensor:
    """Conditional flow matching (Lipman et al. 2023; Liu et al. 2023): t from `timesteps` (continuous, in
    (0, 1); default uniform), eps ~ N(0, I) paired with x0 by objective.coupling, x_t = (1 - t) x0 + t eps,
    and the MSE between the network at (x_t, t T) and its target (flow_target: the velocity eps - x0 for
    prediction v), per point, then averaged. With coupling "reflow" each row of x0 is [x0 | eps], its noise
    fixed (toydiff.distill). Several processes and autocast as in diffusion_loss."""
    timesteps = timesteps or UniformTimes(T)
    t, weights = timesteps.sample(x0.shape[0], generator, x0.device)
    if objective.coupling == "reflow":  # each row carries its own noise, [x0 | eps] (toydiff.distill)
        x0, eps = x0.chunk(2, dim=1)
    else:
        eps = couple(x0, torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype),
                     objective.coupling)
    if world.size > 1:
        s = world.shard(x0.shape[0])
        x0, t, weights, eps = x0[s], t[s], weights[s], eps[s]
        labels = None if labels is None else labels[s]
    tt = t[:, None]
    x_t = (1 - tt) * x0 + tt * eps
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
        t_net = flow_network_time(t, T)
        out = model(x_t, t_net) if labels is None else model(x_t, t_net, labels)
    per_point = ((out.float() - flow_target(objective.prediction, x0, eps)) ** 2).flatten(1).mean(1)
    return (weights * per_point).mean()


def meanflow_loss(model: nn.Module, T: int, x0: torch.Tensor, objective: Objective,
                  generator: torch.Generator | None = None, *, timesteps=None, world: World = World()) -> torch.Tensor:
    """MeanFlow (Geng et al. 2025, Algorithm 1): two times from `timesteps`, t the larger and r the smaller, r set
    to t for all but MEANFLOW_RATIO of the batch; x_t = (1 - t) x0 + t eps (eps paired by objective.coupling) and
    v = eps - x0; the network's u(x_t, r, t) (its interval input h = t - r) and du/dt along (v, dr = 0, dt = 1),
    one forward-mode pass (torch.func.jvp); the target v - (t - r) du/dt without gradient (the MeanFlow
    identity), and the squared error |u - target|^2 weighted adaptively by 1 / (|error|^2 + c)^p, also without
    gradient (MEANFLOW_POWER). Where r = t the target is v: flow matching. Several processes as in flow_matching_loss."""
    timesteps = timesteps or UniformTimes(T)
    n = x0.shape[0]
    a, _ = timesteps.sample(n, generator, x0.device)
    b, _ = timesteps.sample(n, generator, x0.device)
    t = torch.maximum(a, b)
    r = torch.where(torch.rand(n, generator=generator, device=x0.device) < MEANFLOW_RATIO, torch.minimum(a, b), t)
    eps = couple(x0, torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype), objective.coupling)
    if world.size > 1:
        s = world.shard(n)
        x0, t, r, eps = x0[s], t[s], r[s], eps[s]
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    v = eps - x0

    def u(z: torch.Tensor, time: torch.Tensor, interval: torch.Tensor) -> torch.Tensor:
        return model(z, flow_network_time(time, T), h=flow_network_time(interval, T))
    out, du_dt = torch.func.jvp(u, (x_t, t, t - r), (v, torch.ones_like(t), torch.ones_like(t)))
    target = (v - (t - r)[:, None] * du_dt).detach()
    error = ((out - target) ** 2).sum(1)
    weight = 1.0 / (error.detach() + MEANFLOW_C) ** MEANFLOW_POWER
    return (weight * error).mean()


def normal_kl(mean_1: torch.Tensor, log_var_1: torch.Tensor, mean_2: torch.Tensor,
              log_var_2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_1, e^log_var_1) || N(mean_2, e^log_var_2)) per coordinate (diagonal Gaussians), nats."""
    return 0.5 * (log_var_2 - log_var_1 + torch.exp(log_var_1 - log_var_2)
                  + (mean_1 - mean_2) ** 2 * torch.exp(-log_var_2) - 1)


def vlb_term(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, x0_hat: torch.Tensor,
             log_var: torch.Tensor) -> torch.Tensor:
    """L_{t-1} of the variational bound per point (B,), nats summed over dimensions, for p(x_{t-1} | x_t) =
    N(posterior mean at x0_hat, e^log_var): KL(q(x_{t-1} | x_t, x0) || p) for t >= 2, and the continuous
    Gaussian decoder -log p(x0 | x_1) for t = 1 (Ho et al. 2020, eq. 5)."""
    mean_q, _ = schedule.posterior(x0, x_t, t)
    mean_p, _ = schedule.posterior(x0_hat, x_t, t)
    log_var_q = schedule.gather(schedule.log_beta_tilde_clipped, t, x0)  # exact for t >= 2, finite at t = 1
    kl = normal_kl(mean_q, log_var_q, mean_p, log_var).sum(1)
    decoder = 0.5 * ((x0 - mean_p) ** 2 * torch.exp(-log_var) + log_var + LOG_2PI).sum(1)
    return torch.where(t == 1, decoder, kl)
