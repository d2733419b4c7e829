"""Sample quality against the number of network evaluations (NFE), for every sampler toydiff has.

Three parts, so sampler error and model error can be told apart:
  oracle (8 Gaussians):  the exact noise predictor of a 2-D Gaussian mixture (no learning error at all)
  oracle (Two Moons):    the exact denoiser of the noisy moons themselves (oracle.moons_mixture), in the
                         default run's frame: what a perfect model of the default config would sample
  trained:               the default Two Moons model (T = 1000), sampled on respaced schedules
Every sampler runs at 10..1000 steps (ddpm on evenly spaced t, the ODE and DPM-Solver samplers on Karras
sigmas; Heun costs 2 steps - 1 evaluations).
Each row: NFE, sampling wall time, and metrics beside their noise floors (z-scores).
Prints a markdown table and writes JSON (and the table) to benchmarks/results/.

    .venv/bin/python benchmarks/nfe.py            # about 20 minutes on 2 CPU cores
    .venv/bin/python benchmarks/nfe.py --quick    # a smoke run, under a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from report import machine, publish
from toydiff.core import config as C
from toydiff import train_run
from toydiff.core.config import EvalConfig, ScheduleConfig
from toydiff.data.datasets import params
from toydiff.evaluation.judge import evaluate
from toydiff.evaluation.scores import flagged
from toydiff.evaluation.reference import Target, target_for
from toydiff.diffusion.oracle import GaussianMixture, moons_mixture
from toydiff.diffusion.samplers import SAMPLERS
from toydiff.data.scaler import Scaler
from toydiff.diffusion.schedules import NoiseSchedule


def eight_gaussians() -> GaussianMixture:
    angles = np.arange(8) * np.pi / 4
    return GaussianMixture(np.full(8, 1 / 8), 0.8 * np.c_[np.cos(angles), np.sin(angles)], np.full((8, 1), 0.08))


SPACING = {"ddpm": "trailing"}  # the stochastic sampler on evenly spaced t; the ODE solvers on Karras' sigmas


def nfe(name: str, steps: int) -> int:
    return 2 * steps - 1 if name == "heun" else steps


def sweep(denoise_for, schedule: NoiseSchedule, steps: list[int], x_T: torch.Tensor, target: Target,
          spec: EvalConfig, model: str, to_data=lambda x: x, seed: int = 0) -> list[dict]:
    """Every sampler at every step count on the respaced schedule, judged against the target.
    `to_data` maps the samplers' output (the model's frame) to the target's units."""
    rows = []
    for tol in (1e-3, 1e-4, 1e-5):  # the adaptive solver on the full schedule: its NFE follows the tolerance
        calls = [0]
        inner = denoise_for(schedule)

        def counted(x, t):
            calls[0] += 1
            return inner(x, t)
        start = time.perf_counter()
        x = SAMPLERS.get("ode")(counted, schedule, x_T.clone(), rtol=tol, atol=tol)
        seconds = time.perf_counter() - start
        rep = evaluate(to_data(x.cpu().double().numpy()), target, spec)
        rows.append(_row(model, f"ode (tol {tol:g})", 0, calls[0], seconds, rep))
    for name in [n for n in SAMPLERS.names() if n not in ("ode", "meanflow")]:  # meanflow: a mean-flow model's own
        for k in steps:
            s = schedule.respace(k, SPACING.get(name, "karras"))
            start = time.perf_counter()
            x = SAMPLERS.get(name)(denoise_for(s), s, x_T.clone(), generator=torch.Generator().manual_seed(seed))
            seconds = time.perf_counter() - start
            rep = evaluate(to_data(x.cpu().double().numpy()), target, spec)
            rows.append(_row(model, name, k, nfe(name, k), seconds, rep))
    return rows


def oracle_rows(steps: list[int], spec: EvalConfig) -> list[dict]:
    gmm = eight_gaussians()
    draw = lambda rng, n: gmm.sample(n, rng)  # noqa: E731
    target = Target(draw, Scaler.fit(draw(np.random.default_rng(0), 100_000)), {"dataset": "8gaussians-oracle"})
    full = NoiseSchedule.from_config(ScheduleConfig(name="cosine", T=1000))

    x_T = torch.randn(spec.n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return sweep(gmm.denoiser, full, steps, x_T, target, spec, "oracle (8 Gaussians)")


def moons_oracle_rows(steps: list[int], spec: EvalConfig) -> list[dict]:
    cfg = C.ExperimentConfig()
    target = target_for(cfg)
    frame = target.frame  # min-max of 100k iid points: the default run's scaler to within sampling noise
    gmm = moons_mixture(params(cfg.data).noise).scaled(frame.shift, frame.scale)
    full = NoiseSchedule.from_config(cfg.schedule)
    x_T = torch.randn(spec.n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return sweep(gmm.denoiser, full, steps, x_T, target, spec, "oracle (Two Moons)", to_data=frame.inverse)


def trained_rows(steps: list[int], train_steps: int, spec: EvalConfig) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = C.with_overrides(C.ExperimentConfig(), [f"train.steps={train_steps}", "train.checkpoint_every=0"])
        cfg = dataclasses.replace(cfg, eval=spec)
        run = train_run(cfg, Path(tmp) / "run")
        base = run.denoiser

        def denoise_for(s):
            return lambda x, i: base(x, s.model_t(i))

        x_T = torch.randn(spec.n, run.dim, generator=torch.Generator().manual_seed(1))
        rows = sweep(denoise_for, run.schedule, steps, x_T, target_for(cfg), spec,
                     "trained (Two Moons, default model)", to_data=run.scaler.inverse)
    return rows


def _row(model: str, sampler: str, T: int, nfe: int, seconds: float, rep: dict) -> dict:
    m = rep["metrics"]
    return {"model": model, "sampler": sampler, "steps": T, "nfe": nfe, "sample_seconds": round(seconds, 3),
            "knn_auc": m["knn_auc"]["value"], "knn_auc_z": m["knn_auc"]["z"], "mmd2_z": m["mmd2"]["z"],
            "w2": m["w2"]["value"], "w2_floor": m["w2"]["floor_mean"], "precision_z": m["precision"]["z"],
            "indistinguishable": rep["verdict"].startswith("indistinguishable"),
            "flagged": flagged(rep)}


def table(rows: list[dict]) -> str:
    head = ["model", "sampler", "NFE", "sample s", "AUC", "AUC z", "MMD z", "W2 (floor)", "flagged (z > 3)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['nfe']} | {r['sample_seconds']:.2f} | {r['knn_auc']:.3f} | "
                     f"{r['knn_auc_z']:.1f} | {r['mmd2_z']:.1f} | {r['w2']:.3f} ({r['w2_floor']:.3f}) | "
                     f"{', '.join(r['flagged']) or 'none: indistinguishable'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, small n: a smoke run")
    parser.add_argument("--out", default="benchmarks/results", help="folder for nfe.json and nfe.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        steps, train_steps, spec = [5, 20], 300, EvalConfig(n=500, w2_n=500, draws=5, nll_n=0)
    else:
        steps, train_steps, spec = [10, 20, 30, 50, 100, 250, 1000], 4000, EvalConfig(n=5000, draws=20, nll_n=0)
    rows = oracle_rows(steps, spec) + moons_oracle_rows(steps, spec) + trained_rows(steps, train_steps, spec)
    publish(args.out, "nfe", {"meta": machine(threads=1, eval=dataclasses.asdict(spec)), "rows": rows}, table(rows))


if __name__ == "__main__":
    main()
