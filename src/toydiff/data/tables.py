"""The user's own data: a table of numeric columns from CSV, TSV, .npy, .npz or Parquet, checked cell by cell.

    table = read_table("measurements.csv", columns=("a", "b"), label_column="kind")
    table.x (n, D) float64, table.labels (n,) int64 or None, table.names, table.classes

Every problem is a ToydiffError naming the file, and the row and column where there is one:
a missing or empty file, a non-numeric cell, an empty / NaN / infinite cell (or, with
drop_missing, the row is dropped), a ragged row, a constant column, a label column with one
class, too few rows, a file larger than the memory it would need. CSV and TSV have a header
row when the first row is not all numbers; without one, columns are named x1, x2, ...
Parquet needs the optional extra: pip install 'toydiff[parquet]'.
"""

from __future__ import annotations

import csv
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..core.errors import ToydiffError
from ..core.files import check_regular
from ..core.formats import load_npy, npy_header
from ..core.machine import check_memory

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
    integer: tuple[bool, ...] = ()  # per column: every value is a whole number (samples are rounded back)


def read_table(path: str | Path, columns: Sequence[str] = (), label_column: str = "",
               drop_missing: bool = False) -> Table:
    """The chosen numeric columns (default: all but the label column) and the labels of a data file."""
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
    return _select(path, names, cells, rows, list(columns), label_column, drop_missing)


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
        return default_names(len(first)) if all(_is_number(c) for c in first) else \
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
    if all(_is_number(c) for c in first):
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


def _is_number(cell) -> bool:
    try:
        float(cell)
        return True
    except (TypeError, ValueError):
        return False


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
            warnings.append(f"column '{name}' is {values[counts.argmax()]:g} in {share:.0%} of {where}: what the "
                            "model learns and what the evaluation sees of it rest on the few other rows; consider "
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
            drop_missing: bool) -> Table:
    label_at = column_index(names, label_column, f"data file '{path}'") if label_column else None
    chosen = [column_index(names, c, f"data file '{path}'") for c in columns] if columns else \
        [i for i in range(len(names)) if i != label_at]
    if not chosen:
        raise ToydiffError(f"data file '{path}' has no numeric column to model besides the label")
    if len(chosen) > MAX_COLUMNS:
        raise _too_wide(path, len(chosen))
    if isinstance(cells, np.ndarray) and cells.dtype.kind in "iufb":  # a numeric array: checked at once
        x = cells[:, chosen].astype(np.float64)
        keep = np.isfinite(x).all(1)
        if not drop_missing and not keep.all():
            r, j = np.argwhere(~np.isfinite(x))[0]
            raise ToydiffError(f"data file '{path}', row {rows[r]}, column '{names[chosen[j]]}' is NaN or infinite; "
                               "fix the file or pass --drop-missing")
        return _finish(path, names, cells, x, keep, chosen, label_at)
    x = np.empty((len(cells), len(chosen)), dtype=np.float64)
    keep = np.ones(len(cells), dtype=bool)
    for r, row in enumerate(cells):
        for j, c in enumerate(chosen):
            cell = row[c]
            try:
                value = float(cell)
            except (TypeError, ValueError):
                if isinstance(cell, str) and cell.strip() == "" or cell is None:
                    value = math.nan
                else:
                    raise ToydiffError(f"data file '{path}', row {rows[r]}, column '{names[c]}': {str(cell)!r} "
                                       "is not a number") from None
            if not math.isfinite(value):
                if not drop_missing:
                    raise ToydiffError(f"data file '{path}', row {rows[r]}, column '{names[c]}' is missing, NaN or "
                                       "infinite; fix the file or pass --drop-missing")
                keep[r] = False
            x[r, j] = value
    return _finish(path, names, cells, x, keep, chosen, label_at)


def _finish(path: Path, names: list[str], cells, x: np.ndarray, keep: np.ndarray, chosen: list[int],
            label_at: Optional[int]) -> Table:
    """Drop the rows marked missing, then check row count, constant columns and labels."""
    x = x[keep]
    if len(x) < MIN_ROWS:
        raise ToydiffError(f"data file '{path}' has {len(x)} usable rows; toydiff needs at least {MIN_ROWS}")
    for j, c in enumerate(chosen):
        if np.ptp(x[:, j]) == 0:
            raise ToydiffError(f"data file '{path}', column '{names[c]}' is constant ({x[0, j]:g}), so scaling "
                               "would divide by zero; leave it out with data.columns")
    labels, classes = None, []
    if label_at is not None:
        raw = [str(row[label_at]).strip() for row, k in zip(cells, keep) if k]
        classes = sorted(set(raw), key=lambda v: (not _is_number(v), float(v) if _is_number(v) else 0.0, v))
        if len(classes) < 2:
            raise ToydiffError(f"data file '{path}', label column '{names[label_at]}' has one class "
                               f"({classes[0]!r}); a conditional model needs at least two")
        index = {v: i for i, v in enumerate(classes)}
        labels = np.array([index[v] for v in raw], dtype=np.int64)
    integer = tuple(bool(np.all(x[:, j] == np.round(x[:, j]))) for j in range(x.shape[1]))
    return Table(x, labels, [names[c] for c in chosen], classes, int((~keep).sum()), integer)
