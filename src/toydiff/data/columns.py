"""The type of each column of a user's table: continuous, integer, ordinal, binary or categorical, detected or
declared.

    column = decide("grade", values, text=["A", "B", "C"], declared="")   # Column('grade', 'categorical', ...)
    describe(columns)     # the decision, one line per type, as `toydiff train` prints it

Detection, from the rows of the file (the label column aside):
  - a column of text: binary with two levels, categorical with 3 .. MAX_LEVELS levels;
  - a column of numbers: binary with two distinct values, integer when every value is whole, ordinal when its
    values repeat (at most MAX_LEVELS distinct values, each taken by ORDINAL_REPEATS rows or more on average:
    a measurement on a coarse grid, a standardized count), else continuous;
  - a column that mixes numbers and text is an error naming the first cell of the rarer kind.
An integer column keeps its order (grades 1..5 are integer); declare it categorical (data.types =
["grade=categorical"], --types) when its numbers are codes. An ordinal column is modelled as a number and
returned as the nearest value the training rows hold: a column whose rows pile up on a few values (diabetes'
s4, 46 values over 309 training rows) has mass points a gradient-boosted tree finds at once when samples spread
between them; declare it continuous to keep the values as drawn. A declaration that contradicts the rows
(integer on fractions, binary on three values, a number type on text, ordinal on more than MAX_LEVELS
values) is an error.

Data units: a column of numbers keeps its numbers (a binary 1/2 column holds 1 and 2, a categorical of codes
its codes); a column of text holds its level's index 0..K-1 (samples.npy), written back as the level's text in
samples.csv (`table_text`). How each type enters the model's frame and comes back from it is
toydiff.data.scaler.TableScaler's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from ..core.config import COLUMN_TYPES
from ..core.errors import ToydiffError
from ..core.formats import csv_text

MAX_DECIMALS = 30  # digits after the point written back; a file's column with more is written exactly (%.17g)
MAX_LEVELS = 256  # a categorical column's levels: beyond them a column is an identifier or free text, not a category
DISCRETE = ("binary", "categorical")  # the types encoded as levels (not numbers) and sampled as one of them
LEVELLED = DISCRETE + ("ordinal",)  # the types whose values (levels) a Column keeps
ORDINAL_REPEATS = 4  # detection: a column of fractions with at most len(rows) / 4 distinct values is ordinal
PRINTED = 1e-6  # relative precision of a number read back from a CSV of 7 significant digits (a peer's, a float32 copy)


@dataclass(frozen=True)
class Column:
    """A column's name and type; a discrete or ordinal column's levels as their values in data units (ascending)
    and, for a column of text, as their text (level k's text at k; its values are then 0..K-1); `decimals`, the
    digits after the point the file wrote its numbers with (-1: unknown, or an exponent), which samples.csv
    writes them with."""

    name: str
    kind: str
    values: tuple[float, ...] = ()
    text: tuple[str, ...] = ()
    decimals: int = -1

    @property
    def discrete(self) -> bool:
        return self.kind in DISCRETE

    def nearest(self, x: np.ndarray) -> np.ndarray:
        """A discrete or ordinal column's values (n,) as its nearest levels (the levels are ascending: one search
        between their midpoints): the float32 copy a run directory keeps of 0.0506801187398187 is that level."""
        values = np.asarray(self.values)
        return values[np.searchsorted((values[1:] + values[:-1]) / 2, np.asarray(x, dtype=np.float64))]

    def is_level(self, x: np.ndarray) -> np.ndarray:
        """(n,) whether each value is one of a discrete column's levels as a CSV prints it (to PRINTED)."""
        x = np.asarray(x, dtype=np.float64)
        return np.isclose(x, self.nearest(x), rtol=PRINTED, atol=0)

    @property
    def number_format(self) -> str:
        """The %-format a number of this column is written with: with the file's decimals, so that a sample on
        a training value prints as the file printed it (7 significant digits would let a tree tell 0.03430886
        from the data's 0.0343088588, and would add digits a measurement never had); else exactly (%.17g)."""
        return f"%.{self.decimals}f" if self.decimals >= 0 else "%.17g"

    def level(self, value: float) -> str:
        """How a value of this column is written: the level's text, or its number (`number_format`)."""
        if self.text:
            return self.text[int(value)]
        return self.number_format % (round(float(value), self.decimals) + 0.0 if self.decimals >= 0 else value)

    def describe(self) -> str:
        if self.kind == "ordinal":
            return f"{self.name} ({len(self.values)} values in [{self.values[0]:.4g}, {self.values[-1]:.4g}])"
        if not self.discrete:
            return self.name
        shown = list(self.text) if self.text else [f"{v:g}" for v in self.values]
        levels = ", ".join(shown[:4]) + (", ..." if len(shown) > 4 else "")
        return f"{self.name} ({len(shown)} levels: {levels})"

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "values": list(self.values), "text": list(self.text),
                "decimals": self.decimals}

    @classmethod
    def from_dict(cls, d) -> "Column":
        try:
            column = cls(str(d["name"]), str(d["kind"]), tuple(float(v) for v in d["values"]),
                         tuple(str(t) for t in d["text"]), int(d.get("decimals", -1)))
        except (KeyError, TypeError, ValueError) as e:
            raise ToydiffError(f"the stored column types are malformed ({e}); the run directory is damaged") from None
        values = np.asarray(column.values)
        if column.kind not in COLUMN_TYPES or (column.kind in LEVELLED) != (len(values) >= 2) or \
                not np.all(np.isfinite(values)) or not np.all(np.diff(values) > 0) or \
                (column.text and len(column.text) != len(values)) or not -1 <= column.decimals <= MAX_DECIMALS:
            raise ToydiffError(f"the stored type of column '{column.name}' is malformed; the run directory is damaged")
        return column


