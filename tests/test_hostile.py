"""Reliability against the environment: a full disk, a read-only filesystem, names too long, absurd sizes, damaged
or crafted metadata, two writers at once, pipes and devices where files belong, non-finite output, preemption.

Every case ends in success or one line on stderr with exit code 2 (a stop signal: 128 + its number), never a
traceback or a hang, and what was on disk before stays whole. The property-based cases (every JSON field and
tensor of a run directory mutated, an injected OS error at every write) are in test_fuzz.py.
"""

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from toydiff.core import config as C
from toydiff.cli import main
from toydiff.core.errors import ToydiffError
from toydiff.core.files import Lock
from toydiff.core.formats import load_tensors, save_tensors

TINY = ["data.n=256", "schedule.T=20", "model.width=16", "model.depth=1", "train.steps=30", "train.batch_size=64",
        "train.log_every=10", "train.checkpoint_every=10", "sample.n=200", "sample.steps=10", "plot.dpi=40",
        "eval.n=200", "eval.draws=3", "eval.nll_n=0"]
SETS = [a for s in TINY for a in ("--set", s)]


def cli(*argv) -> tuple[int, str]:
    """(exit code, stderr) of one in-process toydiff command."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def refused(argv, *needles) -> str:
    code, err = cli(*argv)
    assert code == 2, (argv, code, err)
    assert err.count("\n") == 1 and err.startswith("toydiff: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def temporaries(root: Path) -> list[Path]:
    return [p for p in Path(root).rglob("*.tmp")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, unchanged):
    """A finished tiny run (trained, sampled, figures, evaluated), copied by each test that changes it."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("finished") / "run"
    code, err = cli("run", "--quiet", "--out", out, *SETS)
    assert code == 0, err
    return unchanged(out)


@pytest.fixture
def run(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


# --- the disk --------------------------------------------------------------------------------------------------

def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path("/tmp/toydiff-mount-probe")
    probe.mkdir(exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True)
    ok = mount.returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], check=True)
    return ok


needs_mount = pytest.mark.skipif(not _can_mount(), reason="mounting a small tmpfs needs root (CI has it)")


