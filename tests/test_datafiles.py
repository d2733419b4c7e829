"""The user's own data files: every format round-trips, every bad input is one line naming file, row and column."""

import json

import numpy as np
import pytest

from toydiff.cli import main
from toydiff.data.tables import read_table
from toydiff.core.errors import ToydiffError

X = np.random.default_rng(0).normal(size=(60, 3)) * [1.0, 10.0, 0.1] + [0.0, 50.0, -2.0]
KIND = np.where(X[:, 0] > 0, "up", "down")


def write_csv(path, rows, header="a,b,c,kind", delimiter=","):
    lines = ([header.replace(",", delimiter)] if header else []) + [delimiter.join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def rows_with_kind():
    return [[*map(repr, r), k] for r, k in zip(X.tolist(), KIND)]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "npy", "npz", "parquet"])
def test_every_format_round_trips(fmt, tmp_path):
    path = tmp_path / f"data.{fmt}"
    if fmt in ("csv", "tsv"):
        write_csv(path, rows_with_kind(), delimiter="," if fmt == "csv" else "\t")
        table = read_table(path, label_column="kind")
        assert table.names == ["a", "b", "c"] and table.classes == ["down", "up"]
        assert np.array_equal(table.labels, (KIND == "up").astype(int))
    elif fmt == "npy":
        np.save(path, X)
        table = read_table(path)
        assert table.names == ["x1", "x2", "x3"] and table.labels is None
    elif fmt == "npz":
        np.savez(path, x=X, other=np.zeros(3))
        table = read_table(path)
    else:
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.table({"a": X[:, 0], "b": X[:, 1], "c": X[:, 2], "kind": KIND}), path)
        table = read_table(path, label_column="kind")
        assert table.names == ["a", "b", "c"] and table.classes == ["down", "up"]
    assert np.array_equal(table.x, X)  # repr() of a float64 reads back exactly


def test_columns_by_name_or_index_and_headerless_csv(tmp_path):
    path = write_csv(tmp_path / "h.csv", rows_with_kind())
    unnamed = read_table(path)  # the label column not named as the label: a binary column of text
    assert unnamed.names == ["a", "b", "c", "kind"] and unnamed.columns[-1].kind == "binary"
    assert unnamed.columns[-1].text == ("down", "up") and set(unnamed.x[:, -1]) == {0.0, 1.0}
    assert np.array_equal(read_table(path, columns=["c", "0"], label_column="kind").x, X[:, [2, 0]])
    bare = write_csv(tmp_path / "bare.csv", X.tolist(), header="")
    assert read_table(bare).names == ["x1", "x2", "x3"] and np.allclose(read_table(bare).x, X)


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("a,b\n1,2\n3\n", "row 3: 1 cells, but there are 2 columns"),
    ("a,b\n" + "1,2\n" * 5 + "1,x7\n" + "3,4\n" * 10, "row 7, column 'b': 'x7' is not a number"),
    ("a,b\n" + "1,2\n" * 5 + "1,\n" + "3,4\n" * 10, "row 7, column 'b' is missing, NaN or infinite; fix the file or "
                                                     "pass --drop-missing"),
    ("a,b\n" + "1,2\n" * 5 + "inf,2\n" + "3,4\n" * 10, "row 7, column 'a' is missing, NaN or infinite"),
    ("a,b\n" + "1,5\n2,5\n" * 10, "column 'b' is constant \\(5\\)"),
    ("a,b\n1,2\n2,3\n", "has 2 usable rows; toydiff needs at least 10"),
    ("a,a\n" + "1,2\n" * 20, "repeated column names"),
])
def test_bad_files_say_what_and_where(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ToydiffError, match=f"data file '{path}'.*{message}" if content else message):
        read_table(path)


def test_drop_missing_drops_the_rows(tmp_path):
    path = tmp_path / "holes.csv"
    path.write_text("a,b\n" + "".join(f"{i},{i * i}\n" for i in range(20)) + "1,nan\n,3\n")
    table = read_table(path, drop_missing=True)
    assert table.dropped == 2 and len(table.x) == 20


