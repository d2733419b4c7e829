"""The `toydiff` command: thin subcommands that parse, call the library and print where things went.

Bad input of any kind ends in one line on stderr and exit code 2; see `toydiff --help`. Every check is its
owner's, so the Python API refuses the same input. This module imports only the light config (and the
engines' names) at start (torch, scikit-learn and matplotlib are imported by the subcommand that needs
them), so --help, --version and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from .core import config as config_io
from .core.errors import RunInterrupted, ToydiffError, did_you_mean, os_error
from .core.progress import message_log
from .core.version import __version__
from .jobs.engines import BACKENDS


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2 instead of argparse's usage dump
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            message += did_you_mean(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", metavar="NAME",
                   help=f"start from a shipped configuration: {', '.join(['default'] + config_io.preset_names())}")
    p.add_argument("--config", metavar="FILE", help="a TOML file of settings, applied over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set schedule.T=100 (repeatable)")
    p.add_argument("--device", help="shorthand for --set train.device=DEVICE (auto, cpu, cuda, cuda:N, mps)")
    p.add_argument("--data", metavar="FILE", help="train on your own .csv, .tsv, .npy, .npz or .parquet file "
                   "(data.path)")
    p.add_argument("--columns", metavar="A,B,...", help="the file's columns to model, names or 0-based indices "
                   "(data.columns; default: all but the label column)")
    p.add_argument("--label-column", metavar="NAME", help="the file's column of class labels, and condition the "
                   "model on them (data.label_column, model.conditional = true)")
    p.add_argument("--drop-missing", action="store_true", default=None,
                   help="drop rows with empty, NaN or infinite cells (data.drop_missing)")
    p.add_argument("--types", metavar="NAME=TYPE,...", help="the file's column types where detection guesses "
                   "wrong: continuous, integer, ordinal, binary or categorical, e.g. grade=categorical (data.types)")


def _add_out_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", help="the new run directory (default: runs/NAME-TIMESTAMP)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint, "
                   "with its own configuration")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages, only the summary")


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    """--device for the commands that load a trained run (those that train set train.device instead)."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def _train_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    _add_out_args(p)


def _run_args(p: argparse.ArgumentParser) -> None:
    _train_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation against the noise floors")


def _distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="the teacher run")
    recipe = config_io.DistillConfig()
    p.add_argument("--method", default="reflow", choices=config_io.DISTILL_METHODS,
                   help="reflow: a flow-matching student on the teacher's ODE pairs (default); progressive: "
                   "halve the teacher's DDIM steps round by round down to --steps; consistency: consistency "
                   "distillation (experimental)")
    p.add_argument("--steps", type=int, default=recipe.steps,
                   help=f"the student's sampling steps (its NFE; default {recipe.steps})")
    p.add_argument("--pairs", type=int, default=recipe.pairs, help="reflow: noise -> data pairs drawn from the "
                   f"teacher (default {recipe.pairs})")
    p.add_argument("--train-steps", type=int, help="the student's training steps, all rounds together (default: "
                   "reflow the teacher's, progressive 1500 a round)")
    p.add_argument("--critic", type=float, default=recipe.critic, metavar="WEIGHT",
                   help="progressive: a critic's loss on the student's samples beside the distillation loss, with "
                   "this weight (default 0: none; toydiff.methods.adversarial)")
    p.add_argument("--out", metavar="DIR", help="the student's run directory (default: runs/distill-TIMESTAMP)")
    _add_device_arg(p)
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation against the noise floors")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages, only the summary")


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--n", type=int, help="how many samples (default: the run's sample.n)")
    p.add_argument("--seed", type=int, help="sampling seed (default: the run's seed)")
    p.add_argument("--batch-size", type=int, help="samples denoised at once (default: the run's sample.batch_size)")
    p.add_argument("--sampler", help=f"{', '.join(config_io.SAMPLERS)} or {config_io.DIFFUSERS_PREFIX}SCHEDULER "
                   "(default: the run's sample.sampler)")
    p.add_argument("--steps", type=int, help="sampling steps on a respaced schedule (default: the run's; 0 = T)")
    p.add_argument("--spacing", help=f"{', '.join(config_io.SAMPLE_SPACINGS)} (default: the run's sample.spacing)")
    p.add_argument("--eta", type=float, help="ddim's eta in [0, 1] (default: the run's sample.eta)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="clamp x0_hat to the training data's range (default: the run's sample.clip)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the network first: faster passes after seconds of compiling, worth it "
                        "for millions of samples (default: the run's sample.compile)")
    p.add_argument("--cuda-graphs", choices=config_io.CUDA_GRAPH_MODES, help="on CUDA, replay each batch's "
                   "whole sampling loop as one CUDA graph: auto, on or off (default: the run's sample.cuda_graphs)")
    p.add_argument("--autocast", choices=config_io.AUTOCASTS, help="bf16: the network in bfloat16, for GPUs "
                   "(default: the run's sample.autocast)")
    p.add_argument("--label", help="conditional models: the class to sample, by its name (a value of the label "
                   "column) or index; -1 = all, in their training proportions (default: the run's sample.label)")
    p.add_argument("--counts", metavar="CLASS=N,...", help="conditional models: how many samples of each class, "
                   "e.g. up=300,down=200 (instead of --n and --label)")
    p.add_argument("--guidance", type=float, help="conditional models: classifier-free guidance scale; 1 = plain "
                   "conditional (default: the run's sample.guidance)")
    p.add_argument("--out", metavar="FILE", help="a .npy or .csv file (default: RUN_DIR/samples.npy and .csv)")
    p.add_argument("--trajectory", metavar="FILE", help="also write the reverse paths x_T..x_0 (scaled frame) here, .npy")
    _add_device_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress display")


