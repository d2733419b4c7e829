"""What a run is judged against: the reference distribution, its frame, and the rules that keep it honest.

For the zoo's datasets the reference is an iid sampler of the same law (make_moons -> iid moons),
drawn afresh for every comparison. For the user's file it is the held-out rows, and never a
training row (`unseen_rows`); `eval --data FILE` takes another file's rows under the same rule.
Everything evaluation will need of a file's held-out rows is checked before training
(`check_reference`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np

from ..core.config import ExperimentConfig
from ..core.errors import ToydiffError
from ..data.datasets import DATASETS, params
from ..data.columns import Column
from ..data.scaler import Scaler, TableScaler
from ..data.tables import column_warnings, default_names
from ..data.zoo import Params

if TYPE_CHECKING:  # pragma: no cover
    from ..runs.run import Run

FRAME_POINTS = 100_000  # iid points whose per-axis min-max defines the evaluation frame
MIN_EVAL_N = 20  # the fewest samples a comparison is made with, and the fewest held-out rows of a file


@dataclass(frozen=True)
class Target:
    """The data distribution a run is judged against: an iid sampler, a fixed frame, what floors depend on."""

    draw: Callable[[np.random.Generator, int], np.ndarray]  # (rng, n) -> (n, D) data units
    frame: Scaler  # per-axis min-max of FRAME_POINTS iid points: one frame for every run on this data
    key: dict  # everything the floors depend on besides the EvalConfig
    support_distance: Optional[Callable[[np.ndarray], np.ndarray]] = None
    noise: float = 0.0
    log_density: Optional[Callable[[np.ndarray], Optional[np.ndarray]]] = None  # data units; None: unknown
    # a finite reference (the user's held-out rows): how many rows it has, so n at most; None for samplers,
    # whose draws are independent. The floors of a finite reference are a permutation test (evaluation.scores).
    max_n: Optional[int] = None
    # a file given to judge a conditional run (file_reference): its references class by class (None for a class
    # with too few rows); {} when the file has no label column, so the classes are not judged on it
    classes: Optional[dict[int, Optional["Target"]]] = None
    # a finite reference with class labels (a conditional run's held-out rows, or a file's with its label column):
    # each row's class index, for machine-learning efficacy
    labels: Optional[np.ndarray] = None
    rows: Optional[np.ndarray] = None  # a finite reference's rows in order (labels' order); None for samplers


def file_target(holdout: np.ndarray, dropped: int = 0, frame: Optional[Scaler] = None,
                columns: Optional[Sequence[Column]] = None) -> Target:
    """The user's held-out rows as the reference: the model's samples meet n of them (all of them at most).
    dropped: how many rows were left out for being training rows (unseen_rows), reported with the
    reference. frame: the evaluation frame (default: the rows' own per-axis min-max, with a binary or
    categorical column of `columns` (the run's types) as its levels at +-1; a class's rows are judged in the
    pooled frame)."""
    holdout = np.asarray(holdout, dtype=np.float64)

    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        return holdout[rng.permutation(len(holdout))[:n]]

    digest = hashlib.sha256(np.ascontiguousarray(holdout).tobytes()).hexdigest()[:16]
    key = {"dataset": "file", "holdout_sha256": digest, "rows": len(holdout)}
    if dropped:
        key["training_rows_dropped"] = dropped
    if frame is None:
        frame = Scaler.fit(holdout, "minmax") if columns is None else \
            TableScaler.fit_table(holdout, "minmax", tuple(columns), every_level=True)
    return Target(draw, frame, key, max_n=len(holdout), rows=holdout)


def unseen_rows(rows: np.ndarray, training: Optional[np.ndarray]) -> tuple[np.ndarray, int]:
    """`rows` without the ones equal to a training row, and how many those were. Rows are compared exactly,
    as the float32 values the run directory keeps of its training data (a memorized row in the reference
    would pass for fidelity)."""
    seen = _seen_mask(rows, training)
    return rows[~seen], int(seen.sum())


def _seen_mask(rows: np.ndarray, training: Optional[np.ndarray]) -> np.ndarray:
    """(len(rows),) True where a row equals a training row (as float32)."""
    if training is None or len(rows) == 0:
        return np.zeros(len(rows), dtype=bool)
    seen = {r.tobytes() for r in np.ascontiguousarray(training, dtype=np.float32)}
    return np.array([r.tobytes() in seen for r in np.ascontiguousarray(rows, dtype=np.float32)], dtype=bool)


def reference_rows(cfg: ExperimentConfig, holdout: Optional[np.ndarray],
                   training: Optional[np.ndarray] = None) -> tuple[np.ndarray, int]:
    """A file run's held-out rows that are not copies of training rows, and how many were; a one-line error
    naming the fix when fewer than MIN_EVAL_N remain."""
    rows, dropped = unseen_rows(holdout, training) if holdout is not None else (None, 0)
    count = 0 if rows is None else len(rows)
    if count < MIN_EVAL_N:
        also = f" ({dropped} more are copies of training rows)" if dropped else ""
        raise ToydiffError(f"evaluating a run on a file needs at least {MIN_EVAL_N} held-out rows and this run "
                           f"has {count}{also}; raise data.holdout (now {cfg.data.holdout}), use more rows, or skip "
                           "the evaluation (--no-eval)")
    return rows, dropped


def check_reference(cfg: ExperimentConfig, holdout: Optional[np.ndarray], names: Optional[Sequence[str]] = None,
                    training: Optional[np.ndarray] = None) -> list[str]:
    """What the evaluation of a run on a file needs of its held-out rows, checked before training: enough of
    them that are not also training rows, and no constant column (one-line errors that name the fix);
    nearly constant columns are returned as warnings. Nothing to check for the zoo's datasets, which are
    drawn afresh."""
    if not cfg.data.path:
        return []
    rows, dropped = reference_rows(cfg, holdout, training)
    warnings = column_warnings(rows, names or default_names(rows.shape[1]), f"the {len(rows)} held-out rows")
    if dropped:
        warnings.append(f"{dropped} held-out rows are copies of training rows; the evaluation leaves them out")
    return warnings


def class_targets(cfg: ExperimentConfig, classes: int, holdout: Optional[np.ndarray] = None,
                  holdout_labels: Optional[np.ndarray] = None, training: Optional[np.ndarray] = None,
                  columns: Optional[Sequence[Column]] = None) -> dict[int, Optional[Target]]:
    """One reference per class of a conditional run, in the pooled reference's frame: the zoo dataset's draws
    of that class (the label its sampler gives: the moon, the component, ...), or the held-out rows of that
    class of the user's file that are not training rows; None for a class with fewer than MIN_EVAL_N."""
    pooled = target_for(cfg, holdout, training, columns)
    if cfg.data.path:
        out: dict[int, Optional[Target]] = {}
        for k in range(classes):
            rows, dropped = unseen_rows(holdout[holdout_labels == k], training) if holdout_labels is not None \
                else (np.empty((0, pooled.frame.dim)), 0)
            out[k] = None if len(rows) < MIN_EVAL_N else file_target(rows, dropped, pooled.frame)
        return out
    spec = DATASETS.get(DATASETS.get(cfg.data.name).iid_twin or cfg.data.name)
    p = params(cfg.data)

    def draw_class(k: int):
        def draw(rng: np.random.Generator, n: int) -> np.ndarray:
            parts, have = [], 0
            while have < n:  # rejection: the dataset's own draws, kept where they fall in class k
                x, labels = spec.sample(2 * n, rng, p)
                parts.append(x[labels == k])
                have += len(parts[-1])
            return np.concatenate(parts)[:n]
        return draw
    return {k: dataclasses.replace(pooled, draw=draw_class(k), key={**pooled.key, "class": k}, log_density=None)
            for k in range(classes)}


def target_for(cfg: ExperimentConfig, holdout: Optional[np.ndarray] = None,
               training: Optional[np.ndarray] = None, columns: Optional[Sequence[Column]] = None,
               labels: Optional[np.ndarray] = None) -> Target:
    """The iid twin of the run's dataset (make_moons -> iid moons), with the run's parameters; for the user's
    file, its held-out rows that are not also training rows (`columns`: their types; `labels`: their classes)."""
    if cfg.data.path:
        target = file_target(*reference_rows(cfg, holdout, training), columns=columns)
        return target if labels is None else dataclasses.replace(target, labels=labels[~_seen_mask(holdout, training)])
    spec = DATASETS.get(cfg.data.name)
    name = spec.iid_twin or cfg.data.name
    spec, p = DATASETS.get(name), params(cfg.data)
    draw = lambda rng, n: spec.sample(n, rng, p)[0]  # noqa: E731
    frame = Scaler.fit(draw(np.random.default_rng(0xF7A3E), FRAME_POINTS), "minmax")
    key = {"dataset": name, "noise": p.noise}
    key.update({k: v for k, v in asdict(p).items() if k != "noise" and v != asdict(Params(0.0))[k]})
    bind = lambda fn: None if fn is None else functools.partial(fn, p=p)  # noqa: E731
    return Target(draw, frame, key, bind(spec.support_distance), p.noise, bind(spec.log_density))


def file_reference(run: Run, path: str | Path, columns: Sequence[str] = (),
                   log: Callable[[str], None] = lambda s: None) -> Target:
    """A data file's rows as the reference for `run` (a test split, say): its columns chosen by name (default:
    the run's own column names where the file has them all), checked against the run's dimension; rows that
    are the run's own training rows are left out, and the file is refused when too few others remain. For a
    conditional run, a file with the run's label column also gives a reference per class (`Target.classes`),
    whatever the run held out when it trained; everything is checked here, before anything is computed."""
    from ..data.tables import column_names, read_table

    path = Path(path)
    header = column_names(path)
    if not columns:
        columns = run.names if run.names and set(run.names) <= set(header) else []
    label = run.config.data.label_column if run.classes else ""
    if run.classes and (not label or label not in header):
        log(f"the classes are not judged one by one on '{path}': it has no label column"
            + (f" '{label}'" if label else ""))
        label = ""
    chosen = list(columns) or [h for h in header if h != label]
    table = read_table(path, chosen, label, schema=run.columns if run.columns is not None and
                       len(chosen) == run.dim else None)
    if table.x.shape[1] != run.dim:
        raise ToydiffError(f"the run models {run.dim} columns ({', '.join(run.names or [])}) but '{path}' gives "
                           f"{table.x.shape[1]} ({', '.join(table.names)}); choose them with --columns")
    unseen = ~_seen_mask(table.x, run.data)
    rows, dropped = table.x[unseen], int((~unseen).sum())
    if len(rows) < MIN_EVAL_N:
        raise ToydiffError(f"only {len(rows)} of the {len(table.x)} rows of '{path}' are not training rows of the "
                           f"run; judging a model on the rows it trained on rewards memorizing them, so the "
                           f"evaluation needs at least {MIN_EVAL_N} rows it has not seen: use a held-out file")
    if dropped:
        log(f"left out {dropped} of the {len(table.x)} rows of '{path}': they are training rows of the run")
    target = file_target(rows, dropped, columns=run.columns)
    if not run.classes:
        return target
    if not label:
        return dataclasses.replace(target, classes={})
    labels = _run_classes(table, run, path)[unseen]
    return dataclasses.replace(target, labels=labels, classes={
        k: file_target(rows[labels == k], 0, target.frame) if (labels == k).sum() >= MIN_EVAL_N else None
        for k in range(run.classes)})


def _run_classes(table, run: Run, path: Path) -> np.ndarray:
    """The file's labels as the run's class indices (matched by value), or a one-line error naming a label the
    run never trained on."""
    names = run.class_names or [str(k) for k in range(run.classes)]
    unknown = [c for c in table.classes if c not in names]
    if unknown:
        raise ToydiffError(f"'{path}' has the label {unknown[0]!r}, which is not a class of the run "
                           f"({', '.join(names[:10])}); judge it with rows of the run's classes")
    index = np.array([names.index(c) for c in table.classes], dtype=np.int64)
    return index[table.labels]