def test_other_bad_inputs(tmp_path):
    with pytest.raises(ToydiffError, match="does not exist"):
        read_table(tmp_path / "nope.csv")
    with pytest.raises(ToydiffError, match="unknown format '.xlsx'"):
        (tmp_path / "a.xlsx").write_text("x")
        read_table(tmp_path / "a.xlsx")
    path = write_csv(tmp_path / "k.csv", [[*map(repr, r), "same"] for r in X.tolist()])
    with pytest.raises(ToydiffError, match="label column 'kind' has one class \\('same'\\)"):
        read_table(path, label_column="kind")
    with pytest.raises(ToydiffError, match="has no column 'd'; its columns are: a, b, c, kind"):
        read_table(path, columns=["d"], label_column="kind")
    np.save(tmp_path / "cube.npy", np.zeros((4, 4, 4)))
    with pytest.raises(ToydiffError, match="shape \\(4, 4, 4\\)"):
        read_table(tmp_path / "cube.npy")
    np.savez(tmp_path / "two.npz", a=X, b=X)
    with pytest.raises(ToydiffError, match="holds arrays \\['a', 'b'\\]; keep one, or name the data 'x'"):
        read_table(tmp_path / "two.npz")
    with_nan = X.copy()
    with_nan[4, 1] = np.nan
    np.save(tmp_path / "nan.npy", with_nan)
    with pytest.raises(ToydiffError, match="row 5, column 'x2' is missing, NaN or infinite"):
        read_table(tmp_path / "nan.npy")


def test_a_file_larger_than_free_memory_is_refused(tmp_path, monkeypatch):
    from toydiff.core import machine
    path = write_csv(tmp_path / "big.csv", rows_with_kind())
    monkeypatch.setattr(machine, "available_memory", lambda: 16)  # 16 bytes available
    with pytest.raises(ToydiffError, match="needs about .* GiB of memory and .* GiB is available; use a random subset"):
        read_table(path, label_column="kind")


def test_a_users_csv_trains_samples_and_evaluates_from_one_command(tmp_path, capsys):
    rng = np.random.default_rng(1)
    x = np.c_[rng.normal(size=600), rng.gamma(2.0, size=600) * 10 + 100]
    path = write_csv(tmp_path / "user.csv", [[repr(float(a)), repr(float(b)), "p" if a > 0 else "n"] for a, b in x],
                     header="height,weight,group")
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--data", str(path), "--label-column", "group", "--out", str(out),
                 "--set", "train.steps=200", "--set", "schedule.T=50", "--set", "eval.draws=3",
                 "--set", "eval.nll_n=20"]) == 0
    header = (out / "samples.csv").read_text().splitlines()[0]
    assert header == "height,weight,group"  # the user's columns, the label column in its place
    assert np.load(out / "holdout_data.npy").shape == (120, 2) and np.load(out / "train_data.npy").shape == (480, 2)
    assert "at n = 120" in (out / "metrics.json").read_text()  # all 120 held-out rows
    efficacy = json.loads((out / "metrics.json").read_text())["efficacy"]  # labelled: machine-learning efficacy
    assert efficacy["held_out_rows"] == 120 and efficacy["samples"] == efficacy["training_rows"] == 480
    assert efficacy["on_training_rows"] > 0.9  # the label is the sign of height: trees learn it from real rows
    samples = np.load(out / "samples.npy")
    assert 80 < np.median(samples[:, 1]) < 150  # data units, not the scaled frame

    from toydiff import Run
    info = json.loads((out / "run.json").read_text())
    assert info["class_names"] == ["n", "p"] and info["columns"] == ["height", "weight"]
    run = Run.load(out)  # --label-column made it class-conditional: each class can be sampled
    assert run.config.model.conditional and run.sample(20, label=1, guidance=2.0).shape == (20, 2)


