"""Property-based input hardening: random and hostile input to the config parser, the --set overrides, the data
loaders, run directories and the CLI. Every case must end in success or a ToydiffError (the CLI: exit code 0 or
2 with one line on stderr), never a traceback, and never change or delete a file that already existed.

Each test counts its cases in CASES; `pytest tests/test_fuzz.py -s` prints the counts.
"""

import errno
import io
import json
import os
import string
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from toydiff.core import config as C  # noqa: E402
from toydiff.cli import main  # noqa: E402
from toydiff.data.tables import read_table  # noqa: E402
from toydiff.core.errors import ToydiffError  # noqa: E402

from conftest import file_hashes as snapshot  # noqa: E402

CASES: Counter = Counter()
STRUCK: Counter = Counter()  # of the injected OS errors, those whose write happened (the command wrote k files)


@pytest.fixture(scope="module", autouse=True)
def case_counts():
    """After this module's tests (in any order; per worker under xdist): how many cases each property saw."""
    yield
    print("\nfuzz cases:", dict(CASES), "total", sum(CASES.values()), dict(STRUCK))
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=True, database=None)  # the same cases on every machine, no example files

SECTIONS = ["data", "schedule", "model", "train", "sample", "plot", "eval", "seed", "nope"]
KEYS = ["name", "n", "noise", "T", "steps", "lr", "prediction", "sampler", "steps", "eta", "columns", "forward_t",
        "dim", "modes", "holdout", "guidance", "label", "variance", "width", "batch_size", "x"]
scalars = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.booleans(), st.lists(st.integers(-5, 5), max_size=3),
                    st.lists(st.text(max_size=4), max_size=3))
tables = st.dictionaries(st.sampled_from(SECTIONS),
                         st.one_of(scalars, st.dictionaries(st.sampled_from(KEYS), scalars, max_size=4)), max_size=4)


@FUZZ
@given(tables)
def test_config_from_any_table_is_a_config_or_a_toydiff_error(d):
    CASES["config tables"] += 1
    try:
        cfg = C.from_dict(d)
    except ToydiffError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(cfg, C.ExperimentConfig)
    assert C.from_dict(__import__("tomllib").loads(cfg.to_toml())) == cfg  # what parses also round-trips


override_text = st.one_of(
    st.text(alphabet=string.printable, max_size=40),
    st.builds(lambda s, k, v: f"{s}.{k}={v}", st.sampled_from(SECTIONS), st.sampled_from(KEYS),
              st.one_of(st.text(alphabet=string.printable, max_size=10), st.integers().map(str),
                        st.floats().map(repr), st.sampled_from(["[1,2]", "[\"a\"]", "true", "\"x\"", "{a=1}", "nan",
                                                                "inf", "-1", "0", "1e400", "[", "'"]))))


@FUZZ
@given(st.lists(override_text, max_size=3))
def test_set_overrides_parse_or_give_one_line(items):
    CASES["--set overrides"] += 1
    try:
        C.with_overrides(C.ExperimentConfig(), items)
    except ToydiffError as e:
        assert "\n" not in str(e)


cells = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers().map(str),
                  st.text(alphabet=string.printable, max_size=6), st.just(""))


@FUZZ
@given(st.lists(st.lists(cells, min_size=1, max_size=4), max_size=30), st.booleans(), st.booleans(),
       st.sampled_from([",", "\t"]))
def test_text_tables_load_or_name_the_problem(tmp_path_factory, rows, header, drop, sep):
    CASES["csv/tsv files"] += 1
    path = tmp_path_factory.mktemp("csv") / ("f.csv" if sep == "," else "f.tsv")
    lines = ([sep.join(f"c{i}" for i in range(len(rows[0])))] if header and rows else []) + \
        [sep.join(c.replace(sep, " ").replace("\n", " ").replace("\r", " ").replace('"', "") for c in r) for r in rows]
    path.write_text("\n".join(lines))
    try:
        table = read_table(path, drop_missing=drop)
    except ToydiffError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    assert table.x.ndim == 2 and np.isfinite(table.x).all() and len(table.x) >= 10


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([".csv", ".npy", ".npz", ".parquet", ".tsv"]))
def test_random_bytes_in_any_format_are_refused_cleanly(tmp_path_factory, blob, suffix):
    CASES["random-byte files"] += 1
    path = tmp_path_factory.mktemp("bytes") / f"f{suffix}"
    path.write_bytes(blob)
    try:
        read_table(path)
    except ToydiffError as e:
        assert "\n" not in str(e)


