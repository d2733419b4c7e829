"""A study on Ray (issue #18): the same grid on a local Ray cluster of 1 CPU and of 2, side by side in one
session, and the local backend with 2 processes beside them: wall time of the whole study (cluster start-up
included), cells per minute and the speed-up of 2 Ray workers over 1.

The grid: the default recipe at 1500 training steps (evaluation at n = 2000, 10 floor draws, no likelihoods),
schedule.T in {100, 1000} x schedule.name in {cosine, linear}, one seed: 4 cells. The noise floors are
computed once before the timed runs (every study finds them cached), so the times are the cells'.

    .venv/bin/python benchmarks/ray_study.py --out docs/results      # about 4 minutes on 2 idle CPU cores
    .venv/bin/python benchmarks/ray_study.py --quick                 # a smoke run
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from report import machine, publish
from toydiff.core import config as C
from toydiff.jobs import study

SETTINGS = ["train.steps=1500", "eval.n=2000", "eval.draws=10", "eval.nll_n=0", "sample.n=2000"]
QUICK = ["train.steps=100", "eval.n=200", "eval.draws=3", "eval.nll_n=0", "sample.n=200", "data.n=1000"]
AXES = {"schedule.T": [100, 1000], "schedule.name": ["cosine", "linear"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="where ray_study.json and .md go (default docs/results; --quick: a temporary folder)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    base = C.with_overrides(C.ExperimentConfig(), QUICK if args.quick else SETTINGS)
    grid = study.build_grid(base, study.parse_axes(AXES), 1, [])
    cells = len(grid.cells)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("TOYDIFF_CACHE", str(Path(tmp) / "cache"))
        study.prepare_floors(grid, print)  # once, before the clocks start
        rows = []
        for label, backend, jobs in (("ray, 1 CPU", "ray", 1), ("ray, 2 CPUs", "ray", 2),
                                     ("local, 2 processes", "local", 2)):
            start = time.perf_counter()
            done = study.run_study(grid, Path(tmp) / label.replace(" ", "").replace(",", "-"), jobs=jobs,
                                   backend=backend, log=print)
            seconds = time.perf_counter() - start
            assert len(done) == cells and not any(r.get("failed") for r in done)
            rows.append({"setting": label, "backend": backend, "workers": jobs, "seconds": round(seconds, 1),
                         "cells_per_minute": round(60 * cells / seconds, 2),
                         "cell_seconds_mean": round(sum(r["seconds"] for r in done) / cells, 1)})
            print(rows[-1])
    speedup = rows[0]["seconds"] / rows[1]["seconds"]
    lines = ["| setting | study wall time (s) | cells / minute | mean seconds per cell |", "|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['seconds']} | {r['cells_per_minute']} | {r['cell_seconds_mean']} |"
              for r in rows]
    lines.append(f"\nSpeed-up of 2 Ray workers over 1: **{speedup:.2f}x** ({cells} cells, cluster start-up "
                 "included).")
    out = args.out or (tempfile.mkdtemp() if args.quick else "docs/results")
    publish(out, "ray_study", {**machine(cells=cells, settings=QUICK if args.quick else SETTINGS,
                                               axes=AXES), "rows": rows, "speedup_2_over_1": round(speedup, 2)},
            "\n".join(lines))


if __name__ == "__main__":
    main()
