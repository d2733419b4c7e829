"""The run directory: every file of a run is named here, once, and read and written through `RunDir`.

A run directory describes itself, so sampling, plotting and evaluation need nothing but its path:

    run.json               format name and version, what was trained, its status, how long it took
    config.toml            the full ExperimentConfig the run was made with
    scaler.json            the fitted Scaler (data units <-> the model's frame)
    train_data.npy         the training data, in data units
    train_labels.npy       their class labels (conditional models)
    train_components.npy   the piece of the support each training row lies in (model.components)
    holdout_data.npy       the rows of the user's file kept out of training (the evaluation's reference)
    holdout_labels.npy     their class labels (conditional runs on a file: each class judged on its own rows)
    model.safetensors      the weights (metadata: format, version, step)
    model_ema.safetensors  their exponential moving average (sampling uses it by default)
    checkpoint.safetensors the whole training state at the last checkpoint (weights, EMA, optimizer, RNG, log),
                           which `--resume` continues from
    train_log.csv          step, loss, lr, seconds, val_loss: a row appended as each is logged, rewritten at checkpoints
    samples.npy / .csv     generated samples, in data units (.csv: the user's table, a text column's levels as text)
    samples.json           how they were drawn, and the SHA-256 of both files (written last: it vouches for them)
    .lock                  the OS lock of the process writing the run directory (RunDir.writing)
    metrics.json           the evaluation: each metric beside its noise floor, the verdict, the likelihoods
    figures/NAME.png       the figures
    result.json            a study's row for this run (toydiff.jobs.study)

A new run directory is staged under a hidden name and renamed into place once its inputs are
written (`RunDir.create`, `publish`): it exists whole or not at all. Nothing here is ever
unpickled (toydiff.core.formats).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..core import config as config_io
from ..core.config import ExperimentConfig
from ..core.errors import ToydiffError
from ..core.files import (Lock, atomic_write_many, atomic_write_text, check_regular, make_staging_dir, publish_dir,
                          remove_stale_temporaries)
from ..core.formats import (FORMAT, VERSION, csv_text, load_npy, load_tensors, load_weights, save_csv, save_npy,
                            save_tensors, save_weights)
from ..core.schema import Fields, MapOf, check_schema, read_json
from ..core.version import __version__
from ..data.scaler import Scaler

MANIFEST = "run.json"
CONFIG = "config.toml"
SCALER = "scaler.json"
TRAIN_DATA = "train_data.npy"
TRAIN_LABELS = "train_labels.npy"
TRAIN_COMPONENTS = "train_components.npy"
HOLDOUT = "holdout_data.npy"
HOLDOUT_LABELS = "holdout_labels.npy"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "model_ema.safetensors"
CHECKPOINT = "checkpoint.safetensors"
TRAIN_LOG = "train_log.csv"
LOG_HEADER = ("step", "loss", "lr", "seconds", "val_loss")  # val_loss: nan without early stopping
TRAIN_NOISE = "train_noise.npy"  # reflow students: the noise paired with each training row (model frame)
SAMPLES = "samples"  # .npy and .csv
SAMPLING = "samples.json"  # how the samples were drawn: sampler, steps, spacing, nfe
METRICS = "metrics.json"
FIGURES_DIR = "figures"
RESULT = "result.json"
REPORT = "report.html"


# What each JSON file of a run directory may hold, checked on every read (core.schema.check_schema): damaged or
# hostile metadata ends in one line naming the field, never a TypeError inside.
MANIFEST_SCHEMA = Fields({
    "format": str, "version": int, "status": str, "dim": int, "n_train": int, "scaling": str, "classes": int,
    "columns": [str], "class_names": [str], "column_types": [str], "label_column": str, "label_index": int,
    "source": str, "student": str, "teacher": str, "method": str,
    "checkpoint_step": int, "steps": int, "processes": int, "train_seconds": float, "final_loss": float,
    "alpha_bar_T": float, "parameters": int, "width": int, "device": str, "threads": int, "created": str,
    "toydiff_version": str, "cuda_graphs": str, "stopped_early": bool,
    "validation": Fields({"rows": int, "best_step": int, "best_loss": float, "patience_steps": int}),
    "components": Fields({"count": int, "shares": [float], "radius": float, "note": str},
                         required=("count", "radius")),
    "sizing": Fields({"probe_steps": int, "candidates": [Fields({"width": int, "weight_decay": float, "loss": float,
                                                                 "step": int, "difference": float, "z": float})],
                      "chosen": Fields({"width": int, "weight_decay": float})})},
    required=("format", "version", "status"))
SAMPLING_SCHEMA = Fields({"sampler": str, "steps": int, "spacing": (str, None), "nfe": (float, None),
                          "npy_sha256": str, "csv_sha256": str, "cuda_graphs": str})
_VALUE = (float, None)
METRICS_SCHEMA = Fields({
    "verdict": str, "n": int, "z_limit": _VALUE, "nfe": _VALUE, "sampling": (SAMPLING_SCHEMA, None),
    "metrics": MapOf(Fields({"value": _VALUE, "floor_mean": _VALUE, "floor_std": _VALUE, "z": _VALUE,
                             "about": str})),
    "likelihood": Fields({"n": int, "units": str, "values": MapOf(Fields({
        "nats": _VALUE, "nats_per_dim": _VALUE, "bits_per_dim": _VALUE, "minus_entropy": _VALUE}))}),
    "efficacy": Fields({"on_samples": float, "on_training_rows": float, "gap": float, "gap_std": float,
                        "held_out_rows": int, "samples": int, "training_rows": int})},
    required=("verdict", "n", "metrics"))
RESULT_SCHEMA = MapOf((str, float, bool, None))


def teacher_path(out: str | Path) -> Path:
    """Where `toydiff run` trains the teacher of a student run at `out` (config [distill]): the sibling OUT-teacher,
    a complete run directory of its own."""
    out = Path(out)
    return out.with_name(f"{out.name}-teacher")


def new_run_path(name: Optional[str], cfg: ExperimentConfig, root: str | Path = "runs") -> Path:
    """runs/NAME-YYYYmmdd-HHMMSS (with -2, -3, ... if taken) for a new run; NAME defaults to the data file's
    stem or the dataset's name."""
    name = name or (Path(cfg.data.path).stem if cfg.data.path else cfg.data.name)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out, k = Path(root) / f"{name}-{stamp}", 1
    while out.exists():
        k += 1
        out = Path(root) / f"{name}-{stamp}-{k}"
    return out