@FUZZ
@given(st.one_of(st.integers(1, 3).flatmap(lambda d: st.lists(
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=d, max_size=d), max_size=40)),
    st.just([])), st.sampled_from([".npy", ".npz"]))
def test_arrays_with_any_values_load_or_name_the_problem(tmp_path_factory, rows, suffix):
    CASES["npy/npz arrays"] += 1
    path = tmp_path_factory.mktemp("arr") / f"a{suffix}"
    array = np.array(rows, dtype=np.float64)
    np.save(path, array) if suffix == ".npy" else np.savez(path, x=array)
    try:
        table = read_table(path)
    except ToydiffError as e:
        assert "\n" not in str(e)
        return
    assert np.isfinite(table.x).all()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, unchanged):
    """A directory with a finished run and a user file, which no fuzz case may change or delete."""
    from toydiff import train_run
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sandbox")
    train_run(C.with_overrides(C.ExperimentConfig(), ["data.n=64", "schedule.T=5", "model.width=8", "model.depth=1",
                                                      "train.steps=3", "sample.n=20"]), root / "run")
    (root / "data.csv").write_text("a,b\n" + "".join(f"{i},{i % 7}\n" for i in range(30)))
    return unchanged(root)


FLAGS = ["--set", "--n", "--seed", "--steps", "--sampler", "--spacing", "--eta", "--label", "--guidance", "--out",
         "--batch-size", "--draws", "--data", "--columns", "--resume", "--preset", "--config", "--device",
         "--trajectory", "--jobs", "--grid", "--seeds", "--no-eval", "--quiet", "--clip", "--drop-missing"]
VALUES = ["-1", "0", "1", "2", "1e9", "nan", "x", "", "ddpm", "diffusers:Nope", "karras", "guide", "cpu", "cuda:7",
          "train.steps=1", "schedule.T=0", "data.name=gmm", "RUN", "DATA", "NEW", "NEW/x.npy", "RUN/run.json",
          "RUN/samples.npy", "DATA/..", "a,b", "schedule.T=1,2"]


@settings(FUZZ, max_examples=60)
@given(st.sampled_from(["run", "train", "sample", "plot", "eval", "study", "config", "nope", "--version"]),
       st.lists(st.one_of(st.sampled_from(FLAGS), st.sampled_from(VALUES),
                          st.text(alphabet=string.ascii_letters + string.digits + "=.-,/", max_size=8)), max_size=6))
def test_cli_exits_0_or_2_with_one_line_and_never_touches_existing_files(sandbox, tmp_path_factory, command, rest):
    CASES["CLI invocations"] += 1
    fresh = tmp_path_factory.mktemp("out")
    subs = {"RUN": str(sandbox / "run"), "DATA": str(sandbox / "data.csv"), "NEW": str(fresh / "new")}
    argv = [command] + [subs.get(a.split("/")[0], a.split("/")[0]) + ("/" + a.split("/", 1)[1] if "/" in a and
                                                                     a.split("/")[0] in subs else "")
                        if a.split("/")[0] in subs else a for a in rest]
    if command in ("run", "train", "study") and "--resume" not in argv:
        argv += ["--out", str(fresh / "made"), "--set", "train.steps=1", "--set", "data.n=40", "--set",
                 "schedule.T=4", "--set", "sample.n=20", "--set", "eval.n=20", "--set", "eval.draws=2",
                 "--set", "eval.nll_n=0", "--set", "model.width=8"]
    before = snapshot(sandbox)
    err, out = io.StringIO(), io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(out):
            code = main(argv)
    except SystemExit as e:  # --help / --version print and exit 0
        code = e.code
    assert code in (0, 2), (argv, code, err.getvalue())
    if code == 2:
        assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("toydiff: error: "), (argv, err.getvalue())
    assert "Traceback" not in err.getvalue()
    after = snapshot(sandbox)
    assert {k: v for k, v in after.items() if k in before} == before or _only_outputs_changed(before, after), argv


