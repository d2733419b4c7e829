"""A trained model with everything needed to use it, loaded back from its run directory, and sampling from it.

    run = toydiff.load("runs/demo")     # everything rebuilt from the directory (toydiff.runs.directory)
    x = run.sample(1000, seed=1)        # (1000, D) in data units
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .. import methods
from ..core.config import MAX_ROWS, ExperimentConfig, SampleConfig
from ..core.errors import ToydiffError, first_line
from ..core.machine import check_memory
from ..core.progress import Progress
from ..core.runtime import NoiseStream, derive_seed, resolve_device, set_threads
from ..core.formats import csv_text
from ..data.columns import Column, table_text
from ..data.components import Components
from ..data.scaler import Scaler, TableScaler
from ..data.tables import default_names
from ..diffusion.models import Autocast, check_batch_memory
from ..diffusion.parameterization import Denoiser
from ..diffusion.sampling import Plan, VPDiffusion, make_plan
from ..diffusion.schedules import NoiseSchedule
from ..methods import Method
from ..training import graphs
from .directory import MANIFEST, RunDir


@dataclass(frozen=True)
class Drawn:
    """Samples with the record of how they were drawn (written beside them in the run directory and reported
    with their metrics): sampler, steps, spacing, nfe (network evaluations per sample) and, on CUDA, what the
    loop graphs did."""

    samples: np.ndarray  # (n, D) data units
    record: dict
    trajectory: Optional[np.ndarray] = None  # (steps + 1, n, D) x_T .. x_0 in the model's frame, when asked
    labels: Optional[np.ndarray] = None  # (n,) the class of each sample, for a conditional model
    pieces: Optional[np.ndarray] = None  # (n,) the piece each sample was drawn in, for a model of pieces


def _shares(shares: list[float], count: int, rd: RunDir) -> tuple[float, ...]:
    """run.json's recorded shares of the pieces, checked (count of them, none negative, summing to 1)."""
    if len(shares) != count or min(shares) < 0 or abs(sum(shares) - 1) > 1e-3:
        raise ToydiffError(f"{rd.path / MANIFEST} is damaged: components.shares should be {count} shares summing "
                           f"to 1, got {shares}; the file was edited or corrupted")
    return tuple(s / sum(shares) for s in shares)


