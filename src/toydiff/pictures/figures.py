"""Compute what each figure shows (the guide's five for 2-D data; pair plot and marginals otherwise), from a Run,
and draw it (make_figures: matplotlib Figures) or write it into the run directory (write_figures: PNG files).

The drawing itself lives in `plots` (numpy in, Figure out); this module runs the
model and the schedule to get the arrays; the figures' file names are toydiff.runs.directory's.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from ..core.errors import ToydiffError
from ..core.files import atomic_write_bytes
from ..core.runtime import numpy_rng, torch_generator
from ..data.tables import column_index
from ..diffusion.schedules import NoiseSchedule
from ..runs.run import Run
from . import plots

ORACLE_TS = 12  # t values (log-spaced) at which the learned field is compared with the exact one
TRAJECTORIES = 12  # reverse paths (probability-flow ODE, DDIM) drawn on the vector field
FIGURES = ("dataset", "forward", "samples", "vector_field", "schedules")  # the guide's five; and "loss", any run
MARGINALS = 32  # columns the marginals figure shows (the first ones): wide data keeps a bounded figure


def default_forward_t(T: int) -> tuple[int, ...]:
    """0, about T / 5 and T: the guide's (0, 2, 10) at T = 10."""
    return tuple(sorted({0, max(1, round(T / 5)), T}))


def default_field_t(schedule: NoiseSchedule) -> tuple[int, ...]:
    """The first t whose noise-to-signal ratio sqrt((1 - abar_t) / abar_t) reaches 0.1, and T.

    Fine structure shows at that noise level whatever the schedule; for the guide's
    schedule it is its (3, T)."""
    ab = schedule.alpha_bar64[1:]
    with np.errstate(divide="ignore"):
        nsr = np.sqrt((1 - ab) / ab)
    return tuple(sorted({int(np.argmax(nsr >= 0.1)) + 1, schedule.T}))


