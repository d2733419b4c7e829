"""Typed, frozen experiment configuration: TOML in and out, strict `--set section.key=value` overrides.

Every field is commented at its default. A config is checked whole when it is made, however
it is made (TOML, `--set`, keyword arguments, plain dicts): unknown sections or keys, values of
the wrong type, names outside their vocabulary and values out of range are ToydiffErrors, with
a "did you mean" for a near miss.

This module owns every closed vocabulary of the config (the dataset, schedule, model, sampler
names, ...), so a config is checked without importing torch and the command line answers at
once. Each registry (toydiff.diffusion.samplers.SAMPLERS, ...) refuses to register a name missing here,
and a test checks that every name here has its implementation. Rules that need more than the
config (what a sampler accepts, what a dataset takes) are checked by the module that owns them,
before anything is written (toydiff.jobs.workflow.validate).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Sequence, get_type_hints

import tomli_w

from .errors import ToydiffError, did_you_mean, unknown
from .files import read_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The closed vocabularies, each with the registry that implements it.
DATASETS = ("moons", "sklearn-moons", "circles", "swissroll", "gaussians", "grid", "checkerboard", "pinwheel",
            "spirals", "rings", "gmm")  # toydiff.data.datasets.DATASETS
SCALINGS = ("minmax", "standardize", "quantile")  # toydiff.data.scaler.Scaler
COLUMN_TYPES = ("continuous", "integer", "ordinal", "binary", "categorical")  # toydiff.data.columns
SCHEDULES = ("linear", "polynomial", "cosine", "sigmoid")  # toydiff.diffusion.schedules.BETA_SCHEDULES
PROCESSES = ("ddpm", "flow")  # toydiff.methods: the VP diffusion and flow matching, each a method of its own
METHODS = ("ddpm", "flow", "meanflow", "consistency")  # toydiff.methods.METHODS: what trains a run from scratch
COUPLINGS = ("independent", "ot", "reflow")  # toydiff.diffusion.losses (flow matching's pairing of data and noise)
DISTILL_METHODS = ("reflow", "progressive", "consistency")  # toydiff.methods.STUDENTS (toydiff distill)
RUN_DISTILL = ("none",) + DISTILL_METHODS  # distill.method: what `toydiff run` makes of the run it trained
ARCHS = ("guide", "mlp")  # toydiff.diffusion.models.MODELS
PREDICTIONS = ("eps", "x0", "v", "edm")  # toydiff.diffusion.parameterization.Prediction
MODEL_VARIANCES = ("fixed", "learned")
LR_SCHEDULES = ("constant", "cosine")
WEIGHTINGS = ("uniform", "min-snr")  # toydiff.diffusion.losses
TIMESTEP_SAMPLINGS = ("uniform", "importance", "log-normal", "logit-normal")  # toydiff.diffusion.losses.TIMESTEP_SAMPLERS
TRAIN_TIMESTEP_SAMPLINGS = ("auto",) + TIMESTEP_SAMPLINGS  # auto: the process's choice (Method.timestep_sampling)
AUTOCASTS = ("none", "bf16")
CUDA_GRAPH_MODES = ("auto", "on", "off")  # toydiff.training.graphs: capture on CUDA where it can | insist | never
SIZINGS = ("auto", "on", "off")  # toydiff.jobs.validation.size: a file's width and weight decay chosen by probes
OBJECTIVES = ("denoise", "consistency", "meanflow")  # the process's own loss | consistency training | MeanFlow
#                                                    (toydiff.methods.of: each names a method)
SAMPLERS = ("ddpm", "ddim", "euler", "heun", "dpmpp-2m", "dpmpp-3m", "dpmpp-2m-sde", "dpmpp-2m-sde-heun",
            "dpmpp-3m-sde", "ode", "consistency", "meanflow")  # toydiff.diffusion.samplers.SAMPLERS
DIFFUSERS_PREFIX = "diffusers:"  # sample.sampler = "diffusers:NAME" drives a diffusers scheduler (toydiff.diffusion.interop)
SPACINGS = ("trailing", "linspace", "leading", "karras")  # NoiseSchedule.respace
SAMPLE_SPACINGS = ("auto",) + SPACINGS
VARIANCES = ("small", "large", "learned")  # ddpm's sigma_t^2 (toydiff.diffusion.samplers.sample_ddpm)
SAMPLE_VARIANCES = ("auto",) + VARIANCES


def choose(kind: str, value: str, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`, else the error that lists them (and the nearest)."""
    if value not in choices:
        raise unknown(kind, value, choices)
    return value


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ToydiffError(message)


