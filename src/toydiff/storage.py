"""File formats: atomic writes, .npy and CSV without pickle, and toydiff-tagged safetensors.

Every file toydiff writes goes to a temporary name beside its target and is renamed over it,
so a crash leaves the old file whole or the new one whole, never half of either. Nothing is
ever unpickled: arrays are .npy read with allow_pickle=False, weights and training state are
safetensors with a format tag and version in their metadata. Which files a run directory holds,
and what they are called, is toydiff.rundir's business.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import nn

from .errors import ToydiffError

FORMAT = "toydiff-run"  # the tag in every safetensors file and run manifest toydiff writes
VERSION = 1  # the newest format version this toydiff reads and writes
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: a crash leaves the old file whole."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # an unwritable or missing folder, a read-only or full disk: one line, nothing written
        raise ToydiffError(f"cannot write '{path}': {e.strerror or e}; choose a folder you can write to") from None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ToydiffError(f"'{path}' does not exist") from None
    except (ValueError, OSError) as e:
        raise ToydiffError(f"'{path}' is not a readable .npy array ({e})") from None


def csv_text(rows: list[dict[str, Any]] | np.ndarray, header: list[str] | tuple[str, ...] | None = None) -> str:
    """Rows of dicts, or a 2-D array with its column names, as CSV text (numbers with 7 significant digits)."""
    buf = io.StringIO()
    if isinstance(rows, np.ndarray):
        np.savetxt(buf, rows, delimiter=",", header=",".join(header or []), comments="", fmt="%.7g")
    else:
        writer = csv.DictWriter(buf, fieldnames=list(header or (list(rows[0]) if rows else [])))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def save_csv(path: Path, rows: list[dict[str, Any]] | np.ndarray, header: list[str] | tuple[str, ...] | None = None
             ) -> None:
    atomic_write_text(path, csv_text(rows, header))


def save_table(path: Path, x: np.ndarray, names: list[str]) -> None:
    """An (n, D) array as .npy (float32) or .csv (headed by `names`), by the path's suffix."""
    path = Path(path)
    if path.suffix == ".npy":
        save_npy(path, np.asarray(x, dtype=np.float32))
    elif path.suffix == ".csv":
        save_csv(path, x, names)
    else:
        raise ToydiffError(f"'{path}' must end in .npy or .csv")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Named tensors and string metadata as one safetensors file, tagged with the run format, written atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(tensors, metadata={**meta, "format": FORMAT, "version": str(VERSION)}))


def load_tensors(path: Path, what: str = "weights") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a toydiff safetensors file; never unpickles anything."""
    if not Path(path).is_file():
        raise ToydiffError(f"'{path}' does not exist: the run has no {what} (did training start?)")
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
    model.load_state_dict(tensors)
    return int(meta.get("step", "0"))


def make_staging_dir(target: Path) -> Path:
    """A fresh hidden directory beside `target` (`publish_dir` renames it there once it is whole); an existing
    non-empty `target` is refused, never written into."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ToydiffError(f"'{target}' already exists and is not empty; choose another --out or remove it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
        os.chmod(staging, 0o777 & ~_UMASK)
    except OSError as e:
        raise ToydiffError(f"cannot create directory '{target}': {e}") from None
    return staging


def publish_dir(staging: Path, target: Path) -> Path:
    """Rename a fully written staging directory to `target`: the directory exists whole or not at all."""
    target = Path(target)
    try:
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        os.rename(staging, target)
    except OSError as e:
        raise ToydiffError(f"cannot create directory '{target}': {e}") from None
    return target