def _only_outputs_changed(before: dict, after: dict) -> bool:
    """`sample`, `plot` and `eval` without --out write their outputs into the run directory by design
    (samples, figures, metrics.json); everything else must be untouched."""
    outputs = ("run/samples.", "run/figures/", "run/metrics.json")
    return all(after.get(k) == v for k, v in before.items() if not k.startswith(outputs))


RUN_FILES = ["run.json", "config.toml", "scaler.json", "train_data.npy", "model.safetensors", "model_ema.safetensors",
             "checkpoint.safetensors", "train_log.csv"]


@settings(FUZZ, max_examples=40)
@given(st.sampled_from(RUN_FILES), st.one_of(st.binary(max_size=200), st.sampled_from([
    b"", b"{}", b'{"format": "toydiff-run", "version": 99}', b'{"format": "toydiff-run", "version": 1, "dim": -1}',
    b"[data]\nname = 3\n", b"[train]\nsteps = 1e9\n", b'{"kind": "minmax", "shift": [0], "scale": [0]}',
    b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (2,), }",
    b"\x80\x04\x95pickle"])), st.sampled_from(["sample", "eval", "plot", "train"]))
def test_a_hostile_run_directory_is_refused_in_one_line(sandbox, tmp_path_factory, name, blob, command):
    """Any file of a run directory replaced by random or crafted bytes: loading, sampling, evaluating, plotting
    and resuming end in success or one line with exit code 2; the other files stay as they were."""
    import shutil
    CASES["hostile run directories"] += 1
    run = tmp_path_factory.mktemp("hostile") / "run"
    shutil.copytree(sandbox / "run", run)
    (run / name).write_bytes(blob)
    before = snapshot(run)
    out = tmp_path_factory.mktemp("o") / "x.npy"
    argv = {"sample": ["sample", str(run), "--out", str(out), "--n", "5"], "eval": ["eval", str(run), "--n", "20",
                                                                                      "--draws", "2"],
            "plot": ["plot", str(run)], "train": ["train", "--resume", str(run), "--quiet"]}[command]
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = main(argv)
    assert code in (0, 2) and "Traceback" not in err.getvalue(), (name, blob, command, err.getvalue())
    if code == 2:
        assert err.getvalue().count("\n") == 1, err.getvalue()
    after = snapshot(run)
    changed = [k for k, v in before.items() if after.get(k) != v and k != name]
    assert all(k.startswith(("samples.", "figures/", "metrics.json", "checkpoint", "model", "train_log", "run.json"))
               for k in changed) and (command == "train" or not any(k.startswith(("checkpoint", "model", "train_log",
                                                                                 "run.json")) for k in changed))


# --- run directories and checkpoints, field by field; an OS error at every write --------------------------------

json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=8)
MANIFEST_FIELDS = ["format", "version", "status", "dim", "n_train", "classes", "columns", "class_names",
                   "integer_columns", "source", "checkpoint_step", "steps", "train_seconds", "final_loss",
                   "alpha_bar_T", "parameters", "device", "threads", "student", "teacher", "method"]


def _one_line_or_success(argv, err: str, code: int, what) -> None:
    assert code in (0, 2) and "Traceback" not in err, (what, argv, code, err)
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("toydiff: error: "), (what, err)


def _copy_run(sandbox, tmp_path_factory, name):
    import shutil
    run = tmp_path_factory.mktemp(name) / "run"
    shutil.copytree(sandbox / "run", run)
    return run


@pytest.fixture(scope="module")
def finished(tmp_path_factory, unchanged):
    """A run through the main job (samples, figures, metrics, report), with steps left to resume."""
    root = tmp_path_factory.mktemp("finished")
    sets = ["data.n=64", "schedule.T=5", "model.width=8", "model.depth=1", "train.steps=3", "sample.n=40",
            "eval.n=40", "eval.draws=2", "eval.nll_n=0", "plot.dpi=30"]
    with redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
        assert main(["run", "--quiet", "--out", str(root / "run")] + [a for x in sets for a in ("--set", x)]) == 0
    return unchanged(root)