# Upper limits on sizes, so that an absurd value (typed, or read from a damaged run directory) is refused before
# anything is allocated from it; each is far beyond what a low-dimensional model needs. What fits this machine's
# memory is checked again where the memory is taken (core.machine.check_memory).
MAX_T = 100_000  # schedule.T, sample.steps
MAX_WIDTH = 16_384  # model.width (its parameters grow as width^2)
MAX_DEPTH = 256  # model.depth
MAX_COMPONENTS = 256  # model.components (each is a class of the network's label embedding)
MAX_CRITIC = 100  # distill.critic
COMPONENTS_AUTO, COMPONENTS_FOUND = 0, -1  # model.components' two values that are not a count
MAX_TIME_DIM = 4096  # model.time_dim
MAX_OCTAVES = 24  # model.fourier_octaves (2^23 pi is already far below float32's resolution)
MAX_ROWS = 100_000_000  # data.n, sample.n
MAX_BATCH = 2**24  # train.batch_size, sample.batch_size
MAX_STEPS = 1_000_000_000  # train.steps and every other step count
MAX_EVAL = 100_000  # eval.n, eval.nll_n (k-NN and kernel metrics grow faster than n)
MAX_W2 = 10_000  # eval.w2_n (exact OT holds an n x n cost matrix)


def _at_most(name: str, value: float, limit: float) -> None:
    _check(value <= limit, f"{name} must be at most {limit:,}, got {value:,}: a larger value is far beyond what "
                           "toydiff's models need and would exhaust memory")


