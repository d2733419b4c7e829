"""Denoiser networks f(x_t (B, D), t (B,) in 1..T[, y (B,)]) -> (B, D * outputs), in a registry.

t may also be (1,), one step for the whole batch (as every sampler calls them): the time
embedding is then computed once and broadcast, which is most of the saving of a sampling step.

`guide` is the guide's NoisePredictor; `mlp` is the stronger default: a residual MLP
with a sinusoidal time embedding, optional Fourier features of x and an optional class
embedding, for any D. `outputs` is 2 when the network also learns its variances.
What the output means (eps, x0 or v, and the variance interpolation) is the
parameterization module's business.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..core.config import ARCHS, ModelConfig
from ..core.errors import ToydiffError
from ..core.machine import check_memory
from ..core.registry import Registry

ModelFn = Callable[..., nn.Module]  # (cfg, dim, T, classes, intervals) -> network
MODELS: Registry[ModelFn] = Registry("model", ARCHS)


class GuideNoisePredictor(nn.Module):
    """The guide's network: one-hot t -> Linear(T, 1), concatenated with x_t, then an MLP D+1-100-100-100-20-D.

    The guide's listing lost its activations (a purely linear network cannot learn the
    moons); LeakyReLU between the layers is the notebook's choice.
    """

    def __init__(self, dim: int, T: int):
        super().__init__()
        self.T = T
        self.t_encoder = nn.Linear(T, 1)
        widths = [dim + 1, 100, 100, 100, 20]
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.LeakyReLU()]
        self.model = nn.Sequential(*layers, nn.Linear(20, dim))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_embedding = self.t_encoder(self._one_hot(t).to(x_t.dtype)).expand(x_t.shape[0], 1)
        return self.model(torch.cat([x_t, t_embedding], dim=1))

    def _one_hot(self, t: torch.Tensor) -> torch.Tensor:
        """one_hot(t - 1); a fractional t (the likelihood ODE) mixes its two neighbours linearly."""
        if not t.is_floating_point():
            return nn.functional.one_hot(t - 1, num_classes=self.T)
        t = t.clamp(1, self.T)
        lo = t.floor().long().clamp(max=self.T - 1) if self.T > 1 else t.floor().long()
        frac = (t - lo)[:, None]
        hot = nn.functional.one_hot(lo - 1, num_classes=self.T).to(t.dtype) * (1 - frac)
        if self.T > 1:
            hot = hot + nn.functional.one_hot(lo, num_classes=self.T).to(t.dtype) * frac
        return hot


def sinusoidal_frequencies(dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """w_k = max_period^(-k / (dim / 2)), k = 0 .. dim / 2 - 1."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0,
                         freqs: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) float -> (B, dim): [cos(t w_k), sin(t w_k)] with w_k = max_period^(-k / (dim / 2)) (Vaswani et al. 2017);
    `freqs` passes the w_k precomputed (sinusoidal_frequencies)."""
    if freqs is None:
        freqs = sinusoidal_frequencies(dim, max_period).to(t.device)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ResidualBlock(nn.Module):
    """h + W2 act(W1 norm(h) + W_t temb): a pre-norm MLP block with additive time conditioning."""

    def __init__(self, width: int, time_width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.time = nn.Linear(time_width, width)
        self.fc2 = nn.Linear(width, width)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(self.act(self.fc1(self.norm(h)) + self.time(temb)))


DEFAULT_TIME_SCALE = 1000.0  # the time embedding's angle at t = T: the scale image models use, whatever T is
MEAN_FLOW_TIME_SCALE = 10.0  # a mean-flow network's: its loss differentiates the network in time (Geng et al.
#                              2025), and at 1000 that derivative swamps the velocity (docs/benchmarks.md)


AUTO_WIDTH = (64, 4, 512)  # model.width = 0: 4 hidden units per frame coordinate as a power of two, in [64, 512]


def width(cfg: ModelConfig, dim: int | None = None) -> int:
    """model.width, with 0 (auto) sized to the model's frame: 64 up to 16 coordinates (the zoo's 2-D data, the
    guide's 64), then 4 units per coordinate rounded up to a power of two, at most 512 (a 64-column table's
    448 Fourier features are no longer squeezed through 64 units). dim None (not yet known, a file not yet
    read): the smallest auto width, for checks made before the data."""
    lo, per, hi = AUTO_WIDTH
    if cfg.width or dim is None:
        return cfg.width or lo
    return min(hi, max(lo, 2 ** math.ceil(math.log2(per * dim))))


def time_scale(cfg: ModelConfig, intervals: bool = False) -> float:
    """model.time_scale, with 0 (auto) resolved: MEAN_FLOW_TIME_SCALE for a mean-flow network, else the default."""
    return cfg.time_scale or (MEAN_FLOW_TIME_SCALE if intervals else DEFAULT_TIME_SCALE)


class MLP(nn.Module):
    """Residual MLP denoiser for D-dimensional data.

    t is embedded as a sinusoid of scale t / T (scale 1000 by default: time_scale),
    x optionally gains sin/cos features at octave frequencies (NeRF's positional encoding),
    which help a small network draw thin structures. With intervals, a second embedding, of the
    interval h = t - r (in t's units; 0 when not given), is added to t's: a mean-flow network
    u(x_t, r, t) (Geng et al. 2025 embed (t, t - r) the same way).
    """

    def __init__(self, dim: int, T: int, width: int = 128, depth: int = 3, time_dim: int = 32,
                 fourier_octaves: int = 0, classes: int = 0, outputs: int = 1, intervals: bool = False,
                 scale: float = DEFAULT_TIME_SCALE):
        super().__init__()
        self.T, self.time_dim, self.fourier_octaves, self.classes = T, time_dim, fourier_octaves, classes
        self.scale = scale
        self.register_buffer("time_freqs", sinusoidal_frequencies(time_dim), persistent=False)
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(fourier_octaves, dtype=torch.float32),
                             persistent=False)
        in_features = dim * (1 + 2 * fourier_octaves)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.interval_mlp = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width)) \
            if intervals else None
        self.inp = nn.Linear(in_features, width)
        # classes 0..K-1 and, at index K, the null label that stands for "unconditional" (label dropout, guidance)
        self.label = nn.Embedding(classes + 1, width) if classes else None
        self.blocks = nn.ModuleList(ResidualBlock(width, width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim * outputs))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.fourier_octaves == 0:
            return x
        angles = (x[:, :, None] * self.freqs).flatten(1)
        return torch.cat([x, torch.sin(angles), torch.cos(angles)], dim=1)

    def embed(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return sinusoidal_embedding(t * (self.scale / self.T), self.time_dim, freqs=self.time_freqs).to(dtype)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                h: torch.Tensor | None = None) -> torch.Tensor:
        """y (B,) long: class labels in 0..K-1, or K (the null label); None = all null (unconditional).
        h (B,) or (1,): a mean-flow network's interval t - r; None = 0 (the instantaneous velocity)."""
        temb = self.time_mlp(self.embed(t, x_t.dtype))
        if self.interval_mlp is not None:
            temb = temb + self.interval_mlp(self.embed(torch.zeros_like(t) if h is None else h, x_t.dtype))
        elif h is not None:
            raise ToydiffError("an interval was given to a network without one; train with train.objective=meanflow")
        if self.label is not None:
            if y is None:
                y = torch.full((temb.shape[0],), self.classes, dtype=torch.long, device=x_t.device)
            temb = temb + self.label(y)
        elif y is not None:
            raise ToydiffError("class labels were given to a network trained without them; set model.conditional")
        h = self.inp(self.features(x_t)) + temb
        for block in self.blocks:
            h = block(h, temb)
        return self.out(h)


class Autocast(nn.Module):
    """`net` with its forward under bfloat16 autocast and its output back in float32 (sample.autocast = bf16):
    the sampler's arithmetic, which divides by sqrt(alpha_bar) down to 1e-5, stays in float32."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.classes = getattr(net, "classes", 0)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, cache_enabled=False):
            return self.net(x, *args, **kwargs).float()


@MODELS.register("guide")
def _guide(cfg: ModelConfig, dim: int, T: int, classes: int = 0, intervals: bool = False) -> nn.Module:
    return GuideNoisePredictor(dim, T)


@MODELS.register("mlp")
def _mlp(cfg: ModelConfig, dim: int, T: int, classes: int = 0, intervals: bool = False) -> nn.Module:
    outputs = 2 if cfg.variance == "learned" else 1
    return MLP(dim, T, width(cfg, dim), cfg.depth, cfg.time_dim, cfg.fourier_octaves, classes, outputs, intervals,
               time_scale(cfg, intervals))


def check(cfg: ModelConfig, classes: int = 0, dim: int | None = None) -> None:
    """What the configured network cannot do (for data of `dim` frame coordinates, where known), refused before
    anything is built or written."""
    if cfg.arch == "guide" and (cfg.variance == "learned" or cfg.conditional or cfg.pieces_asked or classes):
        raise ToydiffError("the guide's network has one output and no labels; use model.arch=mlp for "
                           "model.variance=learned, model.conditional=true or model.components")
    if cfg.arch == "mlp":  # weights, gradients, AdamW's two moments and the EMA: about 5 copies in float32
        w = width(cfg, dim)
        params = (2 * cfg.depth + 2) * w ** 2 + w * (cfg.time_dim + 4 * cfg.fourier_octaves + 16)
        check_memory(20 * params, f"a network of model.width = {w} and model.depth = {cfg.depth}",
                     "lower model.width or model.depth")


def check_batch_memory(cfg: ModelConfig, batch: int, what: str, training: bool, dim: int | None = None) -> None:
    """Refuse a batch whose activations would not fit the memory available (float32; training keeps them for
    the backward pass and the gradients): the network's hidden layers, about 4 tensors of `width` per block."""
    w = width(cfg, dim)
    need = batch * max(w, cfg.time_dim, 64) * (4 * cfg.depth + 8) * 4 * (3 if training else 1)
    check_memory(need, f"{what} = {batch:,} with model.width = {w}", f"lower {what}")


def build_model(cfg: ModelConfig, dim: int, T: int, classes: int = 0, intervals: bool = False) -> nn.Module:
    """The configured network for D = dim and T steps; classes > 0 adds a label input (K classes + null),
    intervals a mean-flow network's second time (mlp)."""
    check(cfg, classes, dim)
    return MODELS.get(cfg.arch)(cfg, dim, T, classes, intervals)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