class SmallDisk:
    """A real tmpfs mounted at `path`; remount(size, ro) changes its size or makes it read-only."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], check=True)

    def remount(self, size: str = "64m", ro: bool = False) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size},{'ro' if ro else 'rw'}", str(self.path)], check=True)

    def __truediv__(self, name: str) -> Path:
        return self.path / name


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path / "disk")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk.path)], check=False)


@needs_mount
@pytest.mark.slow
@pytest.mark.parametrize("size", ["8k", "24k", "100k", "160k", "400k"])
def test_a_full_disk_at_any_point_of_a_run_is_one_line_and_the_run_resumes_when_space_is_freed(small_disk, size):
    """A real filesystem that fills up at a different point of `toydiff run` for each size (staging, checkpoint,
    samples, figures, report): one line naming the disk, no temporary file left, every file there whole; once
    there is room, `toydiff run --resume` (or a fresh run where nothing was published) finishes the job."""
    small_disk.remount(size)
    out = small_disk / "run"
    code, err = cli("run", "--quiet", "--out", out, *SETS)
    if code == 0 and size in ("160k", "400k"):  # PNG sizes vary a little: these may hold the whole run elsewhere
        assert (out / "report.html").is_file()
        return
    # here: 8k fills while staging the directory, 24k and 100k at a checkpoint, 160k at a figure, 400k at the report
    assert code == 2 and err.count("\n") == 1 and "the disk is full: free space on it" in err, err
    assert temporaries(small_disk.path) == []
    assert [p.name for p in small_disk.path.iterdir() if p.name.endswith(".partial")] == []  # no half-made directory
    small_disk.remount("64m")
    if out.exists():  # published: its manifest, config and data are whole, and it resumes to the end
        json.loads((out / "run.json").read_text())
        code, err = cli("run", "--quiet", "--resume", out)
    else:
        code, err = cli("run", "--quiet", "--out", out, *SETS)
    assert code == 0, err
    assert (out / "report.html").is_file() and json.loads((out / "metrics.json").read_text())["verdict"]


@needs_mount
@pytest.mark.parametrize("command", [["sample"], ["plot"], ["train", "--resume"], ["report"], ["eval"],
                                     ["animate", "--frames", "3", "--n", "50"]])
def test_a_read_only_run_directory_is_one_line_and_left_as_it_was(finished, small_disk, command):
    small_disk.remount("8m")
    shutil.copytree(finished, small_disk / "run")
    if command[0] == "train":  # a finished run resumes without writing: give it steps left
        cfg = small_disk / "run" / "config.toml"
        cfg.write_text(cfg.read_text().replace("steps = 30\n", "steps = 60\n"))
    small_disk.remount("8m", ro=True)
    before = snapshot(small_disk / "run")
    argv = command[:1] + (["--resume", small_disk / "run"] if command[0] == "train" else [small_disk / "run"]) \
        + command[2 if command[0] == "train" else 1:] + (["--quiet"] if command[0] in ("train", "eval") else [])
    refused(argv, "read-only")
    assert snapshot(small_disk / "run") == before


@needs_mount
def test_samples_streamed_to_a_full_disk_are_one_line_not_a_bus_error(finished, small_disk):
    """`sample --out FILE.npy` fills a memory map; its space is taken up front, so a full disk is an error before
    the first batch rather than a SIGBUS in the middle."""
    small_disk.remount("1m")
    code = subprocess.run([sys.executable, "-m", "toydiff", "sample", str(finished), "--n", "1000000", "--out",
                           str(small_disk / "big.npy"), "--quiet"], capture_output=True, text=True, timeout=120)
    assert code.returncode == 2 and code.stderr.count("\n") == 1 and "the disk is full" in code.stderr, code.stderr
    assert list(small_disk.path.iterdir()) == []


def test_a_name_too_long_for_the_filesystem_is_one_line(tmp_path):
    refused(["train", "--quiet", "--out", tmp_path / ("a" * 300), *SETS], "too long", "choose a shorter path")
    assert list(tmp_path.iterdir()) == []


# --- sizes -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, needle", [("schedule.T=1000000000000", "schedule.T must be at most 100,000"),
                                             ("model.width=1000000000", "model.width must be at most 16,384"),
                                             ("sample.n=10000000000", "sample.n must be at most"),
                                             ("train.batch_size=1000000000", "train.batch_size must be at most"),
                                             ("sample.guidance=inf", "must be a finite number")])
def test_absurd_sizes_are_refused_before_anything_is_allocated(run, setting, needle):
    """On the command line, and read back from a run directory's config.toml."""
    refused(["train", "--quiet", "--out", run.parent / "new", "--set", setting], needle)
    import tomli_w
    import tomllib
    section, rest = setting.split(".", 1)
    key, value = rest.split("=")
    cfg = tomllib.loads((run / "config.toml").read_text())
    cfg[section][key] = tomllib.loads(f"v = {value}")["v"]
    (run / "config.toml").write_text(tomli_w.dumps(cfg))
    refused(["sample", run, "--n", "5", "--out", run.parent / "s.npy"], needle)


def test_a_network_larger_than_the_memory_is_refused(tmp_path, monkeypatch):
    from toydiff.core import machine
    monkeypatch.setattr(machine, "available_memory", lambda: 2**30)
    refused(["train", "--quiet", "--out", tmp_path / "r", "--set", "model.width=16384"],
            "needs about", "GiB is available; lower model.width")


def test_an_npy_header_that_claims_more_than_its_file_is_refused_unread(run, monkeypatch):
    header = np.lib.format.header_data_from_array_1_0(np.zeros((2, 2), np.float32))
    header["shape"] = (200_000_000_000, 2)  # 1.5 TiB
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    (run / "train_data.npy").write_bytes(buf.getvalue() + b"\0" * 16)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load was reached"))
    refused(["sample", run, "--n", "5", "--out", run.parent / "s.npy"], "header claims", "but it holds 144")


def test_a_zip_bomb_is_refused_before_it_is_decompressed(tmp_path, monkeypatch):
    from toydiff.core import machine
    from toydiff.data.tables import read_table
    np.savez_compressed(tmp_path / "bomb.npz", x=np.zeros((4_000_000, 2)))  # 64 MB of zeros in ~60 KB
    assert (tmp_path / "bomb.npz").stat().st_size < 200_000
    monkeypatch.setattr(machine, "available_memory", lambda: 32 * 2**20)
    monkeypatch.setattr(np.lib.format, "read_array", lambda *a, **k: pytest.fail("decompressed"))
    with pytest.raises(ToydiffError, match="once decompressed.* needs about 0.2 GiB"):
        read_table(tmp_path / "bomb.npz")


