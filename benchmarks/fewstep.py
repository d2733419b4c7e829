"""Few-step generation (issue #14): sample quality at 1, 2, 4, 8 and 16 network evaluations (NFE) for each
generative process toydiff has, beside each process's exact-denoiser ceiling, on Two Moons.

  ceiling   the exact denoiser of the noisy moons (oracle.moons_mixture) on the process's own grid (the VP
            cosine schedule, or the flow path's): the solver's error alone, no learning error
  trained   the default recipe (6000 steps) with schedule.process = ddpm and = flow, 3 training seeds
  reflow    `toydiff distill` of each flow run (20,000 pairs from its ODE, 6000 steps), sampled the same way
  progressive  `toydiff distill --method progressive --steps 1` of each ddpm run: rounds from 512 DDIM steps
            down to 1, 1500 training steps each; the student after each round is judged at its own step
            count with DDIM (its sampler), so one distillation gives the 16, 8, 4, 2 and 1 NFE rows
  consistency-training  the default recipe with train.objective = consistency (no teacher), sampled by
            multistep consistency sampling
  meanflow  the default recipe with schedule.process = flow and train.objective = meanflow (no teacher), sampled
            with MeanFlow's own sampler
  fast      `toydiff run --preset fast`: its teacher and its progressive student, judged at the student's own
            NFE; its seconds are the whole command's training and distillation

Samplers: euler and dpmpp-2m (one evaluation a step, so NFE = steps) on the uniform (trailing) and Karras grids.
Every row is judged by `evaluate` at n = 5000 against fresh iid moons, all metrics beside their floors; the
table gives, per process and NFE, the sampler and grid with the lowest mean k-NN AUC over the seeds (a
measurement, not a default), its AUC (mean and spread over seeds), how many seeds were called indistinguishable,
the share of samples off the moons (mean, and the worst z against its floor), and the ceiling's best AUC. Every
trained model is the default's, which since issue #29 draws each sample's piece (model.components auto: the two
moons) and its students take the pieces over. Training seconds per run are reported. With --models, only those
models are rerun and the other rows are kept from the existing results file (its meta says which models were run
when).

    .venv/bin/python benchmarks/fewstep.py            # about 41 minutes on 2 idle CPU cores; the plot too
    .venv/bin/python benchmarks/fewstep.py --out docs/results --plot-only   # redraw docs/figures/fewstep.png
    .venv/bin/python benchmarks/fewstep.py --models progressive   # the progressive rows only
    .venv/bin/python benchmarks/fewstep.py --quick    # a smoke run, about two minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from report import machine, publish
from toydiff.core import config as C
from toydiff import train_run
from toydiff.jobs.experiment import run_experiment
from toydiff.core.config import EvalConfig
from toydiff.data.datasets import params
from toydiff.jobs.distill import distill_run
from toydiff.evaluation.judge import evaluate
from toydiff.diffusion.oracle import moons_mixture
from toydiff.evaluation.reference import target_for
from toydiff.core.runtime import NoiseStream
from toydiff.diffusion.samplers import SAMPLERS

PROCESSES = ("ddpm", "flow")
ROWS = ("ddpm", "flow", "reflow", "progressive", "consistency-training", "meanflow", "fast")  # the two processes,
#                                                 their students, the two from-scratch few-step models, the fast preset
SAMPLERS_TRIED = ("euler", "dpmpp-2m")
PROGRESSIVE_SAMPLER = ("ddim", "trailing")  # what a progressive student was distilled for
OWN_SAMPLER = {"progressive": PROGRESSIVE_SAMPLER, "fast": PROGRESSIVE_SAMPLER,
               "consistency-training": ("consistency", "trailing"), "meanflow": ("meanflow", "trailing")}  # rows judged with their own sampler only
SPACINGS_TRIED = ("trailing", "karras")


def judge(x: np.ndarray, target, spec: EvalConfig) -> dict:
    rep = evaluate(x, target, spec)
    z = {k: r["z"] for k, r in rep["metrics"].items() if r["z"] is not None}
    return {"verdict": rep["verdict"].split(" ")[0], "knn_auc": rep["metrics"]["knn_auc"]["value"],
            "mmd2_z": z.get("mmd2"), "off_data": rep["metrics"]["off_data"]["value"], "max_z": max(z.values()),
            "worst": max(z, key=z.get), "z": z}  # every metric's z against its floor


def ceiling_rows(run, nfes, target, spec) -> list[dict]:
    """The exact moons denoiser, in `run`'s frame, driven on `run`'s grid by every sampler and grid tried."""
    oracle = moons_mixture(params(run.config.data).noise).scaled(run.scaler.shift, run.scaler.scale)
    x_T = NoiseStream(0, 0, spec.n, torch.device("cpu")).randn((spec.n, run.dim)).double()
    rows = []
    for nfe in nfes:
        for sampler in SAMPLERS_TRIED:
            for spacing in SPACINGS_TRIED:
                grid = run.schedule.respace(nfe, spacing)
                exact = oracle.denoiser(run.schedule)
                x0 = SAMPLERS.get(sampler)(lambda x, i: exact(x, grid.model_t(i)), grid, x_T.clone())
                rows.append({"process": run.config.schedule.process, "model": "ceiling", "seed": None,
                             "sampler": sampler, "spacing": spacing, "nfe": nfe,
                             **judge(run.scaler.inverse(x0.numpy()), target, spec)})
    return rows


def progressive_rows(run, seed, nfes, target, spec, train_seconds, tmp, quick) -> list[dict]:
    """`toydiff distill --method progressive --steps 1` of `run`; each round's student judged at its own NFE."""
    rows, judging = [], [0.0]

    def judge_round(steps, model):
        if steps in nfes:
            begin = time.perf_counter()
            student = dataclasses.replace(run, model=model)
            x = student.sample(spec.n, sampler=PROGRESSIVE_SAMPLER[0], steps=steps, spacing=PROGRESSIVE_SAMPLER[1])
            rows.append({"process": "progressive", "model": "trained", "seed": seed, "sampler": PROGRESSIVE_SAMPLER[0],
                         "spacing": PROGRESSIVE_SAMPLER[1], "nfe": steps, **judge(x, target, spec)})
            print(rows[-1], flush=True)
            judging[0] += time.perf_counter() - begin
    start = time.perf_counter()
    student = distill_run(run.path, Path(tmp) / f"progressive-{seed}", method="progressive", steps=1,
                          train_steps=9 * (100 if quick else 1500), on_round=judge_round)
    seconds = time.perf_counter() - start - judging[0]  # the distillation alone, not the judging between rounds
    judge_round(1, student.model)
    train_seconds.setdefault("progressive", []).append(round(seconds, 1))
    return rows


