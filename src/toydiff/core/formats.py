"""File formats without pickle: .npy (its header checked against the file), CSV, and toydiff-tagged safetensors.

Nothing is ever unpickled: arrays are .npy read with allow_pickle=False, weights and training state are
safetensors with a format tag and version in their metadata. Every write is atomic (toydiff.core.files).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .errors import ToydiffError, os_error
from .files import atomic_write_bytes, atomic_write_text, check_regular
from .machine import check_memory

if TYPE_CHECKING:  # torch and safetensors are imported by the functions that need them: `toydiff --help`
    import torch  # loads no torch
    from torch import nn

FORMAT = "toydiff-run"  # the tag in every safetensors file and run manifest toydiff writes
VERSION = 1  # the newest format version this toydiff reads and writes


def save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def npy_header(f, size: int, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from an open .npy stream's header, checked against the `size` bytes it holds, before any
    array is allocated: a header claiming more rows than its file carries is refused, not believed."""
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read:
            raise ValueError(f"unsupported .npy version {version}")
        shape, _, dtype = read[version](f, max_header_size=10_000)
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise ToydiffError(f"{where} is not a readable .npy array ({e})") from None
    if dtype.hasobject:
        raise ToydiffError(f"{where} holds Python objects; toydiff reads numeric arrays only")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need > size:
        raise ToydiffError(f"{where} is damaged: its header claims {shape} {dtype} ({need:,} bytes) but it holds "
                           f"{size:,}")
    return tuple(shape), dtype


def load_npy(path: Path) -> np.ndarray:
    """A numeric .npy array, its header checked against the file's size and the memory available first."""
    path = Path(path)
    st = check_regular(path, "array file")
    try:
        with open(path, "rb") as f:
            shape, dtype = npy_header(f, st.st_size, f"'{path}'")
    except OSError as e:
        raise os_error(e, path, "read") from None
    check_memory(st.st_size, f"'{path}'", "free memory or use a smaller file")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ToydiffError(f"'{path}' is not a readable .npy array ({e})") from None


def csv_text(rows: list[dict[str, Any]] | list[list[str]] | np.ndarray,
             header: list[str] | tuple[str, ...] | None = None, formats: Sequence[str] = ()) -> str:
    """Rows of dicts, rows of cells (lists of text) or a 2-D array, with the column names, as CSV text (an
    array's numbers with 7 significant digits, or each column's %-format in `formats`; text with a comma, a
    quote or a newline quoted; a dict's missing key: nan)."""
    buf = io.StringIO()
    if isinstance(rows, list) and rows and isinstance(rows[0], list):
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(list(header or []))
        writer.writerows(rows)
    elif isinstance(rows, np.ndarray):  # the header through csv (a name with a comma or newline is quoted)
        if header:
            csv.writer(buf, lineterminator="\n").writerow(list(header))
        np.savetxt(buf, rows, delimiter=",", comments="", fmt=list(formats) if formats else "%.7g")
    else:
        writer = csv.DictWriter(buf, fieldnames=list(header or (list(rows[0]) if rows else [])), restval="nan")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def save_csv(path: Path, rows: list[dict[str, Any]] | np.ndarray, header: list[str] | tuple[str, ...] | None = None
             ) -> None:
    atomic_write_text(path, csv_text(rows, header))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Named tensors and string metadata as one safetensors file, tagged with the run format, written atomically."""
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(tensors, metadata={**meta, "format": FORMAT, "version": str(VERSION)}))


def load_tensors(path: Path, what: str = "weights") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a toydiff safetensors file; never unpickles anything."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).exists():
        raise ToydiffError(f"'{path}' does not exist: the run has no {what} (did training start?)")
    check_regular(Path(path), what)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, ValueError, OSError) as e:
        raise ToydiffError(f"'{path}' is not a safetensors file ({e}); the run directory is damaged") from None
    if meta.get("format") != FORMAT:
        raise ToydiffError(f"'{path}' was not written by toydiff (no '{FORMAT}' format tag)")
    if not meta.get("version", "").isdigit() or int(meta["version"]) > VERSION:
        raise ToydiffError(f"'{path}' has format version {meta.get('version')!r}; this toydiff reads versions up to "
                           f"{VERSION}: upgrade toydiff")
    return tensors, meta


def save_weights(path: Path, model: nn.Module, step: int) -> None:
    save_tensors(path, model.state_dict(), {"step": str(step)})


def load_weights(path: Path, model: nn.Module) -> int:
    """Load safetensors weights into `model`; returns the training step they were saved at."""
    tensors, meta = load_tensors(path)
    expected = model.state_dict()
    missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or extra or wrong:
        what = (f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(extra)[:3]}" if extra
                else f"{wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, the model needs "
                     f"{tuple(expected[wrong[0]].shape)}")
        raise ToydiffError(f"the weights in '{path}' do not fit the run's configured model ({what}); "
                           "was the file copied from another run?")
    step = meta.get("step", "0")
    if not step.isdigit() or len(step) > 18:
        raise ToydiffError(f"'{path}' is damaged: its step is {step!r}, not a count")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:  # a dtype it cannot copy from
        raise ToydiffError(f"the weights in '{path}' do not fit the run's model ({e}); the run directory is "
                           "damaged") from None
    return int(step)