def test_wide_data_is_refused_unless_columns_are_chosen(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 1500))
    path = tmp_path / "wide.csv"
    path.write_text(",".join(f"c{i}" for i in range(1500)) + "\n"
                    + "\n".join(",".join(f"{v:.3f}" for v in row) for row in x) + "\n")
    refused(["train", "--quiet", "--out", tmp_path / "r", "--data", path, *SETS], "1,500 columns",
            "at most 1,024", "--columns")
    code, err = cli("train", "--quiet", "--out", tmp_path / "r", "--data", path, "--columns", "c3,c7,c11", *SETS)
    assert code == 0, err


# --- metadata --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, needle", [
    (lambda m: {**m, "dim": "2"}, "dim should be an integer"),
    (lambda m: {**m, "columns": [1, 2]}, "columns[0] should be a string"),
    (lambda m: {**m, "status": ["trained"]}, "status should be a string"),
    (lambda m: {**m, "status": "done"}, "neither 'training' nor 'trained'"),
    (lambda m: {k: v for k, v in m.items() if k != "status"}, "status is missing")])
def test_a_manifest_with_wrong_types_is_refused_naming_the_field(run, change, needle):
    (run / "run.json").write_text(json.dumps(change(json.loads((run / "run.json").read_text()))))
    for argv in (["sample", run, "--n", "5", "--out", run.parent / "s.npy"], ["report", run], ["plot", run]):
        refused(argv, needle)


@pytest.mark.parametrize("name", ["run.json", "metrics.json", "samples.json", "scaler.json"])
def test_json_nested_100000_deep_is_refused_in_one_line(run, name):
    (run / name).write_text("[" * 100_000 + "]" * 100_000)
    refused(["sample", run, "--n", "5"] if name == "scaler.json" else ["report", run], "nested too deeply")


def _checkpoint(run):
    return load_tensors(run / "checkpoint.safetensors", "checkpoint")


def _rewrite(run, tensors, meta):
    save_tensors(run / "checkpoint.safetensors", tensors, {k: v for k, v in meta.items()
                                                           if k not in ("format", "version")})


@pytest.mark.parametrize("key, value, needle", [
    ("step", "-5", "'step' is '-5', not a count"), ("step", "abc", "not a count"),
    ("step", "100000", "outside 0..30"), ("running", "nan", "not a finite number"),
    ("rows", '[{"step": "1", "loss": 1, "lr": 1, "seconds": 1}]', "[0].step should be an integer"),
    ("rows", '{"a": 1}', "should be a list"), ("param_groups", '[{"lr": "x"}]', "optimizer groups"),
    ("param_groups", "[]", "optimizer groups"), ("scheduler", '{"last_epoch": 3}', "learning-rate schedule"),
    ("scheduler", "[" * 50_000, "nested too deeply")])
def test_a_crafted_checkpoint_is_refused_before_training_resumes(run, key, value, needle):
    tensors, meta = _checkpoint(run)
    before = snapshot(run)
    _rewrite(run, tensors, {**meta, key: value})
    refused(["train", "--resume", run, "--quiet"], needle, "damaged")
    assert {k: v for k, v in snapshot(run).items() if k != "checkpoint.safetensors"} == \
        {k: v for k, v in before.items() if k != "checkpoint.safetensors"}


@pytest.mark.parametrize("change, needle", [
    (lambda t: {**t, "rng": t["rng"][:100]}, "random generator state"),
    (lambda t: {k: v for k, v in t.items() if k != "rng"}, "random generator state"),
    (lambda t: {**t, "optim/0/exp_avg": torch.zeros(3, 3)}, "optimizer entry 'optim/0/exp_avg' has shape"),
    (lambda t: {**t, "optim/99/exp_avg": torch.zeros(1)}, "unknown optimizer entry"),
    (lambda t: {**t, "optim/0/step": torch.zeros(2, dtype=torch.int64)}, "optimizer entry 'optim/0/step'"),
    (lambda t: {k: (v[:1] if k.startswith("model/") and v.ndim else v) for k, v in t.items()}, "does not fit")])