def test_bad_file_on_the_command_line_is_one_line_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n" + "1,2\n" * 20 + "1,oops\n")
    out = tmp_path / "run"
    assert main(["run", "--data", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "row 22, column 'b': 'oops' is not a number" in err and not out.exists()


def test_eval_against_a_file_matches_columns_by_name_and_refuses_other_dimensions(tmp_path, capsys):
    rng = np.random.default_rng(2)
    x = np.c_[rng.normal(size=400), rng.normal(size=400) * 3 + 7]
    train = write_csv(tmp_path / "train.csv", [[repr(float(a)), repr(float(b))] for a, b in x], header="u,v")
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--no-eval", "--data", str(train), "--out", str(out), "--set", "train.steps=30",
                 "--set", "schedule.T=8"]) == 0
    unseen = np.c_[rng.normal(size=100), rng.normal(size=100) * 3 + 7]  # a test split: rows the run never saw
    test = write_csv(tmp_path / "test.csv", [["label", repr(float(b)), repr(float(a))] for a, b in unseen],
                     header="note,v,u")
    assert main(["eval", str(out), "--data", str(test), "--draws", "3"]) == 0
    assert "at n = 100" in capsys.readouterr().out  # the test file's 100 rows, columns u, v found by name
    np.save(tmp_path / "wide.npy", np.zeros((100, 3)) + np.arange(100)[:, None])
    assert main(["eval", str(out), "--data", str(tmp_path / "wide.npy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the run models 2 columns (u, v) but" in err and "gives 3" in err


def test_a_run_on_a_file_is_announced_as_that_file(tmp_path):
    """The training message names the user's file, not the default dataset (it once said "on moons")."""
    from toydiff.core import config as C
    from toydiff import train_run
    rng = np.random.default_rng(3)
    path = write_csv(tmp_path / "plants.csv", [[repr(float(a)), repr(float(b))] for a, b in rng.normal(size=(60, 2))],
                     header="leaf,stem")
    cfg = C.with_overrides(C.ExperimentConfig(), [f"data.path={path}", "train.steps=2", "schedule.T=4"])
    said = []
    train_run(cfg, tmp_path / "run", log=said.append)
    line = next(m for m in said if m.startswith("training"))
    assert f"on {path} (n = 48, D = 2)" in line and "moons" not in line


def test_what_the_evaluation_needs_is_checked_before_training(tmp_path, capsys):
    """A file too small for the held-out reference, or a column constant in the held-out rows, is refused by
    `toydiff run` before the first step (naming the column and the fix); `train` and `run --no-eval` go on."""
    from toydiff.core.runtime import numpy_rng
    rng = np.random.default_rng(4)
    small = write_csv(tmp_path / "small.csv", [[repr(float(a)), repr(float(b))] for a, b in rng.normal(size=(90, 2))],
                      header="a,b")
    quick = ["--set", "train.steps=3", "--set", "schedule.T=4"]
    assert main(["run", "--data", str(small), "--out", str(tmp_path / "r1")] + quick) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs at least 20 held-out rows and this run has 18" in err and "--no-eval" in err
    assert not (tmp_path / "r1").exists()
    assert main(["run", "--quiet", "--no-eval", "--data", str(small), "--out", str(tmp_path / "r2")] + quick) == 0
    assert main(["train", "--quiet", "--data", str(small), "--out", str(tmp_path / "r3")] + quick) == 0
    # 'spike' is 0 except in 3 rows, all of them training rows: constant in the 40 held-out rows
    held = set(numpy_rng(0, "holdout").permutation(200)[:40].tolist())
    spiky = [i for i in range(200) if i not in held][:3]
    rows = [[repr(float(a)), "1" if i in spiky else "0"] for i, a in enumerate(rng.normal(size=200))]
    path = write_csv(tmp_path / "spiky.csv", rows, header="a,spike")
    assert main(["run", "--data", str(path), "--out", str(tmp_path / "r4")] + quick) == 2
    err = capsys.readouterr().err
    assert "column 'spike' is constant (0) in the 40 held-out rows" in err and "data.columns" in err
    assert not (tmp_path / "r4").exists()
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "r5")] + quick) == 0
    err = capsys.readouterr().err
    assert "warning: column 'spike' is 0 in all but 3 of the 160 training rows" in err


