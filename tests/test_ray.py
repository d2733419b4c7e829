"""Studies on a Ray cluster (toydiff.jobs.engines): a local cluster started by the test (ray.init with 2 CPUs), the
same job function as the local backend, results equal to it, retries of a killed worker, resume, Ctrl-C."""

import csv
import io
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from toydiff.core import config as C
from toydiff.jobs import study
from toydiff.cli import main

ray = pytest.importorskip("ray")  # in the test extra: CI runs these

TINY = ["data.n=512", "model.width=16", "model.depth=1", "train.batch_size=128", "train.log_every=50",
        "train.checkpoint_every=0", "sample.n=300", "sample.steps=10", "eval.n=300", "eval.draws=3", "eval.nll_n=0"]


def grid(steps: int = 200, **axes):
    base = C.with_overrides(C.ExperimentConfig(), TINY + [f"train.steps={steps}"])
    return study.build_grid(base, study.parse_axes(axes or {"schedule.T": [10, 20]}), 2, [])


def table(path: Path, drop=("seconds",)) -> list[dict]:
    with open(path / "results.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


@pytest.fixture(scope="module", autouse=True)
def no_cluster_left():
    """Whatever the order of the tests, none leaves this module with a cluster running."""
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def cluster():
    """A local Ray cluster of 2 CPUs, running, for the tests that do not check starting and stopping one (a study
    joins a running cluster and leaves it running): started unless an earlier test left one, and left for the
    next (one start for several tests)."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture
def no_cluster():
    """No cluster running here, so the study starts its own (a test that ran before may have left one)."""
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def local_study(tmp_path_factory, unchanged):
    out = tmp_path_factory.mktemp("local") / "study"
    study.run_study(grid(), out, jobs=2)
    return unchanged(out)


@pytest.mark.slow
@pytest.mark.serial  # a local cluster of 2 CPUs
@pytest.mark.parametrize("shared", [False, True])
def test_ray_tasks_give_the_local_backends_results_bit_for_bit(local_study, tmp_path, shared, request):
    """2 cells x 2 seeds on a local Ray cluster of 2 CPUs: every column of results.csv but the wall time equals
    the local backend's, and each run directory holds the same files with the same samples, whether the runs
    came back from the tasks or were written in place (--shared-dir). The first starts its own cluster and
    shuts it down; the second joins a running one and leaves it running."""
    request.getfixturevalue("cluster" if shared else "no_cluster")
    lines = []
    rows = study.run_study(grid(), tmp_path / "s", jobs=2, backend="ray", shared_dir=shared, log=lines.append)
    assert len(rows) == 4 and not any(r.get("failed") for r in rows)
    assert table(tmp_path / "s") == table(local_study)
    for run in sorted((local_study / "runs").iterdir()):
        mine = tmp_path / "s" / "runs" / run.name
        assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*") if p.name != ".lock") == \
            sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.name != ".lock")
        assert (mine / "samples.npy").read_bytes() == (run / "samples.npy").read_bytes()
    progress = [m for m in lines if m.startswith("[")]
    assert len(progress) == 4 and all("| done" in m and "running" in m and "failed 0" in m for m in progress)
    assert "about" in progress[0] and progress[-1].endswith("left 0")
    assert ray.is_initialized() == shared  # a cluster it started is shut down; one it joined is left running


def _kill_first_task(prefix: bytes, killed: list, stop: threading.Event) -> None:
    while not stop.is_set() and not killed:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(prefix):
                time.sleep(1.0)  # mid-training
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.serial  # a local cluster of 2 CPUs
def test_a_worker_killed_mid_cell_is_retried_and_the_study_completes(tmp_path, cluster):
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=_kill_first_task, args=(b"ray::toydiff T=10 seed 0", killed, stop))
    killer.start()
    try:
        rows = study.run_study(grid(steps=1500), tmp_path / "s", jobs=2, backend="ray")
    finally:
        stop.set()
        killer.join()
    assert killed, "no task was found to kill"
    assert len(rows) == 4 and not any(r.get("failed") for r in rows)
    assert {(r["cell"], r["seed"]) for r in rows} == {(f"T={t}", s) for t in (10, 20) for s in (0, 1)}


@pytest.mark.slow
@pytest.mark.serial  # a local cluster of 2 CPUs
def test_a_cell_that_fails_is_a_row_that_says_why_and_reruns_on_resume(tmp_path, cluster):
    data = tmp_path / "d.csv"
    data.write_text("a,b\n" + "".join(f"{i % 17},{(i * 7) % 13}\n" for i in range(200)))
    g = grid(**{"schedule.T": [10]})
    g = study.build_grid(C.with_overrides(g.base, [f"data.path={str(data)!r}".replace("'", '"')]),
                         study.parse_axes({"schedule.T": [10]}), 1, [])
    data.rename(tmp_path / "gone.csv")  # after the grid was checked: the cell itself fails
    lines = []
    rows = study.run_study(g, tmp_path / "s", backend="ray", log=lines.append)
    assert len(rows) == 1 and "does not exist" in rows[0]["failed"]
    assert "failed" in (tmp_path / "s" / "results.csv").read_text().splitlines()[0]
    assert any("1 of 1 runs failed" in m for m in lines)
    (tmp_path / "gone.csv").rename(data)
    rows = study.run_study(g, tmp_path / "s", backend="ray")
    assert len(rows) == 1 and not rows[0].get("failed") and 0 <= rows[0]["knn_auc"] <= 1


@pytest.mark.slow
@pytest.mark.serial  # a local cluster of 2 CPUs
def test_ctrl_c_cancels_the_tasks_and_the_study_resumes_without_rerunning_finished_cells(tmp_path):
    sets = [a for s in TINY for a in ("--set", s)]
    # one short cell and one long one: whichever runs second is still running when the first one's result lands
    # (two cells of 1000 steps each let the second finish before the Ctrl-C once: the study exited 0)
    argv = [sys.executable, "-m", "toydiff", "study", "--backend", "ray", "--jobs", "1", "--grid",
            "train.steps=1000,30000", "--seeds", "1", "--out", str(tmp_path / "s")] + sets
    # as a terminal's shell starts it: Ctrl-C not ignored (a job started with `&` by a script, as a CI's may be,
    # inherits SIGINT ignored, and the study then never sees it)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "s" / "runs").glob("*/result.json")):
        time.sleep(0.2)
    finished = {p.parent.name: p.stat().st_mtime_ns for p in (tmp_path / "s" / "runs").glob("*/result.json")}
    assert finished, "no cell finished in time"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole process group
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    assert "Traceback" not in out
    deadline = time.time() + 30
    while time.time() < deadline and _tasks_alive():
        time.sleep(0.2)
    assert not _tasks_alive(), "tasks outlived the study"
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{len(finished)} done" in proc.stderr
    for name, stamp in finished.items():
        assert (tmp_path / "s" / "runs" / name / "result.json").stat().st_mtime_ns == stamp
    assert len(table(tmp_path / "s")) == 2


def _tasks_alive() -> list[str]:
    return [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).startswith(b"ray::toydiff")]


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.parametrize("device, share, expected", [("cpu", None, (1.0, 0.0)), ("auto", 0.5, (1.0, 0.0)),
                                                     ("cuda", None, (1.0, 1.0)), ("cuda:1", 0.25, (1.0, 0.25))])
def test_a_cell_asks_the_cluster_for_a_gpu_or_a_share_under_cuda(device, share, expected):
    cfg = C.ExperimentConfig(train={"device": device})  # not validated: no GPU is needed to plan a GPU study
    assert study.cell_resources(cfg, share) == expected


def test_backend_ray_without_ray_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = main(["study", "--backend", "ray", "--grid", "schedule.T=10,20", "--out", str(tmp_path / "s")])
    assert code == 2 and err.getvalue().count("\n") == 1
    assert "pip install 'toydiff[ray]'" in err.getvalue()
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flags, needle", [(["--address", "auto"], "--address go with --backend ray"),
                                           (["--shared-dir", "--retries", "3"], "--shared-dir, --retries go with"),
                                           (["--backend", "ray", "--gpus-per-cell", "0"], "--gpus-per-cell must be"),
                                           (["--backend", "ray", "--retries", "-1"], "--retries must be in 0..100")])
def test_ray_flags_are_checked_before_anything_runs(tmp_path, flags, needle):
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = main(["study", "--grid", "schedule.T=10,20", "--out", str(tmp_path / "s")] + flags)
    assert code == 2 and needle in err.getvalue(), err.getvalue()
    assert not (tmp_path / "s").exists()
