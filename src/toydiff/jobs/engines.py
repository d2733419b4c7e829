"""Where a study's cells run: worker processes on this machine, or tasks on a Ray cluster. Never a scheduler.

    run_cells("local", run_job, cells, on_done, workers=4)        # a process pool here
    run_cells("ray", run_job, cells, on_done, address="auto")     # an existing Ray cluster (ray start --head ...)
    run_cells("ray", run_job, cells, on_done, workers=2)          # a Ray cluster started here with 2 CPUs

Both run the same job function (toydiff.jobs.study.run_job, the library's main job without figures) on each cell's
config, and call `on_done(cell, row, error)` on the driver as each cell ends: `row` its result, or `error` a
one-line reason when it failed (recorded as failed, never dropped). On Ray every cell is a task with its
resources declared (CPUs: train.threads, at least 1; a GPU or a fraction of one under --device cuda), so the
cluster places it; a task whose worker dies is retried by Ray up to `retries` times. Without a shared
filesystem a task trains in a temporary directory on its node and returns the run directory's files with its
row; the driver writes them into the study directory (staged, then renamed: a cell appears whole or not at
all). With `shared_dir` (every node sees the study directory at the same path) the task writes in place.
Ctrl-C or SIGTERM on the driver cancels the tasks and shuts down a cluster it started; the study resumes.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Optional

from ..core.errors import ToydiffError, unknown

BACKENDS = ("local", "ray")
RAY_RETRIES = 2  # times Ray reruns a cell whose worker process or node died
MAX_JOBS = 1024  # local worker processes (or a started cluster's CPUs) at most
MAX_RETRIES = 100
MAX_GPUS_PER_CELL = 8


def check_options(backend: str, jobs: int, address: Optional[str] = None, shared_dir: bool = False,
                  gpus_per_cell: Optional[float] = None, retries: Optional[int] = None) -> None:
    """Refuse, before anything runs, an engine's options out of range or given to the engine that ignores
    them (the CLI's flags and the Python API's keywords are checked here alike)."""
    if backend not in BACKENDS:
        raise ToydiffError(unknown("backend", backend, BACKENDS))
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= MAX_JOBS:
        raise ToydiffError(f"--jobs must be in 1..{MAX_JOBS}, got {jobs!r}")
    ray_only = [f for f, v in (("--address", address), ("--shared-dir", shared_dir),
                               ("--gpus-per-cell", gpus_per_cell is not None), ("--retries", retries is not None))
                if v]
    if ray_only and backend != "ray":
        raise ToydiffError(f"{', '.join(ray_only)} go with --backend ray")
    if gpus_per_cell is not None and (isinstance(gpus_per_cell, bool) or not isinstance(gpus_per_cell, (int, float))
                                      or not 0 < gpus_per_cell <= MAX_GPUS_PER_CELL):
        raise ToydiffError(f"--gpus-per-cell must be in (0, {MAX_GPUS_PER_CELL}], got {gpus_per_cell!r}")
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)
                                or not 0 <= retries <= MAX_RETRIES):
        raise ToydiffError(f"--retries must be in 0..{MAX_RETRIES}, got {retries!r}")


@dataclass(frozen=True)
class CellJob:
    """One (cell, seed) of a study: its labels, its config as TOML, where its run directory goes, and what it
    asks of a cluster."""
    meta: dict
    cfg_toml: str
    run_dir: str
    cpus: float = 1.0
    gpus: float = 0.0


Done = Callable[[CellJob, Optional[dict], Optional[str]], None]


def run_cells(backend: str, job: Callable[[str, str], dict], cells: list[CellJob], on_done: Done, *,
              workers: int = 1, address: Optional[str] = None, shared_dir: bool = False,
              retries: int = RAY_RETRIES) -> None:
    """Run `job(cfg_toml, run_dir) -> row` (a module-level function: it travels to the workers by name) for
    every cell on `backend`, calling on_done on the driver as each ends (see the module)."""
    if backend == "local":
        _run_local(cells, on_done, workers, job)
    elif backend == "ray":
        _run_ray(cells, on_done, workers, address, shared_dir, retries, job)
    else:  # pragma: no cover - the CLI's choices
        raise ToydiffError(f"unknown study backend '{backend}'; choose one of: {', '.join(BACKENDS)}")


def parallelism(backend: str, workers: int, cells: list[CellJob]) -> int:
    """How many cells run at once: the local workers, or what the Ray cluster's CPUs (and GPUs) hold."""
    if backend == "local" or not cells:
        return workers
    import ray
    resources = ray.cluster_resources()
    by_cpu = resources.get("CPU", 1) / max(cells[0].cpus, 1e-9)
    by_gpu = resources.get("GPU", 0) / cells[0].gpus if cells[0].gpus else math.inf
    return max(1, int(min(by_cpu, by_gpu)))