@settings(FUZZ, max_examples=60)
@given(st.sampled_from(["run.json", "samples.json", "metrics.json", "scaler.json"]),
       st.sampled_from(MANIFEST_FIELDS + ["sampler", "nfe", "npy_sha256", "verdict", "n", "metrics", "kind",
                                          "shift", "scale"]), json_values,
       st.sampled_from(["sample", "plot", "report", "eval", "train"]))
def test_every_json_field_of_a_run_directory_mutated_is_refused_in_one_line(sandbox, tmp_path_factory, name, field,
                                                                              value, command):
    CASES["run-directory JSON fields"] += 1
    run = _copy_run(sandbox, tmp_path_factory, "field")
    path = run / name
    if not path.is_file():
        path.write_text("{}")
    d = json.loads(path.read_text())
    d = {**d, field: value} if isinstance(d, dict) else value
    path.write_text(json.dumps(d))
    argv = {"sample": ["sample", str(run), "--n", "5"], "plot": ["plot", str(run)], "report": ["report", str(run)],
            "eval": ["eval", str(run), "--n", "20", "--draws", "2", "--quiet"],
            "train": ["train", "--resume", str(run), "--quiet"]}[command]
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = main(argv)
    _one_line_or_success(argv, err.getvalue(), code, (name, field, value))


META_KEYS = ["step", "rows", "running", "since", "seconds", "param_groups", "scheduler", "format", "version"]
meta_values = st.one_of(st.text(max_size=12), json_values.map(json.dumps),
                        st.sampled_from(["-5", "0", "3", "99999999999999999999", "nan", "inf", "1e308", "[]", "{}",
                                         "[" * 5000, '[{"step": 1, "loss": "x", "lr": 1, "seconds": 0}]']))


@settings(FUZZ, max_examples=50)
@given(st.one_of(st.tuples(st.just("meta"), st.sampled_from(META_KEYS), meta_values),
                 st.tuples(st.just("tensor"), st.integers(0, 200),
                           st.sampled_from(["dtype", "shape", "grow", "shrink", "drop", "nan"]))))
def test_every_checkpoint_field_and_tensor_mutated_is_refused_or_resumes(sandbox, tmp_path_factory, change):
    """Each metadata entry of the checkpoint set to junk, or one tensor's dtype, shape or size changed (or
    dropped, or NaN): `train --resume` ends in one line, or resumes (a NaN weight: the divergence guard's line)."""
    from toydiff.core.formats import load_tensors, save_tensors
    CASES["checkpoint fields and tensors"] += 1
    run = _copy_run(sandbox, tmp_path_factory, "ckpt")
    cfg = (run / "config.toml").read_text().replace("steps = 3\n", "steps = 6\n")  # steps left to train
    (run / "config.toml").write_text(cfg)
    tensors, meta = load_tensors(run / "checkpoint.safetensors", "checkpoint")
    if change[0] == "meta":
        meta = {**meta, change[1]: change[2]}
    else:
        key = sorted(tensors)[change[1] % len(tensors)]
        t = tensors[key]
        tensors[key] = {"dtype": lambda: t.to(torch.float64 if t.dtype != torch.float64 else torch.int32),
                        "shape": lambda: t.reshape(-1, 1) if t.ndim != 2 else t.reshape(-1),
                        "grow": lambda: torch.cat([t.reshape(-1), t.reshape(-1)[:1]]),
                        "shrink": lambda: t.reshape(-1)[:-1] if t.numel() > 1 else t.reshape(-1)[:0],
                        "drop": lambda: None, "nan": lambda: t.float() * float("nan")}[change[2]]()
        tensors = {k: v for k, v in tensors.items() if v is not None}
    save_tensors(run / "checkpoint.safetensors", tensors, {k: v for k, v in meta.items()
                                                          if k not in ("format", "version")})
    if change[0] == "meta" and change[1] in ("format", "version"):  # the tag itself: written as given
        from safetensors.torch import save_file
        save_file(tensors, str(run / "checkpoint.safetensors"), metadata=meta)
    argv = ["train", "--resume", str(run), "--quiet"]
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = main(argv)
    _one_line_or_success(argv, err.getvalue(), code, change)


