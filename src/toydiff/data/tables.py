"""The user's own data: a table from CSV, TSV, .npy, .npz or Parquet, checked cell by cell.

    table = read_table("measurements.csv", columns=("a", "b"), label_column="kind")
    table.x (n, D) float64, table.labels (n,) int64 or None, table.names, table.classes, table.columns

Each column is continuous, integer, ordinal, binary or categorical, numbers or text (toydiff.data.columns: detected
from the rows, or declared with data.types); a column of text holds its levels' indices in `x`. Every problem
is a ToydiffError naming the file, and the row and column where there is one: a missing or empty file, a
column mixing numbers and text, an empty / NaN / infinite cell (or, with drop_missing, the row is dropped), a
ragged row, a constant column, a label column with one class, a declared type the column contradicts, too
few rows, a file larger than the memory it would need. CSV and TSV have a header
row when the first row is not all numbers; without one, columns are named x1, x2, ...
Parquet needs the optional extra: pip install 'toydiff[parquet]'.
"""

from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..core.errors import ToydiffError
from ..core.files import check_regular
from ..core.formats import load_npy, npy_header
from ..core.machine import check_memory
from .columns import Column, as_number, codes, decide, decimals, declared_types, level_order

MIN_ROWS = 10
MAX_COLUMNS = 1024  # columns a file may give the model: far beyond low-dimensional data, and every figure stays bounded
TEXT_PEAK = 32  # a CSV / TSV file takes up to this many times its size while parsed cell by cell (measured: ~28x)
ARRAY_PEAK = 3  # a .npy / .npz array: the array, its float64 copy and the chosen columns
NEAR_CONSTANT = 0.95  # a column whose commonest value fills this share of a split's rows gets a warning
FORMATS = (".csv", ".tsv", ".npy", ".npz", ".parquet")


def default_names(dim: int) -> list[str]:
    """x1, x2, ...: the names of columns that have none (the zoo's, a headerless file's, an array's)."""
    return [f"x{i + 1}" for i in range(dim)]


@dataclass(frozen=True)
class Table:
    x: np.ndarray  # (n, D) float64, finite
    labels: Optional[np.ndarray]  # (n,) int64 class indices, or None
    names: list[str]  # the D column names
    classes: list[str]  # the label values behind indices 0..K-1 ([] without labels)
    dropped: int = 0  # rows dropped for missing values (drop_missing)
    columns: tuple[Column, ...] = ()  # each column's type (toydiff.data.columns), detected or declared
    label_column: str = ""  # the label column's name ("" without one)
    label_index: int = 0  # where the label column goes among `names` to restore the file's order of columns