def _subset(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return x[rng.choice(len(x), size=min(k, len(x)), replace=False)]


def _frame_scale(run: Run, t: int) -> float:
    """What x_t is drawn in: the process's own frame (Method.frame_scale: a flow run's x_t = (1 - t) x0 + t eps
    is c(t) times the VP view its schedule and denoiser work in; 1 for ddpm)."""
    return run.method.frame_scale(run.config, run.schedule, t)


def forward_panels(run: Run, ts: tuple[int, ...], x0: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """x_t ~ q(x_t | x_0) for the same points and the same eps at every t."""
    x0_t = torch.as_tensor(x0, dtype=torch.float32, device=run.device)
    eps = torch.randn(x0_t.shape, generator=torch_generator(run.config.seed, "figure-forward", run.device),
                      device=run.device)
    panels = []
    for t in ts:
        t_vec = torch.full((len(x0_t),), t, dtype=torch.long, device=run.device)
        panels.append((t, (run.schedule.q_sample(x0_t, t_vec, eps) * _frame_scale(run, t)).cpu().numpy()))
    return panels


@torch.no_grad()
def field_panels(run: Run, ts: tuple[int, ...], grid: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """eps_theta(x, t) on the grid points for each t (the figure draws its negative)."""
    g = torch.as_tensor(grid, dtype=torch.float32, device=run.device)
    out = []
    for t in ts:
        t_vec = torch.full((len(g),), t, dtype=torch.long, device=run.device)
        out.append((t, run.denoiser.eps(g / _frame_scale(run, t), t_vec).cpu().numpy()))
    return out


def schedule_panels(run: Run) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """linear and polynomial (the guide's Fig. 5), and the configured schedule if it is another, at the same T;
    for a flow-matching run, its straight path seen as a VP schedule (schedules.flow_betas) beside them."""
    cfg = run.config.schedule
    own = run.method.schedule_panel(run.config, run.schedule)  # a schedule none of the beta schedules is
    names = ["linear", "polynomial"] + ([cfg.name] if cfg.name not in ("linear", "polynomial") else [])
    panels = []
    for name in names:
        try:
            s = NoiseSchedule.from_config(dataclasses.replace(cfg, name=name))
        except ToydiffError:  # e.g. linear's beta_end > 1: nothing to compare with
            continue
        title = f"{name}{' (this run)' if name == cfg.name and own is None else ''}, $T={s.T}$"
        panels.append((title, s.betas64, 1 - s.alpha_bar64))
    return panels + ([own] if own is not None else [])


def pair_columns(run: Run, data: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The (D, k) projection shown by the pair plot and its axis names: plot.columns of the data by name or
    index, else the first min(D, 4) principal components of the scaled training data (PCA is orthonormal,
    so isotropic noise stays isotropic in the projection)."""
    names, d = run.column_names, run.frame_dim
    if run.config.plot.columns:  # a categorical column is shown by its first level's coordinate
        index = [column_index(names, c, "plot.columns: the data") for c in run.config.plot.columns]
        return np.eye(d)[:, [run.scaler.frame_columns[i] for i in index]], [names[i] for i in index]
    if d <= 4:
        return np.eye(d), run.scaler.frame_names or list(names)
    from sklearn.decomposition import PCA
    k = min(d, 4)
    return PCA(n_components=k, random_state=0).fit(data).components_.T, [f"PC{i + 1}" for i in range(k)]


def make_figures(run: Run, samples: np.ndarray) -> dict[str, Figure]:
    """The figures of a run and its samples (data units), as matplotlib Figures, name -> Figure (nothing written).

    D = 2: the guide's five (FIGURES). Other D: a pair plot of samples over data (plot.columns, or the
    first principal components), the per-column marginals in data units, the forward process in the pair
    plot's first two axes (D >= 2) and the schedules. Any D: the loss curve of its training log ("loss").
    """
    figures = _two_dims(run, samples) if run.frame_dim == 2 else _other_dims(run, samples)
    log = run.dir.read_log()
    if log is not None:
        figures["loss"] = plots.loss_figure(log["step"], log["loss"], log["lr"])
    return figures


def _two_dims(run: Run, samples: np.ndarray) -> dict[str, Figure]:
    cfg, T = run.config.plot, run.schedule.T
    rng = numpy_rng(run.config.seed, "figures")
    data = run.scaler.transform(run.data)
    density = _subset(data, 2000, rng)
    shown = _subset(data, cfg.points, rng)
    figures = {
        "dataset": plots.points_figure(density, shown, "data"),
        "forward": plots.forward_figure(forward_panels(run, cfg.forward_t or default_forward_t(T), shown)),
        "samples": plots.points_figure(density, run.scaler.transform(samples), f"all {len(samples)} samples over "
                                       "the data", every=True),
    }
    axis = np.linspace(-plots.LIM, plots.LIM, cfg.grid)
    grid = np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2)
    # the probability-flow paths (deterministic DDIM): smooth, along the field, where a stochastic sampler's zig-zag
    _, path = run.sample(TRAJECTORIES, seed=run.config.seed + 1, trajectory=True, sampler="ddim",
                         steps=min(50, T), spacing="trailing")
    # at most 20 segments, evenly spaced in t: 1000 Brownian-like steps would hide the path's shape
    n_steps = len(path) - 1  # T, or fewer on a respaced schedule
    shown_steps = np.unique(np.linspace(0, n_steps, min(n_steps, 20) + 1).round().astype(int))
    figures["vector_field"] = plots.vector_field_figure(
        grid, field_panels(run, cfg.field_t or default_field_t(run.schedule), grid), T,
        trajectory=path[shown_steps])
    figures["schedules"] = plots.schedule_figure(schedule_panels(run))
    exact = oracle_panels(run, grid, (cfg.field_t or default_field_t(run.schedule))[0])
    if exact is not None:
        figures["oracle"] = plots.oracle_figure(grid, *exact)
    return figures


@torch.no_grad()
def oracle_panels(run: Run, grid: np.ndarray, t: int):
    """Where the data's exact law is known (oracle.oracle_for) and the frame is affine: the learned and the exact
    -eps on the grid at t, the error |eps_theta - eps| over the grid at that t, and its root mean square over the
    grid (plain, and weighted by the noised data's density p_t: where samples pass) at ORACLE_TS values of t;
    None elsewhere."""
    from ..diffusion.oracle import oracle_for
    from ..data.scaler import AffineScaler

    law = oracle_for(run.config.data)
    if law is None or not isinstance(run.scaler, AffineScaler) or run.dim != 2:
        return None
    law = law.scaled(run.scaler.shift, run.scaler.scale)
    ts = np.unique(np.geomspace(1, run.schedule.T, ORACLE_TS).round().astype(int))
    curve = []
    for s in ts:
        scale = _frame_scale(run, int(s))
        x = torch.as_tensor(grid / scale, dtype=torch.float64, device=run.device)
        t_vec = torch.full((len(x),), int(s), dtype=torch.long, device=run.device)
        alpha_bar = run.schedule.alpha_bar_at(t_vec, x).cpu()
        learned = run.denoiser.eps(x.float(), t_vec).double().cpu()
        true = law.eps(x.cpu(), t_vec.cpu(), alpha_bar)
        error = (learned - true).norm(dim=1).numpy()
        weight = torch.softmax(law.log_prob(x.cpu(), alpha_bar.flatten()), 0).numpy()
        curve.append((float(np.sqrt((error**2).mean())), float(np.sqrt((weight * error**2).sum()))))
        if s == ts[np.argmin(np.abs(ts - t))]:
            at = (int(s), learned.numpy(), true.numpy(), error)
    return at, (ts, np.array(curve))


def write_figures(run: Run, samples: np.ndarray) -> dict[str, Path]:
    """Draw make_figures' figures into the run directory (PNG, atomically); returns name -> path."""
    paths = {}
    run.dir.figures.mkdir(parents=True, exist_ok=True)
    for name, fig in make_figures(run, samples).items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=run.config.plot.dpi)
        paths[name] = run.dir.figure(name)
        atomic_write_bytes(paths[name], buf.getvalue())
    return paths


def _other_dims(run: Run, samples: np.ndarray) -> dict[str, Figure]:
    cfg, T = run.config.plot, run.schedule.T
    rng = numpy_rng(run.config.seed, "figures")
    data = run.scaler.transform(run.data)
    projection, names = pair_columns(run, data)
    shown_data = _subset(data, 2000, rng)
    shown_samples = _subset(run.scaler.transform(samples), 2000, rng)
    figures = {"pairs": plots.pair_figure(shown_data @ projection, shown_samples @ projection,
                                          [f"{n} (scaled)" for n in names], "samples over the data"),
               "marginals": plots.marginals_figure(_subset(run.data, 5000, rng)[:, :MARGINALS],
                                                   _subset(samples, 5000, rng)[:, :MARGINALS],
                                                   run.column_names[:MARGINALS])}
    if projection.shape[1] >= 2:
        shown = _subset(data, cfg.points, rng)
        panels = [(t, x_t @ projection[:, :2]) for t, x_t in forward_panels(run, cfg.forward_t or default_forward_t(T),
                                                                            shown)]
        figures["forward"] = plots.forward_figure(panels)
    figures["schedules"] = plots.schedule_figure(schedule_panels(run))
    return figures


ANIMATION_POINTS = 2000  # points in an animation by default
ANIMATION_FRAMES = 60  # frames by default (the default run's 50 steps: 51 frames, a 0.6 MB GIF)
ANIMATION_MAX_POINTS = 100_000  # an animation's points and frames at most: every frame is drawn in memory
ANIMATION_MAX_FRAMES = 1000
FRAME_MS, HOLD_MS = 80, 1500  # each frame's time on screen, and the last frame's


def _projection(run: Run) -> np.ndarray:
    """(D, 2): the plane an animation is drawn in, the pair plot's first two axes (the identity for D = 2)."""
    if run.frame_dim < 2:
        raise ToydiffError("an animation draws points in a plane; the data has one column")
    if run.frame_dim == 2:
        return np.eye(2)
    return pair_columns(run, run.scaler.transform(run.data))[0][:, :2]


def check_animation(n: int, frames: int) -> None:
    """An animation's points and frames within what is drawn in memory, or a one-line error."""
    ok = all(not isinstance(v, bool) and isinstance(v, (int, np.integer)) for v in (n, frames))
    if not ok or not 1 <= n <= ANIMATION_MAX_POINTS or not 2 <= frames <= ANIMATION_MAX_FRAMES:
        raise ToydiffError(f"--n must be in 1..{ANIMATION_MAX_POINTS:,} and --frames in 2..{ANIMATION_MAX_FRAMES}, "
                           f"got --n {n} --frames {frames}")


def _evenly(count: int, frames: int) -> np.ndarray:
    return np.unique(np.linspace(0, count - 1, min(frames, count)).round().astype(int))


def reverse_frames(run: Run, n: int = ANIMATION_POINTS, frames: int = ANIMATION_FRAMES,
                   progress: bool = False) -> list[tuple[str, np.ndarray]]:
    """The reverse process from noise to samples with the run's own sampler: (label, x_t (n, 2)) at `frames`
    of its steps, evenly spaced, the last the samples; x_t in the process's own frame (as the figures)."""
    check_animation(n, frames)
    _, path = run.sample(n, seed=run.config.seed + 2, trajectory=True, progress=progress)
    plan = run.plan()
    steps = len(path) - 1
    fixed = steps == plan.grid.T  # a fixed-step sampler visits every grid point once (the adaptive ODE does not)
    projection = _projection(run)
    out = []
    for k in _evenly(steps + 1, frames):
        t = int(plan.grid.model_t(torch.tensor([plan.grid.T - k]))) if fixed and k < steps else 0
        label = f"t = {t}, step {k} of {steps}" if fixed or k == steps else f"step {k} of {steps}"
        out.append((label, (path[k] * _frame_scale(run, t)) @ projection))
    return out


def forward_frames(run: Run, n: int = ANIMATION_POINTS, frames: int = ANIMATION_FRAMES) -> list[tuple[str, np.ndarray]]:
    """The forward process from the data to noise: the same points and the same noise at `frames` t in 0..T."""
    check_animation(n, frames)
    rng = numpy_rng(run.config.seed, "animation")
    x0 = _subset(run.scaler.transform(run.data), n, rng)
    ts = tuple(int(t) for t in _evenly(run.schedule.T + 1, frames))
    projection = _projection(run)
    return [(f"t = {t} of {run.schedule.T}", x_t @ projection) for t, x_t in forward_panels(run, ts, x0)]


ANIMATION_FORMATS = (".gif", ".webp")  # Pillow writes both, no system binary needed


def write_animation(run: Run, frames: list[tuple[str, np.ndarray]], out: Path) -> Path:
    """The frames as a looping animation at `out` (atomically): a GIF, or an animated WebP (full colour, smaller)
    by its suffix; the data's density behind, the last frame held."""
    from PIL import Image

    if out.suffix not in ANIMATION_FORMATS:
        raise ToydiffError(f"an animation is written as {' or '.join(ANIMATION_FORMATS)}, not '{out.suffix}'")
    data = run.scaler.transform(run.data) @ _projection(run)
    first = np.abs(frames[0][1]).max(axis=1) if len(frames[0][1]) else np.zeros(1)
    lim = max(plots.LIM, float(np.quantile(first, 0.99)) + 0.1)  # fixed axes that hold the noise too
    images = plots.animation_frames(_subset(data, 2000, numpy_rng(run.config.seed, "figures")), frames, lim=lim)
    webp = out.suffix == ".webp"
    pictures = [Image.fromarray(a) if webp else Image.fromarray(a).convert("P", palette=Image.Palette.ADAPTIVE,
                                                                           colors=64) for a in images]
    buf = io.BytesIO()
    options = {"quality": 80} if webp else {"optimize": True}
    pictures[0].save(buf, format="WEBP" if webp else "GIF", save_all=True, append_images=pictures[1:], loop=0,
                     duration=[FRAME_MS] * (len(pictures) - 1) + [HOLD_MS], **options)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    return out


def samples_over_data(samples: np.ndarray, target, points: int = 2000) -> bytes:
    """A PNG of samples toydiff did not make over a fresh draw of their dataset (`toydiff eval --samples`), in the
    target's frame: all samples for 2-D data, else the first two columns (one column: against zero)."""
    def plane(x: np.ndarray) -> np.ndarray:
        return np.c_[x, np.zeros(len(x))] if x.shape[1] == 1 else x[:, :2]
    data = target.frame.transform(target.draw(numpy_rng(0, "samples-over-data"), points))
    fig = plots.points_figure(plane(data), plane(target.frame.transform(samples)), f"all {len(samples)} samples "
                              "over the data", every=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