def test_a_checkpoint_with_wrong_tensors_is_refused(run, change, needle):
    tensors, meta = _checkpoint(run)
    _rewrite(run, change(tensors), meta)
    refused(["train", "--resume", run, "--quiet"], needle)


def test_a_run_marked_trained_with_an_early_checkpoint_trains_on(run):
    """status "trained" alone does not make a run trained: the checkpoint's step decides."""
    tensors, meta = _checkpoint(run)
    assert meta["step"] == "30"
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "steps": 60}))
    cfg = (run / "config.toml").read_text().replace("steps = 30\n", "steps = 60\n")
    (run / "config.toml").write_text(cfg)
    code, err = cli("train", "--resume", run, "--quiet")
    assert code == 0, err
    assert _checkpoint(run)[1]["step"] == "60"


def test_non_finite_weights_or_scaler_or_guidance_never_write_non_finite_samples(run):
    before = snapshot(run)
    refused(["sample", run, "--guidance", "nan"], "finite")
    refused(["sample", run, "--guidance", "1e30"], "at most 1,000")
    ema = load_tensors(run / "model_ema.safetensors")
    save_tensors(run / "model_ema.safetensors", {k: v * float("nan") for k, v in ema[0].items()},
                 {"step": ema[1]["step"]})
    refused(["sample", run], "samples came out NaN or infinite; nothing was written")
    shutil.copy(run / "model.safetensors", run / "model_ema.safetensors")  # finite weights again
    scaler = json.loads((run / "scaler.json").read_text())
    (run / "scaler.json").write_text(json.dumps({**scaler, "scale": [float("inf"), 1.0]}).replace("Infinity", "1e999"))
    refused(["sample", run], "scaler is malformed")
    for name in ("samples.npy", "samples.csv", "samples.json"):
        assert (run / name).read_bytes() == before[name]


def test_samples_files_that_do_not_belong_together_are_refused(run, monkeypatch):
    """A write cut between its renames (a kill, here simulated), or a samples.npy swapped by hand."""
    from toydiff.core import files
    real, calls = os.replace, {"n": 0}

    def replace_then_die(a, b):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed after samples.npy was renamed into place, before samples.json
        return real(a, b)
    monkeypatch.setattr(files.os, "replace", replace_then_die)
    code, err = cli("sample", run, "--seed", "7")
    assert code == 130
    monkeypatch.undo()
    assert temporaries(run) == []
    for argv in (["plot", run], ["report", run]):
        refused(argv, "samples", "are incomplete", f"toydiff sample {run}")
    code, err = cli("sample", run)
    assert code == 0, err
    code, err = cli("report", run)
    assert code == 0, err


