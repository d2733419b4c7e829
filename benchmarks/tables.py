"""toydiff against the tabular generators people use, on real and generated tables, by one outside judge (issue #28).

Each table is split at random (70% training rows, 30% test rows; a new split per seed). Every generator
trains on the same training CSV and returns as many rows as it trained on, as a CSV in the table's schema;
every CSV is judged the same way against the test rows:

  invalid     share of cells a column cannot take: a level it does not have, a fraction in an integer
              column, a number outside the training rows' range
  gbt_auc     gradient-boosted-tree two-sample AUC (toydiff.evaluation.metrics.gbt_auc), with its floor's z
  knn_auc     k-NN two-sample AUC, with its floor's z
  memorized   share of samples closer to a training row than 90% of test rows are (exact floor), with its z
  efficacy    labelled tables: held-out accuracy of trees trained on the samples, and the gap to trees
              trained on the training rows (toydiff.evaluation.metrics.efficacy)
  verdict     toydiff's verdict on the samples, every metric beside its permutation floor

The judge works on the table's numbers (a text column as its level's index, per-axis min-max of the test
rows), never on a generator's own frame; a binary or categorical value is read as the level it prints
(to 7 significant digits), and an invented value is left as it is.

Generators: toydiff (its defaults on the file: `toydiff run --data train.csv [--label-column target]`), a
per-class Gaussian (mean and covariance of each class), and the peers of the optional extra, installed by
`--install-peers` into the current environment: SDV's GaussianCopula, CTGAN and TVAE (300 epochs), and
ForestDiffusion (flow, 50 noise levels, 100 duplicates, n_jobs 1). A generator that is not installed is
skipped with a line.

Tables: `mixed` (generated, 1500 rows: continuous, integer, binary, a text category with a comma, a label
that depends on them), scikit-learn's diabetes (unlabelled; a binary `sex`, an integer target), breast
cancer, wine, iris and digits (labelled). No default was tuned on them, but some were looked at: wine and
diabetes while early stopping was built (its settings fixed beforehand); diabetes, breast cancer and mixed
when ordinal columns, data.scaling = auto and the auto width were measured before becoming defaults. Iris,
wine and digits were not looked at for those: the held-out part of the panel.

    .venv/bin/python benchmarks/tables.py --tables mixed,diabetes --splits 3
    .venv/bin/python benchmarks/tables.py --install-peers --generators toydiff,gaussian,copula,ctgan,tvae,forest
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from report import machine, publish
from toydiff.core.config import EvalConfig
from toydiff.data.columns import PRINTED
from toydiff.data.tables import read_table
from toydiff.evaluation.judge import evaluate
from toydiff.evaluation.metrics import efficacy
from toydiff.evaluation.scores import z_limit
from toydiff.evaluation.reference import file_target

TABLES = ("mixed", "diabetes", "breast-cancer", "wine", "iris", "digits")
GENERATORS = ("toydiff", "gaussian", "copula", "ctgan", "tvae", "forest")
PEERS = ["sdv>=1.17", "ForestDiffusion>=1.0"]  # the optional extra (--install-peers)
LABEL = "target"
COUNTS = ("digits",)  # tables whose columns are counts, declared integer as a user would (--types): a pixel that
#                       is 0 or 1 in the training rows is not a binary column, and the test rows hold its 2s
RECIPE: dict[str, dict] = {}  # what a generator chose for the current split (toydiff: its width, its sizing)
TYPES: list[str] = []  # the current table's data.types (every generator reads its training CSV with them)
TOYDIFF_SET: dict = {}  # --toydiff-set SECTION.KEY=VALUE: toydiff's settings other than its defaults (ablations)


def table(name: str) -> tuple[list[str], list[list[str]], bool]:
    """(header, rows of cells, labelled) of a table; a labelled table's label column is LABEL."""
    if name == "mixed":
        rng = np.random.default_rng(2028)
        n = 1500
        age = rng.integers(18, 90, n)
        smoker = rng.random(n) < 0.15 + 0.3 * (age < 40)
        region = rng.choice(["north", "south, coast", "east", "west"], n, p=[0.4, 0.3, 0.2, 0.1])
        bmi = 22 + 0.06 * age + 2.5 * (region == "south, coast") + rng.gamma(2.0, 1.5, n)
        risk = 0.04 * (age - 50) + 1.2 * smoker + 0.15 * (bmi - 28) + rng.normal(0, 0.8, n)
        label = np.where(risk > 0.4, "high", np.where(risk > -0.6, "mid", "low"))
        rows = [[f"{b:.2f}", str(a), str(int(s)), r, k] for b, a, s, r, k in zip(bmi, age, smoker, region, label)]
        return ["bmi", "age", "smoker", "region", LABEL], rows, True
    from sklearn import datasets
    bunch = getattr(datasets, "load_" + name.replace("-", "_"))()
    names = [str(f).replace(",", " ") for f in bunch.feature_names]
    labelled = name != "diabetes"
    rows = [[f"{v:.10g}" for v in x] + [f"{t:.10g}"] for x, t in zip(bunch.data, bunch.target)]
    return names + [LABEL], rows, labelled


