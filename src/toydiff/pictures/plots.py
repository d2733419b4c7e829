"""The figures: the guide's five for 2-D data, pair plots and marginals for other D, the zoo gallery, study plots.

Numpy arrays in, matplotlib Figures out. No torch, no file I/O.

Points are drawn in the model's scaled frame (where the diffusion happens), in the
look of the guide's figures: seaborn-style blue dots with white edges over a filled
density, open top and right spines, Computer Modern maths.
"""

from __future__ import annotations

import functools
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from scipy.stats import gaussian_kde

BLUE, ORANGE = "#4C72B0", "#DD8452"
STYLE = {"font.family": "serif", "mathtext.fontset": "cm", "font.size": 13, "axes.linewidth": 1.4,
         "axes.spines.top": False, "axes.spines.right": False}
LIM = 1.5  # the guide's axis range, in the scaled frame


def _styled(fn):
    """Run a figure function under the guide's style (rcParams are read when artists are made)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)
    return wrapper


def _figure(ncols: int, width: float = 4.6, height: float = 4.4) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.tick_params(width=1.4, length=5)
    return fig, axes


def _scatter(ax: Axes, x: np.ndarray, **kw) -> None:
    ax.scatter(x[:, 0], x[:, 1], s=kw.pop("s", 60), color=kw.pop("color", BLUE), edgecolors="white",
               linewidths=0.8, zorder=3, **kw)


def _square(ax: Axes, lim: float = LIM, label: bool = True) -> None:
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    if label:
        ax.set_xlabel(r"$x_1$ (scaled)")
        ax.set_ylabel(r"$x_2$ (scaled)")


def _density(ax: Axes, x: np.ndarray, lim: float = LIM, resolution: int = 160, bandwidth: float = 0.12) -> None:
    """Filled Gaussian-KDE contours of x (N, 2), the guide's background (a narrow kernel keeps the arcs thin)."""
    kde = gaussian_kde(x[:, :2].T, bw_method=bandwidth)
    g = np.linspace(-lim, lim, resolution)
    xx, yy = np.meshgrid(g, g)
    zz = kde(np.vstack([xx.ravel(), yy.ravel()])).reshape(xx.shape)
    levels = np.linspace(0, zz.max(), 10)
    ax.set_facecolor("#aebddf")  # the lowest contour level's colour, so empty space matches
    ax.contourf(xx, yy, zz, levels=levels, cmap=_blues(), zorder=1)


def _blues():
    from matplotlib.colors import LinearSegmentedColormap
    return LinearSegmentedColormap.from_list("guide", ["#aebddf", "#5b86d6", "#3e5a8c", "#2b3d5e"])


@_styled
def points_figure(density: np.ndarray, shown: np.ndarray, title: str, every: bool = False) -> Figure:
    """Points (n, 2) over a filled density of the data (N, 2), scaled frame.

    Fig. 1 shows points of the data set; Fig. 3 shows generated samples over the training data. every: the
    points are all the samples, drawn small and translucent, so a thin tail off the data shows.
    """
    fig, (ax,) = _figure(1)
    _density(ax, density)
    if every:
        ax.scatter(shown[:, 0], shown[:, 1], s=3, color=ORANGE, alpha=0.45, linewidths=0, zorder=3)
    else:
        _scatter(ax, shown)
    _square(ax)
    ax.set_title(title)
    return fig


@_styled
def forward_figure(panels: Sequence[tuple[int, np.ndarray]]) -> Figure:
    """Fig. 2: the forward process, one panel per (t, x_t (N, 2)), on shared axes wide enough for the noise."""
    fig, axes = _figure(len(panels), width=4.2, height=4.0)
    lim = max(LIM, max(float(np.abs(x_t).max()) for _, x_t in panels) * 1.05)
    for ax, (t, x_t) in zip(axes, panels):
        _scatter(ax, x_t)
        _square(ax, lim=lim, label=ax is axes[0])
        ax.set_title(f"$t={t}$")
    return fig


@_styled
def vector_field_figure(grid: np.ndarray, fields: Sequence[tuple[int, np.ndarray]], T: int,
                        trajectory: np.ndarray | None = None) -> Figure:
    """Fig. 4: -eps_theta(x_t, t) on a grid (G, 2), one panel per (t, field (G, 2)).

    `trajectory` (steps, 2) is one reverse path x_T .. x_0, or (steps, k, 2) k of them, drawn on the first panel
    (each start a cross, each end a dot).
    """
    fig, axes = _figure(len(fields), width=4.6, height=4.6)
    paths = None if trajectory is None else (trajectory[:, None, :] if trajectory.ndim == 2 else trajectory)
    for ax, (t, field) in zip(axes, fields):
        ax.quiver(grid[:, 0], grid[:, 1], -field[:, 0], -field[:, 1], color="#222222", width=0.004, zorder=2)
        if paths is not None and ax is axes[0]:
            for j in range(paths.shape[1]):
                ax.plot(paths[:, j, 0], paths[:, j, 1], "-", color=BLUE, lw=1.6, alpha=0.8, zorder=3)
            ax.scatter(paths[0, :, 0], paths[0, :, 1], marker="x", s=40, color=BLUE, zorder=4)
            ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=40, color=ORANGE, edgecolors="white", zorder=4)
        t_label = "T" if t == T else str(t)
        ax.set_title(rf"$-\epsilon_\theta(\mathbf{{x}}_t, t={t_label})$")
        _square(ax, lim=LIM + 0.15, label=ax is axes[0])
    return fig


