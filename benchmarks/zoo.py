"""The default model on every 2-D dataset of the zoo: the gallery (data beside samples) and each verdict.

Trains the built-in default config (Two Moons' settings: cosine T = 1000, the 33k-parameter MLP with
x-Fourier features, v prediction, 6000 steps, EMA) on each dataset with its default parameters, samples
5000 points with the default sampler (SDE-DPM-Solver++(3M), 50 steps) and judges them against fresh iid
data beside the noise floors (toydiff.evaluation).
Writes docs/figures/zoo.png and benchmarks/results/zoo.json + zoo.md; prints the table.

    .venv/bin/python benchmarks/zoo.py               # about 25 minutes on 2 CPU cores (--jobs 2)
    .venv/bin/python benchmarks/zoo.py --quick       # a smoke run
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from report import machine, publish
from toydiff.core import config as C
from toydiff.data.datasets import DATASETS
from toydiff.evaluation.scores import flagged
from toydiff.pictures.plots import gallery_figure
from toydiff.jobs.experiment import run_experiment

NAMES = [n for n in DATASETS.names() if n not in ("sklearn-moons", "gmm")]  # the 2-D zoo (gmm: any D)


def one(name: str, overrides: list[str]) -> dict:
    torch.set_num_threads(1)
    cfg = C.with_overrides(C.ExperimentConfig(), [f"data.name={name}", "eval.nll_n=0"] + overrides)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = run_experiment(cfg, Path(tmp) / "run", figures=False)  # the main job: train, sample, evaluate
        seconds = time.perf_counter() - start
    run, samples, rep = result.run, result.samples, result.report
    m = rep["metrics"]
    flags = flagged(rep)
    return {"dataset": name, "job_seconds": round(seconds, 1), "verdict": rep["verdict"],
            "knn_auc": m["knn_auc"]["value"], "knn_auc_z": m["knn_auc"]["z"], "mmd2_z": m["mmd2"]["z"],
            "w2": m["w2_data"]["value"], "w2_floor": m["w2_data"]["floor_mean"], "flagged": flags,
            "data": run.data[:1500].tolist(), "samples": samples[:1500].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 training steps, n = 500: a smoke run")
    parser.add_argument("--jobs", type=int, default=2, help="parallel processes")
    parser.add_argument("--out", default="benchmarks/results", help="folder for zoo.json and zoo.md")
    parser.add_argument("--figure", default="docs/figures/zoo.png", help="the gallery's PNG")
    args = parser.parse_args()
    overrides = (["train.steps=300", "sample.n=500", "eval.n=500", "eval.w2_n=500", "eval.draws=5"]
                 if args.quick else [])
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one, NAMES, [overrides] * len(NAMES)))
    fig = gallery_figure([(r["dataset"], np.array(r["data"]), np.array(r["samples"])) for r in rows])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130)
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    Path(args.figure).write_bytes(buf.getvalue())
    table = ["| dataset | verdict at n = 5000 | AUC (z) | MMD z | W2, data units (floor) | train + sample + evaluate s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "indistinguishable" if not r["flagged"] else "flagged: " + ", ".join(r["flagged"])
        table.append(f"| {r['dataset']} | {verdict} | {r['knn_auc']:.3f} ({r['knn_auc_z']:.1f}) | {r['mmd2_z']:.1f} | "
                     f"{r['w2']:.3f} ({r['w2_floor']:.3f}) | {r['job_seconds']:.0f} |")
    light = [{k: v for k, v in r.items() if k not in ("data", "samples")} for r in rows]
    publish(args.out, "zoo", {"meta": machine(quick=args.quick), "rows": light}, "\n".join(table))


if __name__ == "__main__":
    main()
