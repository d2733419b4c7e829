"""The verdict's calibration on a held-out panel of real and synthetic tables (issue #13's goal).

Each table is split at random, again for every repeat, into training rows (40%), reference rows (30%,
the evaluation's held-out rows) and candidate rows (30%). The candidate is judged against the reference
exactly as `toydiff eval` judges a run on a file (file_target, every metric beside its floor, memorization
against the training rows, power), as it is and with known defects:

  iid        the candidate itself: should never be called distinguishable (the false-alarm rate)
  shift      the widest column shifted by one of its standard deviations
  blur       Gaussian noise of half of each column's standard deviation added
  drop       the commonest class left out (the candidate refilled from the other classes)
  memorized  training rows with 1e-3 of each column's standard deviation of noise (a model that copies)

A defect should be called distinguishable or inconclusive, never indistinguishable. Tables: the zoo's
moons (D = 2) and an 8-D Gaussian mixture (3000 rows each), scikit-learn's bundled wine (D = 13, 178
rows), breast cancer (30, 569) and digits (64, 1797), and the zoo's circles at 10,000 rows (n = 3000 compared
points). None of them was used to choose any default. Prints JSON and a table; writes
benchmarks/results/panel.json and .md.

    .venv/bin/python benchmarks/panel.py --repeats 20        # about 50 minutes on 2 CPU cores
    .venv/bin/python benchmarks/panel.py --tables wine,digits  # some of them

It also prints what n affords (power_table): the AUC shift the classifier test sees at each n.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import numpy as np
import torch

from report import machine, publish
from toydiff.core.config import DataConfig, EvalConfig
from toydiff.data.datasets import load_dataset
from toydiff.evaluation.judge import evaluate
from toydiff.evaluation.scores import z_limit
from toydiff.evaluation.reference import file_target

CASES = ("iid", "shift", "blur", "drop", "memorized")


TABLES = ("moons", "gmm-8d", "wine", "breast-cancer", "digits", "circles-10k")


def tables(names=TABLES) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(rows, class labels) of each named table."""
    from sklearn import datasets
    zoo = {"moons": (DataConfig(), 3000), "gmm-8d": (DataConfig(name="gmm", dim=8), 3000),
           "circles-10k": (DataConfig(name="circles"), 10_000)}
    out = {}
    for name in names:
        if name in zoo:
            out[name] = load_dataset(zoo[name][0], zoo[name][1], np.random.default_rng(0))
        else:
            bunch = getattr(datasets, "load_" + name.replace("-", "_"))()
            out[name] = (bunch.data.astype(np.float64), bunch.target.astype(np.int64))
    return out


def candidates(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, ...]]:
    """(training, reference, candidate) per case, from one random split of the table."""
    order = rng.permutation(len(x))
    a, b = int(0.4 * len(x)), int(0.7 * len(x))
    train, ref, cand, cand_y = x[order[:a]], x[order[a:b]], x[order[b:]], y[order[b:]]
    sd = x.std(0)
    shifted = cand.copy()
    widest = int(np.argmax(sd))  # digits' column 0 is all zeros: a "shift" by its deviation would change nothing
    shifted[:, widest] += sd[widest]
    commonest = np.bincount(cand_y).argmax()
    others = cand[cand_y != commonest]
    dropped = others[rng.integers(0, len(others), len(cand))]
    copied = train[rng.integers(0, len(train), len(cand))] + 1e-3 * sd * rng.normal(size=cand.shape)
    return {"iid": (train, ref, cand), "shift": (train, ref, shifted),
            "blur": (train, ref, cand + 0.5 * sd * rng.normal(size=cand.shape)),
            "drop": (train, ref, dropped), "memorized": (train, ref, copied)}


def judge(train: np.ndarray, ref: np.ndarray, cand: np.ndarray, draws: int) -> str:
    keep = np.ptp(ref, 0) > 0  # a column constant in this reference (digits' border pixels) cannot be framed
    target = file_target(ref[:, keep])
    spec = EvalConfig(n=min(len(cand), target.max_n), draws=draws, w2_n=500, nll_n=0)
    verdict = evaluate(cand[:, keep], target, spec, training=train[:, keep])["verdict"]
    return verdict.split(" ")[0]  # distinguishable | indistinguishable | inconclusive


def power_table(draws: int) -> list[dict]:
    """What n affords: the classifier-AUC shift seen with 80% power at each n, from `draws` pairs of iid moons
    (the AUC floor's spread depends on n far more than on the data), as `toydiff eval` computes it."""
    from toydiff.core.config import ExperimentConfig
    from toydiff.evaluation.scores import power
    from toydiff.evaluation.metrics import knn_auc
    from toydiff.evaluation.reference import target_for

    target, rng, out = target_for(ExperimentConfig()), np.random.default_rng(0), []
    for n in (20, 50, 100, 200, 500, 1000, 2000, 5000):
        auc = [knn_auc(*(target.frame.transform(target.draw(rng, n)) for _ in range(2))) for _ in range(draws)]
        sees = power({"knn_auc": {"mean": float(np.mean(auc)), "std": float(np.std(auc, ddof=1))}}, n,
                     z_limit(EvalConfig().z_max, draws))
        out.append({"n": n, "auc_shift": round(sees["auc_shift"], 3), "conclusive": sees["conclusive"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="random splits per table")
    parser.add_argument("--draws", type=int, default=20, help="floor pairs per evaluation (eval.draws)")
    parser.add_argument("--tables", default=",".join(TABLES), help="comma-separated, of: " + ", ".join(TABLES))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, (x, y) in tables(args.tables.split(",")).items():
        start = time.perf_counter()
        counts = {case: Counter() for case in CASES}
        for r in range(args.repeats):
            for case, parts in candidates(x, y, np.random.default_rng([r, len(x)])).items():
                if case != "iid" and r >= max(3, args.repeats // 4):
                    continue  # the defects are clear-cut; the false-alarm rate needs every repeat
                counts[case][judge(*parts, args.draws)] += 1
        a, b = int(0.4 * len(x)), int(0.7 * len(x))
        rows.append({"table": name, "rows": len(x), "dim": x.shape[1], "n": min(len(x) - b, b - a),
                     "seconds": round(time.perf_counter() - start, 1),
                     **{case: dict(counts[case]) for case in CASES}})
        print(json.dumps(rows[-1]), flush=True)
    lines = ["| table | rows | D | n | " + " | ".join(CASES) + " |", "|---|---|---|---|" + "---|" * len(CASES)]
    for r in rows:
        cells = [" / ".join(f"{r[c].get(v, 0)}" for v in ("distinguishable", "inconclusive", "indistinguishable"))
                 for c in CASES]
        lines.append(f"| {r['table']} | {r['rows']} | {r['dim']} | {r['n']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: distinguishable / inconclusive / indistinguishable, over the repeats.")
    sees = power_table(args.draws)
    lines += ["", "| n compared | AUC shift seen (80% power) | verdict possible |", "|---|---|---|"]
    lines += [f"| {p['n']} | {p['auc_shift']:.3f} | {'indistinguishable' if p['conclusive'] else 'inconclusive at best'} |"
              for p in sees]
    publish(args.out, "panel", {"meta": machine(repeats=args.repeats, draws=args.draws), "rows": rows,
                                "power": sees}, "\n".join(lines))


if __name__ == "__main__":
    main()
