"""Grid studies: every cell of a grid of config overrides, several seeds each, in parallel processes.

A study directory holds one run directory per (cell, seed) under runs/, each finished one
marked by its result.json, so an interrupted study resumes where it stopped. It ends
with results.csv (one row per run), summary.md (mean +- std per cell) and study.png.
study.json records the grid (base configuration and cells): a study directory resumes only
the grid it was made for and refuses another one, and one process runs a study directory
at a time (an OS lock; the second is told who holds it). Where the cells run is
toydiff.jobs.engines' business: local worker processes (`--jobs N`) or a Ray cluster
(`--backend ray`); either way workers stop when the study does, a failed cell is a row
that says why, and Ctrl-C or SIGTERM leaves the study resumable.

Grid files (TOML):

    preset = "guide"                    # the base configuration (default: the built-in defaults)
    seeds = 3
    set = ["eval.nll_n=0"]              # overrides applied to every cell
    [axes]
    "schedule.T" = [10, 100, 1000]      # a plain axis: the values of one key
    [axes.schedule]                     # a named axis: each level is a set of overrides
    linear = { "schedule.name" = "polynomial", "schedule.power" = 1.0 }
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..core import config as config_io
from ..core.config import ExperimentConfig
from ..core.errors import ToydiffError
from ..core.files import Lock, atomic_write_bytes, atomic_write_text
from ..core.formats import csv_text
from ..core.schema import Fields, read_json
from ..runs.directory import RunDir
from . import engines

RUNS = "runs"  # the study directory: runs/cellNNN-seedS/ (one run directory each), results.csv, summary.md, study.png
GRID_RECORD = "study.json"  # the grid a study directory was made for
MAX_SEEDS = 1000  # seeds per cell at most


@dataclass(frozen=True)
class StudyFiles:
    """The files a study directory holds besides its runs."""
    results: Path
    summary: Path
    figure: Path
    page: Path  # study.html: the table and the plot on one self-contained page (toydiff.pictures.report.study_page)

    @classmethod
    def of(cls, out: str | Path) -> "StudyFiles":
        out = Path(out)
        return cls(out / "results.csv", out / "summary.md", out / "study.png", out / "study.html")


# (metric, what the summary shows of it): value or z-score against the noise floor
SUMMARY = [("knn_auc", "value"), ("mmd2", "z"), ("w2", "value"), ("precision", "value"), ("recall", "value"),
           ("off_data", "value")]


@dataclass(frozen=True)
class Cell:
    name: str  # e.g. "T=10,schedule=cosine"
    levels: dict[str, str]  # axis -> level label
    overrides: tuple[str, ...]  # --set items


@dataclass(frozen=True)
class Grid:
    base: ExperimentConfig
    cells: tuple[Cell, ...]
    seeds: int


def _fmt(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def parse_axes(axes: dict[str, Any]) -> list[tuple[str, list[tuple[str, tuple[str, ...]]]]]:
    """[(axis name, [(level label, overrides)])] from a TOML [axes] table."""
    out = []
    for key, spec in axes.items():
        if isinstance(spec, list) and spec:
            out.append((key.split(".")[-1], [(str(v), (f"{key}={_fmt(v)}",)) for v in spec]))
        elif isinstance(spec, dict) and spec and all(isinstance(v, dict) for v in spec.values()):
            out.append((key, [(label, tuple(f"{k}={_fmt(v)}" for k, v in sets.items())) for label, sets in spec.items()]))
        else:
            raise ToydiffError(f"grid axis '{key}' must be a non-empty list of values or a table of named "
                               "override tables")
    return out


def parse_cli_axis(item: str) -> tuple[str, list]:
    """'schedule.T=10,100' -> ('schedule.T', [10, 100]), each value read as TOML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise ToydiffError(f"--grid expects section.key=v1,v2,..., got '{item}'")
    return key.strip(), [config_io.parse_override(f"x={v}")[1] for v in raw.split(",")]


def check_seeds(seeds: int) -> None:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_SEEDS:
        raise ToydiffError(f"a study needs 1..{MAX_SEEDS} seeds per cell, got {seeds!r}")