_HELD: dict[tuple[int, int], list] = {}  # (device, inode) of a run directory this process writes -> [Lock, depth]


class RunDir:
    """One run directory on disk: its files' paths, and reading and writing each.

    One process writes a run directory at a time: whatever writes into one (training, resuming, sampling,
    figures, the report) holds `writing()`, an OS file lock the kernel drops when the process dies, so a
    SIGKILL never leaves a stale lock and a second writer is told which process holds it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir('{self.path}')"

    # --- paths -------------------------------------------------------------------------------------------
    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def ema_weights(self) -> Path:
        return self.path / EMA_WEIGHTS

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def train_log(self) -> Path:
        return self.path / TRAIN_LOG

    @property
    def samples(self) -> Path:
        """samples.npy (beside it, samples.csv)."""
        return self.path / f"{SAMPLES}.npy"

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def figures(self) -> Path:
        return self.path / FIGURES_DIR

    def figure(self, name: str) -> Path:
        return self.path / FIGURES_DIR / f"{name}.png"

    @property
    def report(self) -> Path:
        """report.html: the run on one self-contained page (toydiff.pictures.report)."""
        return self.path / REPORT

    def animation(self, name: str) -> Path:
        """figures/NAME.gif: an animation of the process (`toydiff animate`; name reverse or forward)."""
        return self.path / FIGURES_DIR / f"{name}.gif"

    def figure_paths(self) -> dict[str, Path]:
        """The figures written so far, name -> path."""
        return {p.stem: p for p in sorted(self.figures.glob("*.png"))}

    @contextmanager
    def writing(self):
        """Hold this run directory's lock while writing into it (re-entrant within a process; it follows the
        directory through a rename, so a staging directory's lock holds once published). Temporary files that
        a killed writer left are removed when the lock is first taken."""
        try:
            st = os.stat(self.path)
        except OSError:
            yield self  # not there yet (or unreadable): the caller's own error will name it
            return
        key = (st.st_dev, st.st_ino)
        if key in _HELD:
            _HELD[key][1] += 1
            try:
                yield self
            finally:
                _HELD[key][1] -= 1
            return
        if self.figures.is_symlink() or (self.figures.exists() and not self.figures.is_dir()):
            raise ToydiffError(f"'{self.figures}' is not a folder of the run directory (a link or a file); toydiff "
                               "writes only inside the run directory: remove it and run the command again")
        lock = Lock(self.path).acquire()
        _HELD[key] = [lock, 1]
        try:
            if lock.fd is not None:
                remove_stale_temporaries(self.path)
                if self.figures.is_dir():
                    remove_stale_temporaries(self.figures)
            yield self
        finally:
            del _HELD[key]
            lock.release()

    # --- creating ----------------------------------------------------------------------------------------
    @classmethod
    def create(cls, target: str | Path) -> "RunDir":
        """A staging directory beside `target` for a new run (publish it once its inputs are written); an
        existing non-empty `target` is refused."""
        staging = cls(make_staging_dir(Path(target)))
        try:
            staging.figures.mkdir()
        except OSError as e:
            raise ToydiffError(f"cannot create run directory '{target}': {e}") from None
        return staging

    def publish(self, target: str | Path) -> "RunDir":
        return RunDir(publish_dir(self.path, Path(target)))

    def write_inputs(self, cfg: ExperimentConfig, scaler: Scaler, x: np.ndarray, labels: Optional[np.ndarray],
                     holdout: Optional[np.ndarray], info: dict[str, Any],
                     holdout_labels: Optional[np.ndarray] = None, noise: Optional[np.ndarray] = None,
                     components: Optional[np.ndarray] = None) -> None:
        """Everything a run is made from, and its manifest (status "training"); `noise`: a reflow student's noise
        paired with each training row; `components`: the piece of each training row (model.components)."""
        atomic_write_text(self.path / CONFIG, cfg.to_toml())
        atomic_write_text(self.path / SCALER, json.dumps(scaler.to_dict(), indent=2))
        save_npy(self.path / TRAIN_DATA, x.astype(np.float32))
        if labels is not None:
            save_npy(self.path / TRAIN_LABELS, labels)
        if holdout is not None:
            save_npy(self.path / HOLDOUT, holdout)
        if holdout is not None and holdout_labels is not None:
            save_npy(self.path / HOLDOUT_LABELS, holdout_labels)
        if noise is not None:
            save_npy(self.path / TRAIN_NOISE, noise.astype(np.float32))
        if components is not None:
            save_npy(self.path / TRAIN_COMPONENTS, components.astype(np.int64))
        self.write_manifest({"toydiff_version": __version__, **info, "status": "training"})

    # --- the manifest ------------------------------------------------------------------------------------
    def write_manifest(self, info: dict[str, Any]) -> None:
        atomic_write_text(self.path / MANIFEST, json.dumps({"format": FORMAT, "version": VERSION, **info}, indent=2))

    def read_manifest(self) -> dict[str, Any]:
        """The manifest, after checking that this is a toydiff run directory this version can read."""
        if not self.path.is_dir():
            raise ToydiffError(f"run directory '{self.path}' does not exist; make one with `toydiff run` or "
                               "`toydiff train`")
        path = self.path / MANIFEST
        if not path.exists():
            raise ToydiffError(f"'{self.path}' is not a toydiff run directory (no {MANIFEST}); "
                               "make one with `toydiff run` or `toydiff train`")
        info = read_json(path, "run manifest")
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise ToydiffError(f"'{self.path}' is not a toydiff run directory ({MANIFEST} has no '{FORMAT}' format "
                               "tag)")
        version = info.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
            raise ToydiffError(f"'{self.path}' has run format version {version!r}; this toydiff reads versions up "
                               f"to {VERSION}: upgrade toydiff")
        check_schema(info, MANIFEST_SCHEMA, f"run manifest '{path}'")
        if info["status"] not in ("training", "trained"):
            raise ToydiffError(f"run manifest '{path}' is damaged: status {info['status']!r} is neither 'training' "
                               "nor 'trained'")
        return info

    def is_run(self) -> bool:
        """Whether this path holds a run directory's manifest (a directory safe to replace as a run)."""
        return (self.path / MANIFEST).is_file()

    # --- reading a run back ------------------------------------------------------------------------------
    def read_config(self) -> ExperimentConfig:
        return config_io.load(self.path / CONFIG)

    def read_scaler(self) -> Scaler:
        return Scaler.from_dict(read_json(self.path / SCALER, "scaler file"))

    def read_data(self, dim: int, conditional: bool, classes: Optional[int]
                  ) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
        """(training data, labels or None, held-out rows or None), each checked against the run's D and the
        manifest's class count."""
        data = load_npy(self.path / TRAIN_DATA)
        if data.ndim != 2 or data.shape[1] != dim:
            raise ToydiffError(f"'{self.path}' is damaged: {TRAIN_DATA} has shape {data.shape} but the scaler has "
                               f"{dim} columns")
        labels = None
        if conditional:
            labels = load_npy(self.path / TRAIN_LABELS)
            if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu" or classes != int(labels.max()) + 1:
                raise ToydiffError(f"'{self.path}' is damaged: {TRAIN_LABELS} does not match the training data or "
                                   f"{MANIFEST}")
        holdout = load_npy(self.path / HOLDOUT) if (self.path / HOLDOUT).is_file() else None
        if holdout is not None and (holdout.ndim != 2 or holdout.shape[1] != dim):
            raise ToydiffError(f"'{self.path}' is damaged: {HOLDOUT} has shape {holdout.shape}, the data "
                               f"{data.shape}")
        return data, labels, holdout

    def read_components(self, n: int, count: Optional[int]) -> Optional[np.ndarray]:
        """The piece of each of the n training rows (None for a run of one, `count` None), checked against the
        manifest's count."""
        if count is None:
            return None
        path = self.path / TRAIN_COMPONENTS
        pieces = load_npy(path) if path.is_file() else None
        if pieces is None or pieces.shape != (n,) or pieces.dtype.kind not in "iu" or pieces.min() < 0 \
                or int(pieces.max()) + 1 != count:
            raise ToydiffError(f"'{self.path}' is damaged: {TRAIN_COMPONENTS} is missing or does not match the "
                               f"training data or the {count} components of {MANIFEST}")
        return pieces.astype(np.int64)

    def read_train_noise(self, shape: tuple[int, int]) -> np.ndarray:
        """A reflow student's noise, one row per training row (`shape`), or a one-line error."""
        path = self.path / TRAIN_NOISE
        if not path.is_file():
            raise ToydiffError(f"'{self.path}' is damaged: a reflow run trains on {TRAIN_NOISE}, its noise paired with "
                               "each training row, and it is missing; distill the teacher again (`toydiff distill`)")
        noise = load_npy(path)
        if noise.shape != tuple(shape):
            raise ToydiffError(f"'{self.path}' is damaged: {TRAIN_NOISE} has shape {noise.shape}, the training data "
                               f"{tuple(shape)}")
        return noise

    def read_holdout_labels(self, holdout: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """The class labels of the held-out rows, where the run kept them."""
        if holdout is None or not (self.path / HOLDOUT_LABELS).is_file():
            return None
        labels = load_npy(self.path / HOLDOUT_LABELS)
        if labels.shape != (len(holdout),) or labels.dtype.kind not in "iu":
            raise ToydiffError(f"'{self.path}' is damaged: {HOLDOUT_LABELS} does not match {HOLDOUT}")
        return labels

    def load_weights(self, model: nn.Module, ema: bool) -> None:
        """The trained weights into `model`; with ema, their moving average where the run has one."""
        load_weights(self.weights, model)
        if ema and self.ema_weights.is_file():
            load_weights(self.ema_weights, model)

    # --- training ----------------------------------------------------------------------------------------
    def save_checkpoint(self, tensors: dict[str, torch.Tensor], meta: dict[str, str], model: nn.Module,
                        ema: Optional[nn.Module], step: int, rows: list[dict]) -> None:
        """The whole training state first, then the plain weights, the EMA and the log, each file atomically."""
        save_tensors(self.checkpoint, tensors, meta)
        save_weights(self.weights, model, step)
        if ema is not None:
            save_weights(self.ema_weights, ema, step)
        self.write_log(rows)

    def load_checkpoint(self) -> Optional[tuple[dict[str, torch.Tensor], dict[str, str]]]:
        """The training state saved by save_checkpoint, or None before the first checkpoint."""
        if not self.checkpoint.is_file():
            return None
        return load_tensors(self.checkpoint, "checkpoint")

    def read_log(self) -> Optional[dict[str, np.ndarray]]:
        """The loss log as columns (LOG_HEADER -> array), or None while it has no row."""
        if not self.train_log.exists():
            return None
        check_regular(self.train_log, "loss log")
        try:
            table = np.loadtxt(self.train_log, delimiter=",", skiprows=1, ndmin=2)
        except ValueError as e:
            raise ToydiffError(f"'{self.train_log}' is not a loss log ({e}); the run directory is damaged") from None
        if table.shape[0] == 0:
            return None
        if table.shape[1] not in (len(LOG_HEADER) - 1, len(LOG_HEADER)):  # a log from before early stopping: no val_loss
            raise ToydiffError(f"'{self.train_log}' has {table.shape[1]} columns, not {len(LOG_HEADER)}; the run "
                               "directory is damaged")
        return dict(zip(LOG_HEADER, table.T))

    def write_log(self, rows: list[dict]) -> None:
        """The whole loss log, atomically (at checkpoints, and when a resumed run drops the rows logged after
        its last checkpoint)."""
        save_csv(self.train_log, rows, LOG_HEADER)

    def append_log(self, row: dict) -> None:
        """One loss-log row, appended and flushed as training goes, so the log can be followed live; the file is
        rewritten whole (atomically) at every checkpoint."""
        new = not self.train_log.is_file() or self.train_log.stat().st_size == 0
        text = csv_text([row], LOG_HEADER)
        with open(self.train_log, "a", encoding="utf-8") as f:
            f.write(text if new else text.split("\n", 1)[1])
            f.flush()
            os.fsync(f.fileno())

    # --- outputs -----------------------------------------------------------------------------------------
    def write_samples(self, samples: np.ndarray, table: str, sampling: Optional[dict] = None) -> tuple[Path, Path]:
        """samples.npy and samples.csv in data units (the CSV text `table`: Run.table_text), and samples.json
        beside them: how they were drawn (`sampling`, Drawn.record: sampler, steps, spacing, nfe) and the
        SHA-256 of both files. The three are written as one unit, samples.json renamed last, so a kill or a full
        disk in between leaves files that read_samples finds do not belong together, never silently mixed."""
        npy, csv, about = self.samples, self.samples.with_suffix(".csv"), self.path / SAMPLING
        buf = io.BytesIO()
        np.save(buf, samples.astype(np.float32), allow_pickle=False)
        npy_bytes, csv_bytes = buf.getvalue(), table.encode("utf-8")
        record = {**(sampling or {}), "npy_sha256": hashlib.sha256(npy_bytes).hexdigest(),
                  "csv_sha256": hashlib.sha256(csv_bytes).hexdigest()}
        atomic_write_many({npy: npy_bytes, csv: csv_bytes, about: json.dumps(record).encode("utf-8")})
        return npy, csv

    def _samples_record(self) -> Optional[dict]:
        path = self.path / SAMPLING
        return read_json(path, "sampling record", SAMPLING_SCHEMA) if path.is_file() else None

    def read_sampling(self) -> Optional[dict]:
        """How the stored samples were drawn (samples.json without its checksums), or None when unknown."""
        record = self._samples_record()
        if record is None or "sampler" not in record:
            return None
        return {k: v for k, v in record.items() if not k.endswith("_sha256")}

    def read_samples(self) -> Optional[np.ndarray]:
        """The stored samples, or None when there are none; refused when samples.npy is not the file
        samples.json vouches for (a write cut short)."""
        if not self.samples.is_file():
            return None
        record = self._samples_record()
        digest = hashlib.sha256()
        with open(self.samples, "rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
        if record is None or record.get("npy_sha256") != digest.hexdigest():
            raise ToydiffError(f"the samples in '{self.path}' are incomplete: {SAMPLES}.npy is not the file "
                               f"{SAMPLING} vouches for (a write was cut short); draw them again with "
                               f"`toydiff sample {self.path}`")
        return load_npy(self.samples)

    def write_metrics(self, report: dict) -> Path:
        atomic_write_text(self.metrics, json.dumps(report, indent=2))
        return self.metrics

    def read_metrics(self) -> Optional[dict]:
        return read_json(self.metrics, "metrics file", METRICS_SCHEMA) if self.metrics.is_file() else None

    def write_result(self, row: dict) -> None:
        atomic_write_text(self.path / RESULT, json.dumps(row))

    def read_result(self) -> Optional[dict]:
        """A study's stored row for this run, or None when the run has not finished."""
        path = self.path / RESULT
        return read_json(path, "study result", RESULT_SCHEMA) if path.is_file() else None