# --- local processes ---------------------------------------------------------------------------------------------

def _watch_parent(parent: int) -> None:
    """In a worker: end this process when the study's process is gone (killed), instead of running on."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _run_local(cells: list[CellJob], on_done: Done, workers: int, job: Callable) -> None:
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_watch_parent,
                               initargs=(os.getpid(),))
    try:
        futures = {pool.submit(job, c.cfg_toml, c.run_dir): c for c in cells}
        for fut in as_completed(futures):
            cell = futures[fut]
            try:
                row, error = fut.result(), None
            except Exception as e:  # the job failed, or its worker died (BrokenProcessPool): recorded, not dropped
                row, error = None, _one_line(e)
            on_done(cell, row, error)
    except BaseException:  # Ctrl-C, SIGTERM: stop the workers now, not after their cells
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()


# --- Ray ---------------------------------------------------------------------------------------------------------

def import_ray():
    """Ray, or the one-line error that names the extra to install."""
    try:
        import ray
    except ImportError:
        raise ToydiffError("--backend ray needs Ray, which is not installed; pip install 'toydiff[ray]'") from None
    return ray


def ray_cell(job: Callable, cfg_toml: str, run_dir: str, shared_dir: bool) -> tuple[dict, Optional[dict]]:
    """A Ray task's body: the cell's job, in place (shared_dir) or in a temporary directory on the node, whose
    files come back with the row ({relative path: bytes, or None for a folder}, the lock file left out)."""
    if shared_dir:
        return job(cfg_toml, run_dir), None
    with tempfile.TemporaryDirectory(prefix="toydiff-cell-") as tmp:
        path = Path(tmp) / "run"
        row = job(cfg_toml, str(path))
        files = {str(p.relative_to(path)): None if p.is_dir() else p.read_bytes() for p in sorted(path.rglob("*"))
                 if p.is_dir() or p.is_file() and p.name != ".lock"}
    return row, files


def write_returned_run(run_dir: str | Path, files: dict[str, Optional[bytes]]) -> None:
    """A cell's run directory, as its task returned it, into the study directory: staged beside its place and
    renamed there, so it appears whole (result.json included) or not at all."""
    from ..core.files import make_staging_dir, publish_dir

    target = Path(run_dir)
    if target.exists():
        shutil.rmtree(target)  # an unfinished attempt of this cell
    staging = make_staging_dir(target)
    try:
        for rel, data in files.items():
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise ToydiffError(f"a cell returned a file outside its run directory: '{rel}'")
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            if data is None:
                (staging / rel).mkdir(exist_ok=True)
            else:
                (staging / rel).write_bytes(data)
        publish_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _run_ray(cells: list[CellJob], on_done: Done, workers: int, address: Optional[str], shared_dir: bool,
             retries: int, job: Callable) -> None:
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        try:
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ToydiffError(f"cannot reach the Ray cluster at '{address}' ({_one_line(e)}); start one with "
                               "`ray start --head`, or leave out --address for a local one") from None
    task = ray.remote(ray_cell)
    pending: dict = {}
    try:
        for c in cells:
            ref = task.options(num_cpus=c.cpus, num_gpus=c.gpus, max_retries=retries, retry_exceptions=False,
                               name=f"toydiff {c.meta['cell']} seed {c.meta['seed']}").remote(
                job, c.cfg_toml, c.run_dir, shared_dir)
            pending[ref] = c
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            try:
                row, files = ray.get(ready[0])
                if files is not None:
                    write_returned_run(cell.run_dir, files)
                error = None
            except (ray.exceptions.RayError, ToydiffError, OSError) as e:  # failed past its retries: recorded
                row, error = None, _one_line(getattr(e, "cause", None) or e)
            on_done(cell, row, error)
    except BaseException:  # Ctrl-C, SIGTERM: cancel what is left; finished cells are in the study directory
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return f"{type(e).__name__}: {last}"[:300] if last else type(e).__name__