def _plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    _add_device_arg(p)


def _animate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", metavar="FILE.gif", help="where to write it, a .gif or an animated .webp (default: "
                   "RUN_DIR/figures/reverse.gif, or forward.gif)")
    p.add_argument("--n", type=int, help="points that move (default: figures.ANIMATION_POINTS, 2000)")
    p.add_argument("--frames", type=int, help="frames, evenly spaced over the steps (default: figures."
                   "ANIMATION_FRAMES, 60)")
    p.add_argument("--forward", action="store_true", help="the forward process, data to noise, instead")
    _add_device_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress display")


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", metavar="FILE.html", help="where to write it (default: RUN_DIR/report.html)")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="the run whose samples are judged")
    p.add_argument("--samples", metavar="FILE", help="judge this file's rows instead (CSV, TSV, .npy, .npz, "
                   "Parquet): samples toydiff did not make, against --dataset")
    p.add_argument("--dataset", metavar="NAME", help="with --samples: the dataset they should come from (default "
                   "moons); --set data.noise=... and the other [data] and [eval] keys describe it further")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="with --samples: a [data] or [eval] setting (repeatable)")
    p.add_argument("--report", metavar="FILE.html", help="with --samples: also write the verdict, the metrics and "
                   "the samples over the data on one self-contained page")
    p.add_argument("--n", type=int, help="samples compared (default: the run's eval.n)")
    p.add_argument("--draws", type=int, help="reference pairs behind each floor (default: the run's eval.draws)")
    p.add_argument("--data", metavar="FILE", help="judge against this file's rows instead (e.g. a test split)")
    p.add_argument("--columns", metavar="A,B,...", help="the --data file's columns, in the run's order (default: "
                   "the run's column names)")
    _add_device_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress display or messages, only the table")


def _study_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--grid", dest="axes", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                   help="one grid axis (repeatable), e.g. --grid schedule.T=10,100")
    p.add_argument("--grid-file", metavar="FILE", help="a TOML grid file (see toydiff.jobs.study)")
    p.add_argument("--builtin", metavar="NAME", help="a shipped grid: guide (the guide's claims)")
    p.add_argument("--seeds", type=int, help="seeds per cell (default: the grid file's, else 3)")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes (default 1); with --backend ray and no "
                   "--address, the CPUs of the local Ray cluster")
    p.add_argument("--out", metavar="DIR", help="study directory; an existing one is resumed (default: studies/NAME)")
    p.add_argument("--backend", choices=BACKENDS, default="local",
                   help="where the cells run: local processes, or tasks on a Ray cluster (pip install 'toydiff[ray]')")
    p.add_argument("--address", metavar="ADDR", help="--backend ray: the cluster to join (auto: the one `ray start` "
                   "made here or RAY_ADDRESS; host:6379); default: start a local one")
    p.add_argument("--shared-dir", action="store_true", help="--backend ray: every node sees --out at the same path, "
                   "so tasks write their runs in place instead of sending them back")
    p.add_argument("--gpus-per-cell", type=float, metavar="F", help="--backend ray with --device cuda: the GPU share "
                   "each cell asks for (default 1; 0.25 puts four cells on a GPU)")
    p.add_argument("--retries", type=int, default=None, metavar="N", help="--backend ray: reruns of a cell whose "
                   "worker or node died (default 2)")