@_styled
def schedule_figure(panels: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> Figure:
    """Fig. 5: beta_t and 1 - alpha_bar_t against t = 0..T, one panel per (title, betas, one_minus_alpha_bar)."""
    fig, axes = _figure(len(panels), width=3.9, height=3.8)
    for ax, (title, betas, one_minus) in zip(axes, panels):
        t = np.arange(len(betas))
        ax.plot(t, betas, color=BLUE, lw=2.5, label=r"$\beta_t$")
        ax.plot(t, one_minus, color=ORANGE, lw=2.5, label=r"$1 - \bar\alpha_t$")
        ax.set_xlabel("$t$")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(title, fontsize=11)
    axes[-1].legend(loc="upper left", fontsize=12)
    return fig


@_styled
def animation_frames(density: np.ndarray, frames: Sequence[tuple[str, np.ndarray]], lim: float = LIM,
                     size: float = 4.0, dpi: int = 80) -> list[np.ndarray]:
    """An animation's frames as RGB arrays (H, W, 3): the points of each (label, points (n, 2)) over the data's
    density, on fixed axes [-lim, lim]^2; the density is drawn once, each frame moves the points and its title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig, (ax,) = _figure(1, width=size, height=size)
    fig.set_dpi(dpi)
    _density(ax, density, lim=lim)
    _square(ax, lim=lim, label=False)
    dots = ax.scatter([], [], s=5, color=ORANGE, alpha=0.8, linewidths=0, zorder=3)
    title = ax.set_title("", fontsize=11)
    canvas = FigureCanvasAgg(fig)
    out = []
    for label, points in frames:
        dots.set_offsets(points[:, :2])
        title.set_text(label)
        canvas.draw()
        out.append(np.asarray(canvas.buffer_rgba())[..., :3].copy())
    return out


@_styled
def oracle_figure(grid: np.ndarray, at: tuple[int, np.ndarray, np.ndarray, np.ndarray],
                  curve: tuple[np.ndarray, np.ndarray]) -> Figure:
    """The learned field beside the true one: -eps_theta and the exact -eps on the grid (G, 2) at t, the map of
    |eps_theta - eps| over the grid at t, and its root mean square against t (log scales): over the grid, and
    weighted by the noised data's density (curve: ts (k,) and rms (k, 2))."""
    t, learned, true, error = at
    fig, axes = _figure(4, width=4.2, height=4.2)
    for ax, field, title in ((axes[0], learned, rf"learned $-\epsilon_\theta$, $t={t}$"),
                             (axes[1], true, rf"exact $-\epsilon$, $t={t}$")):
        ax.quiver(grid[:, 0], grid[:, 1], -field[:, 0], -field[:, 1], color="#222222", width=0.004)
        _square(ax, lim=LIM + 0.15, label=ax is axes[0])
        ax.set_title(title, fontsize=12)
    side = int(round(np.sqrt(len(grid))))
    image = axes[2].imshow(error.reshape(side, side), origin="lower", cmap="magma",
                           extent=(grid[:, 0].min(), grid[:, 0].max(), grid[:, 1].min(), grid[:, 1].max()))
    fig.colorbar(image, ax=axes[2], shrink=0.8)
    axes[2].set_title(rf"$|\epsilon_\theta - \epsilon|$, $t={t}$", fontsize=12)
    ts, rms = curve
    axes[3].plot(ts, rms[:, 0], "-o", color=BLUE, lw=2, ms=4, label="over the grid")
    axes[3].plot(ts, rms[:, 1], "-o", color=ORANGE, lw=2, ms=4, label="weighted by $p_t$")
    axes[3].set_xscale("log")
    axes[3].set_yscale("log")
    axes[3].set_xlabel("$t$")
    axes[3].legend(fontsize=10)
    axes[3].set_title("RMS error", fontsize=12)
    return fig


@_styled
def loss_figure(step: np.ndarray, loss: np.ndarray, lr: np.ndarray, smoothing: float | None = None) -> Figure:
    """The training loss against the step on a log scale: each logged mean faint, an exponential moving average
    (weight `smoothing` on the past, debiased as Adam's moments are; by default about a twentieth of the log)
    over it, the learning rate on a second axis."""
    if smoothing is None:
        smoothing = float(np.clip(1 - 20 / max(len(loss), 1), 0.0, 0.98))
    fig, (ax,) = _figure(1, width=6.0, height=3.8)
    smooth, avg = np.empty_like(loss, dtype=float), 0.0
    for i, value in enumerate(loss):
        avg = smoothing * avg + (1 - smoothing) * value
        smooth[i] = avg / (1 - smoothing ** (i + 1))
    ax.plot(step, loss, color=BLUE, alpha=0.3, lw=1.0)
    ax.plot(step, smooth, color=BLUE, lw=2.2, label="loss")
    if np.all(loss > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color=BLUE)
    lr_ax = ax.twinx()
    lr_ax.spines["right"].set_visible(True)
    lr_ax.plot(step, lr, color=ORANGE, lw=1.6, ls="--")
    lr_ax.set_ylabel("learning rate", color=ORANGE)
    lr_ax.set_ylim(bottom=0)
    ax.set_title("training")
    return fig


@_styled
def study_figure(labels: Sequence[str], panels: Sequence[tuple[str, Sequence]]) -> Figure:
    """One panel per metric: mean +- std over seeds (entries (mean, std) or None) for each grid cell."""
    fig = Figure(figsize=(4.2 * len(panels), 0.32 * len(labels) + 1.4), layout="constrained")
    y = np.arange(len(labels))[::-1]
    for i, (title, stats) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ok = [k for k, s in enumerate(stats) if s is not None]
        ax.errorbar([stats[k][0] for k in ok], y[ok], xerr=[stats[k][1] for k in ok], fmt="o", color=BLUE,
                    capsize=3)
        ax.set_yticks(y, labels if i == 0 else [""] * len(labels), fontsize=9)
        ax.set_title(title, fontsize=12)
        ax.locator_params(axis="x", nbins=4)
        ax.grid(axis="x", alpha=0.3)
    return fig


@_styled
def pair_figure(data: np.ndarray, samples: np.ndarray, names: Sequence[str], title: str) -> Figure:
    """For D != 2: samples (orange) over data (blue) for every pair of the k columns of data and samples
    (n, k), histograms of both on the diagonal; k = 1 gives the histogram alone."""
    k = data.shape[1]
    fig = Figure(figsize=(2.6 * k + 0.6, 2.6 * k + 0.4), layout="constrained")
    lo = np.minimum(data.min(0), samples.min(0))
    hi = np.maximum(data.max(0), samples.max(0))
    for i in range(k):
        for j in range(k):
            ax = fig.add_subplot(k, k, i * k + j + 1)
            if i == j:
                bins = np.linspace(lo[i], hi[i], 40)
                ax.hist(data[:, i], bins=bins, density=True, color=BLUE, alpha=0.55, label="data")
                ax.hist(samples[:, i], bins=bins, density=True, histtype="step", color=ORANGE, lw=1.8,
                        label="samples")
            else:
                ax.scatter(data[:, j], data[:, i], s=3, color=BLUE, alpha=0.35, linewidths=0)
                ax.scatter(samples[:, j], samples[:, i], s=3, color=ORANGE, alpha=0.35, linewidths=0)
                ax.set_xlim(lo[j], hi[j])
                ax.set_ylim(lo[i], hi[i])
            if i == k - 1:
                ax.set_xlabel(names[j], fontsize=11)
            if j == 0:
                ax.set_ylabel(names[i], fontsize=11)
            ax.tick_params(labelsize=8, width=1.0, length=3)
    fig.axes[0].legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=13)
    return fig