class _Section:
    """A config section: on construction every field is coerced to its declared type (ints to floats, lists
    to tuples, nothing else) and checked, so keyword arguments meet the rules a TOML file meets."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self):
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(f"{self.SECTION}.{f.name}", getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
        self._check()

    def _check(self) -> None:
        pass


@dataclass(frozen=True)
class DataConfig(_Section):
    SECTION: ClassVar[str] = "data"
    name: str = "moons"  # moons | sklearn-moons (the guide's make_moons) | a toydiff.data.zoo dataset (circles, gmm, ...)
    n: int = 10_000  # training points drawn from the dataset
    noise: float = -1.0  # std of the Gaussian noise added to each point, data units; -1 = the dataset's (moons 0.05)
    scale: float = 1.0  # multiplies the dataset's noise-free shape
    modes: int = 0  # the dataset's count (gaussians 8, grid 5 per side, checkerboard 4, pinwheel 5, rings 4, gmm 8)
    dim: int = 2  # gmm: the dimension
    scaling: str = "auto"  # minmax: per axis into [-1, 1] (the guide's) | standardize: zero mean, unit std
    #                        | quantile: each column through its distribution to a standard normal (tables)
    #                        | auto: quantile for a file's table, minmax for the zoo (toydiff.data.scaler.AUTO)
    path: str = ""  # the user's data: a .csv, .tsv, .npy, .npz or .parquet file; set, it replaces name and n
    columns: tuple[str, ...] = ()  # file columns to model, by name or 0-based index; () = all but the label
    label_column: str = ""  # file column of class labels (model.conditional uses them); "" = none
    holdout: float = 0.2  # share of the file's rows kept out of training, the evaluation's reference
    drop_missing: bool = False  # drop file rows with empty, NaN or infinite cells instead of refusing the file
    types: tuple[str, ...] = ()  # file columns' types where detection guesses wrong, "NAME=TYPE" each, TYPE one of
    #                              continuous | integer | ordinal | binary | categorical (toydiff.data.columns detects the rest)

    def _check(self):
        choose("dataset", self.name, DATASETS)
        choose("data.scaling", self.scaling, ("auto",) + SCALINGS)
        _check(self.n >= 1, f"data.n must be >= 1, got {self.n}")
        _at_most("data.n", self.n, MAX_ROWS)
        _at_most("data.modes", self.modes, 10_000)
        _check(self.noise >= 0 or self.noise == -1, f"data.noise must be >= 0 (or -1: the dataset's), got {self.noise}")
        _check(self.scale > 0, f"data.scale must be > 0, got {self.scale}")
        _check(self.modes >= 0, f"data.modes must be >= 0 (0 = the dataset's), got {self.modes}")
        _check(1 <= self.dim <= 4096, f"data.dim must be in 1..4096, got {self.dim}")
        _check(0 <= self.holdout < 1, f"data.holdout must be in [0, 1), got {self.holdout}")
        for entry in self.types:
            _check(entry.count("=") >= 1 and entry.rpartition("=")[0].strip() != "",
                   f"data.types entry '{entry}' must read NAME=TYPE, e.g. 'grade=categorical'")
            choose(f"data.types: the type of '{entry.rpartition('=')[0].strip()}'", entry.rpartition("=")[2].strip(),
                   COLUMN_TYPES)
        _check(not (self.path and self.name != "moons"),
               f"data.path ('{self.path}') and data.name ('{self.name}') both name the data; keep one")


@dataclass(frozen=True)
class ScheduleConfig(_Section):
    SECTION: ClassVar[str] = "schedule"
    process: str = "ddpm"  # ddpm (the discrete VP process of the betas below) | flow (flow matching's straight
    #                        path x_t = (1 - t) x0 + t eps, continuous t; the betas below are unused)
    name: str = "cosine"  # beta schedule: linear | polynomial | cosine | sigmoid
    T: int = 1000  # diffusion steps; t runs 1..T, t = 0 is the data (training cost does not grow with T);
    #                flow: the time grid t = k / T the samplers may visit (training draws t continuously)
    beta_start: float = 1e-4  # linear: beta_1 (Ho et al. 2020 use 1e-4 with T = 1000)
    beta_end: float = 0.02  # linear: beta_T (Ho et al. 2020 use 0.02 with T = 1000)
    beta_max: float = 0.99  # polynomial: beta_t = (beta_max * t / T) ** power, so beta_T = beta_max ** power
    power: float = 4.0  # polynomial: the guide's linspace(0, beta_max, T + 1) ** power
    cosine_s: float = 0.008  # cosine: offset s of Nichol and Dhariwal (2021)
    max_beta: float = 0.999  # cosine and sigmoid: betas are clipped here, as in Nichol and Dhariwal (2021)
    sigmoid_start: float = -3.0  # sigmoid: start of the sigmoid's input range (Jabri et al. 2023)
    sigmoid_end: float = 3.0  # sigmoid: end of the input range
    sigmoid_tau: float = 1.0  # sigmoid: temperature
    zero_terminal_snr: bool = False  # rescale so alpha_bar_T = 0 exactly (Lin et al. 2023); needs v or x0 prediction

    def _check(self):
        choose("schedule.process", self.process, PROCESSES)
        choose("schedule", self.name, SCHEDULES)
        _check(self.T >= 1, f"schedule.T must be >= 1, got {self.T}")
        _at_most("schedule.T", self.T, MAX_T)
        _check(self.sigmoid_end > self.sigmoid_start and self.sigmoid_tau > 0,
               "schedule.sigmoid_end must exceed sigmoid_start, and sigmoid_tau must be > 0")


@dataclass(frozen=True)
class ModelConfig(_Section):
    SECTION: ClassVar[str] = "model"
    arch: str = "mlp"  # denoiser network: mlp (residual MLP, any dimension) | guide (the guide's NoisePredictor)
    prediction: str = "v"  # what the network predicts: eps | x0 | v (v: well-conditioned where alpha_bar_t -> 0)
    #                        | edm (Karras et al. 2022's preconditioning, sigma_data 0.5; the ddpm process)
    width: int = 0  # mlp: hidden units per layer; 0 = auto: 64 for the zoo, more for a wide table (models.width)
    depth: int = 2  # mlp: residual blocks
    time_dim: int = 32  # mlp: size of the sinusoidal time embedding
    fourier_octaves: int = 3  # mlp: sin/cos features of x at frequencies 2^0..2^(k-1) * pi; 0 = off
    time_scale: float = 0.0  # mlp: the time embedding's angle at t = T; 0 = auto (toydiff.diffusion.models.time_scale)
    variance: str = "fixed"  # fixed (the sampler's choice) | learned (Nichol and Dhariwal 2021; hybrid loss; mlp)
    conditional: bool = False  # mlp: condition on the dataset's class labels (moons: 2) for per-class sampling
    components: int = 0  # mlp: the support's separate pieces, each sample drawing its piece first by the training
    #                      rows' shares, then a point of it (toydiff.data.components): 0 = auto (found for a
    #                      built-in dataset's unconditional run whose method draws pieces, else one:
    #                      toydiff.jobs.workflow.expected_pieces); -1 = found (as many as the training rows fall
    #                      into, any data); 1 = one (off); K >= 2 = exactly K (else an error)

    @property
    def pieces_asked(self) -> bool:
        """The user asked for pieces (found, or a count), not left them to auto."""
        return self.components not in (COMPONENTS_AUTO, 1)

    def _check(self):
        choose("model", self.arch, ARCHS)
        choose("prediction", self.prediction, PREDICTIONS)
        choose("model.variance", self.variance, MODEL_VARIANCES)
        _check(self.width >= 0, f"model.width must be >= 0 (0 = auto), got {self.width}")
        _check(self.depth >= 0, f"model.depth must be >= 0, got {self.depth}")
        _at_most("model.width", self.width, MAX_WIDTH)
        _at_most("model.depth", self.depth, MAX_DEPTH)
        _at_most("model.time_dim", self.time_dim, MAX_TIME_DIM)
        _at_most("model.fourier_octaves", self.fourier_octaves, MAX_OCTAVES)
        _check(self.time_dim >= 2 and self.time_dim % 2 == 0, f"model.time_dim must be even and >= 2, got {self.time_dim}")
        _check(self.fourier_octaves >= 0, f"model.fourier_octaves must be >= 0, got {self.fourier_octaves}")
        _check(self.time_scale >= 0, f"model.time_scale must be >= 0 (0 = auto), got {self.time_scale}")
        _check(self.components >= COMPONENTS_FOUND, f"model.components must be >= -1 (0 = auto, -1 = found, 1 = off), "
               f"got {self.components}")
        _at_most("model.components", self.components, MAX_COMPONENTS)
        _check(not self.pieces_asked or not self.conditional, "model.components and model.conditional cannot be "
               "combined yet: the class labels already split the rows; set model.components = 0 (auto) or 1")


@dataclass(frozen=True)
class TrainConfig(_Section):
    SECTION: ClassVar[str] = "train"
    steps: int = 6000  # optimizer steps (with full batches, the guide's "epochs")
    batch_size: int = 1024  # points per step; 0 = the whole data set every step (the guide's full batch)
    lr: float = 3e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    lr_schedule: str = "cosine"  # constant | cosine (decay to 0 over the run, after warm-up)
    warmup_steps: int = 100  # linear learning-rate warm-up
    grad_clip: float = 1.0  # clip the global gradient norm here; 0 = off
    loss_weighting: str = "uniform"  # uniform (L_simple) | min-snr (Hang et al. 2023)
    min_snr_gamma: float = 5.0  # min-snr: the SNR at which the weight is capped
    timestep_sampling: str = "auto"  # auto: log-normal for a built-in dataset on the ddpm process, else uniform
    #                                  (toydiff.methods: Method.timestep_sampling; docs/default.md measures it)
    #                                  | uniform | importance (p_t ~ sqrt(E[L_t^2]), Nichol and Dhariwal 2021)
    #                                     | log-normal (ddpm: EDM's ln sigma ~ N(-1.2, 1.2^2), Karras et al. 2022)
    #                                     | logit-normal (flow: t = sigmoid(N(0, 1)), Esser et al. 2024)
    coupling: str = "independent"  # flow: independent | ot (each batch's data and noise paired by exact
    #                                optimal transport, Tong et al. 2024; POT's exact solver) | reflow (each
    #                                row's own noise, from a teacher's ODE: set by `toydiff distill`)
    objective: str = "denoise"  # denoise (the process's own loss) | consistency (consistency training, Song et al.
    #                             2023, Algorithm 3; no teacher; sample it with sample.sampler = consistency)
    #                             | meanflow (flow: the mean velocity over [r, t], Geng et al. 2025; its sampler
    #                             is sample.sampler = meanflow)
    vlb_weight: float = 0.001  # model.variance = learned: lambda of L_hybrid = L_simple + lambda L_vlb
    label_dropout: float = 0.1  # model.conditional (or components): share of labels replaced by the null label
    #                             (for guidance; a model of pieces draws its vector field with that branch)
    validation: float = -1.0  # share of the training rows held back to stop training when their denoising loss stops
    #                           improving (early stopping, against memorizing a small table); -1 = auto: 0.1 for
    #                           a user's file (data.path), 0 (off) for the zoo's draws; ddpm and flow (a denoising loss)
    patience: float = 0.25  # early stopping: stop once the validation loss has not improved for this share of steps
    sizing: str = "auto"  # the width and weight decay chosen by the held-back rows' loss after short probes of each
    #                       (toydiff.jobs.validation): auto (a file with an auto width <= 128) | on | off
    ema_decay: float = 0.999  # EMA of the weights, decay min(ema_decay, (1 + k) / (10 + k)) at update k; 0 = off
    log_every: int = 100  # steps between loss-log rows (and the only host-device syncs)
    checkpoint_every: int = 1000  # steps between weight checkpoints; 0 = only at the end
    device: str = "auto"  # auto (cuda if present, else cpu) | cpu | cuda | cuda:N | mps
    threads: int = 0  # CPU threads for torch; 0 = auto: 1 (more were up to 4x slower on a loaded machine; measured)
    autocast: str = "none"  # none | bf16: the network's forward in bfloat16 (for GPUs), schedule math and loss in float32
    cuda_graphs: str = "auto"  # on CUDA, replay the whole step as one CUDA graph (toydiff.training.graphs), checked against
    #                            the eager step first: auto (where it can, else eager) | on (or an error) | off

    def _check(self):
        choose("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        choose("train.loss_weighting", self.loss_weighting, WEIGHTINGS)
        choose("train.timestep_sampling", self.timestep_sampling, TRAIN_TIMESTEP_SAMPLINGS)
        choose("train.coupling", self.coupling, COUPLINGS)
        choose("train.autocast", self.autocast, AUTOCASTS)
        choose("train.cuda_graphs", self.cuda_graphs, CUDA_GRAPH_MODES)
        choose("train.objective", self.objective, OBJECTIVES)
        choose("train.sizing", self.sizing, SIZINGS)
        _check(self.validation == -1 or 0 <= self.validation <= 0.5,
               f"train.validation must be in [0, 0.5] (or -1: auto), got {self.validation}")
        _check(0 < self.patience <= 1, f"train.patience must be in (0, 1], got {self.patience}")
        _check(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _check(self.batch_size >= 0, f"train.batch_size must be >= 0 (0 = full batch), got {self.batch_size}")
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
        _check(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        _check(0 <= self.ema_decay < 1, f"train.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        _check(self.min_snr_gamma > 0, f"train.min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        _check(self.vlb_weight >= 0, f"train.vlb_weight must be >= 0, got {self.vlb_weight}")
        _check(0 <= self.label_dropout < 1, f"train.label_dropout must be in [0, 1), got {self.label_dropout}")
        _check(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _check(self.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        _check(self.threads >= 0, f"train.threads must be >= 0 (0 = auto), got {self.threads}")
        for name in ("steps", "warmup_steps", "log_every", "checkpoint_every"):
            _at_most(f"train.{name}", getattr(self, name), MAX_STEPS)
        _at_most("train.batch_size", self.batch_size, MAX_BATCH)
        _at_most("train.threads", self.threads, 4096)


@dataclass(frozen=True)
class SampleConfig(_Section):
    SECTION: ClassVar[str] = "sample"
    sampler: str = "dpmpp-3m-sde"  # ddpm | ddim | euler | heun | dpmpp-2m | dpmpp-3m | dpmpp-2m-sde (midpoint)
    #                    | dpmpp-2m-sde-heun | dpmpp-3m-sde | ode | diffusers:NAME (a diffusers scheduler; [diffusers] extra)
    steps: int = 50  # sampling steps over a respaced schedule, at most T; 0 (or >= T) = all T
    spacing: str = "auto"  # which t a respaced sampler visits: trailing (starts at T) | linspace | leading | karras
    #                        | auto (trailing for ddpm and diffusers' schedulers, karras for the others)
    eta: float = 0.0  # ddim only: 0 = deterministic, 1 = the ancestral DDPM step
    variance: str = "auto"  # ddpm: small (beta_tilde_t) | large (beta_t) | learned | auto (learned if it can, else small)
    guidance: float = 1.0  # conditional models: x0 = x0_u + w (x0_c - x0_u); 1 = conditional, 0 = unconditional
    label: int = -1  # conditional models: sample this class only; -1 = classes in their training proportions
    use_ema: bool = True  # sample with the EMA weights when the run has them
    clip: bool = False  # clamp x0_hat to the training data's per-axis range (in the model's frame) at every step
    compile: bool = False  # torch.compile the network for sampling: pays only for large jobs (docs/benchmarks.md)
    cuda_graphs: str = "auto"  # on CUDA, replay the sampler's whole loop as one CUDA graph per batch shape, checked
    #                            against the eager loop first: auto (jobs of 2+ batches) | on (or an error) | off
    autocast: str = "none"  # none | bf16: the network's forward in bfloat16 (for GPUs); the sampler's math in float32
    round_integers: bool = True  # a file's integer and ordinal columns: samples rounded to whole numbers and to the
    #                              nearest training value (false: left as drawn, still within the training range;
    #                              binary and categorical columns always decoded)
    n: int = 5000  # samples drawn by `toydiff run`
    batch_size: int = 65536  # samples denoised at once (bounds memory)

    def _check(self):
        if not self.sampler.startswith(DIFFUSERS_PREFIX):
            choose("sampler", self.sampler, SAMPLERS)
        choose("sample.spacing", self.spacing, SAMPLE_SPACINGS)
        choose("sample.variance", self.variance, SAMPLE_VARIANCES)
        choose("sample.cuda_graphs", self.cuda_graphs, CUDA_GRAPH_MODES)
        choose("sample.autocast", self.autocast, AUTOCASTS)
        _check(self.steps >= 0, f"sample.steps must be >= 0 (0 = all T), got {self.steps}")
        _check(0 <= self.eta <= 1, f"sample.eta must be in [0, 1], got {self.eta}")
        _check(self.n >= 1, f"sample.n must be >= 1, got {self.n}")
        _check(self.guidance >= 0, f"sample.guidance must be >= 0, got {self.guidance}")
        _check(self.label >= -1, f"sample.label must be a class index or -1 (all classes), got {self.label}")
        _check(self.batch_size >= 1, f"sample.batch_size must be >= 1, got {self.batch_size}")
        _at_most("sample.steps", self.steps, MAX_T)
        _at_most("sample.n", self.n, MAX_ROWS)
        _at_most("sample.batch_size", self.batch_size, MAX_BATCH)
        _at_most("sample.label", self.label, 1_000_000)
        _at_most("sample.guidance", self.guidance, 1000)


@dataclass(frozen=True)
class PlotConfig(_Section):
    SECTION: ClassVar[str] = "plot"
    forward_t: tuple[int, ...] = ()  # t shown in the forward-process figure; () = 0, about T/5 and T
    field_t: tuple[int, ...] = ()  # t shown in the vector-field figure; () = about 0.3 T and T
    points: int = 100  # points scattered on the dataset and forward figures (the guide's 100; the samples figure
    #                    draws every sample)
    grid: int = 16  # arrows per side in the vector field
    columns: tuple[str, ...] = ()  # D != 2: columns in the pair plot (names or indices); () = first 4 PCs (or all)
    dpi: int = 150  # resolution of the PNG files

    def _check(self):
        _check(self.points >= 1, f"plot.points must be >= 1, got {self.points}")
        _check(self.grid >= 2, f"plot.grid must be >= 2, got {self.grid}")
        _check(self.dpi >= 10, f"plot.dpi must be >= 10, got {self.dpi}")
        _at_most("plot.points", self.points, 1_000_000)
        _at_most("plot.grid", self.grid, 256)
        _at_most("plot.dpi", self.dpi, 1200)
        _check(all(0 <= t <= MAX_T for t in self.forward_t + self.field_t),
               f"plot.forward_t and plot.field_t must hold t in 0..T, got {self.forward_t + self.field_t}")


@dataclass(frozen=True)
class EvalConfig(_Section):
    SECTION: ClassVar[str] = "eval"
    n: int = 5000  # samples compared with as many fresh iid reference points (n = 5000 has the power: docs/evaluation.md)
    w2_n: int = 2000  # points used by exact W2 (its cost grows about as n^3)
    k: int = 5  # neighbours for precision / recall / density / coverage
    draws: int = 20  # reference pairs behind each noise floor (10 leave the floor's std 25% uncertain)
    z_max: float = 3.0  # a metric more than this many floor deviations on the bad side is flagged
    nll_n: int = 1000  # held-out iid points whose ELBO and ODE likelihood are computed; 0 = skip likelihoods
    efficacy: bool = True  # a conditional run on a labelled table: classifiers trained on samples and on the training
    #                        rows, tested on the held-out rows (machine-learning efficacy)

    def _check(self):
        _check(self.n >= 20, f"eval.n must be >= 20, got {self.n}")
        _check(self.w2_n >= 2, f"eval.w2_n must be >= 2, got {self.w2_n}")
        _check(self.k >= 1, f"eval.k must be >= 1, got {self.k}")
        _check(self.draws >= 2, f"eval.draws must be >= 2 (a floor needs a spread), got {self.draws}")
        _check(self.z_max > 0, f"eval.z_max must be > 0, got {self.z_max}")
        _check(self.nll_n >= 0, f"eval.nll_n must be >= 0 (0 = skip), got {self.nll_n}")
        _at_most("eval.n", self.n, MAX_EVAL)
        _at_most("eval.nll_n", self.nll_n, MAX_EVAL)
        _at_most("eval.w2_n", self.w2_n, MAX_W2)
        _at_most("eval.k", self.k, 1000)
        _at_most("eval.draws", self.draws, 1000)


@dataclass(frozen=True)
class DistillConfig(_Section):
    """A few-step student made by `toydiff run` itself (the `fast` preset): with a method set, the configured
    run trains as the teacher, in the run directory's sibling OUT-teacher, and OUT is its student
    (toydiff.jobs.distill, the same as `toydiff distill OUT-teacher --method ... --out OUT`)."""
    SECTION: ClassVar[str] = "distill"
    method: str = "none"  # none | reflow | progressive | consistency (toydiff.jobs.distill)
    steps: int = 4  # the student's sampling steps: its network evaluations per sample
    train_steps: int = 0  # the student's training steps, all rounds together; 0 = the method's default
    pairs: int = 20_000  # reflow: noise -> data pairs drawn from the teacher's ODE
    critic: float = 0.0  # progressive: the weight of a critic's loss on the student's samples beside its
    #                      distillation loss (toydiff.methods.adversarial); 0 = no critic

    def _check(self):
        choose("distill.method", self.method, RUN_DISTILL)
        _check(self.steps >= 1, f"distill.steps must be >= 1 (the student's sampling steps), got {self.steps}")
        _check(self.train_steps >= 0, f"distill.train_steps must be >= 0 (0 = the method's default), got "
                                      f"{self.train_steps}")
        _check(self.pairs >= 2, f"distill.pairs must be >= 2, got {self.pairs}")
        _check(0 <= self.critic <= MAX_CRITIC, f"distill.critic must be in [0, {MAX_CRITIC}] (0 = no critic), got "
                                              f"{self.critic}")
        _check(self.critic == 0 or self.method != "none", "distill.critic weighs a few-step student's critic; "
               "set distill.method = progressive, or distill.critic = 0")
        _at_most("distill.steps", self.steps, MAX_T)
        _at_most("distill.train_steps", self.train_steps, MAX_STEPS)
        _at_most("distill.pairs", self.pairs, MAX_ROWS)


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole configuration. Sections may be given as their dataclasses or as plain dicts, which are
    checked like a TOML file: ExperimentConfig(schedule={"T": 100}, model={"prediction": "eps"})."""

    seed: int = 0  # every random draw (data, weights, batches, noise, samples) derives from this
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    plot: PlotConfig = field(default_factory=PlotConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self):
        object.__setattr__(self, "seed", _coerce("seed", self.seed, int))
        _check(0 <= self.seed < 2**63, f"seed must be an integer in [0, 2^63), got {self.seed}")
        for name, cls in _sections().items():
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, _section_from_dict(name, cls, value))
            elif not isinstance(value, cls):
                raise ToydiffError(f"[{name}] must be a table of keys (a dict or a {cls.__name__}), got {value!r}")
        self._check_across()

    def _check_across(self) -> None:
        """The rules that tie two sections together and belong to no method (a method's own rules are its
        check, toydiff.methods, which jobs.workflow.validate asks before anything runs)."""
        T = self.schedule.T
        for t in self.plot.forward_t:
            _check(0 <= t <= T, f"plot.forward_t has t = {t}; each t must be in 0..T = 0..{T}")
        for t in self.plot.field_t:
            _check(1 <= t <= T, f"plot.field_t has t = {t}; each t must be in 1..T = 1..{T}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        d = {k: {kk: list(vv) if isinstance(vv, tuple) else vv for kk, vv in v.items()} if isinstance(v, dict) else v
             for k, v in self.to_dict().items()}
        return tomli_w.dumps(d)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