@dataclass
class Run:
    """A trained model with everything needed to use it, as stored in (or loaded from) a run directory."""

    path: Path
    config: ExperimentConfig
    scaler: Scaler
    schedule: NoiseSchedule
    model: nn.Module
    data: np.ndarray  # (N, D) training data, data units
    device: torch.device
    labels: Optional[np.ndarray] = None  # (N,) class labels in 0..K-1 of a conditional model's training data
    names: Optional[list[str]] = None  # the D column names (x1, x2, ... for the zoo)
    holdout: Optional[np.ndarray] = None  # (H, D) rows of the user's file kept out of training, data units
    class_names: list[str] = field(default_factory=list)  # the label values behind class indices 0..K-1
    holdout_labels: Optional[np.ndarray] = None  # (H,) class indices of the held-out rows (conditional, file)
    label_column: str = ""  # a conditional run on a file: its label column's name, written into samples.csv
    label_index: int = 0  # and that column's place among the columns
    components: Optional[Components] = None  # model.components: what was found (one piece: no prior)
    _compiled_model: Optional[nn.Module] = field(default=None, init=False, repr=False, compare=False)

    @property
    def dir(self) -> RunDir:
        return RunDir(self.path)

    @property
    def dim(self) -> int:
        return self.data.shape[1]

    @property
    def classes(self) -> int:
        """K for a class-conditional model, else 0."""
        return 0 if self.labels is None else int(self.labels.max()) + 1

    @property
    def row_labels(self) -> Optional[np.ndarray]:
        """The class (or piece) of each training row, as the network is conditioned on it; None: unconditional."""
        return self.pieces.labels if self.pieces is not None else self.labels

    @property
    def pieces(self) -> Optional[Components]:
        """The support's pieces the model draws first (model.components found two or more), or None."""
        return self.components if self.components is not None and self.components.count > 1 else None

    @property
    def frame_dim(self) -> int:
        """The coordinates the network sees: D, or more where a categorical column is one-hot."""
        return self.scaler.frame_dim

    @property
    def column_names(self) -> list[str]:
        return self.names or default_names(self.dim)

    @property
    def columns(self) -> Optional[tuple[Column, ...]]:
        """A user's table's column types (toydiff.data.columns); None for the zoo's data."""
        return self.scaler.columns if isinstance(self.scaler, TableScaler) else None

    def class_index(self, label: str | int) -> int:
        """A class of a conditional model given by its name (a value of the label column; names first, so a
        class named "2" is that class) or by its index, as its index; -1 (all classes) passes through."""
        names = self.class_names or [str(k) for k in range(self.classes)]
        if not self.classes:
            raise ToydiffError(f"'{self.path}' is not a conditional model, so it has no classes to choose from; "
                               "drop --label / --counts")
        text = str(label).strip()
        if text in names:
            return names.index(text)
        if text.lstrip("-").isdigit() and -1 <= int(text) < self.classes:
            return int(text)
        raise ToydiffError(f"'{text}' is not a class of '{self.path}'; its classes are "
                           f"{', '.join(names[:10])}{', ...' if len(names) > 10 else ''} (or their indices 0.."
                           f"{self.classes - 1}, or -1 for all)")

    def table_text(self, samples: np.ndarray, labels: Optional[np.ndarray] = None) -> str:
        """Samples as the CSV text of the user's table (its columns' names, order and types, the label column
        back in its place for a conditional run), or of the columns of the zoo's data."""
        if self.columns is None:
            return csv_text(samples, self.column_names)
        return table_text(samples, self.columns, labels if self.label_column else None, self.label_column,
                          self.label_index, self.class_names)

    @property
    def method(self) -> Method:
        """The generative method that trained this run (toydiff.methods)."""
        return methods.of(self.config)

    def denoiser_for(self, labels: torch.Tensor | None = None, guidance: float = 1.0,
                     model: nn.Module | None = None) -> Denoiser:
        """The run's network (or `model`, a network of the same kind) as its method's denoiser."""
        return self.method.denoiser(self.config, self.model if model is None else model, self.schedule, labels,
                                    guidance)

    @property
    def denoiser(self) -> Denoiser:
        """The unconditional denoiser (a conditional model asked with its null label)."""
        return self.denoiser_for()

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", threads: int = 0, weights: bool = True) -> "Run":
        """Rebuild a run from its directory alone (config, scaler, data, weights); weights=False leaves the
        model at its seeded initialisation (for resuming from the training checkpoint)."""
        rd = RunDir(path)
        info = rd.read_manifest()
        cfg = rd.read_config()
        scaler = rd.read_scaler()
        data, labels, holdout = rd.read_data(scaler.dim, cfg.model.conditional, info.get("classes"))
        found = info.get("components")
        pieces = rd.read_components(len(data), found["count"] if found and found["count"] > 1 else None)
        components = None if not found else Components.of(
            np.zeros(len(data), dtype=np.int64) if pieces is None else pieces, found["radius"], found.get("note", ""))
        if pieces is not None and "shares" in found:  # drawn by the recorded shares (a student's: its teacher's)
            components = dataclasses.replace(components, shares=_shares(found["shares"], found["count"], rd))
        dev = resolve_device(device)
        set_threads(threads, dev)  # for sampling (resume_run sets train.threads for training)
        methods.check(cfg)  # a config.toml edited into a combination its method refuses
        schedule, model = methods.of(cfg).build(cfg, scaler.frame_dim, dev,
                                                int(labels.max()) + 1 if labels is not None else
                                                0 if pieces is None else int(pieces.max()) + 1)
        if weights:
            rd.load_weights(model, ema=cfg.sample.use_ema)  # sampling uses the moving average when there is one
        model.eval()
        names = info.get("columns") or default_names(data.shape[1])
        return cls(rd.path, cfg, scaler, schedule, model, data, dev, labels, names, holdout,
                   info.get("class_names") or [], rd.read_holdout_labels(holdout) if labels is not None else None,
                   info.get("label_column", "") if labels is not None else "", info.get("label_index", 0), components)

    def settings(self, **given) -> SampleConfig:
        """The run's [sample] settings with the given ones replaced (None keeps the run's), checked like a config."""
        given = {k: v for k, v in given.items() if v is not None}
        return dataclasses.replace(self.config.sample, **given) if given else self.config.sample

    def plan(self, settings: Optional[SampleConfig] = None) -> Plan:
        """The sampling plan (toydiff.diffusion.sampling) for `settings` (default: the run's own)."""
        if settings is not None:
            self.method.check_sampler(self.config, settings.sampler)
        return make_plan(settings or self.config.sample, VPDiffusion(self.schedule),
                         learned_variance=self.config.model.variance == "learned", classes=self.classes)

    def sample(self, n: int, *, trajectory: bool = False, **settings):
        """n samples in data units, an (n, D) array; with trajectory=True (samples, path). What `draw` does,
        without its record: `Run.draw(...).record` says how they were drawn (sampler, steps, nfe)."""
        drawn = self.draw(n, trajectory=trajectory, **settings)
        return (drawn.samples, drawn.trajectory) if trajectory else drawn.samples

    def draw(self, n: int, *, seed: Optional[int] = None, batch_size: Optional[int] = None,
             sampler: Optional[str] = None, steps: Optional[int] = None, spacing: Optional[str] = None,
             eta: Optional[float] = None, clip: Optional[bool] = None, label: Optional[int] = None,
             guidance: Optional[float] = None, trajectory: bool = False, compile: Optional[bool] = None,
             cuda_graphs: Optional[str] = None, autocast: Optional[str] = None, progress: bool = False,
             into: Optional[np.ndarray] = None) -> "Drawn":
        """Draw n samples in data units, in batches of at most `batch_size` (bounded memory), with the record
        of how they were drawn (`Drawn`).

        sampler, steps, spacing, eta, clip, label, guidance, compile, cuda_graphs and autocast default to the
        run's [sample] settings; steps < T samples on the respaced schedule. A conditional model samples class
        `label`, or for label = -1 classes drawn in their training proportions, with classifier-free guidance
        scale `guidance`. With trajectory=True, `Drawn.trajectory` (steps + 1, n, D) holds
        x_T .. x_0 in the model's scaled frame (the frame of the figures). compile runs the network through
        torch.compile (compiled once per Run, again for each new batch shape); on CUDA, cuda_graphs replays
        each recurring batch shape's whole loop as one CUDA graph (toydiff.training.graphs.LoopGraphs; the same samples
        as eager), and autocast = bf16 runs the network in bfloat16. progress shows the steps (the batches of
        a graphed job).
        A user's table comes back as values its columns take (toydiff.data.scaler.TableScaler): binary and
        categorical columns as their levels, integers whole and ordinals on their training values
        (sample.round_integers), numbers within the training rows' range. `Drawn.labels` holds a conditional model's class of each sample.
        into: an (n, D) array to write the samples into and return (a memory map: `core.files.npy_writer`), so
        that memory stays that of one batch however large n is.
        """
        self.check_count(n)
        if seed is not None and not 0 <= seed < 2**63:
            raise ToydiffError(f"the sampling seed must be an integer in [0, 2^63), got {seed}")
        cfg = self.settings(batch_size=batch_size, sampler=sampler, steps=steps, spacing=spacing, eta=eta, clip=clip,
                            label=label, guidance=guidance, compile=compile, cuda_graphs=cuda_graphs,
                            autocast=autocast)
        plan = self.plan(cfg)
        base_seed = derive_seed(self.config.seed if seed is None else seed, "sample")
        gen = torch.Generator(device=self.device).manual_seed(base_seed)  # diffusers' schedulers draw from it
        bounds = self._bounds() if cfg.clip else None
        model = self._compiled() if cfg.compile else self.model
        model = Autocast(model) if cfg.autocast == "bf16" else model
        compile_errors = (torch._dynamo.exc.TorchDynamoException,) if cfg.compile else ()  # () catches nothing
        if into is not None and (into.shape != (n, self.dim) or trajectory):
            raise ValueError(f"`into` must be an ({n}, {self.dim}) array, without a trajectory")
        if into is None:
            check_memory(n * self.dim * 8 * (2 + (plan.steps + 1 if trajectory else 0)),
                         f"{n:,} samples of {self.dim} columns" + (" with their paths" if trajectory else ""),
                         "draw fewer at a time (--n), or write them to a .npy file (--out FILE.npy): streamed")
        check_batch_memory(self.config.model, min(cfg.batch_size, n), "sample.batch_size (--batch-size)",
                           training=False, dim=self.frame_dim)
        samples = np.empty((n, self.dim)) if into is None else into  # each batch is written into it in data units
        drawn_labels = np.empty(n, dtype=np.int64) if self.labels is not None or self.pieces is not None else None
        paths, calls, bad = [], 0, 0
        batches, per_batch = math.ceil(n / cfg.batch_size), plan.evaluations_per_batch
        graphed = graphs.wanted(cfg.cuda_graphs, self.device, "sample.cuda_graphs",
                                "a trajectory is read at every step" if trajectory else plan.graph_blocker)
        loops = graphs.LoopGraphs(graphs.side_stream(self.device) if graphed else None, strict=cfg.cuda_graphs == "on")
        step_bar = per_batch and not graphed  # a replayed loop cannot report its steps: the bar moves per batch
        bar = Progress(batches * per_batch if per_batch else batches, "sample", "step" if per_batch else "batch",
                       enabled=progress)
        calls_of: dict[int, int] = {}  # network calls of a batch of b samples (a replay runs no Python to count)
        with graphs.on(loops.stream):  # a graphed job runs wholly on its capture stream
            for start in range(0, n, cfg.batch_size):
                b = min(cfg.batch_size, n - start)
                stream = NoiseStream(base_seed, start, b, self.device)  # each sample's noise, whatever the batches
                labels = self._draw_labels(b, cfg.label, stream)
                x_T = stream.randn((b, self.frame_dim))
                visited: list[torch.Tensor] = []

                def callback(t, x_t, x0_hat):
                    if step_bar:
                        bar.update()
                    if trajectory:
                        visited.append(x_t.cpu())

                def loop(x_T, labels, noise):
                    denoiser = self.denoiser_for(labels, cfg.guidance, model)
                    x0 = plan.run(denoiser, x_T, noise=noise, generator=gen, bounds=bounds,
                                  callback=callback if trajectory or (progress and step_bar) else None)
                    calls_of[x_T.shape[0]] = denoiser.calls  # each sample of the batch saw every call
                    return x0
                try:
                    x0 = loops.run(loop, [x_T, labels], stream, capture=cfg.cuda_graphs == "on"
                                   or (b == cfg.batch_size and n // cfg.batch_size >= 2)) if graphed \
                        else loop(x_T, labels, stream)
                    x0 = x0.cpu()
                except compile_errors as e:
                    raise ToydiffError(f"torch.compile failed ({first_line(e)}); sample without --compile "
                                       "(sample.compile = false)") from None
                calls += calls_of[b]
                if not step_bar:
                    bar.update(per_batch or 1)
                z = x0.cpu().double().numpy()
                bad += int(np.count_nonzero(~np.isfinite(z).all(axis=1)))
                samples[start:start + b] = self.scaler.inverse(z, whole=cfg.round_integers)
                if drawn_labels is not None:
                    drawn_labels[start:start + b] = labels.cpu().numpy()
                if trajectory:
                    paths.append(torch.stack(visited + [x0.cpu()]))
        graphs.join(loops.stream)
        bar.close()
        if bad:  # refused here, before any caller writes them
            raise ToydiffError(f"{bad} of the {n} samples came out NaN or infinite; nothing was written. The "
                               f"weights or the scaler of '{self.path}' may be damaged, or the guidance scale "
                               f"({cfg.guidance:g}) too large: lower it, or sample without the EMA weights "
                               "(sample.use_ema = false)")
        return Drawn(samples, {"sampler": plan.sampler, "steps": plan.steps, "spacing": plan.spacing,
                               "nfe": round(calls / batches, 2), **({"cuda_graphs": loops.note} if graphed else {})},
                     torch.cat(paths, dim=1).numpy() if trajectory else None,
                     drawn_labels if self.labels is not None else None,
                     drawn_labels if self.pieces is not None else None)

    @staticmethod
    def check_count(n: int) -> None:
        """A number of samples to draw: 1..config.MAX_ROWS, or a one-line error."""
        if not 1 <= n <= MAX_ROWS:
            raise ToydiffError(f"the number of samples must be in 1..{MAX_ROWS:,}, got {n}")

    def _bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training data's per-axis range in the model's frame (sample.clip)."""
        scaled = torch.as_tensor(self.scaler.transform(self.data), dtype=torch.float32, device=self.device)
        return scaled.amin(0), scaled.amax(0)

    def _compiled(self) -> nn.Module:
        if self._compiled_model is None:
            self._compiled_model = torch.compile(self.model)
        return self._compiled_model

    def initial_noise(self, n: int, seed: Optional[int] = None, label: Optional[int] = None) -> torch.Tensor:
        """The x_T (n, frame_dim) that draw(n, seed=seed, label=label) starts its samples from (in the model's
        frame), whatever its batches: each sample's stream replayed to its x_T (after the uniform number that
        draws its class or piece, where one is drawn)."""
        stream = NoiseStream(derive_seed(self.config.seed if seed is None else seed, "sample"), 0, n, self.device)
        label = self.config.sample.label if label is None else label
        if (self.labels is not None or self.pieces is not None) and label < 0:
            stream.rand(n)
        return stream.randn((n, self.frame_dim))

    def _draw_labels(self, n: int, label: int, stream: NoiseStream) -> torch.Tensor | None:
        """n labels for a conditional model: all `label`, or (-1) drawn with the training classes' frequencies
        (one uniform number per sample, by inverting their cumulative distribution); for a model of pieces
        (model.components), each sample's piece, drawn the same way with the training rows' shares."""
        if self.labels is None and self.pieces is None:
            return None
        if label >= 0:
            return torch.full((n,), label, dtype=torch.long, device=self.device)
        cdf = np.cumsum(np.bincount(self.labels, minlength=self.classes)) / len(self.labels) \
            if self.labels is not None else np.cumsum(self.pieces.shares)
        u = stream.rand(n).cpu().numpy()
        drawn = np.searchsorted(cdf, u, side="right").clip(max=len(cdf) - 1)
        return torch.as_tensor(drawn, device=self.device)