@_styled
def marginals_figure(data: np.ndarray, samples: np.ndarray, names: Sequence[str]) -> Figure:
    """Per-column histograms of data (filled) and samples (line), in data units, up to 8 panels a row."""
    d = data.shape[1]
    cols = min(d, 8)
    rows = -(-d // cols)
    fig = Figure(figsize=(2.4 * cols, 2.1 * rows + 0.3), layout="constrained")
    for c in range(d):
        ax = fig.add_subplot(rows, cols, c + 1)
        lo, hi = min(data[:, c].min(), samples[:, c].min()), max(data[:, c].max(), samples[:, c].max())
        bins = np.linspace(lo, hi, 40) if hi > lo else 10
        ax.hist(data[:, c], bins=bins, density=True, color=BLUE, alpha=0.55, label="data")
        ax.hist(samples[:, c], bins=bins, density=True, histtype="step", color=ORANGE, lw=1.8, label="samples")
        ax.set_title(names[c], fontsize=10)
        ax.tick_params(labelsize=7, width=1.0, length=3)
        ax.set_yticks([])
    fig.axes[0].legend(fontsize=7, loc="upper right")
    return fig


@_styled
def gallery_figure(panels: Sequence[tuple[str, np.ndarray, np.ndarray]], points: int = 1500) -> Figure:
    """One column per (title, data (N, 2), samples (M, 2)): data above, samples below, same axes."""
    fig = Figure(figsize=(2.3 * len(panels), 4.9), layout="constrained")
    for i, (title, data, samples) in enumerate(panels):
        lo = np.minimum(data.min(0), np.percentile(samples, 0.5, axis=0))
        hi = np.maximum(data.max(0), np.percentile(samples, 99.5, axis=0))
        pad = 0.05 * (hi - lo)
        for row, (x, color, label) in enumerate(((data, BLUE, "data"), (samples, ORANGE, "samples"))):
            ax = fig.add_subplot(2, len(panels), row * len(panels) + i + 1)
            ax.scatter(x[:points, 0], x[:points, 1], s=1.5, color=color, linewidths=0)
            ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=11)
            if i == 0:
                ax.set_ylabel(label, fontsize=11)
    return fig
