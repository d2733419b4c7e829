"""The law of each metric between two samples of one distribution, and how often a z-score reading of it
false-alarms: the study behind evaluation.z_scores' gamma reading of bounded metrics (issue #13).

On development tables that are not in the calibration panel (benchmarks/panel.py), `--pairs` pairs of
independent draws of n points give each metric's null law. Then, many times over, 20 of them make a floor
(eval.draws) and one more is judged against it as `toydiff eval` judges a run: the share beyond z_limit,
per metric and for any metric (the verdict's false-alarm rate), read two ways:

  normal   z = (value - floor mean) / floor std, the reading before this study
  gamma    evaluation.z_scores: bounded metrics as a gamma law anchored at their bound

A metric's nominal rate is z_max's normal tail (0.135% at z_max = 3). Prints JSON and a table; writes
benchmarks/results/null_tails.json and .md.

    .venv/bin/python benchmarks/null_tails.py            # about 5 minutes on 2 CPU cores (268 s measured)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy import stats

from report import machine, publish
from toydiff.evaluation import metrics as M
from toydiff.core.config import DataConfig, EvalConfig
from toydiff.data.datasets import load_dataset
from toydiff.evaluation.scores import FRACTIONS, METRICS, compute, z_limit, z_scores
from toydiff.data.scaler import Scaler

TABLES = {"pinwheel": DataConfig(name="pinwheel"), "checkerboard": DataConfig(name="checkerboard"),
          "gmm-16d": DataConfig(name="gmm", dim=16)}


def null_draws(data: DataConfig, n: int, pairs: int, spec: EvalConfig) -> dict[str, np.ndarray]:
    """Each metric over `pairs` pairs of independent draws of n points, in one frame and on one kernel."""
    x = load_dataset(data, 2 * n * pairs + n, np.random.default_rng(1))[0]
    frame = Scaler.fit(x, "minmax")
    bandwidths = M.mmd_bandwidths(frame.transform(x[-n:]))
    values: dict[str, list[float]] = {}
    for i in range(pairs):
        a, b = x[2 * n * i:2 * n * i + n], x[2 * n * i + n:2 * n * (i + 1)]
        for name, v in compute(a, b, frame, spec, bandwidths=bandwidths).items():
            if v is not None:
                values.setdefault(name, []).append(v)
    return {name: np.array(v) for name, v in values.items()}


def alarm_rates(null: dict[str, np.ndarray], n: int, draws: int, trials: int, limit: float) -> dict:
    """Shares of trials (a floor of `draws` null values, one more judged) beyond `limit`, per metric and for
    any metric, under the normal and the gamma reading."""
    rng = np.random.default_rng(0)
    pairs = len(next(iter(null.values())))
    hits = {reading: {name: 0 for name in null} for reading in ("normal", "gamma")}
    anyhit = {"normal": 0, "gamma": 0}
    for _ in range(trials):
        pick = rng.permutation(pairs)[:draws + 1]
        floor = {name: {"mean": float(v[pick[:draws]].mean()), "std": float(v[pick[:draws]].std(ddof=1))}
                 for name, v in null.items()}
        value = {name: float(v[pick[draws]]) for name, v in null.items()}
        gamma = z_scores(value, floor, n)
        normal = {name: METRICS[name].direction * (value[name] - f["mean"])
                  / max(f["std"], 1.0 / n if name in FRACTIONS else 1e-12) for name, f in floor.items()}
        for reading, z in (("normal", normal), ("gamma", gamma)):
            over = [name for name in null if z[name] > limit]
            for name in over:
                hits[reading][name] += 1
            anyhit[reading] += bool(over)
    return {reading: {"any": anyhit[reading] / trials, **{k: c / trials for k, c in hits[reading].items()}}
            for reading in hits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=900, help="points per side (the panel's 3000-row tables give 900)")
    parser.add_argument("--pairs", type=int, default=300, help="null pairs per table")
    parser.add_argument("--trials", type=int, default=5000, help="floors drawn from them per table")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = EvalConfig(n=args.n, w2_n=500)
    limit, nominal = z_limit(spec.z_max, spec.draws), float(stats.norm.sf(spec.z_max))
    rows = []
    for name, data in TABLES.items():
        start = time.perf_counter()
        null = null_draws(data, args.n, args.pairs, spec)
        rates = alarm_rates(null, args.n, spec.draws, args.trials, limit)
        skew = {k: round(float(stats.skew(METRICS[k].direction * v)), 2) for k, v in null.items()}
        rows.append({"table": name, "dim": int(data.dim if data.name == "gmm" else 2), "skew": skew, **rates,
                     "seconds": round(time.perf_counter() - start, 1)})
        print(f"{name}: any metric {rates['normal']['any']:.2%} (normal) -> {rates['gamma']['any']:.2%} (gamma)",
              flush=True)
    names = list(rows[0]["skew"])
    lines = [f"False alarms per {args.trials} floors of {spec.draws} pairs (n = {args.n}), beyond z_limit = "
             f"{limit:.2f}; nominal per metric {nominal:.3%}. Cells: normal reading -> gamma reading "
             "(bad-side skewness of the metric's null law).", "",
             "| metric | " + " | ".join(r["table"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for k in ["any"] + names:
        cells = [f"{r['normal'][k]:.2%} -> {r['gamma'][k]:.2%}" + (f" ({r['skew'][k]:+.1f})" if k in r["skew"] else "")
                 for r in rows]
        lines.append(f"| {'any metric' if k == 'any' else k} | " + " | ".join(cells) + " |")
    publish(args.out, "null_tails", {"meta": machine(n=args.n, pairs=args.pairs, trials=args.trials),
                                     "nominal": nominal, "z_limit": limit, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