def build_grid(base: ExperimentConfig, axes: list, seeds: int, fixed: list[str]) -> Grid:
    from .workflow import validate

    check_seeds(seeds)
    if not axes:
        raise ToydiffError("a study needs at least one grid axis (--grid key=v1,v2 or a grid file)")
    base = config_io.with_overrides(base, fixed)
    cells = []
    for combo in itertools.product(*[levels for _, levels in axes]):
        levels = {axis: label for (axis, _), (label, _) in zip(axes, combo)}
        overrides = tuple(o for _, sets in combo for o in sets)
        validate(config_io.with_overrides(base, list(overrides)))  # every cell is checked before anything runs
        cells.append(Cell(",".join(f"{a}={v}" for a, v in levels.items()), levels, overrides))
    return Grid(base, tuple(cells), seeds)


def load_grid_file(path: str | Path, base: ExperimentConfig | None = None) -> Grid:
    d = config_io.read_toml(path)
    unknown = set(d) - {"preset", "seeds", "set", "axes"}
    if unknown:
        raise ToydiffError(f"unknown key '{sorted(unknown)[0]}' in grid file '{path}'; valid: preset, seeds, set, axes")
    if base is None:
        base = config_io.preset(d.get("preset", "default"))
    return build_grid(base, parse_axes(d.get("axes", {})), int(d.get("seeds", 3)), list(d.get("set", [])))


def builtin_grids() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files("toydiff.studies").iterdir()
                  if p.name.endswith(".toml"))


def builtin_grid_path(name: str) -> Path:
    if name not in builtin_grids():
        raise ToydiffError(f"unknown built-in study '{name}'; choose one of: {', '.join(builtin_grids())}")
    return Path(str(resources.files("toydiff.studies").joinpath(f"{name}.toml")))


def run_job(cfg_toml: str, run_dir: str) -> dict:
    """One (cell, seed): the main job without figures; returns the flat result row. Runs in a worker process."""
    import torch

    from .experiment import run_experiment

    torch.set_num_threads(1)
    cfg = config_io.loads(cfg_toml)
    path = Path(run_dir)
    if path.exists():
        shutil.rmtree(path)  # an unfinished run of this study: start it again
    start = time.perf_counter()
    rep = run_experiment(cfg, path, figures=False).report
    row: dict[str, Any] = {"seconds": round(time.perf_counter() - start, 2),
                           "indistinguishable": rep["verdict"].startswith("indistinguishable"), "nfe": rep.get("nfe")}
    for name, m in rep["metrics"].items():
        row[name], row[f"{name}_z"] = m["value"], m["z"]
    for name, r in rep.get("likelihood", {}).get("values", {}).items():
        row[f"{name}_nats_per_dim"] = r["nats_per_dim"]
    RunDir(path).write_result(row)
    return row


def prepare_floors(grid: Grid, log: Callable[[str], None], progress: bool = False) -> None:
    """Compute each distinct noise floor once, before the workers start (they then find it cached)."""
    from ..evaluation.judge import evaluate
    from ..evaluation.reference import target_for

    seen = set()
    for cell in grid.cells:
        cfg = config_io.with_overrides(grid.base, list(cell.overrides))
        if cfg.data.path:
            continue  # a file's floors are a permutation test of each run's own samples
        target = target_for(cfg)
        key = json.dumps([target.key, cfg.eval.n, cfg.eval.w2_n, cfg.eval.k, cfg.eval.draws])
        if key not in seen:
            seen.add(key)
            evaluate(target.draw(np.random.default_rng(0), cfg.eval.n), target, cfg.eval, log=log, progress=progress)


def grid_record(grid: Grid) -> dict:
    """What identifies a grid: its base configuration and its cells (name and overrides, in order)."""
    return {"base": grid.base.to_toml(), "cells": [[c.name, list(c.overrides)] for c in grid.cells]}