def own_sampler_rows(name, seeds, nfes, target, spec, train_seconds, tmp, quick) -> list[dict]:
    """Consistency training or MeanFlow (judged at every NFE) or the fast preset (at its student's NFE), one run a
    seed."""
    rows = []
    sampler, spacing = OWN_SAMPLER[name]
    for seed in seeds:
        if name == "fast":
            cfg = C.merged(C.preset("fast"), {"seed": seed})
            if quick:
                cfg = C.merged(cfg, {"train": {"steps": 300}, "distill": {"train_steps": 700}})
        else:
            cfg = C.ExperimentConfig(seed=seed, schedule={"process": "flow" if name == "meanflow" else "ddpm"},
                                     train={"objective": name.split("-")[0], "steps": 300 if quick else 6000},
                                     sample={"sampler": sampler, "spacing": spacing})
        start = time.perf_counter()
        run = run_experiment(cfg, Path(tmp) / f"{name}-{seed}", figures=False, evaluate=False).run
        train_seconds.setdefault(name, []).append(round(time.perf_counter() - start, 1))
        for nfe in [cfg.distill.steps] if name == "fast" else nfes:
            drawn = run.draw(spec.n, sampler=sampler, steps=nfe, spacing=spacing)
            x = drawn.samples
            assert drawn.record["nfe"] == nfe, drawn.record
            rows.append({"process": name, "model": "trained", "seed": seed, "sampler": sampler, "spacing": spacing,
                         "nfe": nfe, **judge(x, target, spec)})
            print(rows[-1], flush=True)
    return rows