@functools.cache
def _sections() -> dict[str, type]:
    hints = _hints(ExperimentConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(ExperimentConfig) if dataclasses.is_dataclass(hints[f.name])}


def _coerce(where: str, value: Any, hint: Any) -> Any:
    """Check one value against a field's type; ints are accepted for floats, lists for tuples, nothing else."""
    name = getattr(hint, "__name__", str(hint))
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not -2**63 <= value < 2**63:
            raise ToydiffError(f"{where} must be a 64-bit integer, got {value}")
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and (abs(value) > 1e300 or not math.isfinite(value)):
            raise ToydiffError(f"{where} must be a finite number, got {value!r}")
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif getattr(hint, "__origin__", None) is tuple:
        item = hint.__args__[0]
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
        name = "list of integers" if item is int else "list of strings"
    else:  # pragma: no cover - every field type is listed above
        raise TypeError(f"unsupported config type {hint}")
    if not ok:
        raise ToydiffError(f"{where} must be {_article(name)}, got {value!r}")
    return value


def _article(name: str) -> str:
    return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}.get(name, name)


def from_dict(d: dict[str, Any]) -> ExperimentConfig:
    """Build a validated config from nested dicts (as TOML gives); missing keys keep their defaults."""
    if not isinstance(d, dict):
        raise ToydiffError("a config must be a table of sections")
    sections = _sections()
    top = [f.name for f in dataclasses.fields(ExperimentConfig)]
    for key in d:
        if key not in top:
            valid = [k for k in top if k not in sections] + [f"[{s}]" for s in sections]
            raise ToydiffError(f"unknown config key '{key}'; valid keys: {', '.join(valid)}{did_you_mean(key, top)}")
    return ExperimentConfig(**d)