def read_table(path: str | Path, columns: Sequence[str] = (), label_column: str = "",
               drop_missing: bool = False, types: Sequence[str] = (),
               schema: Optional[Sequence[Column]] = None) -> Table:
    """The chosen columns (default: all but the label column) and the labels of a data file, each column's
    type detected or declared (`types`: data.types' "NAME=TYPE" entries); or, given a run's `schema` (its
    columns' types, in the order of `columns`), read as that run's columns: a text level or a value the run's
    column does not have is an error."""
    path = Path(path)
    if not path.is_file():
        raise ToydiffError(f"data file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ToydiffError(f"data file '{path}' has an unknown format '{suffix}'; use one of: {', '.join(FORMATS)}")
    size = check_regular(path, "data file").st_size
    if size == 0:
        raise ToydiffError(f"data file '{path}' is empty")
    text = suffix in (".csv", ".tsv")
    if text or suffix == ".parquet":
        check_memory((TEXT_PEAK if text else ARRAY_PEAK) * size, f"data file '{path}' ({size / 2**20:.0f} MiB)",
                     "use a random subset of its rows (e.g. `shuf -n 1000000`)")
    if text:
        names, cells, rows = _read_text(path, "\t" if suffix == ".tsv" else ",")
    else:
        names, cells, rows = _read_array(path, suffix)
    if schema is not None and len(schema) != len(columns):
        raise ValueError("read_table: a schema needs the columns it describes")
    return _select(path, names, cells, rows, list(columns), label_column, drop_missing, types, schema)


def _too_wide(path: Path, d: int) -> ToydiffError:
    return ToydiffError(f"data file '{path}' has {d:,} columns; toydiff models at most {MAX_COLUMNS:,} (it is made "
                        "for low-dimensional data): choose columns with data.columns (--columns) or reduce them first "
                        "(e.g. PCA)")


def column_names(path: str | Path) -> list[str]:
    """The column names of a data file, without checking its cells (x1, x2, ... where it has none)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv") and path.is_file():
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            first = next(csv.reader(f, delimiter="\t" if suffix == ".tsv" else ","), [])
        return default_names(len(first)) if all(as_number(c) is not None for c in first) else \
            [c.strip() for c in first]
    return read_table(path).names if path.is_file() and suffix in FORMATS else []


def _read_text(path: Path, delimiter: str):
    """(names, cells: list of rows of strings, line numbers) of a CSV / TSV file."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(i, row) for i, row in enumerate(csv.reader(f, delimiter=delimiter), start=1) if row]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ToydiffError(f"data file '{path}' is not readable as text ({e})") from None
    if not rows:
        raise ToydiffError(f"data file '{path}' is empty")
    first = rows[0][1]
    if all(as_number(c) is not None for c in first):
        names = default_names(len(first))
    else:
        names, rows = [c.strip() for c in first], rows[1:]
        if len(set(names)) != len(names):
            raise ToydiffError(f"data file '{path}' has repeated column names in its header: {names}")
    for line, row in rows:
        if len(row) != len(names):
            raise ToydiffError(f"data file '{path}', row {line}: {len(row)} cells, but there are {len(names)} "
                               "columns")
    return names, [row for _, row in rows], [line for line, _ in rows]


def _read_array(path: Path, suffix: str):
    """(names, a 2-D object array of cells, row numbers) of a .npy, .npz or .parquet file."""
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ToydiffError("reading Parquet needs pyarrow, which is not installed; "
                               "pip install 'toydiff[parquet]'") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises its own types for every kind of damage
            raise ToydiffError(f"data file '{path}' is not readable as Parquet ({e})") from None
        names = list(table.column_names)
        cells = np.stack([np.asarray(table.column(n).to_numpy(zero_copy_only=False), dtype=object)
                          for n in names], axis=1) if names else np.empty((0, 0), dtype=object)
    else:
        if suffix == ".npz":
            loaded = _read_npz(path)
        else:
            loaded = load_npy(path)
        array = loaded[:, None] if loaded.ndim == 1 else loaded
        if array.ndim != 2:
            raise ToydiffError(f"data file '{path}' holds an array of shape {loaded.shape}; it needs rows x columns")
        names = default_names(array.shape[1])
        cells = array
    return names, cells, list(range(1, len(cells) + 1))


def _read_npz(path: Path) -> np.ndarray:
    """The one array (or the one named x) of an .npz file, its sizes checked from the zip's directory and the
    array's header before anything is decompressed: a zip bomb is refused, not expanded."""
    try:
        with zipfile.ZipFile(path) as z:
            members = {i.filename.removesuffix(".npy"): i for i in z.infolist()}
            if len(members) != 1 and "x" not in members:
                raise ToydiffError(f"data file '{path}' holds arrays {sorted(members)}; keep one, or name the data 'x'")
            info = members["x" if "x" in members else next(iter(members))]
            check_memory(ARRAY_PEAK * info.file_size, f"data file '{path}' ({info.file_size / 2**20:.0f} MiB once "
                         "decompressed)", "use a random subset of its rows")
            with z.open(info) as f:
                npy_header(f, info.file_size, f"data file '{path}'")
            with z.open(info) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
    except ToydiffError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as e:
        raise ToydiffError(f"data file '{path}' is not a readable .npz file ({e})") from None


def column_warnings(x: np.ndarray, names: Sequence[str], where: str) -> list[str]:
    """Refuse a column that is constant in the rows x (n, D) (`where` names them, e.g. "the 30 held-out
    rows"); return a warning for each nearly constant one (one value in >= NEAR_CONSTANT of the rows)."""
    warnings = []
    for j, name in enumerate(names):
        values, counts = np.unique(x[:, j], return_counts=True)
        if len(values) == 1:
            raise ToydiffError(f"column '{name}' is constant ({values[0]:g}) in {where}, so scaling it would divide "
                               "by zero; leave it out with data.columns (--columns), or change data.holdout")
        share = counts.max() / len(x)
        if share >= NEAR_CONSTANT:
            others = len(x) - counts.max()
            warnings.append(f"column '{name}' is {values[counts.argmax()]:g} in all but {others} of {where}: what "
                            "the model learns and what the evaluation sees of it rest on those few rows; consider "
                            "leaving it out with data.columns")
    return warnings


def column_index(names: Sequence[str], column: str, where: str) -> int:
    """The index of `column`, given by name or as a 0-based index; `where` names the table in the error."""
    if column in names:
        return list(names).index(column)
    if column.isdigit() and int(column) < len(names):
        return int(column)
    raise ToydiffError(f"{where} has no column '{column}'; its columns are: {', '.join(names)}")


def _select(path: Path, names: list[str], cells, rows: list[int], columns: list[str], label_column: str,
            drop_missing: bool, types: Sequence[str], schema: Optional[Sequence[Column]]) -> Table:
    where = f"data file '{path}'"
    label_at = column_index(names, label_column, where) if label_column else None
    chosen = [column_index(names, c, where) for c in columns] if columns else \
        [i for i in range(len(names)) if i != label_at]
    if not chosen:
        raise ToydiffError(f"{where} has no column to model besides the label")
    if len(chosen) > MAX_COLUMNS:
        raise _too_wide(path, len(chosen))
    declared = declared_types(types, [names[c] for c in chosen], where)
    texts: dict[int, list] = {}  # chosen column j -> its cells, for a column of text
    if isinstance(cells, np.ndarray) and cells.dtype.kind in "iufb":  # a numeric array: checked at once
        x = cells[:, chosen].astype(np.float64)
        missing = ~np.isfinite(x)
    else:
        x = np.empty((len(cells), len(chosen)), dtype=np.float64)
        missing = np.zeros(x.shape, dtype=bool)
        for j, c in enumerate(chosen):
            text = schema[j].text if schema is not None else declared.get(names[c]) == "categorical"
            x[:, j], missing[:, j], is_text = _parse_column(where, names[c], [row[c] for row in cells], rows,
                                                            bool(text))
            if is_text:
                texts[j] = [row[c] for row in cells]
    if missing.any() and not drop_missing:
        r, j = np.argwhere(missing)[0]
        raise ToydiffError(f"{where}, row {rows[r]}, column '{names[chosen[j]]}' is missing, NaN or infinite; fix "
                           "the file or pass --drop-missing")
    keep = ~missing.any(axis=1)
    return _finish(where, names, cells, x, keep, chosen, label_at, rows, texts, declared, schema)


def _parse_column(where: str, name: str, cells: list, rows: list[int], text: bool
                  ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(values, missing, is_text) of one column's cells: numbers, or (text=True, or text alone) a column of text
    whose values are filled in later. A column mixing numbers and text is an error naming the rarer kind's
    first cell."""
    blank = np.array([cell is None or isinstance(cell, str) and not cell.strip() for cell in cells], dtype=bool)
    numbers = [None if b else as_number(cell) for cell, b in zip(cells, blank)]
    words = [r for r, v in enumerate(numbers) if v is None and not blank[r]]
    if text or (words and len(words) == int((~blank).sum())):  # a column of text: only blanks are missing
        return np.zeros(len(cells)), blank, True
    if words:
        numeric = [r for r, v in enumerate(numbers) if v is not None]
        if len(words) <= len(numeric):
            r = words[0]
            raise ToydiffError(f"{where}, row {rows[r]}, column '{name}': {str(cells[r])!r} is not a number, and "
                               f"the column's other cells are; fix the cell, or declare the column categorical "
                               f"(data.types = [\"{name}=categorical\"])")
        r = numeric[0]
        raise ToydiffError(f"{where}, row {rows[r]}, column '{name}': {str(cells[r])!r} is a number in a column of "
                           f"text; fix the cell, or declare the column categorical (data.types = "
                           f"[\"{name}=categorical\"]) to read every cell as a level")
    values = np.array([np.nan if v is None else v for v in numbers], dtype=np.float64)
    return values, ~np.isfinite(values), False


def _finish(where: str, names: list[str], cells, x: np.ndarray, keep: np.ndarray, chosen: list[int],
            label_at: Optional[int], rows: list[int], texts: dict[int, list], declared: dict[str, str],
            schema: Optional[Sequence[Column]]) -> Table:
    """Drop the rows marked missing, give each column of text its codes, then check the row count, constant
    columns, the labels, and each column's type (detected, declared, or the `schema` given)."""
    x = x[keep]
    kept_rows = [r for r, k in zip(rows, keep) if k]
    if len(x) < MIN_ROWS:
        raise ToydiffError(f"{where} has {len(x)} usable rows; toydiff needs at least {MIN_ROWS}")
    levels: dict[int, list[str]] = {}
    for j, raw in texts.items():
        kept = [str(cell).strip() for cell, k in zip(raw, keep) if k]
        if schema is not None:
            x[:, j] = codes(schema[j], kept, where, kept_rows)
        else:
            levels[j] = level_order(kept)
            index = {t: k for k, t in enumerate(levels[j])}
            x[:, j] = [index[t] for t in kept]
    found = []
    for j, c in enumerate(chosen):
        if np.ptp(x[:, j]) == 0:
            shown = repr(levels[j][0]) if j in levels else f"{x[0, j]:g}"
            raise ToydiffError(f"{where}, column '{names[c]}' is constant ({shown}), so scaling would divide by "
                               "zero; leave it out with data.columns")
        if schema is not None:
            _check_levels(where, schema[j], x[:, j], kept_rows)
        else:
            places = -1 if j in levels else decimals(row[c] for row, k in zip(cells, keep) if k)
            found.append(decide(names[c], x[:, j], levels.get(j), declared.get(names[c], ""), where, places))
    labels, classes = None, []
    if label_at is not None:
        raw = [str(row[label_at]).strip() for row, k in zip(cells, keep) if k]
        classes = level_order(raw)
        if len(classes) < 2:
            raise ToydiffError(f"{where}, label column '{names[label_at]}' has one class ({classes[0]!r}); a "
                               "conditional model needs at least two")
        index = {v: i for i, v in enumerate(classes)}
        labels = np.array([index[v] for v in raw], dtype=np.int64)
    return Table(x, labels, [names[c] for c in chosen], classes, int((~keep).sum()),
                 tuple(schema) if schema is not None else tuple(found),
                 "" if label_at is None else names[label_at], sum(c < (label_at or 0) for c in chosen))


def _check_levels(where: str, column: Column, values: np.ndarray, rows: list[int]) -> None:
    """A discrete column of numbers read against a run's types: every value one of its levels (up to the 7
    significant digits samples.csv writes)."""
    if column.discrete and not column.text:
        bad = np.flatnonzero(~column.is_level(values))
        if bad.size:
            r = int(bad[0])
            raise ToydiffError(f"{where}, row {rows[r]}, column '{column.name}': {values[r]:g} is not one of the "
                               f"column's values ({', '.join(f'{v:g}' for v in column.values[:6])})")