def level_order(levels: Iterable[str]) -> list[str]:
    """Distinct text levels in their natural order: numbers by value first, then the rest alphabetically (the
    order of class indices and of a text column's codes)."""
    def key(v: str):
        number = as_number(v)
        return (number is None, number if number is not None else 0.0, v)
    return sorted(set(levels), key=key)


def as_number(cell) -> Optional[float]:
    try:
        return float(cell)
    except (TypeError, ValueError):
        return None


def declared_types(entries: Sequence[str], names: Sequence[str], where: str) -> dict[str, str]:
    """data.types' "NAME=TYPE" entries (the config checked their form and types) as {column: type}, each name
    one of the modelled columns."""
    types = {}
    for entry in entries:
        name, _, kind = entry.rpartition("=")
        name = name.strip()
        if name not in names:
            raise ToydiffError(f"data.types names column '{name}', which {where} does not model; its columns are: "
                               f"{', '.join(names)}")
        types[name] = kind.strip()
    return types


def decimals(cells: Iterable) -> int:
    """The most digits after the point among a column's cells as the file wrote them; -1 where a cell has an
    exponent (1e-05) or more than MAX_DECIMALS of them, or is not text (a .npy file's numbers)."""
    most = 0
    for cell in cells:
        if not isinstance(cell, str):
            return -1
        cell = cell.strip().lower()
        if "e" in cell or "n" in cell:  # 1e-05, inf, nan
            return -1
        most = max(most, len(cell) - cell.index(".") - 1 if "." in cell else 0)
    return most if most <= MAX_DECIMALS else -1