def check_grid_record(grid: Grid, out: Path) -> None:
    """Record the grid in a new study directory, or check that an existing one was made for this grid (its seeds
    may change: more seeds add runs); a study of another grid is refused, never relabelled."""
    path = out / GRID_RECORD
    record = grid_record(grid)
    if path.exists():
        stored = read_json(path, "study record", Fields({"base": str, "cells": [[object]]}, required=("base", "cells")))
        if {k: stored[k] for k in record} != record:
            cells = [str(c[0]) for c in stored["cells"] if c]
            shown = ", ".join(cells[:4]) + (", ..." if len(cells) > 4 else "")
            raise ToydiffError(f"'{out}' holds a study of another grid (its cells: {shown}); choose another "
                               "--out, or remove that folder to start over")
    elif any((out / RUNS).glob("*")):
        raise ToydiffError(f"'{out}' holds runs of a study that recorded no grid; choose another --out, or remove "
                           "that folder to start over")
    atomic_write_text(path, json.dumps({**record, "seeds": grid.seeds}, indent=1))


def run_study(grid: Grid, out: str | Path, jobs: int = 1, log: Callable[[str], None] = lambda s: None,
              progress: bool = False, *, backend: str = "local", address: Optional[str] = None,
              shared_dir: bool = False, gpus_per_cell: Optional[float] = None,
              retries: Optional[int] = None) -> list[dict]:
    """Run every (cell, seed) not yet finished in `out` on `backend` (toydiff.jobs.engines: `jobs` local processes,
    or a Ray cluster: the one at `address`, else one started here with `jobs` CPUs), then write the tables and
    the plot. A cell that fails is a row with its reason in the `failed` column (rerun on resume), never
    dropped. Holds the study directory's lock throughout; Ctrl-C or SIGTERM stops the workers (finished runs
    are kept). `retries` (Ray only) defaults to engines.RAY_RETRIES."""
    out = Path(out)
    engines.check_options(backend, jobs, address, shared_dir, gpus_per_cell, retries)
    check_seeds(grid.seeds)
    retries = engines.RAY_RETRIES if retries is None else retries
    if backend == "ray":
        engines.import_ray()  # a missing extra is said before anything is made
    try:
        (out / RUNS).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ToydiffError(f"cannot create study directory '{out}': {e.strerror or e}") from None
    with Lock(out, "study directory"):
        check_grid_record(grid, out)
        return _run_study(grid, out, jobs, log, progress, backend, address, shared_dir, gpus_per_cell, retries)


def _run_study(grid: Grid, out: Path, jobs: int, log: Callable[[str], None], progress: bool, backend: str,
               address: Optional[str], shared_dir: bool, gpus_per_cell: Optional[float], retries: int) -> list[dict]:
    todo, rows = [], []
    for i, cell in enumerate(grid.cells):
        for seed in range(grid.seeds):
            run_dir = out / RUNS / f"cell{i:03d}-seed{seed}"
            cfg = config_io.with_overrides(grid.base, list(cell.overrides) + [f"seed={seed}"])
            meta = {"cell": cell.name, **cell.levels, "seed": seed}
            done = RunDir(run_dir).read_result()
            if done is not None:
                rows.append({**meta, **done})
            else:
                todo.append(engines.CellJob(meta, cfg.to_toml(), str(run_dir.resolve() if shared_dir else run_dir),
                                            *cell_resources(cfg, gpus_per_cell)))
    where = f"{jobs} local processes" if backend == "local" else \
        f"Ray ({address or f'a local cluster of {jobs} CPUs'}{', shared directory' if shared_dir else ''})"
    log(f"study: {len(grid.cells)} cells x {grid.seeds} seeds; {len(rows)} done, {len(todo)} to run on {where}")
    if todo:
        prepare_floors(grid, log, progress)
        tracker = Tracker(len(todo), log)

        def on_done(job: engines.CellJob, row: Optional[dict], error: Optional[str]) -> None:
            rows.append({**job.meta, **row} if row is not None else {**job.meta, "failed": error})
            tracker.done(job.meta, row, error, lambda: engines.parallelism(backend, jobs, todo))
        engines.run_cells(backend, run_job, todo, on_done, workers=jobs, address=address, shared_dir=shared_dir,
                          retries=retries)
        if tracker.failed:
            log(f"warning: {tracker.failed} of {len(todo)} runs failed (the `failed` column of results.csv says "
                "why); run the study again to retry them")
    order = {c.name: i for i, c in enumerate(grid.cells)}
    rows.sort(key=lambda r: (order[r["cell"]], r["seed"]))
    write_outputs(grid, rows, out)
    return rows


