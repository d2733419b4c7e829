"""Does early stopping's held-out loss pick the right training length, and would a smaller or more regularized
network do better on a small table? (issue #28, item 3)

On the development tables of benchmarks/tables.py (mixed, diabetes, breast cancer; never iris, wine or digits,
the held-out part of the panel), each cut to --rows rows and split 70/30 at random, toydiff trains with its
defaults for a file (10% of the training rows held back for early stopping) but never stops (train.patience =
1), and beside each log row's validation loss the benchmark records the same denoising loss on the 30% test
rows, which training never sees: the truth early stopping estimates. Per run:

  best_test     the lowest test loss over the run, and its step
  chosen        the step the default early stopping returns (the best validation row up to where
                train.patience would have stopped it), its test loss, and its regret over best_test
  end           the test loss after all train.steps (what no early stopping gives)

Variants (--variants): the recipe toydiff's rules give (train.sizing = off), the recipe its sizing chooses
(train.sizing = on; its probes run their whole quarter of train.steps here, patience being 1) and a few
regularized networks; the lowest test loss says whether one of them would be worth choosing per table, and
"sized" against "rules" whether the probes choose well.

    .venv/bin/python benchmarks/early_stopping.py --rows 180 --seeds 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import tomllib
from pathlib import Path

import numpy as np
import torch

import tables as panel
from report import machine, publish
import toydiff
from toydiff.core.config import TrainConfig
from toydiff.data.tables import read_table
from toydiff.jobs import validation
from toydiff.training.loop import early_stop

VARIANTS = {"rules": {}, "sized": {"train": {"sizing": "on"}}, "width 32": {"model": {"width": 32}}, "weight decay 0.1": {"train": {"weight_decay": 0.1}},
            "no Fourier features": {"model": {"fourier_octaves": 0}}}
DEV_TABLES = ("mixed", "diabetes", "breast-cancer")


def curve(name: str, rows: int, seed: int, variant: dict) -> tuple[list[tuple[int, float, float]], str]:
    """(step, validation loss, test loss) at each log row of one run that never stops early, and its recipe
    (width / weight decay)."""
    header, cells, labelled = panel.table(name)
    order = np.random.default_rng([100 + seed, len(cells)]).permutation(len(cells))[:rows or None]
    cut = int(0.7 * len(order))
    names, cells = panel.varying(header, cells, order[:cut], order[cut:])
    label = panel.LABEL if labelled else ""
    log: list[tuple[int, float, float]] = []
    real = validation.validation_loss

    def both(run, state, objective, x, y):  # the validation loss, and the test rows' beside it
        held = real(run, state, objective, x, y)
        tx = torch.as_tensor(run.scaler.transform(test.x), dtype=torch.float32)
        ty = None if test.labels is None else torch.as_tensor(test.labels)
        truth = real(run, state, objective, tx, ty)

        def validate() -> float:
            value = held()
            log.append((state.step, value, truth()))
            return value
        return validate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_csv = panel.write(tmp / "train.csv", names, [cells[i] for i in order[:cut]])
        test_csv = panel.write(tmp / "test.csv", names, [cells[i] for i in order[cut:]])
        train = read_table(train_csv, label_column=label)
        test = read_table(test_csv, columns=train.names, label_column=label, schema=train.columns)
        if labelled:  # the test rows' labels as the training file's class indices
            test = test.__class__(**{**test.__dict__, "labels": np.array(
                [train.classes.index(test.classes[k]) for k in test.labels])})
        sections = {"data": {"path": str(train_csv), "holdout": 0.0, **({"label_column": label} if labelled else {})},
                    "model": {"conditional": labelled, **variant.get("model", {})}, "seed": seed,
                    "train": {"validation": 0.1, "patience": 1.0, "sizing": "off", **variant.get("train", {})}}
        validation.validation_loss = both
        try:
            toydiff.run(out=tmp / "run", figures=False, evaluate=False, quiet=True, **sections)
        finally:
            validation.validation_loss = real
        info = json.loads((tmp / "run" / "run.json").read_text())
        decay = tomllib.loads((tmp / "run" / "config.toml").read_text())["train"]["weight_decay"]
        recipe = f"width {info['width']}, decay {decay:g}"
    starts = [i for i in range(1, len(log)) if log[i][0] < log[i - 1][0]]  # sizing's probes come first
    return (log[starts[-1]:] if starts else log), recipe


def summarize(log: list[tuple[int, float, float]], recipe: str) -> dict:
    rows = [{"step": s, "val_loss": v, "test": t} for s, v, t in log]
    defaults = TrainConfig()
    upto = next((rows[:i + 1] for i in range(len(rows)) if early_stop(rows[:i + 1], defaults)), rows)
    chosen = min(upto, key=lambda r: r["val_loss"])
    best = min(rows, key=lambda r: r["test"])
    return {"recipe": recipe, "best_test": round(best["test"], 4), "best_step": best["step"],
            "chosen_step": chosen["step"],
            "stopped_at": upto[-1]["step"], "chosen_test": round(chosen["test"], 4),
            "regret": round(chosen["test"] - best["test"], 4), "end_test": round(rows[-1]["test"], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", default=",".join(DEV_TABLES))
    p.add_argument("--rows", type=int, default=180, help="rows each table is cut to before its split (0 = all)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="docs/results")
    args = p.parse_args()
    results = []
    for name in args.tables.split(","):
        if name not in DEV_TABLES:
            raise SystemExit(f"{name} is in the held-out part of the panel; choose from {', '.join(DEV_TABLES)}")
        for seed in range(args.seeds):
            for variant in args.variants.split(","):
                row = {"table": name, "seed": seed, "variant": variant,
                       **summarize(*curve(name, args.rows, seed, VARIANTS[variant]))}
                results.append(row)
                print(json.dumps(row), flush=True)
    keys = ("recipe", "best_test", "best_step", "chosen_step", "stopped_at", "chosen_test", "regret", "end_test")
    lines = ["| table | seed | variant | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in ("table", "seed", "variant", *keys)) + " |" for r in results]
    publish(args.out, "early_stopping", {"meta": machine(rows=args.rows, seeds=args.seeds), "rows": results},
            "\n".join(lines))


if __name__ == "__main__":
    main()
