"""The `toydiff` command: thin subcommands that parse, call the public API and write files.

Bad input of any kind ends in one line on stderr and exit code 2; see `toydiff --help`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from . import config as config_io
from .checkpoint import save_csv, save_npy
from .config import ExperimentConfig
from .errors import RunInterrupted, ToydiffError
from .samplers import SAMPLERS
from .schedules import SPACINGS


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2 instead of argparse's usage dump
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


def _add_out_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", help="the new run directory (default: runs/NAME-TIMESTAMP)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint, "
                   "with its own configuration")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages, only the summary")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="toydiff", description="Diffusion models on low-dimensional data.")
    parser.add_argument("--version", action="version", version=f"toydiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="the main job: train, sample, draw the figures and evaluate, in a new run directory")
    _add_config_args(p)
    _add_out_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation against the noise floors")
    p = sub.add_parser("train", help="train a model into a new run directory")
    _add_config_args(p)
    _add_out_args(p)

    p = sub.add_parser("sample", help="draw samples from a trained run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--n", type=int, help="how many samples (default: the run's sample.n)")
    p.add_argument("--seed", type=int, help="sampling seed (default: the run's seed)")
    p.add_argument("--batch-size", type=int, help="samples denoised at once (default: the run's sample.batch_size)")
    p.add_argument("--sampler", help=f"{', '.join(SAMPLERS.names())} or diffusers:SCHEDULER "
                   "(default: the run's sample.sampler)")
    p.add_argument("--steps", type=int, help="sampling steps on a respaced schedule (default: the run's; 0 = T)")
    p.add_argument("--spacing", help=f"auto, {', '.join(SPACINGS)} (default: the run's sample.spacing)")
    p.add_argument("--eta", type=float, help="ddim's eta in [0, 1] (default: the run's sample.eta)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="clamp x0_hat to the training data's range (default: the run's sample.clip)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the network first: faster passes after seconds of compiling, worth it "
                        "for millions of samples (default: the run's sample.compile)")
    p.add_argument("--label", type=int, help="conditional models: the class to sample; -1 = all, in their "
                   "training proportions (default: the run's sample.label)")
    p.add_argument("--guidance", type=float, help="conditional models: classifier-free guidance scale; 1 = plain "
                   "conditional (default: the run's sample.guidance)")
    p.add_argument("--out", metavar="FILE", help="a .npy or .csv file (default: RUN_DIR/samples.npy and .csv)")
    p.add_argument("--trajectory", metavar="FILE", help="also write the reverse paths x_T..x_0 (scaled frame) here, .npy")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")

    p = sub.add_parser("plot", help="draw the figures of a trained run (the guide's five for 2-D data)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")

    p = sub.add_parser("eval", help="judge a run's samples against fresh iid data, each metric beside its noise floor")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--n", type=int, help="samples compared (default: the run's eval.n)")
    p.add_argument("--draws", type=int, help="reference pairs behind each floor (default: the run's eval.draws)")
    p.add_argument("--data", metavar="FILE", help="judge against this file's rows instead (e.g. a test split)")
    p.add_argument("--columns", metavar="A,B,...", help="the --data file's columns, in the run's order (default: "
                   "the run's column names)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")

    p = sub.add_parser("study", help="run a grid of configurations x seeds in parallel; resumable")
    _add_config_args(p)
    p.add_argument("--grid", dest="axes", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                   help="one grid axis (repeatable), e.g. --grid schedule.T=10,100")
    p.add_argument("--grid-file", metavar="FILE", help="a TOML grid file (see toydiff.study)")
    p.add_argument("--builtin", metavar="NAME", help="a shipped grid: guide (the guide's claims)")
    p.add_argument("--seeds", type=int, help="seeds per cell (default: the grid file's, else 3)")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--out", metavar="DIR", help="study directory; an existing one is resumed (default: studies/NAME)")

    p = sub.add_parser("config", help="print the resolved configuration as TOML")
    _add_config_args(p)
    return parser


def resolve_config(args: argparse.Namespace) -> ExperimentConfig:
    cfg = config_io.preset(args.preset)
    if args.config:
        cfg = config_io.merged(cfg, config_io.read_toml(args.config))
    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
    cfg = config_io.with_overrides(cfg, overrides)
    data = {"path": args.data, "label_column": args.label_column, "drop_missing": args.drop_missing,
            "columns": None if args.columns is None else [c.strip() for c in args.columns.split(",") if c.strip()]}
    data = {k: v for k, v in data.items() if v is not None}
    updates = {"data": data} if data else {}
    if args.label_column:
        updates["model"] = {"conditional": True}
    return config_io.merged(cfg, updates) if updates else cfg


def _default_out(args: argparse.Namespace, cfg: ExperimentConfig) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = args.preset if args.preset != "default" else (Path(cfg.data.path).stem if cfg.data.path else cfg.data.name)
    out = Path("runs") / f"{name}-{stamp}"
    k = 1
    while out.exists():
        k += 1
        out = Path("runs") / f"{name}-{stamp}-{k}"
    return out


def _log(quiet: bool):
    """Progress messages to stderr; --quiet silences all but warnings."""
    def log(message: str) -> None:
        if not quiet or message.startswith("warning:"):
            print(message, file=sys.stderr, flush=True)
    return log


def cmd_train(args: argparse.Namespace, *, full: bool) -> int:
    from .figures import write_figures
    from .runs import sampling_steps, save_samples
    from .workflow import resume_run, train_run

    from .runtime import init_world

    world, device = init_world(args.device or "auto")
    log = _log(args.quiet or not world.is_writer)
    progress = not args.quiet and world.is_writer and sys.stderr.isatty()
    if world.size > 1 and not args.resume:  # each process on its own device (cuda:LOCAL_RANK or the CPU)
        args.overrides = list(args.overrides) + [f"train.device={device}"]
        args.device = None
    if args.resume:
        given = [flag for flag, value in (("--preset", args.preset != "default"), ("--config", args.config),
                                          ("--set", args.overrides), ("--data", args.data), ("--out", args.out),
                                          ("--columns", args.columns), ("--label-column", args.label_column),
                                          ("--drop-missing", args.drop_missing)) if value]
        if given:
            raise ToydiffError(f"--resume continues the run with its own configuration; drop {', '.join(given)}")
        run = resume_run(args.resume, device=device, progress=progress, log=log, world=world)
    else:
        cfg = resolve_config(args)
        out = Path(args.out) if args.out else _default_out(args, cfg)
        if world.size > 1 and not args.out:
            raise ToydiffError("under torchrun, name the run directory with --out (every process must agree on it)")
        run = train_run(cfg, out, progress=progress, log=log, world=world)
    world.close()  # training is the only collective work; rank 0 goes on alone
    if not world.is_writer:
        return 0
    cfg = run.config
    print(f"run directory: {run.path}")
    print(f"  weights:   {run.path / 'model.safetensors'}")
    print(f"  loss log:  {run.path / 'train_log.csv'}")
    if not full:
        return 0
    steps = sampling_steps(cfg.sample.steps, run.schedule.T)
    log(f"sampling {cfg.sample.n} points with {cfg.sample.sampler} ({steps} of T = {run.schedule.T} steps)")
    samples = run.sample(cfg.sample.n)
    save_samples(run.path / "samples", samples, run.names)
    print(f"  samples:   {run.path / 'samples.npy'} and .csv ({len(samples)} points, data units)")
    log("drawing figures")
    for name, path in write_figures(run, samples).items():
        print(f"  figure:    {path}")
    if not args.no_eval:
        _evaluate(run, samples, log)
    return 0


def _evaluate(run, samples, log, spec=None, target=None) -> None:
    from .evaluation import evaluate_run, format_likelihoods, format_table

    rep = evaluate_run(run, samples, log=log, spec=spec, target=target)
    print(f"  metrics:   {run.path / 'metrics.json'}")
    print(format_table(rep))
    if "likelihood" in rep:
        print(format_likelihoods(rep["likelihood"]))


def cmd_sample(args: argparse.Namespace) -> int:
    from .runs import Run, save_samples

    run = Run.load(args.run_dir, device=args.device)
    out = Path(args.out) if args.out else run.path / "samples.npy"
    if out.suffix not in (".npy", ".csv"):
        raise ToydiffError(f"--out must end in .npy or .csv, got '{out}'")
    if args.trajectory and not args.trajectory.endswith(".npy"):
        raise ToydiffError(f"--trajectory must end in .npy, got '{args.trajectory}'")
    if not out.parent.is_dir():
        raise ToydiffError(f"the folder of --out '{out}' does not exist")
    n = run.config.sample.n if args.n is None else args.n
    result = run.sample(n, seed=args.seed, batch_size=args.batch_size, sampler=args.sampler, steps=args.steps,
                        spacing=args.spacing, eta=args.eta, clip=args.clip, label=args.label,
                        guidance=args.guidance, trajectory=bool(args.trajectory), compile=args.compile)
    samples = result[0] if args.trajectory else result
    if args.out is None:
        save_samples(out, samples, run.names)
        print(f"wrote {len(samples)} samples to {out} and {out.with_suffix('.csv')} (data units)")
    else:
        (save_npy(out, samples.astype("float32")) if out.suffix == ".npy"
         else save_csv(out, samples, run.names))
        print(f"wrote {len(samples)} samples to {out} (data units)")
    if args.trajectory:
        save_npy(Path(args.trajectory), result[1])
        print(f"wrote the reverse paths (steps, n, D) to {args.trajectory} (scaled frame)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .checkpoint import load_npy
    from .figures import write_figures
    from .runs import Run

    run = Run.load(args.run_dir, device=args.device)
    sample_file = run.path / "samples.npy"
    samples = load_npy(sample_file) if sample_file.exists() else run.sample(run.config.sample.n)
    if samples.ndim != 2 or samples.shape[1] != run.dim:
        raise ToydiffError(f"'{sample_file}' has shape {samples.shape}; the run's data has {run.dim} columns")
    for path in write_figures(run, samples).values():
        print(f"figure: {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from .checkpoint import load_npy
    from .runs import Run

    run = Run.load(args.run_dir, device=args.device)
    spec = run.config.eval
    try:
        spec = dataclasses.replace(spec, **{k: v for k, v in (("n", args.n), ("draws", args.draws)) if v is not None})
    except ToydiffError as e:
        raise ToydiffError(f"{e} (from --n / --draws)") from None
    sample_file = run.path / "samples.npy"
    samples = load_npy(sample_file) if sample_file.exists() else None
    if samples is None or len(samples) < spec.n:
        samples = run.sample(spec.n)  # the stored ones are too few: draw afresh
    _evaluate(run, samples, _log(False), spec, _file_reference(run, args) if args.data else None)
    return 0


def _file_reference(run, args: argparse.Namespace):
    """A --data file's rows as the reference, checked against the run's columns."""
    from .datafiles import column_names, read_table
    from .evaluation import file_target

    path = Path(args.data)
    if args.columns:
        columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    else:
        columns = run.names if run.names and set(run.names) <= set(column_names(path)) else []
    table = read_table(path, columns)
    if table.x.shape[1] != run.dim:
        raise ToydiffError(f"the run models {run.dim} columns ({', '.join(run.names or [])}) but '{path}' gives "
                           f"{table.x.shape[1]} ({', '.join(table.names)}); choose them with --columns")
    return file_target(table.x)


def cmd_study(args: argparse.Namespace) -> int:
    import dataclasses

    from . import study

    if args.jobs < 1:
        raise ToydiffError(f"--jobs must be >= 1, got {args.jobs}")
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
            study.build_grid(grid.base, [("x", [("x", ())])], grid.seeds, [])  # the same check as a file's seeds
        name = args.builtin or path.stem
    out = Path(args.out) if args.out else Path("studies") / name
    study.run_study(grid, out, jobs=args.jobs, log=_log(False))
    print(f"study directory: {out}")
    print(f"  results:   {out / 'results.csv'}")
    print(f"  summary:   {out / 'summary.md'}")
    print(f"  figure:    {out / 'study.png'}")
    print((out / "summary.md").read_text(encoding="utf-8"), end="")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(resolve_config(args).to_toml(), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command in ("run", "train"):
            return cmd_train(args, full=args.command == "run")
        return {"sample": cmd_sample, "plot": cmd_plot, "eval": cmd_eval, "study": cmd_study,
                "config": cmd_config}[args.command](args)
    except (ToydiffError, _UsageError) as e:
        print(f"toydiff: error: {e}", file=sys.stderr)
        return 2
    except RunInterrupted as e:
        print(f"toydiff: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("toydiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