def varying(header: list[str], rows: list[list[str]], *parts: np.ndarray) -> tuple[list[str], list[list[str]]]:
    """The table without the columns constant in its training or its test rows (digits' always-blank corner
    pixels), which toydiff refuses and no generator or judge learns anything from; the label column is kept."""
    keep = [j for j, h in enumerate(header) if h == LABEL or all(len({rows[i][j] for i in p}) > 1 for p in parts)]
    return [header[j] for j in keep], [[r[j] for j in keep] for r in rows]


def write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# --- generators: (train.csv, labelled, n, seed, work folder) -> samples.csv in the same schema ---------------------

def gen_toydiff(train: Path, labelled: bool, n: int, seed: int, work: Path) -> Path:
    import toydiff
    sections = {"data": {"path": str(train), "holdout": 0.0, "types": TYPES,
                         **({"label_column": LABEL} if labelled else {})},
                "model": {"conditional": labelled}, "seed": seed}
    for key, value in TOYDIFF_SET.items():
        section, _, name = key.partition(".")
        sections[section] = {**sections.get(section, {}), name: value}
    exp = toydiff.run(out=work / "run", figures=False, evaluate=False, quiet=True, **sections)
    info = exp.run.dir.read_manifest()
    RECIPE["toydiff"] = {"width": info.get("width"), "sizing": info.get("sizing", {}).get("chosen", "not sized")}
    drawn = exp.run.draw(n, seed=seed)
    (work / "samples.csv").write_text(exp.run.table_text(drawn.samples, drawn.labels), encoding="utf-8")
    return work / "samples.csv"


def gen_gaussian(train: Path, labelled: bool, n: int, seed: int, work: Path) -> Path:
    """A Gaussian per class (mean and covariance of its rows; a text column as its level index, written back as
    the nearest level); the label drawn in the training proportions."""
    t = read_table(train, label_column=LABEL if labelled else "", types=TYPES)
    rng = np.random.default_rng(seed)
    labels = t.labels if t.labels is not None else np.zeros(len(t.x), dtype=int)
    drawn_labels = rng.choice(labels, n)
    out = np.empty((n, t.x.shape[1]))
    for k in np.unique(labels):
        rows, where = t.x[labels == k], drawn_labels == k
        cov = np.cov(rows.T) if len(rows) > 1 else np.zeros((t.x.shape[1],) * 2)
        out[where] = rng.multivariate_normal(rows.mean(0), np.atleast_2d(cov) + 1e-9 * np.eye(t.x.shape[1]),
                                             int(where.sum()))
    for j, c in enumerate(t.columns):
        if c.text:
            out[:, j] = np.clip(np.round(out[:, j]), 0, len(c.text) - 1)
    from toydiff.data.columns import table_text
    text = table_text(out, t.columns, drawn_labels if labelled else None, LABEL, t.label_index, t.classes)
    (work / "samples.csv").write_text(text, encoding="utf-8")
    return work / "samples.csv"


def _sdv(kind: str):
    def gen(train: Path, labelled: bool, n: int, seed: int, work: Path) -> Path:
        import pandas as pd
        import torch
        from sdv.metadata import Metadata
        from sdv.single_table import CTGANSynthesizer, GaussianCopulaSynthesizer, TVAESynthesizer
        torch.manual_seed(seed)
        np.random.seed(seed)
        frame = pd.read_csv(train)
        metadata = Metadata.detect_from_dataframes({"table": frame})  # SDV 1.x named it detect_from_dataframe
        model = {"copula": lambda: GaussianCopulaSynthesizer(metadata),
                 "ctgan": lambda: CTGANSynthesizer(metadata, epochs=300),
                 "tvae": lambda: TVAESynthesizer(metadata, epochs=300)}[kind]()
        model.fit({"table": frame})  # SDV 2 takes and returns {table name: DataFrame}; SDV 1 the frame itself
        made = model.sample(n)
        (made["table"] if isinstance(made, dict) else made).to_csv(work / "samples.csv", index=False)
        return work / "samples.csv"
    return gen


