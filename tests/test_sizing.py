"""Sizing a file's recipe (train.sizing): which recipes are compared, that each probe is exactly the run its
recipe would make when configured by hand, that the lowest is chosen, recorded and trained, that the written
config reproduces the run, and the refusals."""

import csv
import json
import os
import tomllib

import numpy as np
import pytest

from toydiff import Run, train_run
from toydiff.cli import main
from toydiff.core import config as C
from toydiff.jobs.validation import SIZING_DECAY, SIZING_Z, candidates, compare

from test_reliability import same_weights


def test_candidates_change_one_thing_at_a_time_and_keep_what_the_user_set():
    def cfg(*sets):
        return C.with_overrides(C.ExperimentConfig(), ["data.path=x.csv", *sets])
    assert candidates(cfg(), 4) == [(64, 0.0), (32, 0.0), (64, SIZING_DECAY)]
    assert candidates(cfg(), 40) == [(256, 0.0), (128, 0.0), (256, SIZING_DECAY)]  # 4 x 40 -> 256
    assert candidates(cfg("model.width=48"), 4) == [(48, 0.0), (48, SIZING_DECAY)]
    assert candidates(cfg("train.weight_decay=0.01"), 4) == [(64, 0.01), (32, 0.01)]
    assert candidates(cfg("model.width=48", "train.weight_decay=0.01"), 4) == [(48, 0.01)]


def test_a_candidate_replaces_the_rules_recipe_only_when_lower_row_by_row_by_two_standard_errors():
    from scipy.stats import ttest_rel
    rng = np.random.default_rng(0)
    rules = rng.uniform(0.5, 1.5, 12)  # rows differ a lot from one another; that is not the candidates' doing
    steady = rules - 0.03 + rng.normal(0, 0.01, 12)  # 3% lower on every row: significant
    lucky = rules - 0.06 + rng.normal(0, 0.5, 12)  # lower on average, by noise: not
    worse = rules + 0.02 + rng.normal(0, 0.01, 12)
    tried = [{"loss": float(v.mean())} for v in (rules, steady, lucky, worse)]
    chosen = compare(tried, [rules, steady, lucky, worse])
    assert chosen is tried[1] and tried[2]["loss"] < tried[1]["loss"]  # the lucky one is lower, and not chosen
    for c, v in zip(tried[1:], (steady, lucky, worse)):
        assert c["z"] == pytest.approx(ttest_rel(v, rules).statistic)  # the paired t statistic
        assert c["difference"] == pytest.approx((v.mean() - rules.mean()) / rules.mean())
    assert tried[1]["z"] < -SIZING_Z < tried[2]["z"]
    only_noise = [{"loss": 1.0}, {"loss": 0.9}]
    assert compare(only_noise, [rules, lucky]) is only_noise[0]
    uniform = [{"loss": 1.0}, {"loss": 0.99}]  # lower by the same amount on every row: chosen
    assert compare(uniform, [rules, rules - 0.01]) is uniform[1] and uniform[1]["z"] == -1e6


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """90 rows: a 2-D Gaussian and a count column; 400 steps, so each probe is 100 steps of 10-step log rows."""
    path = tmp_path_factory.mktemp("small") / "small.csv"
    rng = np.random.default_rng(3)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "n"])
        w.writerows(np.c_[rng.normal(size=(90, 2)), rng.integers(0, 4, 90)].tolist())
    return C.with_overrides(C.ExperimentConfig(), [
        f"data.path={path}", "schedule.T=50", "train.steps=400", "train.log_every=10", "train.checkpoint_every=0",
        "train.warmup_steps=5", "train.patience=0.2"])


def test_a_file_is_sized_by_the_probes_lowest_loss_recorded_and_reproduced(small, tmp_path):
    lines = []
    run = train_run(small, tmp_path / "sized", log=lines.append)
    record = json.loads((run.path / "run.json").read_text())["sizing"]
    tried = record["candidates"]
    assert record["probe_steps"] == 100 and [(c["width"], c["weight_decay"]) for c in tried] == candidates(small, 3)
    better = [c for c in tried[1:] if c["z"] < -SIZING_Z]  # lower than the rules' by 2 standard errors
    lowest = min(better, key=lambda c: c["loss"]) if better else tried[0]
    assert record["chosen"] == {"width": lowest["width"], "weight_decay": lowest["weight_decay"]}
    assert any(line.startswith("sizing: held-back loss") and
               (f"chosen width {lowest['width']}," if better else "the rules' recipe kept") in line for line in lines)
    written = tomllib.loads((run.path / "config.toml").read_text())
    assert (written["model"]["width"], written["train"]["weight_decay"], written["train"]["sizing"]) == \
        (lowest["width"], lowest["weight_decay"], "off")
    layers = Run.load(run.path).model.named_modules()  # the network trained is the choice
    assert [m.out_features for name, m in layers if name.endswith("inp")] == [lowest["width"]]

    # each probe is the first quarter of the run its recipe makes when configured by hand: the same losses
    for c in tried:
        by_hand = train_run(C.with_overrides(small, [f"model.width={c['width']}", f"train.weight_decay="
                                                     f"{c['weight_decay']}", "train.sizing=off"]),
                            tmp_path / f"probe-{c['width']}-{c['weight_decay']}")
        with open(by_hand.path / "train_log.csv", newline="") as f:
            quarter = [r for r in csv.DictReader(f) if int(r["step"]) <= 100]
        best = min(quarter, key=lambda r: float(r["val_loss"]))
        assert (float(best["val_loss"]), int(best["step"])) == (pytest.approx(c["loss"], rel=1e-6), c["step"])

    # the written config trains the same weights with no sizing at all
    again = train_run(C.load(run.path / "config.toml"), tmp_path / "again", log=lines.append)
    assert "sizing" not in json.loads((again.path / "run.json").read_text())
    assert same_weights(run.path / "model_ema.safetensors", again.path / "model_ema.safetensors")


def test_the_zoo_and_wide_frames_are_not_sized_and_off_is_off(small, tmp_path):
    zoo = train_run(C.with_overrides(C.ExperimentConfig(), ["data.n=300", "train.steps=20"]), tmp_path / "zoo")
    assert "sizing" not in json.loads((zoo.path / "run.json").read_text())
    off = train_run(C.with_overrides(small, ["train.sizing=off"]), tmp_path / "off")
    info = json.loads((off.path / "run.json").read_text())
    assert "sizing" not in info and info["width"] == 64


@pytest.mark.parametrize("sets, needle", [
    (["train.sizing=on"], "no held-back rows (set train.validation > 0)"),
    (["train.sizing=on", "train.validation=0.2", "model.width=32", "train.weight_decay=0.1"],
     "both model.width and train.weight_decay set"),
    (["train.sizing=on", "train.validation=0.2", "model.arch=guide"], "the guide's fixed network"),
    (["train.sizing=maybe"], "train.sizing"),
])
def test_sizing_that_cannot_be_done_is_one_line_exit_2_and_nothing_is_written(tmp_path, capsys, sets, needle):
    out = tmp_path / "r"
    flags = [a for s in sets for a in ("--set", s)]
    code = main(["run", "--out", str(out), "--quiet", "--set", "train.steps=2", "--set", "data.n=400", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]