FIXES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "quota", errno.EACCES: "permission denied",
         errno.EROFS: "read-only", errno.EMFILE: "too many open files", errno.ENAMETOOLONG: "too long"}


@settings(FUZZ, max_examples=60)
@given(st.sampled_from(["train", "resume", "sample", "plot", "report", "eval"]), st.integers(1, 10),
       st.sampled_from(["create", "write"]), st.sampled_from(sorted(FIXES)))
def test_an_os_error_at_any_write_is_one_line_and_leaves_everything_whole(finished, tmp_path_factory, command, k,
                                                                           phase, code_):
    """The k-th file a command writes fails: at its creation with any of six errors, or while its bytes go to
    the disk (a real ENOSPC from /dev/full). One line naming the fix; no temporary file; every file there is
    whole (the samples' three files agree); a new run left behind resumes once the fault is gone. The one
    file whose loss is no failure is the noise-floor cache's entry (eval starts with an empty cache, so it is
    its first write): the command succeeds and warns that the floors were not cached."""
    import tempfile

    from toydiff.runs.directory import RunDir
    from toydiff.core.files import check_regular
    CASES["OS errors injected at a write"] += 1
    run = _copy_run(finished, tmp_path_factory, "oserr")
    cache = tmp_path_factory.mktemp("cache")  # each case its own empty cache: the same writes on every machine
    if command == "resume":
        (run / "config.toml").write_text((run / "config.toml").read_text().replace("steps = 3\n", "steps = 6\n"))
    new = run.parent / "new"
    argv = {"train": ["train", "--quiet", "--out", str(new), "--set", "data.n=64", "--set", "schedule.T=5", "--set",
                      "model.width=8", "--set", "model.depth=1", "--set", "train.steps=4", "--set",
                      "train.checkpoint_every=2", "--set", "train.log_every=1"],
            "resume": ["train", "--resume", str(run), "--quiet"], "sample": ["sample", str(run), "--n", "20"],
            "plot": ["plot", str(run)], "report": ["report", str(run)],
            "eval": ["eval", str(run), "--n", "20", "--draws", "2", "--quiet"]}[command]
    real, calls = tempfile.mkstemp, {"n": 0, "struck": None}

    def failing_mkstemp(*a, **kw):
        calls["n"] += 1
        if calls["n"] != k:
            return real(*a, **kw)
        calls["struck"] = Path(kw["dir"])
        if phase == "create":
            raise OSError(code_, os.strerror(code_))
        fd, path = real(*a, **kw)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), path  # its bytes meet a real ENOSPC
    before = snapshot(run)
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stderr(err), redirect_stdout(io.StringIO()):
        patch.setenv("TOYDIFF_CACHE", str(cache))
        patch.setattr(tempfile, "mkstemp", failing_mkstemp)
        code = main(argv)
    _one_line_or_success(argv, err.getvalue(), code, (command, k, phase))
    in_cache = calls["struck"] is not None and cache in calls["struck"].parents
    # it fails if and only if a file of the command's own was hit
    assert code == (2 if calls["struck"] and not in_cache else 0), (command, k, calls, err.getvalue())
    if in_cache:
        assert "warning: the noise floors were not cached" in err.getvalue(), err.getvalue()
    STRUCK["OS errors that struck a write"] += calls["struck"] is not None
    STRUCK["of them the floor cache's (a warning)"] += in_cache
    if code == 2:
        assert FIXES[errno.ENOSPC if phase == "write" else code_] in err.getvalue(), err.getvalue()
    assert not list(run.parent.rglob("*.tmp")) and not list(run.parent.glob(".*.partial")), command
    for path in run.rglob("*.json"):
        json.loads(path.read_text())
    RunDir(run).read_samples()  # the three samples files agree (old or new, never mixed)
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in (run / "figures").glob("*.png"))
    kept = ("samples.", "figures/", "metrics.json", "report.html", "checkpoint", "model", "train_log", "run.json",
            ".lock")
    assert all(snapshot(run).get(f) == v for f, v in before.items() if not f.startswith(kept)), command
    if command == "train" and code == 2 and new.exists():  # published before the fault: it resumes
        check_regular(new / "run.json")
        with redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
            assert main(["train", "--resume", str(new), "--quiet"]) == 0