def decide(name: str, values: np.ndarray, text: Optional[list[str]], declared: str, where: str,
           places: int = -1) -> Column:
    """The column named `name`, from its kept rows: `values` (n,) float64 (a text column's codes 0..K-1 into
    `text`, its levels in level_order), `declared` its data.types entry or "", `places` its cells' `decimals`.
    `where` names the file."""
    distinct = np.unique(values)
    levels = len(text) if text is not None else len(distinct)
    if declared and text is not None and declared not in DISCRETE:
        raise ToydiffError(f"{where}, column '{name}' is declared {declared} (data.types) but holds text "
                           f"({text[0]!r}, ...); declare it categorical, or fix the column")
    if declared == "integer" and not np.all(distinct == np.round(distinct)):
        bad = distinct[distinct != np.round(distinct)][0]
        raise ToydiffError(f"{where}, column '{name}' is declared integer (data.types) but holds {bad:g}; declare "
                           "it continuous, or fix the column")
    if declared == "ordinal" and levels > MAX_LEVELS:
        raise ToydiffError(f"{where}, column '{name}' is declared ordinal (data.types) but takes {levels:,} values; "
                           f"an ordinal column takes at most {MAX_LEVELS}: declare it continuous")
    if declared == "binary" and levels != 2:
        raise ToydiffError(f"{where}, column '{name}' is declared binary (data.types) but takes {levels} values; "
                           "declare it categorical or integer")
    kind = declared or ("binary" if levels == 2 else "categorical" if text is not None else
                        "integer" if np.all(distinct == np.round(distinct)) else
                        "ordinal" if 3 <= levels <= min(MAX_LEVELS, len(values) / ORDINAL_REPEATS) else "continuous")
    if kind == "ordinal" and levels < 2:
        kind = "continuous"  # a constant column: refused by the reader's checks, not here
    if kind == "categorical" and levels > MAX_LEVELS:
        raise ToydiffError(f"{where}, column '{name}' has {levels:,} levels; toydiff models a categorical column of "
                           f"at most {MAX_LEVELS}: it looks like an identifier or free text, so leave it out with "
                           "data.columns (--columns), or declare it integer if its numbers have an order")
    if kind not in LEVELLED:
        return Column(name, kind, decimals=places)
    if text is not None:
        return Column(name, kind, tuple(float(k) for k in range(levels)), tuple(text))
    return Column(name, kind, tuple(float(v) for v in distinct), decimals=places)


def codes(column: Column, cells: Sequence, where: str, rows: Sequence[int]) -> np.ndarray:
    """The values (data units) of a column of text given its known levels: each cell's level index, or a
    one-line error for a level the column does not have (`rows` number the cells for it)."""
    index = {t: k for k, t in enumerate(column.text)}
    out = np.empty(len(cells))
    for r, cell in enumerate(cells):
        k = index.get(str(cell).strip())
        if k is None:
            raise ToydiffError(f"{where}, row {rows[r]}, column '{column.name}': {str(cell).strip()!r} is not one of "
                               f"the column's levels ({', '.join(column.text[:6])}{', ...' if len(column.text) > 6 else ''})")
        out[r] = k
    return out


def describe(columns: Sequence[Column]) -> str:
    """One line: how many columns of each type, naming the non-continuous ones (what `toydiff train` prints)."""
    parts = []
    for kind in COLUMN_TYPES:
        chosen = [c for c in columns if c.kind == kind]
        if chosen:
            named = "" if kind == "continuous" else ": " + "; ".join(c.describe() for c in chosen[:6]) + \
                ("; ..." if len(chosen) > 6 else "")
            parts.append(f"{len(chosen)} {kind}{named}")
    return "column types: " + ", ".join(parts) + " (declare others with data.types, --types NAME=TYPE)"


def table_text(x: np.ndarray, columns: Sequence[Column], labels: Optional[np.ndarray] = None,
               label_column: str = "", label_index: int = 0, class_names: Sequence[str] = ()) -> str:
    """Rows (n, D) in data units as the CSV text of the user's table: its columns' names and order, a text
    column's levels as their text, and (with `labels`, class indices) the label column back at `label_index`
    holding each row's class name. Read back by toydiff.data.tables.read_table with the same columns' types."""
    header = [c.name for c in columns]
    if not any(c.text for c in columns) and labels is None:
        x = np.array(x, dtype=np.float64)
        for j, c in enumerate(columns):
            if c.decimals >= 0:
                x[:, j] = np.round(x[:, j], c.decimals) + 0.0  # no -0.00
        return csv_text(x, header, [c.number_format for c in columns])
    rows = [[c.level(v) for c, v in zip(columns, row)] for row in np.asarray(x).tolist()]
    if labels is not None:
        header.insert(label_index, label_column)
        for row, k in zip(rows, labels.tolist()):
            row.insert(label_index, class_names[k])
    return csv_text(rows, header)