def plot(results: dict, path: Path) -> None:
    """docs/figures/fewstep.png: k-NN AUC and the off-moon share against NFE (mean over seeds, each row's best
    sampler), every method beside the two ceilings."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    auc_ax, off_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for process in ROWS:
        mine = sorted((s for s in results["summary"] if s["process"] == process), key=lambda s: s["nfe"])
        if not mine:
            continue
        nfe = [s["nfe"] for s in mine]
        style = dict(marker="o", lw=2, ms=5, label=process)
        auc_ax.plot(nfe, [s["knn_auc_mean"] for s in mine], **style)
        off = [np.mean([r["off_data"] for r in results["rows"] if (r["process"], r["nfe"], r["sampler"], r["spacing"],
                                                                     r["model"]) == (process, s["nfe"], s["sampler"],
                                                                                     s["spacing"], "trained")])
               for s in mine]
        off_ax.plot(nfe, 100 * np.array(off), **style)
        if mine[0]["ceiling_auc"] is not None:
            auc_ax.plot(nfe, [s["ceiling_auc"] for s in mine], ls=":", color="grey", lw=1.5)
    auc_ax.axhline(0.5, color="black", lw=1)
    auc_ax.set(xscale="log", xlabel="network evaluations per sample", ylabel="k-NN AUC (floor 0.50)",
               title="sample quality (dotted: the exact denoiser's ceilings)")
    off_ax.set(xscale="log", yscale="log", xlabel="network evaluations per sample", ylabel="% of samples off the moons",
               title="the bridge between the moons")
    for ax in (auc_ax, off_ax):
        ax.set_xticks([1, 2, 4, 8, 16], labels=["1", "2", "4", "8", "16"])
    auc_ax.legend(fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 300 steps, n = 500")
    parser.add_argument("--models", default=",".join(ROWS), help="comma-separated, of: " + ", ".join(ROWS))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--figure", default="docs/figures/fewstep.png", help="where the plot goes")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from OUT/fewstep.json, run nothing")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((Path(args.out) / "fewstep.json").read_text()), Path(args.figure))
        return
    torch.set_num_threads(1)
    chosen = args.models.split(",")
    seeds, nfes = ((0,), (1, 4)) if args.quick else ((0, 1, 2), (1, 2, 4, 8, 16))
    spec = EvalConfig(n=500 if args.quick else 5000, nll_n=0)
    target = target_for(C.ExperimentConfig())
    rows, train_seconds, runs_at = [], {}, {}
    previous = Path(args.out) / "fewstep.json"
    if set(chosen) != set(ROWS) and previous.exists():
        kept = json.loads(previous.read_text())
        rows = [r for r in kept["rows"] if r["process"] not in chosen]
        train_seconds = {k: v for k, v in kept["train_seconds"].items() if k not in chosen}
        runs_at = {k: v for k, v in kept["meta"].get("run_at", {}).items() if k not in chosen}
    today = datetime.date.today().isoformat()
    with tempfile.TemporaryDirectory() as tmp:
        for process in PROCESSES:
            students = {"flow": "reflow", "ddpm": "progressive"}[process]
            if process not in chosen and students not in chosen:
                continue
            for seed in seeds:
                cfg = C.ExperimentConfig(seed=seed, schedule={"process": process},
                                         train={"steps": 300} if args.quick else {})
                start = time.perf_counter()
                run = train_run(cfg, Path(tmp) / f"{process}-{seed}")
                if process in chosen:  # a teacher trained only for its students keeps the earlier rows' time
                    train_seconds.setdefault(process, []).append(round(time.perf_counter() - start, 1))
                models = [(process, run)] if process in chosen else []
                if seed == seeds[0] and process in chosen:
                    rows += ceiling_rows(run, nfes, target, spec)
                if students == "reflow" and "reflow" in chosen:
                    start = time.perf_counter()
                    student = distill_run(run.path, Path(tmp) / f"reflow-{seed}", pairs=2000 if args.quick else 20_000)
                    train_seconds.setdefault("reflow", []).append(round(time.perf_counter() - start, 1))
                    models.append(("reflow", student))
                if students == "progressive" and "progressive" in chosen:
                    rows += progressive_rows(run, seed, nfes, target, spec, train_seconds, tmp, args.quick)
                for name, model in models:
                    for nfe in nfes:
                        for sampler in SAMPLERS_TRIED:
                            for spacing in SPACINGS_TRIED:
                                drawn = model.draw(spec.n, sampler=sampler, steps=nfe, spacing=spacing)
                                x = drawn.samples
                                assert drawn.record["nfe"] == nfe, drawn.record
                                rows.append({"process": name, "model": "trained", "seed": seed, "sampler": sampler,
                                             "spacing": spacing, "nfe": nfe, **judge(x, target, spec)})
                        print(rows[-1], flush=True)
        for name in ("consistency-training", "meanflow", "fast"):
            if name in chosen:
                rows += own_sampler_rows(name, seeds, nfes, target, spec, train_seconds, tmp, args.quick)
    runs_at.update({m: today for m in chosen})
    lines = ["| process | NFE | best sampler (grid) | k-NN AUC, trained (mean +- sd, seeds) | indistinguishable "
             "| worst metric (z) | off-support share, mean (worst z against its floor) "
             "| ceiling: exact denoiser's best AUC |", "|---|---|---|---|---|---|---|---|"]
    summary = []
    for process in ROWS:
        for nfe in nfes:
            def of(model, sampler, spacing):
                return [r for r in rows if (r["process"], r["model"], r["nfe"], r["sampler"], r["spacing"])
                        == (process, model, nfe, sampler, spacing)]
            combos = [OWN_SAMPLER[process]] if process in OWN_SAMPLER else \
                [(s, g) for s in SAMPLERS_TRIED for g in SPACINGS_TRIED]
            if not of("trained", *combos[0]):
                continue
            best = min(combos, key=lambda c: np.mean([r["knn_auc"] for r in of("trained", *c)]))
            trained = of("trained", *best)
            auc = [r["knn_auc"] for r in trained]
            ceiling = min(of("ceiling", *c)[0]["knn_auc"] for c in combos) if process in PROCESSES else None
            alike = sum(r["verdict"] == "indistinguishable" for r in trained)
            worst = max(trained, key=lambda r: r["max_z"])
            off, off_z = float(np.mean([r["off_data"] for r in trained])), max(r["z"]["off_data"] for r in trained)
            summary.append({"process": process, "nfe": nfe, "sampler": best[0], "spacing": best[1],
                            "knn_auc_mean": float(np.mean(auc)), "knn_auc_sd": float(np.std(auc)),
                            "indistinguishable": alike, "seeds": len(trained), "ceiling_auc": ceiling,
                            "off_data_mean": off, "off_data_z_max": float(off_z)})
            lines.append(f"| {process} | {nfe} | {best[0]} ({best[1]}) | {np.mean(auc):.3f} +- {np.std(auc):.3f} | "
                         f"{alike} / {len(trained)} | {worst['worst']} ({worst['max_z']:.0f}) | "
                         f"{100 * off:.2f}% ({off_z:.1f}) | " + ("" if ceiling is None else f"{ceiling:.3f}") + " |")
    seconds = {p: float(np.mean(s)) for p, s in train_seconds.items()}
    lines += ["", "Training seconds per run (mean): " + ", ".join(f"{p} {s:.0f} s" for p, s in seconds.items()),
              f"k-NN AUC floor at n = {spec.n}: about 0.50 (an AUC is judged against its floor's spread)."]
    results = {"meta": machine(seeds=list(seeds), nfes=list(nfes), n=spec.n, run_at=runs_at), "summary": summary,
               "train_seconds": train_seconds, "rows": rows}
    publish(args.out, "fewstep", results, "\n".join(lines))
    if not args.quick:
        plot(results, Path(args.figure))


if __name__ == "__main__":
    main()