def test_column_names_with_commas_and_newlines_survive_the_samples_csv(tmp_path):
    import csv
    path = tmp_path / "odd.csv"
    rng = np.random.default_rng(1)
    rows = "\n".join(f"{a:.4f},{b:.4f}" for a, b in rng.normal(size=(300, 2)))
    path.write_text('"a,b","c\nd"\n' + rows + "\n")
    code, err = cli("train", "--quiet", "--out", tmp_path / "r", "--data", path, *SETS)
    assert code == 0, err
    code, err = cli("sample", tmp_path / "r", "--n", "20")
    assert code == 0, err
    with open(tmp_path / "r" / "samples.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["a,b", "c\nd"] and len(table) == 21 and all(len(r) == 2 for r in table)


# --- files that are not files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["config", "run.json", "config.toml", "scaler.json", "train_log.csv"])
def test_a_pipe_or_device_where_a_file_belongs_never_hangs(run, where):
    if where == "config":
        argv = [sys.executable, "-m", "toydiff", "train", "--config", "/dev/zero", "--out", str(run.parent / "n")]
    else:
        (run / where).unlink()
        os.mkfifo(run / where)
        command = {"scaler.json": "sample", "config.toml": "sample", "train_log.csv": "plot"}.get(where, "report")
        argv = [sys.executable, "-m", "toydiff", command, str(run)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "not a regular file" in proc.stderr


def test_a_figures_link_out_of_the_run_directory_is_refused(run, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "dataset.png").write_bytes(b"precious")
    shutil.rmtree(run / "figures")
    (run / "figures").symlink_to(outside)
    refused(["plot", run], "is not a folder of the run directory")
    refused(["animate", run, "--frames", "3", "--n", "20"], "is not a folder of the run directory")
    assert (outside / "dataset.png").read_bytes() == b"precious" and len(list(outside.iterdir())) == 1


def test_a_trajectory_may_not_overwrite_the_samples(run, tmp_path):
    before = snapshot(run)
    refused(["sample", run, "--out", tmp_path / "s.npy", "--trajectory", tmp_path / "s.npy"], "would overwrite")
    refused(["sample", run, "--trajectory", run / "samples.npy"], "would overwrite")
    assert snapshot(run) == before


# --- one writer ------------------------------------------------------------------------------------------------

HOLD = ("import sys, time; from toydiff.core.files import Lock; Lock(sys.argv[1]).acquire(); print('held', flush=True); "
        "time.sleep(600)")


def test_one_writer_per_run_directory_and_a_killed_holder_leaves_no_stale_lock(run):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        for argv in (["train", "--resume", run, "--quiet"], ["sample", run], ["plot", run], ["report", run],
                     ["run", "--resume", run, "--quiet"]):
            refused(argv, f"is in use by process {holder.pid}", "wait for it to finish")
        assert snapshot(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    (run / ".samples.npy.dead.tmp").write_bytes(b"left by a killed writer")
    code, err = cli("sample", run, "--n", "10")  # the kernel dropped the lock with the process
    assert code == 0, err
    assert temporaries(run) == []  # and the writer that took it cleaned what the killed one left


def test_staging_left_by_a_killed_run_is_removed_and_a_live_one_is_not(tmp_path):
    stale, live = tmp_path / ".r.dead.partial", tmp_path / ".r.live.partial"
    for d in (stale, live):
        d.mkdir()
        (d / "config.toml").write_text("x")
        os.utime(d, (time.time() - 3600, time.time() - 3600))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = cli("train", "--quiet", "--out", tmp_path / "r", *SETS)
        assert code == 0, err
        assert not stale.exists() and (live / "config.toml").is_file()
    finally:
        holder.kill()
        holder.wait()


def test_sigterm_while_sampling_exits_143_and_writes_nothing(run):
    before = snapshot(run)
    proc = subprocess.Popen([sys.executable, "-m", "toydiff", "sample", str(run), "--n", "50000000", "--batch-size",
                             "4096"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120  # the command holds the run's lock (its pid in .lock) once it is under way
    while time.time() < deadline and (run / ".lock").read_text().strip() != str(proc.pid):
        time.sleep(0.1)
    time.sleep(1.5)  # into the sampling loop
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().splitlines()[-1].startswith("toydiff: stopped by SIGTERM"), err
    assert "Traceback" not in err
    assert {k: v for k, v in snapshot(run).items() if k != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"} and temporaries(run) == []


@pytest.mark.slow
@pytest.mark.serial  # two processes racing for the lock
def test_two_resumes_of_one_run_started_together_one_trains_the_other_is_refused(run):
    cfg = (run / "config.toml").read_text().replace("steps = 30\n", "steps = 3000\n")
    (run / "config.toml").write_text(cfg)
    argv = [sys.executable, "-m", "toydiff", "train", "--resume", str(run), "--quiet"]
    a = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    b = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    errs = {p.pid: p.communicate(timeout=300)[1] for p in (a, b)}
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 2], errs
    loser = a if a.returncode == 2 else b
    assert "is in use by process" in errs[loser.pid], errs


# --- studies ---------------------------------------------------------------------------------------------------

def test_a_study_directory_refuses_another_grid(tmp_path):
    from toydiff.jobs import study
    base = C.with_overrides(C.ExperimentConfig(), TINY + ["train.steps=5"])
    first = study.build_grid(base, study.parse_axes({"schedule.T": [10, 20]}), 1, [])
    study.run_study(first, tmp_path)
    other = study.build_grid(base, study.parse_axes({"model.width": [8, 32]}), 1, [])
    results = (tmp_path / "results.csv").read_bytes()
    with pytest.raises(ToydiffError, match="holds a study of another grid .*T=10, T=20.*choose another --out"):
        study.run_study(other, tmp_path)
    assert (tmp_path / "results.csv").read_bytes() == results
    more_seeds = study.build_grid(base, study.parse_axes({"schedule.T": [10, 20]}), 2, [])
    assert len(study.run_study(more_seeds, tmp_path)) == 4  # the same grid with more seeds resumes
    with Lock(tmp_path, "study directory"):
        holder_pid = os.getpid()
        with pytest.raises(ToydiffError, match=f"study directory .* is in use by process {holder_pid}"):
            study.run_study(first, tmp_path)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.slow
@pytest.mark.serial  # a study of two worker processes
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_or_stopped_study_takes_its_workers_with_it(tmp_path, sig):
    sets = [a for s in TINY + ["train.steps=100000"] for a in ("--set", s)]
    study = subprocess.Popen([sys.executable, "-m", "toydiff", "study", "--grid", "schedule.T=10,20", "--seeds", "1",
                              "--jobs", "2", "--out", str(tmp_path / "s")] + sets,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any((tmp_path / "s" / "runs").glob("*/run.json")):
        time.sleep(0.2)
    workers = _children(study.pid)
    assert workers, "the study started no worker"
    study.send_signal(sig)
    assert study.wait(timeout=60) == (-signal.SIGKILL if sig == signal.SIGKILL else 143)
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() and
                                         "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]
                                         for p in workers):
        time.sleep(0.2)
    alive = [p for p in workers if Path(f"/proc/{p}").exists()
             and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert alive == [], "workers outlived their study"


# --- preemption under torchrun ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.serial  # two torchrun ranks, timed
def test_a_frozen_torchrun_rank_ends_the_job_within_the_collective_timeout(tmp_path):
    """Rank 1 frozen (SIGSTOP) mid-training: rank 0 gives up after TOYDIFF_COLLECTIVE_TIMEOUT (5) seconds with
    one line, instead of gloo's 30 minutes; the run directory resumes."""
    sets = [a for s in TINY + ["train.steps=200000", "train.checkpoint_every=50"] for a in ("--set", s)]
    out = tmp_path / "r"
    env = {**os.environ, "TOYDIFF_COLLECTIVE_TIMEOUT": "5"}
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "toydiff",
                            "train", "--quiet", "--out", str(out)] + sets, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint.safetensors").exists():
        time.sleep(0.2)
    assert (out / "checkpoint.safetensors").exists()
    ranks = {}
    for pid in _children(_children(job.pid)[0]) if _children(job.pid) else []:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((e.split(b"=")[1] for e in environ if e.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[int(rank)] = pid
    if not ranks:  # torchrun may run the workers as its own children
        for pid in _children(job.pid):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((e.split(b"=")[1] for e in environ if e.startswith(b"RANK=")), None)
            if rank is not None:
                ranks[int(rank)] = pid
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGSTOP)
    start = time.time()
    try:
        while Path(f"/proc/{ranks[0]}").exists() and "Z" not in _state(ranks[0]) and time.time() - start < 90:
            time.sleep(0.2)
        waited = time.time() - start  # rank 0 gave up on its own (torchrun's agent would wait 30 s more for rank 1)
    finally:
        os.kill(ranks[1], signal.SIGKILL)
    _, err = job.communicate(timeout=60)
    assert job.returncode != 0 and waited < 60, waited
    assert "another process of this torchrun job stopped or stopped answering" in err, err[-2000:]
    step = int(_checkpoint(out)[1]["step"])
    assert step > 0
    cfg = (out / "config.toml").read_text().replace("steps = 200000\n", f"steps = {step + 20}\n")
    (out / "config.toml").write_text(cfg)
    code, err = cli("train", "--resume", out, "--quiet")
    assert code == 0, err


def test_os_errors_name_the_fix():
    from toydiff.core.errors import os_error
    for code, needle in ((errno.ENOSPC, "free space"), (errno.EROFS, "read-only"), (errno.EACCES, "permission"),
                         (errno.ENAMETOOLONG, "shorter path"), (errno.EMFILE, "ulimit -n")):
        message = str(os_error(OSError(code, os.strerror(code), "/x/y"), doing="write"))
        assert message.startswith("cannot write '/x/y': ") and needle in message, message