def cell_resources(cfg: ExperimentConfig, gpus_per_cell: Optional[float] = None) -> tuple[float, float]:
    """(CPUs, GPUs) one cell asks a cluster for: 1 CPU (run_job trains on one thread), and with train.device
    cuda (--device cuda) a GPU or the given share of one. A cell asking for no GPU sees none (Ray hides them
    from its task), so train.device = auto runs on the CPU there: ask for cuda to use GPUs."""
    gpus = (1.0 if gpus_per_cell is None else gpus_per_cell) if cfg.train.device.startswith("cuda") else 0.0
    return 1.0, gpus


class Tracker:
    """A study's progress on the driver, a line per finished cell: done, running, failed and left, and the
    time left at the pace so far (cells finished per second of wall time)."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.log, self.start = total, log, time.perf_counter()
        self.finished = self.failed = 0

    def done(self, meta: dict, row: Optional[dict], error: Optional[str], parallel: Callable[[], int]) -> None:
        self.finished += 1
        self.failed += error is not None
        left = self.total - self.finished
        try:
            running = min(left, parallel())
        except Exception:  # the cluster went away: the count is only for show
            running = 0
        elapsed = time.perf_counter() - self.start
        eta = f", about {elapsed / self.finished * left:.0f} s left" if left else ""
        what = f"{row['seconds']:.0f} s" if row is not None else f"FAILED ({error})"
        self.log(f"[{self.finished}/{self.total}] {meta['cell']} seed {meta['seed']}: {what} | done "
                 f"{self.finished - self.failed}, running {running}, failed {self.failed}, left "
                 f"{left - running}{eta}")


def summarize(grid: Grid, rows: list[dict]) -> list[dict]:
    out = []
    for cell in grid.cells:
        mine = [r for r in rows if r["cell"] == cell.name and not r.get("failed")]
        s: dict[str, Any] = {**cell.levels, "seeds": len(mine),
                             "indistinguishable": sum(bool(r["indistinguishable"]) for r in mine)}
        for name, kind in SUMMARY:
            key = name if kind == "value" else f"{name}_z"
            vals = [r[key] for r in mine if r.get(key) is not None]
            s[key] = (float(np.mean(vals)), float(np.std(vals))) if vals else None
        out.append(s)
    return out


def table(grid: Grid, summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The summary as a header and rows of text: the axes' levels, each SUMMARY column as mean +- std over the
    seeds, and how many seeds were judged indistinguishable."""
    axes = list(grid.cells[0].levels)
    cols = [name if kind == "value" else f"{name}_z" for name, kind in SUMMARY]
    rows = []
    for s in summary:
        cells = [str(s[a]) for a in axes]
        cells += ["" if s[c] is None else f"{s[c][0]:.3g} +- {s[c][1]:.2g}" for c in cols]
        cells.append(f"{s['indistinguishable']}/{s['seeds']}")
        rows.append(cells)
    return axes + cols + ["indistinguishable"], rows


def markdown(grid: Grid, summary: list[dict]) -> str:
    head, rows = table(grid, summary)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def write_outputs(grid: Grid, rows: list[dict], out: Path) -> None:
    if not rows:
        return
    files = StudyFiles.of(out)
    atomic_write_text(files.results, csv_text(rows, list(dict.fromkeys(k for r in rows for k in r))))
    summary = summarize(grid, rows)
    atomic_write_text(files.summary, markdown(grid, summary))
    from ..pictures.plots import study_figure

    labels = [",".join(str(v) for v in c.levels.values()) for c in grid.cells]
    panels = [(f"{name}{'' if kind == 'value' else ' z'}", [s[name if kind == "value" else f"{name}_z"] for s in summary])
              for name, kind in SUMMARY[:3]]
    fig = study_figure(labels, panels)
    buf_png = io.BytesIO()
    fig.savefig(buf_png, format="png", dpi=120)
    atomic_write_bytes(files.figure, buf_png.getvalue())
    from ..pictures.report import study_page

    atomic_write_text(files.page, study_page(out.name, *table(grid, summary), files.figure, grid.seeds))