def gen_forest(train: Path, labelled: bool, n: int, seed: int, work: Path) -> Path:
    from ForestDiffusion import ForestDiffusionModel
    from toydiff.data.columns import table_text
    t = read_table(train, label_column=LABEL if labelled else "", types=TYPES)
    cats = [j for j, c in enumerate(t.columns) if c.discrete]
    ints = [j for j, c in enumerate(t.columns) if c.kind == "integer"]
    model = ForestDiffusionModel(t.x, label_y=t.labels, n_t=50, duplicate_K=100, diffusion_type="flow",
                                 cat_indexes=cats, int_indexes=ints, bin_indexes=[], n_jobs=1, seed=seed)
    out = np.asarray(model.generate(batch_size=n))
    x, y = (out[:, :-1], out[:, -1].astype(int)) if labelled else (out, None)
    text = table_text(x, t.columns, y, LABEL, t.label_index, t.classes)
    (work / "samples.csv").write_text(text, encoding="utf-8")
    return work / "samples.csv"


MAKERS = {"toydiff": gen_toydiff, "gaussian": gen_gaussian, "copula": _sdv("copula"), "ctgan": _sdv("ctgan"),
          "tvae": _sdv("tvae"), "forest": gen_forest}
NEEDS = {"copula": "sdv", "ctgan": "sdv", "tvae": "sdv", "forest": "ForestDiffusion"}


# --- the judge ----------------------------------------------------------------------------------------------------