def _section_from_dict(section: str, cls: type, values: dict[str, Any]):
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise ToydiffError(f"unknown config key '{section}.{key}'; valid keys in [{section}]: {', '.join(names)}"
                               f"{did_you_mean(key, names)}")
    return cls(**values)


def merged(cfg: ExperimentConfig, updates: dict[str, Any]) -> ExperimentConfig:
    """cfg with the keys named in `updates` (nested like the TOML) replaced; every value is re-checked."""
    d = cfg.to_dict()
    for key, value in updates.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, dict) and isinstance(d.get(key), dict):
            d[key].update(value)
        else:
            d[key] = value
    return from_dict(d)


MAX_CONFIG_BYTES = 2**20  # a config or grid file; larger is not a config (/dev/zero, a data file given by mistake)


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a table: a regular file of at most MAX_CONFIG_BYTES, or a one-line error."""
    path = Path(path)
    text = read_text(path, "config file", MAX_CONFIG_BYTES)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ToydiffError(f"config file '{path}' is not valid TOML: {e}") from None
    except RecursionError:
        raise ToydiffError(f"config file '{path}' is not valid TOML: nested too deeply") from None


def loads(text: str, source: str = "config") -> ExperimentConfig:
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ToydiffError(f"{source} is not valid TOML: {e}") from None
    except RecursionError:
        raise ToydiffError(f"{source} is not valid TOML: nested too deeply") from None
    return from_dict(d)


def load(path: str | Path) -> ExperimentConfig:
    """A config file over the defaults."""
    return from_dict(read_toml(path))


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files("toydiff.presets").iterdir()
                  if p.name.endswith(".toml"))


def preset(name: str) -> ExperimentConfig:
    """A named configuration shipped with toydiff (`default` is the dataclass defaults)."""
    if name == "default":
        return ExperimentConfig()
    if name not in preset_names():
        raise unknown("preset", name, ["default"] + preset_names())
    text = resources.files("toydiff.presets").joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return loads(text, source=f"preset '{name}'")


def parse_override(item: str) -> tuple[list[str], Any]:
    """'section.key=value' -> (['section', 'key'], value); value is read as TOML, else taken as a string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ToydiffError(f"--set expects section.key=value, got '{item}'")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as moons or cosine
    except RecursionError:
        raise ToydiffError(f"--set {key}: the value is nested too deeply") from None
    return key.split("."), value