SUBCOMMANDS = {  # name -> (help, the function that adds its arguments), in the order --help lists them
    "run": ("the main job: train, sample, draw the figures and evaluate, in a new run directory", _run_args),
    "train": ("train a model into a new run directory", _train_args),
    "distill": ("train a few-step student of a trained run into a new run directory, and judge it", _distill_args),
    "sample": ("draw samples from a trained run", _sample_args),
    "plot": ("draw the figures of a trained run (the guide's five for 2-D data)", _plot_args),
    "animate": ("the reverse process (or the forward one) of a trained run as an animated GIF", _animate_args),
    "report": ("write the run on one self-contained HTML page (report.html in the run directory)", _report_args),
    "eval": ("judge a run's samples (or any generator's, --samples) against fresh iid data, each metric beside its "
             "noise floor", _eval_args),
    "study": ("run a grid of configurations x seeds in parallel; resumable", _study_args),
    "config": ("print the resolved configuration as TOML", _add_config_args),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and its subcommands' parsers by name."""
    parser = _Parser(prog="toydiff", description="Diffusion models on low-dimensional data.")
    parser.add_argument("--version", action="version", version=f"toydiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subs = {}
    for name, (help, add_args) in SUBCOMMANDS.items():
        subs[name] = sub.add_parser(name, help=help)
        add_args(subs[name])
    return parser, subs


def _columns(text: str | None) -> list[str] | None:
    return None if text is None else [c.strip() for c in text.split(",") if c.strip()]


def resolve_config(args: argparse.Namespace):
    cfg = config_io.preset(args.preset)
    if args.config:
        cfg = config_io.merged(cfg, config_io.read_toml(args.config))
    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
    cfg = config_io.with_overrides(cfg, overrides)
    data = {"path": args.data, "label_column": args.label_column, "drop_missing": args.drop_missing,
            "columns": _columns(args.columns), "types": _columns(args.types)}
    data = {k: v for k, v in data.items() if v is not None}
    updates = {"data": data} if data else {}
    if args.label_column:
        updates["model"] = {"conditional": True}
    return config_io.merged(cfg, updates) if updates else cfg


def cmd_train(args: argparse.Namespace, *, full: bool) -> int:
    cfg, out = None, args.resume
    if args.resume:
        given = [flag for flag, value in (("--preset", args.preset != "default"), ("--config", args.config),
                                          ("--set", args.overrides), ("--data", args.data), ("--out", args.out),
                                          ("--columns", args.columns), ("--label-column", args.label_column),
                                          ("--drop-missing", args.drop_missing), ("--types", args.types))
                 if value]
        if given:
            raise ToydiffError(f"--resume continues the run with its own configuration; drop {', '.join(given)}")
    else:
        cfg = resolve_config(args)  # checked before torch is imported: a bad setting answers at once

    from .jobs.experiment import run_experiment
    from .runs.directory import new_run_path
    from .core.runtime import init_world
    from .jobs.workflow import resume_run, train_run

    world, device = init_world(args.device or "auto")
    log = message_log(args.quiet or not world.is_writer)
    progress = not args.quiet and world.is_writer
    if cfg is not None:
        if world.size > 1:  # each process on its own device (cuda:LOCAL_RANK or the CPU), one agreed directory
            if not args.out:
                raise ToydiffError("under torchrun, name the run directory with --out (every process must agree "
                                   "on it)")
            cfg = config_io.merged(cfg, {"train": {"device": device}})
        out = Path(args.out) if args.out else new_run_path(args.preset if args.preset != "default" else None, cfg)
    if full:
        result = run_experiment(cfg, out, resume=bool(args.resume), device=device, evaluate=not args.no_eval,
                                progress=progress, log=log, world=world)
        if result is not None:
            _print_run(result.run, result)
            _report(result.run)
        return 0
    if args.resume:
        run = resume_run(out, device=device, progress=progress, log=log, world=world)
    else:
        run = train_run(cfg, out, progress=progress, log=log, world=world)
    world.close()
    if world.is_writer:
        _print_run(run)
    return 0


def _print_run(run, result=None) -> None:
    print(f"run directory: {run.path}")
    print(f"  weights:   {run.dir.weights}")
    print(f"  loss log:  {run.dir.train_log}")
    if result is None:
        return
    print(f"  samples:   {run.dir.samples} and .csv ({len(result.samples)} points, data units)")
    for path in result.figures.values():
        print(f"  figure:    {path}")
    if result.report is not None:
        _print_report(run, result.report)


def _report(run) -> None:
    """The run's report.html, its path printed as the last line."""
    from .pictures.report import write_report

    print(f"report: {write_report(run.path)}")


def _print_report(run, report: dict) -> None:
    from .evaluation.scores import format_likelihoods, format_table

    print(f"  metrics:   {run.dir.metrics}")
    print(format_table(report))
    if "likelihood" in report:
        print(format_likelihoods(report["likelihood"]))


def cmd_distill(args: argparse.Namespace) -> int:
    from .jobs.distill import distill_run
    from .runs.directory import new_run_path
    from .jobs.experiment import finish

    log = message_log(args.quiet)
    out = Path(args.out) if args.out else new_run_path("distill", config_io.ExperimentConfig())
    run = distill_run(args.run_dir, out, method=args.method, steps=args.steps, pairs=args.pairs,
                      train_steps=args.train_steps, critic=args.critic, device=args.device,
                      progress=not args.quiet, log=log)
    result = finish(run, evaluate=not args.no_eval, progress=not args.quiet, log=log)
    _print_run(run, result)
    _report(run)
    return 0


def _output(path: Optional[str], flag: str, suffixes: tuple[str, ...]) -> Optional[Path]:
    """A file a command is told to write, checked before any work: its suffix, and a folder that exists."""
    if not path:
        return None
    out = Path(path)
    if out.suffix not in suffixes:
        raise ToydiffError(f"{flag} must end in {' or '.join(suffixes)}, got '{out}'")
    if not out.parent.is_dir():
        raise ToydiffError(f"the folder of {flag} '{out}' does not exist")
    return out


def cmd_sample(args: argparse.Namespace) -> int:
    from .runs.run import Run

    out = _output(args.out, "--out", (".npy", ".csv"))
    trajectory = _output(args.trajectory, "--trajectory", (".npy",))
    run = Run.load(args.run_dir, device=args.device)
    if trajectory is not None and trajectory.resolve() in (
            (out or run.dir.samples).resolve(), run.dir.samples.resolve()):
        raise ToydiffError(f"--trajectory '{trajectory}' would overwrite the samples; give it another file name")
    with run.dir.writing() if out is None else contextlib.nullcontext():
        return _sample(run, args, out, trajectory)


def _sample(run, args: argparse.Namespace, out: Optional[Path], trajectory: Optional[Path]) -> int:
    from .core.files import npy_writer

    counts = _class_counts(run, args)
    n = sum(counts.values()) if counts else run.config.sample.n if args.n is None else args.n
    run.check_count(n)
    options = dict(seed=args.seed, batch_size=args.batch_size, sampler=args.sampler, steps=args.steps,
                   spacing=args.spacing, eta=args.eta, clip=args.clip, guidance=args.guidance,
                   compile=args.compile, cuda_graphs=args.cuda_graphs, autocast=args.autocast,
                   progress=not args.quiet)
    if counts:  # one draw per class, each with its own seed, stacked in the order given
        import numpy as np

        from .runs.run import Drawn
        seed = run.config.seed if args.seed is None else args.seed
        parts = [run.draw(count, label=k, **{**options, "seed": seed + i}) for i, (k, count) in
                 enumerate(counts.items())]
        drawn = Drawn(np.concatenate([p.samples for p in parts]), parts[0].record,
                      labels=np.concatenate([p.labels for p in parts]))
        return _write_drawn(run, drawn, out, None)
    options["label"] = None if args.label is None else run.class_index(args.label)
    if out is not None and out.suffix == ".npy" and trajectory is None:  # streamed: memory is one batch's
        with npy_writer(out, (n, run.dim)) as into:  # a text column's level indices (samples.csv: its text)
            run.sample(n, into=into, **options)
        print(f"wrote {n} samples to {out} (data units)")
        return 0
    return _write_drawn(run, run.draw(n, trajectory=trajectory is not None, **options), out, trajectory)


def _class_counts(run, args: argparse.Namespace) -> dict[int, int]:
    """--counts as {class index: count}, or {} without it."""
    if args.counts is None:
        return {}
    if args.label is not None or args.n is not None or args.trajectory:
        raise ToydiffError("--counts gives each class's number of samples; drop --label, --n and --trajectory")
    counts: dict[int, int] = {}
    for item in _columns(args.counts) or []:
        name, _, count = item.rpartition("=")
        if not name or not count.strip().isdigit() or int(count) < 1:
            raise ToydiffError(f"--counts entry '{item}' must read CLASS=N with N >= 1, e.g. up=300")
        k = run.class_index(name.strip())
        if k < 0 or k in counts:
            raise ToydiffError(f"--counts names class '{name.strip()}' {'twice' if k in counts else 'as -1'}; "
                               "give each class once")
        counts[k] = int(count)
    if not counts:
        raise ToydiffError("--counts is empty; give CLASS=N entries, e.g. up=300,down=200")
    return counts


def _write_drawn(run, drawn, out: Optional[Path], trajectory: Optional[Path]) -> int:
    from .core.files import atomic_write_text
    from .core.formats import save_npy

    samples = drawn.samples
    if out is None:
        npy, csv = run.dir.write_samples(samples, run.table_text(samples, drawn.labels), drawn.record)
        print(f"wrote {len(samples)} samples to {npy} and {csv} (data units)")
    elif out.suffix == ".csv":
        atomic_write_text(out, run.table_text(samples, drawn.labels))
        print(f"wrote {len(samples)} samples to {out} (data units)")
    else:
        save_npy(out, samples.astype("float32"))
        print(f"wrote {len(samples)} samples to {out} (data units)")
    if trajectory is not None:
        save_npy(trajectory, drawn.trajectory)
        print(f"wrote the reverse paths (steps, n, D) to {trajectory} (scaled frame)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .pictures.figures import write_figures
    from .runs.run import Run

    run = Run.load(args.run_dir, device=args.device)
    with run.dir.writing():
        samples = run.dir.read_samples()
        if samples is None:
            samples = run.sample(run.config.sample.n)
        if samples.ndim != 2 or samples.shape[1] != run.dim:
            raise ToydiffError(f"'{run.dir.samples}' has shape {samples.shape}; the run's data has {run.dim} columns")
        for path in write_figures(run, samples).values():
            print(f"figure: {path}")
    return 0


def cmd_animate(args: argparse.Namespace) -> int:
    from .pictures.figures import (ANIMATION_FORMATS, ANIMATION_FRAMES, ANIMATION_POINTS, check_animation,
                                   forward_frames, reverse_frames, write_animation)
    from .runs.run import Run

    out = _output(args.out, "--out", ANIMATION_FORMATS)
    n, count = ANIMATION_POINTS if args.n is None else args.n, ANIMATION_FRAMES if args.frames is None else args.frames
    check_animation(n, count)  # before the run is loaded

    run = Run.load(args.run_dir, device=args.device)
    with run.dir.writing() if out is None else contextlib.nullcontext():
        frames = forward_frames(run, n, count) if args.forward else reverse_frames(run, n, count,
                                                                                   progress=not args.quiet)
        path = write_animation(run, frames, out or run.dir.animation("forward" if args.forward else "reverse"))
    print(f"animation: {path} ({len(frames)} frames)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    out = _output(args.out, "--out", (".html",))
    from .pictures.report import write_report
    from .runs.directory import RunDir

    rd = RunDir(args.run_dir)
    rd.read_manifest()  # a missing or foreign directory says so
    if rd.read_samples() is None:
        raise ToydiffError(f"'{args.run_dir}' has no samples to report on; draw them with `toydiff sample "
                           f"{args.run_dir}` (and judge them with `toydiff eval {args.run_dir}`)")
    print(f"report: {write_report(args.run_dir, out)}")
    return 0


def _eval_samples(args: argparse.Namespace) -> int:
    """`toydiff eval --samples FILE --dataset NAME`: any generator's samples against a dataset's floors."""
    if args.run_dir or args.data or args.columns:
        raise ToydiffError("--samples judges a file against --dataset; drop RUN_DIR, --data and --columns")
    from .api import evaluate_samples
    from .evaluation.scores import format_table

    page = _output(args.report, "--report", (".html",))
    report = evaluate_samples(args.samples, args.dataset or "moons", n=args.n, draws=args.draws,
                              settings=args.overrides, report=page, quiet=args.quiet)
    print(f"samples: {args.samples} against {args.dataset or 'moons'}")
    print(format_table(report))
    if page is not None:
        print(f"report: {page}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.samples:
        return _eval_samples(args)
    if args.dataset or args.overrides:
        raise ToydiffError("--dataset and --set go with --samples; a run is judged against its own data")
    if not args.run_dir:
        raise ToydiffError("name the run to judge (toydiff eval RUN_DIR), or a file of samples (--samples FILE "
                           "--dataset NAME)")
    from .api import evaluate
    from .runs.run import Run

    run = Run.load(args.run_dir, device=args.device)
    report = evaluate(run, n=args.n, draws=args.draws, data=args.data, columns=_columns(args.columns) or (),
                      quiet=args.quiet)
    _print_report(run, report)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    import dataclasses

    from .jobs import study

    if sum(bool(x) for x in (args.axes, args.grid_file, args.builtin)) != 1:
        raise ToydiffError("give the grid one way: --grid (repeatable), --grid-file FILE or --builtin NAME")
    if args.axes:
        axes = study.parse_axes(dict(study.parse_cli_axis(a) for a in args.axes))
        grid = study.build_grid(resolve_config(args), axes, 3 if args.seeds is None else args.seeds, [])
        name = "grid"
    else:
        path = study.builtin_grid_path(args.builtin) if args.builtin else Path(args.grid_file)
        explicit = args.preset != "default" or args.config or args.overrides or args.device
        grid = study.load_grid_file(path, resolve_config(args) if explicit else None)
        if args.seeds is not None:
            grid = dataclasses.replace(grid, seeds=args.seeds)
        name = args.builtin or path.stem
    out = Path(args.out) if args.out else Path("studies") / name
    study.run_study(grid, out, jobs=args.jobs, log=message_log(False), progress=True, backend=args.backend,
                    address=args.address, shared_dir=args.shared_dir, gpus_per_cell=args.gpus_per_cell,
                    retries=args.retries)
    files = study.StudyFiles.of(out)
    print(f"study directory: {out}")
    print(f"  results:   {files.results}")
    print(f"  summary:   {files.summary}")
    print(f"  figure:    {files.figure}")
    print(files.summary.read_text(encoding="utf-8"), end="")
    print(f"report: {files.page}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from . import methods

    cfg = resolve_config(args)
    methods.check(cfg)  # what its method refuses, before it is printed as a config to use
    print(cfg.to_toml(), end="")
    return 0


COMMANDS = {"animate": cmd_animate, "report": cmd_report, "distill": cmd_distill, "sample": cmd_sample,
            "plot": cmd_plot, "eval": cmd_eval, "study": cmd_study, "config": cmd_config}


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed arguments; an unknown flag is named with its subcommand's nearest flag and --help."""
    parser, subs = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        sub = subs[args.command]
        flags = [s for a in sub._actions for s in a.option_strings]
        flag = next((e for e in extras if e.startswith("-")), extras[0])
        hint = did_you_mean(flag.split("=")[0], flags) if flag.startswith("-") else ""
        raise _UsageError(f"unrecognized argument '{flag}'{hint} (see `{sub.prog} --help`)")
    return args


class _Stopped(KeyboardInterrupt):
    """SIGTERM (a cluster stopping the job) or SIGHUP (the session went away) outside training's own handling:
    treated like Ctrl-C, with the shell's exit code for the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    raise _Stopped(signum)


def main(argv: Sequence[str] | None = None) -> int:
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _main(argv)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = parse(argv)
        if args.command in ("run", "train"):
            return cmd_train(args, full=args.command == "run")
        return COMMANDS[args.command](args)
    except (ToydiffError, _UsageError) as e:
        print(f"toydiff: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the OS said no where no owner expected it (a full disk, a read-only folder): one line
        print(f"toydiff: error: {os_error(e)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("toydiff: error: out of memory; lower sample.n, sample.batch_size, eval.n or the data's size",
              file=sys.stderr)
        return 2
    except RunInterrupted as e:
        print(f"toydiff: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"toydiff: {how}; files are written whole or not at all (a study resumes with the same command, "
              "a run with --resume)", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