def read_samples(path: Path, train) -> tuple[np.ndarray, np.ndarray | None, float]:
    """A generator's CSV as the training table's numbers (a text column's level index; an unknown level as -1),
    its labels (None: unlabelled or unknown), and the share of cells no column of the table can take."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, rows = rows[0], rows[1:]
    where = {h: i for i, h in enumerate(header)}
    lo, hi = train.x.min(0), train.x.max(0)
    x, bad = np.empty((len(rows), len(train.columns))), 0
    for j, c in enumerate(train.columns):
        cells = [r[where[c.name]] for r in rows]
        if c.text:
            index = {t: k for k, t in enumerate(c.text)}
            x[:, j] = [index.get(v.strip(), -1) for v in cells]
            bad += int((x[:, j] < 0).sum())
            continue
        values = np.array([float(v) if v.strip() else math.nan for v in cells])
        slack = PRINTED * max(abs(lo[j]), abs(hi[j]))  # a CSV's 7 significant digits may step past the range
        ok = np.isfinite(values) & (values >= lo[j] - slack) & (values <= hi[j] + slack)
        if c.discrete:  # a level as printed is that level (0.05068012 is diabetes' 0.0506801187398187)
            level = c.is_level(values)
            ok &= level
            values = np.where(level, c.nearest(np.where(np.isfinite(values), values, lo[j])), values)
        elif c.kind == "integer":
            ok &= values == np.round(values)
        bad += int((~ok).sum())
        x[:, j] = np.where(np.isfinite(values), values, lo[j])
    labels = None
    if train.labels is not None and LABEL in where:
        index = {t: k for k, t in enumerate(train.classes)}
        found = [index.get(_level(r[where[LABEL]]), -1) for r in rows]
        bad += sum(k < 0 for k in found)
        labels = np.array(found)
    return x, labels, bad / max(1, x.size + (0 if labels is None else len(labels)))


def _level(cell: str) -> str:
    """A label as the training file writes it (a generator may write 1 as 1.0)."""
    cell = cell.strip()
    try:
        number = float(cell)
        return f"{number:.10g}"
    except ValueError:
        return cell


def judge(samples: Path, train, test, draws: int) -> dict:
    x, labels, invalid = read_samples(samples, train)
    spec = EvalConfig(n=len(test.x), draws=draws, nll_n=0)
    rep = evaluate(x, file_target(test.x), spec, training=train.x)
    m = rep["metrics"]
    row = {"invalid": round(invalid, 4), "verdict": rep["verdict"].split(":")[0].split(" at ")[0]}
    for name in ("gbt_auc", "knn_auc", "memorized"):
        row[name], row[name + "_z"] = m[name]["value"], m[name]["z"]
    row["gbt_floor"] = m["gbt_auc"]["floor_mean"]
    if train.labels is not None and labels is not None and (labels >= 0).all() and len(np.unique(labels)) > 1:
        e = efficacy(x, labels, train.x, train.labels, test.x, test.labels)
        row.update(efficacy=e["on_samples"], efficacy_real=e["on_training_rows"], efficacy_gap=e["gap"])
    return row


def installed(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", default=",".join(TABLES))
    p.add_argument("--generators", default="toydiff,gaussian,copula,ctgan,tvae,forest")
    p.add_argument("--splits", type=int, default=3)
    p.add_argument("--draws", type=int, default=20, help="permutation pairs behind each floor")
    p.add_argument("--install-peers", action="store_true", help=f"pip install {' '.join(PEERS)} first")
    p.add_argument("--toydiff-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a toydiff setting other than its default, e.g. data.scaling=minmax (repeatable)")
    p.add_argument("--keep", metavar="FILE", help="an earlier tables.json: its rows of tables, generators and splits not "
                   "run now are kept (same splits, same judge), marked reused")
    p.add_argument("--out", default="docs/results")
    args = p.parse_args()
    kept = json.loads(Path(args.keep).read_text())["rows"] if args.keep else []  # read before --out overwrites it
    for entry in args.toydiff_set:
        key, _, value = entry.partition("=")
        try:
            TOYDIFF_SET[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            TOYDIFF_SET[key.strip()] = value.strip()
    if args.install_peers:
        subprocess.run([sys.executable, "-m", "pip", "install", *PEERS], check=True)
    chosen = []
    for g in args.generators.split(","):
        if g in NEEDS and not installed(NEEDS[g]):
            print(f"skipping {g}: {NEEDS[g]} is not installed (--install-peers)", flush=True)
        else:
            chosen.append(g)
    results = []
    for name in args.tables.split(","):
        header, rows, labelled = table(name)
        for split in range(args.splits):
            order = np.random.default_rng([split, len(rows)]).permutation(len(rows))
            cut = int(0.7 * len(rows))
            names, cells = varying(header, rows, order[:cut], order[cut:])
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                train_csv = write(tmp / "train.csv", names, [cells[i] for i in order[:cut]])
                test_csv = write(tmp / "test.csv", names, [cells[i] for i in order[cut:]])
                TYPES[:] = [f"{h}=integer" for h in names if h != LABEL] if name in COUNTS else []
                train = read_table(train_csv, label_column=LABEL if labelled else "", types=TYPES)
                test = read_table(test_csv, columns=train.names, label_column=LABEL if labelled else "",
                                  schema=train.columns)
                if labelled:  # the test rows' labels as the training file's class indices
                    test = test.__class__(**{**test.__dict__, "labels": np.array(
                        [train.classes.index(test.classes[k]) for k in test.labels])})
                for g in chosen:
                    work = tmp / g
                    work.mkdir()
                    start = time.perf_counter()
                    try:
                        made = MAKERS[g](train_csv, labelled, len(train.x), split, work)
                        seconds = time.perf_counter() - start
                        row = {**judge(made, train, test, args.draws), "seconds": round(seconds, 1),
                               **RECIPE.pop(g, {})}
                    except Exception as e:  # a peer that fails on a table is a row that says so
                        row = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                    results.append({"table": name, "split": split, "generator": g, "rows": len(train.x),
                                    "dim": len(train.columns), **row})
                    print(json.dumps(results[-1]), flush=True)
    done = {(r["table"], r["split"], r["generator"]) for r in results}
    results += [{**r, "reused": r.get("reused", "previous run, same split")} for r in kept
                if (r["table"], r["split"], r["generator"]) not in done]
    meta = machine(splits=args.splits, draws=args.draws, toydiff_set=TOYDIFF_SET, kept_from=args.keep)
    publish(args.out, "tables", {"meta": meta, "rows": results},
            summary(results) + "\n\n" + goals(results, z_limit(EvalConfig().z_max, args.draws)))
    plot(results, Path(args.out) / "tables.png")


def summary(results: list[dict]) -> str:
    """Mean (and spread over splits) of each generator's numbers on each table."""
    keys = ("invalid", "gbt_auc", "knn_auc", "memorized", "efficacy", "seconds")
    lines = ["| table | generator | " + " | ".join(keys) + " | verdicts |", "|---|---|" + "---|" * (len(keys) + 1)]
    for name in dict.fromkeys(r["table"] for r in results):
        for g in dict.fromkeys(r["generator"] for r in results):
            mine = [r for r in results if r["table"] == name and r["generator"] == g and "error" not in r]
            if not mine:
                failed = [r for r in results if r["table"] == name and r["generator"] == g]
                if failed:
                    lines.append(f"| {name} | {g} | failed: {failed[0]['error'][:60]} |" + " |" * len(keys))
                continue
            cells = []
            for k in keys:
                v = [r[k] for r in mine if r.get(k) is not None]
                cells.append(f"{np.mean(v):.3f} +- {np.std(v):.3f}" if len(v) > 1 else
                             (f"{v[0]:.3f}" if v else ""))
            verdicts = ", ".join(f"{v} {sum(r['verdict'] == v for r in mine)}" for v in
                                 dict.fromkeys(r["verdict"] for r in mine))
            lines.append(f"| {name} | {g} | " + " | ".join(cells) + f" | {verdicts} |")
    lines += ["", "Each cell: mean +- standard deviation over the splits (70% training, 30% test rows). invalid: "
              "share of cells a column cannot take; gbt_auc, knn_auc: two-sample AUCs against the test rows "
              "(0.5 = indistinguishable); memorized: share closer to a training row than 90% of test rows are "
              "(about 0.1 expected); efficacy: test accuracy of trees trained on the samples."]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Tree and k-NN AUC of every generator on every table (mean and spread over splits; 0.5 = data)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tables = list(dict.fromkeys(r["table"] for r in results))
    gens = [g for g in GENERATORS if any(r["generator"] == g for r in results)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    width = 0.8 / len(gens)
    for ax, key, title in zip(axes, ("gbt_auc", "knn_auc"), ("gradient-boosted-tree AUC", "k-NN AUC")):
        for k, g in enumerate(gens):
            mean, spread = [], []
            for t in tables:
                v = [r[key] for r in results if r["table"] == t and r["generator"] == g and key in r]
                mean.append(np.mean(v) if v else np.nan)
                spread.append(np.std(v) if len(v) > 1 else 0.0)
            ax.bar(np.arange(len(tables)) + (k - (len(gens) - 1) / 2) * width, mean, width, yerr=spread,
                   label=g, color=plt.cm.tab10(k), capsize=2)
        ax.axhline(0.5, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(tables)), tables)
        ax.set_ylim(0.4, 1.02)
        ax.set_title(f"{title} against the test rows (0.5: indistinguishable)", fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), ncol=len(gens), fontsize=9, loc="lower center")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def goals(results: list[dict], limit: float) -> str:
    """Issue #28's goal on each table, toydiff against the best peer (means over splits): tree and k-NN AUC at
    or below the best peer's, memorization within its floor (z <= limit on every split), efficacy within 0.01
    of the best peer's or better, no invalid value, and a verdict that sees whatever the tree test sees. A peer
    whose samples are flagged as memorized (mean z > limit) is no peer to match on the classifier tests or
    efficacy: copies of the training rows pass both, so it is left out of "best"."""
    def mean(rows, key):
        v = [r[key] for r in rows if r.get(key) is not None]
        return float(np.mean(v)) if v else None

    lines = ["| table | tree AUC <= best peer | k-NN AUC <= best peer | memorized within floor | efficacy >= best "
             "peer - 0.01 | no invalid value | verdict sees the tree |", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["table"] for r in results):
        ok = [r for r in results if r["table"] == name and "error" not in r]
        mine = [r for r in ok if r["generator"] == "toydiff"]
        peers = {g: [r for r in ok if r["generator"] == g] for g in dict.fromkeys(r["generator"] for r in ok)
                 if g != "toydiff"}
        peers = {g: rows for g, rows in peers.items() if mean(rows, "memorized_z") <= limit}
        if not mine or not peers:
            continue
        cells = []
        for key, better in (("gbt_auc", min), ("knn_auc", min), ("efficacy", max)):
            theirs = {g: mean(rows, key) for g, rows in peers.items() if mean(rows, key) is not None}
            ours = mean(mine, key)
            if ours is None or not theirs:
                cells.append("")
                continue
            best = better(theirs, key=theirs.get)
            met = ours <= theirs[best] if key != "efficacy" else ours >= theirs[best] - 0.01
            cells.append(f"{'yes' if met else '**no**'} ({ours:.3f} vs {best} {theirs[best]:.3f})")
        cells.insert(2, "yes" if all(r["memorized_z"] <= limit for r in mine) else
                     f"**no** (z {max(r['memorized_z'] for r in mine):.1f} > {limit:.1f})")
        bad = max(r["invalid"] for r in mine)
        cells.insert(4, "yes" if bad == 0 else f"**no** ({bad:.1%} of cells)")
        seen = all(r["verdict"].startswith("distinguishable") for r in mine if r["gbt_auc_z"] > limit)
        cells.append("yes" if seen else "**no**")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", f"Goals: toydiff against the best peer on each test (z limit {limit:.2f}; "
                                   "peers flagged for memorizing left out); **no** marks a goal not met."])


if __name__ == "__main__":
    main()
