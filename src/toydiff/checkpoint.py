"""The run directory's file formats: atomic writes, safetensors weights, and a versioned manifest.

A run directory describes itself, so sampling, plotting and evaluation need nothing
but its path:

    run.json            format name and version, what was trained, how long it took
    config.toml         the full ExperimentConfig the run was made with
    scaler.json         the fitted Scaler (data units <-> the model's frame)
    train_data.npy      the training data, in data units
    model.safetensors   the weights (metadata: format, version, step)
    model_ema.safetensors  their exponential moving average (sampling uses it by default)
    checkpoint.safetensors the whole training state at the last checkpoint (weights, EMA, optimizer, RNG, log),
                        which `--resume` continues from
    train_log.csv       step, loss, lr, seconds
    samples.npy/.csv    generated samples, in data units
    figures/*.png       the figures

Nothing here is ever unpickled: weights are safetensors, the rest JSON, TOML, CSV and
.npy read with allow_pickle=False.
"""

from __future__ import annotations

import csv
import io
import json
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

FORMAT = "toydiff-run"
VERSION = 1
MANIFEST = "run.json"
_UMASK = os.umask(0)
os.umask(_UMASK)
WEIGHTS = "model.safetensors"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: a crash leaves the old file whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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


def save_csv(path: Path, rows: list[dict[str, Any]] | np.ndarray, header: list[str] | None = None) -> None:
    buf = io.StringIO()
    if isinstance(rows, np.ndarray):
        np.savetxt(buf, rows, delimiter=",", header=",".join(header or []), comments="", fmt="%.7g")
    else:
        writer = csv.DictWriter(buf, fieldnames=header or (list(rows[0]) if rows else []))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


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


def write_manifest(run_dir: Path, info: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / MANIFEST, json.dumps({"format": FORMAT, "version": VERSION, **info}, indent=2))


def read_manifest(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ToydiffError(f"run directory '{run_dir}' does not exist; make one with `toydiff run` or `toydiff train`")
    path = run_dir / MANIFEST
    if not path.is_file():
        raise ToydiffError(f"'{run_dir}' is not a toydiff run directory (no {MANIFEST}); "
                           "make one with `toydiff run` or `toydiff train`")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ToydiffError(f"'{path}' is not valid JSON ({e}); the run directory is damaged") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ToydiffError(f"'{run_dir}' is not a toydiff run directory ({MANIFEST} has no '{FORMAT}' format tag)")
    version = info.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ToydiffError(f"'{run_dir}' has run format version {version!r}; this toydiff reads versions up to "
                           f"{VERSION}: upgrade toydiff")
    return info


def create_run_dir(run_dir: Path) -> Path:
    """Make a staging directory beside `run_dir` for a new run (`publish_run_dir` moves it into place); an
    existing non-empty `run_dir` is never written into."""
    run_dir = Path(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ToydiffError(f"'{run_dir}' already exists and is not empty; choose another --out or remove it")
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}.", suffix=".partial"))
        os.chmod(staging, 0o777 & ~_UMASK)
        (staging / "figures").mkdir()
    except OSError as e:
        raise ToydiffError(f"cannot create run directory '{run_dir}': {e}") from None
    return staging


def publish_run_dir(staging: Path, run_dir: Path) -> Path:
    """Rename a fully written staging directory to `run_dir`: a run directory exists whole or not at all."""
    run_dir = Path(run_dir)
    try:
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
        os.rename(staging, run_dir)
    except OSError as e:
        raise ToydiffError(f"cannot create run directory '{run_dir}': {e}") from None
    return run_dir