def test_eval_never_judges_a_run_on_its_own_training_rows(tmp_path, capsys):
    """`eval --data` leaves out the file's rows that are training rows of the run, saying how many, and refuses a
    file with too few others (judging a model on what it trained on rewards memorizing it)."""
    rng = np.random.default_rng(5)
    x = np.c_[rng.normal(size=300), rng.normal(size=300) * 2]
    whole = write_csv(tmp_path / "whole.csv", [[repr(float(a)), repr(float(b))] for a, b in x], header="u,v")
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--no-eval", "--data", str(whole), "--out", str(out), "--set", "train.steps=20",
                 "--set", "schedule.T=8"]) == 0
    capsys.readouterr()
    training = np.load(out / "train_data.npy")
    fresh = np.c_[rng.normal(size=110), rng.normal(size=110) * 2]
    rows = lambda a: [[repr(float(u)), repr(float(v))] for u, v in a]  # noqa: E731
    mostly_seen = write_csv(tmp_path / "seen.csv", rows(np.r_[training[:100], fresh[:10]]), header="u,v")
    assert main(["eval", str(out), "--data", str(mostly_seen), "--draws", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only 10 of the 110 rows of" in err and "at least 20 rows it has not seen" in err
    mixed = write_csv(tmp_path / "mixed.csv", rows(np.r_[fresh[10:], training[:50]]), header="u,v")
    assert main(["eval", str(out), "--data", str(mixed), "--draws", "3"]) == 0
    captured = capsys.readouterr()
    assert "left out 50 of the 150 rows" in captured.err and "at n = 100" in captured.out  # the 100 unseen rows
    import json
    assert json.loads((out / "metrics.json").read_text())["reference"]["training_rows_dropped"] == 50


def test_a_conditional_run_on_a_file_judges_each_class_on_its_own_held_out_rows(tmp_path):
    """The held-out rows keep their labels (holdout_labels.npy); a class with enough of them is judged on
    them alone, a class with too few is named and not judged."""
    import json
    rng = np.random.default_rng(6)
    # column w is 0 throughout class a (constant within a class is fine: classes are judged in the pooled frame)
    rows = [[repr(float(rng.normal(c))), repr(float(rng.normal())), "0" if kind == "a" else repr(float(rng.normal())),
             kind] for kind, c, count in (("a", -2.0, 285), ("b", 2.0, 285), ("rare", 0.0, 30)) for _ in range(count)]
    path = write_csv(tmp_path / "kinds.csv", rows, header="u,v,w,kind")
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--data", str(path), "--label-column", "kind", "--out", str(out),
                 "--set", "train.steps=30", "--set", "schedule.T=8", "--set", "eval.draws=3",
                 "--set", "eval.nll_n=0"]) == 0
    held = np.load(out / "holdout_labels.npy")
    assert held.shape == (120,) and set(held.tolist()) == {0, 1, 2}
    per_class = json.loads((out / "metrics.json").read_text())["per_class"]
    assert set(per_class) == {"a", "b", "rare"}
    assert per_class["rare"]["verdict"].startswith("not judged: fewer than 20 held-out rows")
    for kind in ("a", "b"):  # each class's own held-out rows, at most eval.n / 3
        assert per_class[kind]["n"] == (held == ["a", "b"].index(kind)).sum()


@pytest.mark.slow
def test_bounded_spiky_integer_columns_come_back_in_range_whole_and_with_their_spikes(tmp_path):
    """Digits-like pixel counts (0..16; 40% zeros, 15% sixteens per column): with data.scaling = quantile the
    samples stay in [0, 16], are whole numbers like the file's column, and each column's shares of 0 and 16
    land within 0.04 of the data's (0.016 at most, measured). With min-max scaling the same data came back
    from -0.7 to 31.8."""
    rng = np.random.default_rng(7)
    kind = rng.choice(3, size=(2000, 4), p=[0.4, 0.15, 0.45])
    x = np.where(kind == 0, 0, np.where(kind == 1, 16, rng.integers(1, 16, size=(2000, 4))))
    path = write_csv(tmp_path / "pixels.csv", [[str(int(v)) for v in row] for row in x], header="p1,p2,p3,p4")
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--no-eval", "--data", str(path), "--out", str(out), "--set", "data.scaling=quantile",
                 "--set", "train.steps=1500", "--set", "sample.n=4000"]) == 0
    samples = np.load(out / "samples.npy")
    assert samples.min() >= 0 and samples.max() <= 16 and np.array_equal(samples, np.round(samples))
    for j in range(4):
        assert abs(np.mean(samples[:, j] == 0) - np.mean(x[:, j] == 0)) < 0.04
        assert abs(np.mean(samples[:, j] == 16) - np.mean(x[:, j] == 16)) < 0.04
