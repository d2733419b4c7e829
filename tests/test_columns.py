"""Column types of a user's table: detection on tables whose types are known, declarations, the typed scaler's
encoding pinned by hand, samples that take only values their columns take, and samples.csv in the user's schema."""

import csv
import json

import numpy as np
import pytest
from scipy import stats

from toydiff.cli import main
from toydiff.core.errors import ToydiffError
from toydiff.data.columns import MAX_LEVELS, Column, decimals
from toydiff.data.scaler import Scaler, TableScaler
from toydiff.data.tables import read_table

TRICKY = ["plain", "with, comma", 'with "quotes"']


def _write(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _known_table(tmp_path, n=400, seed=0):
    """Columns of every type, with the edge cases: a 0/1 float column, a categorical with one rare level, an
    integer column with 200 levels, string categories with commas and quotes."""
    rng = np.random.default_rng(seed)
    flag = rng.integers(0, 2, n).astype(float)  # written as 0.0 / 1.0
    rare = np.array(["common"] * (n - 1) + ["rare"], dtype=object)
    rare[: n // 3] = "other"
    rng.shuffle(rare)
    count = np.arange(n) % 200  # 200 whole-number levels
    text = rng.choice(TRICKY, n)
    size = rng.normal(size=n)
    rows = [[f"{a:.1f}", r, int(c), t, repr(float(s))] for a, r, c, t, s in zip(flag, rare, count, text, size)]
    return _write(tmp_path / "known.csv", ["flag", "rare", "count", "text", "size"], rows)


def test_detection_on_a_table_whose_types_are_known(tmp_path):
    table = read_table(_known_table(tmp_path))
    kinds = {c.name: c.kind for c in table.columns}
    assert kinds == {"flag": "binary", "rare": "categorical", "count": "integer", "text": "categorical",
                     "size": "continuous"}
    by = {c.name: c for c in table.columns}
    assert by["flag"].values == (0.0, 1.0) and by["flag"].text == ()  # numbers keep their numbers
    assert by["rare"].text == ("common", "other", "rare")  # the rare level is a level like any other
    assert by["text"].text == tuple(sorted(TRICKY))  # commas and quotes survive the CSV reader
    j = table.names.index("text")
    assert set(table.x[:, j]) == {0.0, 1.0, 2.0}  # a text column holds its levels' indices


def test_declared_types_override_detection_and_contradictions_are_refused(tmp_path):
    path = _known_table(tmp_path)
    table = read_table(path, types=["count=categorical", "flag=integer"])
    by = {c.name: c for c in table.columns}
    assert by["count"].kind == "categorical" and len(by["count"].values) == 200 and by["flag"].kind == "integer"
    for types, message in [(["size=integer"], "declared integer .* holds"),
                           (["count=binary"], "declared binary .* takes 200 values"),
                           (["text=continuous"], "declared continuous .* holds text"),
                           (["nope=binary"], "names column 'nope'")]:
        with pytest.raises(ToydiffError, match=message):
            read_table(path, types=types)


def test_a_column_mixing_numbers_and_text_is_an_error_naming_the_cell_unless_declared_categorical(tmp_path):
    rows = [[str(i % 7), f"{i * 0.5}"] for i in range(30)]
    rows[12][0] = "n/a"
    path = _write(tmp_path / "mixed.csv", ["a", "b"], rows)
    with pytest.raises(ToydiffError, match="row 14, column 'a': 'n/a' is not a number, and the column's other"):
        read_table(path)
    table = read_table(path, types=["a=categorical"])  # every cell a level
    assert table.columns[0].kind == "categorical" and "n/a" in table.columns[0].text
    words = [["x" if i % 2 else "y", str(i)] for i in range(30)]
    words[5][0] = "42"
    with pytest.raises(ToydiffError, match="row 7, column 'a': '42' is a number in a column of text"):
        read_table(_write(tmp_path / "words.csv", ["a", "b"], words))


def test_typed_scaler_encodes_each_type_as_written_by_hand():
    columns = (Column("w", "continuous"), Column("sex", "binary", (1.0, 2.0)),
               Column("grade", "categorical", (0.0, 1.0, 2.0), ("A", "B", "C")), Column("age", "integer"))
    x = np.array([[60.0, 1, 0, 20], [80.0, 2, 2, 40], [70.0, 2, 0, 30]])
    s = Scaler.fit(x, "minmax", columns=columns)
    assert isinstance(s, TableScaler) and s.frame_dim == 5  # grade: levels A and C seen, B never
    assert s.frame_names == ["w", "sex", "grade=A", "grade=C", "age"]
    z = s.transform(x)
    expected = np.array([[-1, -1, 1, -1, -1], [1, 1, -1, 1, 1], [0, 1, 1, -1, 0]], dtype=float)
    assert np.allclose(z, expected)
    assert np.array_equal(s.inverse(z), x)
    # decoding: sign of a binary, argmax over the seen levels, integers rounded, numbers clipped to the range
    back = s.inverse(np.array([[5.0, 0.2, -0.9, -0.3, 0.04], [-0.5, -0.01, 0.3, 0.2, -9.0]]))
    assert np.allclose(back, [[80.0, 2, 2, 30], [65.0, 1, 0, 20]])
    assert np.allclose(s.inverse(np.array([[0, 0, 0, 0, 0.04]]), whole=False)[0, 3], 30.4)
    again = Scaler.from_dict(json.loads(json.dumps(s.to_dict())))
    assert np.array_equal(again.transform(x), z) and again.frame_names == s.frame_names
    damaged = s.to_dict()
    damaged["seen"][2] = [0.0, 7.0]  # a level the column does not have
    with pytest.raises(ToydiffError, match="run directory is damaged"):
        Scaler.from_dict(damaged)


def test_a_categorical_of_too_many_levels_and_a_one_class_label_are_one_line_errors(tmp_path, capsys):
    n = 10_000
    ids = _write(tmp_path / "ids.csv", ["id", "v"], [[f"user{i}", i * 0.1] for i in range(n)])
    out = tmp_path / "r"
    assert main(["train", "--data", str(ids), "--out", str(out), "--set", "train.steps=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"has {n:,} levels" in err and str(MAX_LEVELS) in err and not out.exists()
    one = _write(tmp_path / "one.csv", ["a", "b", "kind"], [[i, i % 3, "same"] for i in range(30)])
    assert main(["train", "--data", str(one), "--label-column", "kind", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has one class ('same')" in err and not out.exists()
    assert main(["train", "--data", str(one), "--types", "b=binary", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "declared binary" in err and not out.exists()
    assert main(["train", "--data", str(one), "--types", "b=nominal", "--out", str(out)]) == 2
    assert "continuous, integer, ordinal, binary, categorical" in capsys.readouterr().err and not out.exists()


@pytest.fixture(scope="module")
def typed_run(tmp_path_factory):
    """A small conditional run on a table of every type (trained once for the tests below)."""
    tmp = tmp_path_factory.mktemp("typed")
    rng = np.random.default_rng(3)
    n = 900
    grade = rng.choice(TRICKY, n, p=[0.6, 0.3, 0.1])
    sex = rng.choice([1, 2], n, p=[0.3, 0.7])
    age = rng.integers(18, 80, n)
    weight = rng.normal(70, 8, n) + 10 * (sex == 2)
    kind = np.where(rng.random(n) < 0.4, "up", "down")
    path = _write(tmp / "people.csv", ["weight", "kind", "sex", "grade", "age"],
                  [[f"{w:.3f}", k, s, g, a] for w, k, s, g, a in zip(weight, kind, sex, grade, age)])
    out = tmp / "run"
    assert main(["train", "--quiet", "--data", str(path), "--label-column", "kind", "--out", str(out),
                 "--set", "train.steps=1500"]) == 0
    assert main(["sample", str(out), "--quiet", "--n", "3000", "--steps", "20"]) == 0
    return path, out


def test_samples_take_only_values_their_columns_take_in_the_users_schema(typed_run):
    path, out = typed_run
    train = read_table(path, label_column="kind")
    with open(out / "samples.csv", newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert header == ["weight", "kind", "sex", "grade", "age"]  # the file's names and order, label included
    from toydiff import load
    run = load(out)
    back = read_table(out / "samples.csv", columns=run.names, label_column="kind", schema=run.columns)
    assert np.allclose(back.x, np.load(out / "samples.npy"), atol=1e-3)  # the CSV round-trips through the reader
    assert set(back.classes) <= {"down", "up"}
    x = back.x
    assert set(np.unique(x[:, 1])) == {1.0, 2.0}  # a binary column returns exactly its two values
    assert set(np.unique(x[:, 2])) <= {0.0, 1.0, 2.0}  # only seen categories
    assert np.array_equal(x[:, 3], np.round(x[:, 3]))  # integers whole
    assert x[:, 3].min() >= train.x[:, 3].min() and x[:, 3].max() <= train.x[:, 3].max()
    lo, hi = run.data[:, 0].min(), run.data[:, 0].max()  # the training rows' range (float32 as stored)
    assert x[:, 0].min() >= lo - 1e-4 and x[:, 0].max() <= hi + 1e-4
    with open(out / "samples.csv", newline="", encoding="utf-8") as f:
        cells = list(csv.reader(f))[1:]
    assert all(len(r[0].split(".")[1]) == 3 for r in cells)  # weight as the file wrote it: 3 decimals
    assert all(r[4].isdigit() for r in cells)  # age: whole numbers without a point
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["scaling"] == "quantile" == run.scaler.numeric.kind  # data.scaling = auto on a file
    assert manifest["width"] == 64  # model.width = 0 (auto) for a 6-coordinate frame


def test_a_categorical_columns_sampled_frequencies_match_the_training_frequencies(typed_run):
    """Chi-square test of the sampled levels against the training rows' frequencies (fixed seed, 3000 samples):
    a model that learned the levels' shares passes at the 1% level; one that drew them uniformly would not."""
    from toydiff import load
    run = load(typed_run[1])
    samples = run.sample(3000, seed=11)
    for j, name in ((2, "grade"), (1, "sex")):
        levels = np.array(run.columns[j].values)
        expected = (run.data[:, j][:, None] == levels).mean(0) * len(samples)
        observed = (samples[:, j][:, None] == levels).sum(0)
        assert observed.sum() == len(samples)
        assert stats.chisquare(observed, expected).pvalue > 0.01, (name, observed, expected)
        uniform = np.full(len(levels), len(samples) / len(levels))
        assert stats.chisquare(observed, uniform).pvalue < 1e-6  # the test has the power to see a wrong share


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_sample_label_k_and_per_class_counts_from_the_cli(typed_run, tmp_path, capsys):
    run, out = typed_run[1], tmp_path / "up.csv"
    for label in ("1", "up"):  # the class's index or its name
        assert main(["sample", str(run), "--label", label, "--n", "50", "--out", str(out), "--quiet"]) == 0
        rows = _rows(out)
        assert len(rows) == 50 and {r["kind"] for r in rows} == {"up"} and {r["grade"] for r in rows} <= set(TRICKY)
    assert main(["sample", str(run), "--counts", "up=30,down=12", "--out", str(out), "--quiet"]) == 0
    kinds = [r["kind"] for r in _rows(out)]
    assert kinds == ["up"] * 30 + ["down"] * 12
    capsys.readouterr()
    for flags, message in [(["--label", "sideways"], "'sideways' is not a class"),
                           (["--counts", "up=0"], "must read CLASS=N with N >= 1"),
                           (["--counts", "up=3,up=4"], "names class 'up' twice"),
                           (["--counts", "up=3", "--n", "5"], "drop --label, --n and --trajectory")]:
        assert main(["sample", str(run), "--out", str(tmp_path / "never.csv")] + flags) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and not (tmp_path / "never.csv").exists()


def test_eval_data_reads_a_file_as_the_runs_columns_and_names_a_level_it_never_had(typed_run, tmp_path, capsys):
    path, out = typed_run
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    rows[5][3] = "never seen"
    bad = _write(tmp_path / "bad.csv", rows[0], rows[1:])
    assert main(["eval", str(out), "--data", str(bad), "--draws", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "row 6, column 'grade': 'never seen' is not one of the column's levels" in err


def test_levels_that_float32_cannot_hold_stay_their_levels(tmp_path):
    """diabetes' sex column is -0.0446416365069974 / 0.0506801187398187: the float32 copy a run keeps of its rows
    and the 7 digits of samples.csv must still read as those levels (the first build read every row as the lower
    one, and a sample's 0.05068012 as a value the column never takes)."""
    low, high = -0.0446416365069974, 0.0506801187398187
    column = Column("sex", "binary", (low, high))
    x64 = np.array([[low], [high], [high]])
    s = Scaler.fit(x64, "minmax", columns=(column,))
    assert np.array_equal(s.transform(x64.astype(np.float32)), [[-1], [1], [1]])
    rows = [[f"{v:.7g}"] for v in (low, high) * 10]
    back = read_table(_write(tmp_path / "s.csv", ["sex"], rows), columns=["sex"], schema=(column,))
    near = column.nearest(back.x[:, 0])
    assert np.allclose(back.x[:, 0], near, rtol=1e-6, atol=0) and set(near) == {low, high}
    bad = _write(tmp_path / "bad.csv", ["sex"], rows + [["0.02"]])
    with pytest.raises(ToydiffError, match="0.02 is not one of the column's values"):
        read_table(bad, columns=["sex"], schema=(column,))


def test_nearest_level_is_the_closest_level_by_brute_force():
    levels = (-3.0, -0.5, 0.25, 2.0, 10.0)
    column = Column("c", "categorical", levels)
    x = np.random.default_rng(1).uniform(-6, 14, 2000)
    brute = np.asarray(levels)[np.abs(x[:, None] - np.asarray(levels)).argmin(1)]
    assert np.array_equal(column.nearest(x), brute)
    assert column.is_level(np.array([0.25 * (1 + 1e-8), 2.0, 2.1])).tolist() == [True, True, False]


def _piled(rng, n, values=40):
    """A column of fractions whose rows pile up on `values` grid points (a standardized ratio, diabetes' s4)."""
    grid = np.sort(np.random.default_rng(values).normal(size=values))
    return grid, grid[rng.integers(0, values, n)]


def test_a_column_of_fractions_that_repeat_is_ordinal_and_comes_back_on_its_training_values(tmp_path):
    rng = np.random.default_rng(5)
    grid, piled = _piled(rng, 400)
    spread = rng.normal(size=400)  # 400 distinct fractions: continuous
    near = np.round(rng.normal(size=400), 1) + 0.05  # about 50 distinct values: ordinal (<= 400 / 4)
    path = _write(tmp_path / "o.csv", ["piled", "spread", "near"],
                  [[repr(float(a)), repr(float(b)), repr(float(c))] for a, b, c in zip(piled, spread, near)])
    by = {c.name: c for c in read_table(path).columns}
    assert (by["piled"].kind, by["spread"].kind, by["near"].kind) == ("ordinal", "continuous", "ordinal")
    assert np.array_equal(by["piled"].values, np.unique(piled)) and by["spread"].values == ()
    assert "piled (" in by["piled"].describe() and "values in [" in by["piled"].describe()
    assert read_table(path, types=["piled=continuous"]).columns[0].kind == "continuous"
    with pytest.raises(ToydiffError, match=r"'spread' is declared ordinal .* takes 400 values; .* at most 256"):
        _write(tmp_path / "many.csv", ["spread"], [[repr(float(v))] for v in rng.normal(size=400)])
        read_table(tmp_path / "many.csv", types=["spread=ordinal"])
    # the scaler models it as a number and returns the nearest training value (brute force), in range
    column = by["piled"]
    s = Scaler.fit(piled[:, None], "minmax", columns=(column,))
    assert s.frame_dim == 1 and np.allclose(s.transform(piled[:, None]).min(), -1)
    z = rng.uniform(-1.3, 1.3, (3000, 1))
    back = s.inverse(z)[:, 0]
    drawn = s.inverse(z, whole=False)[:, 0]
    brute = grid[np.abs(drawn[:, None] - grid).argmin(1)]
    assert np.array_equal(back, brute) and set(np.unique(back)) <= set(grid)
    assert not np.isin(drawn, grid).all() and drawn.min() >= grid.min() and drawn.max() <= grid.max()
    again = Scaler.from_dict(json.loads(json.dumps(s.to_dict())))
    assert np.array_equal(again.inverse(z)[:, 0], back)


def test_the_tree_test_sees_a_piled_column_spread_between_its_values_and_not_once_snapped():
    """Why ordinal exists: the gradient-boosted-tree test tells rows whose column piles on a few values from
    rows spread between them (what a model of a continuous column returns), and cannot once they are moved to
    the nearest value seen in training."""
    from toydiff.evaluation.metrics import gbt_auc
    rng = np.random.default_rng(6)
    grid, real = _piled(rng, 600, values=30)
    _, train = _piled(np.random.default_rng(7), 600, values=30)
    spread = train + rng.normal(0, 0.5 * np.diff(grid).mean(), 600)  # between the values, not on them
    column = Column("c", "ordinal", tuple(np.unique(train)))
    other, more = rng.normal(size=(600, 3)), rng.normal(size=(600, 3))
    assert gbt_auc(np.c_[spread, other], np.c_[real, more]) > 0.7
    assert gbt_auc(np.c_[column.nearest(spread), other], np.c_[real, more]) < 0.6


def test_numbers_are_written_with_the_decimals_the_file_wrote_them_with():
    assert decimals(["1.50", " 2", "-0.125 "]) == 3 and decimals(["3", "4"]) == 0
    assert decimals(["0.1", "1e-05"]) == -1 and decimals([0.5, 1.0]) == -1  # an exponent; a .npy's numbers
    assert decimals(["0." + "1" * 40]) == -1  # more digits than a float holds: written exactly
    assert decimals(["0." + "1" * 40]) == -1  # more digits than a float holds: written exactly
    piled = Column("s4", "ordinal", (-0.0394933829, 0.0343088588, 0.0712099798), decimals=10)
    assert [piled.level(v) for v in piled.values] == ["-0.0394933829", "0.0343088588", "0.0712099798"]
    assert Column("w", "continuous", decimals=2).level(-0.0001) == "0.00"  # no "-0.00"
    exact = Column("v", "continuous")  # decimals unknown: written exactly
    assert float(exact.level(0.1 + 0.2)) == 0.1 + 0.2
    from toydiff.data.columns import table_text
    text = table_text(np.array([[0.0343088588, 3.14159], [-0.0394933829, -0.004]]),
                      [piled, Column("w", "continuous", decimals=2)])
    assert text == "s4,w\n0.0343088588,3.14\n-0.0394933829,0.00\n"
    assert Column.from_dict({k: v for k, v in piled.to_dict().items() if k != "decimals"}).decimals == -1
    with pytest.raises(ToydiffError, match="damaged"):
        Column.from_dict({**piled.to_dict(), "decimals": 10**9})  # a hostile scaler.json


def test_auto_scaling_is_quantile_for_a_table_and_minmax_for_points():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2))
    assert Scaler.fit(x, "auto").kind == "minmax"
    table = Scaler.fit(x, "auto", columns=(Column("a", "continuous"), Column("b", "continuous")))
    assert table.scaling == "quantile" and Scaler.fit(x, "auto").scaling == "minmax"


def test_a_held_out_file_may_hold_values_an_ordinal_column_never_had_in_training(tmp_path):
    """An ordinal column's levels bound what samples take, not what a reference file may hold (eval --data)."""
    column = Column("r", "ordinal", (0.5, 1.5, 2.5), decimals=1)
    path = _write(tmp_path / "test.csv", ["r"], [[v] for v in ("0.5", "3.5", "1.0") * 5])
    back = read_table(path, columns=["r"], schema=(column,))
    assert sorted(set(back.x[:, 0])) == [0.5, 1.0, 3.5]