def with_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """Apply `--set section.key=value` overrides, all at once (a rule that ties two settings together sees both,
    in whatever order they were given); they go through the same checks as a TOML file."""
    updates: dict[str, Any] = {}
    for item in overrides:
        path, value = parse_override(item)
        if len(path) > 2:
            raise ToydiffError(f"--set expects section.key=value, got '{item}'")
        if len(path) == 2 and path[0] not in _sections():
            raise ToydiffError(f"unknown config section '{path[0]}' in --set {item}; "
                               f"valid sections: {', '.join(_sections())}{did_you_mean(path[0], _sections())}")
        if len(path) == 1 and path[0] in _sections():
            raise ToydiffError(f"--set {item}: [{path[0]}] is a section; set one of its keys, --set {path[0]}.KEY=VALUE")
        if len(path) == 1:
            updates[path[0]] = value
        else:
            updates.setdefault(path[0], {})[path[1]] = value
    return merged(cfg, updates) if updates else cfg


def samples_config(dataset: str, overrides: Sequence[str] = (), n: int | None = None,
                   draws: int | None = None) -> ExperimentConfig:
    """The configuration outside samples are judged by (`toydiff eval --samples`): a zoo dataset, with only
    [data] and [eval] settings overridden (nothing is trained); n and draws: eval.n and eval.draws."""
    if not isinstance(dataset, str):
        raise ToydiffError(f"the dataset is a name ({', '.join(DATASETS)}), not {type(dataset).__name__}")
    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
        raise ToydiffError("settings are a list of section.key=value strings, e.g. ['data.noise=0.1']")
    outside = [o for o in overrides if o.split(".", 1)[0] not in ("data", "eval")]
    if outside:
        raise ToydiffError(f"--samples takes only [data] and [eval] settings; drop --set {outside[0]}")
    given = [f"eval.{k}={v}" for k, v in (("n", n), ("draws", draws)) if v is not None]
    cfg = with_overrides(ExperimentConfig(data={"name": choose("dataset", dataset, DATASETS)}),
                         list(overrides) + given)
    if cfg.data.path:
        raise ToydiffError("--samples is judged against a dataset of the zoo; to judge against a file's rows, train "
                           "a run on it (its held-out rows are the reference)")
    return cfg
