"""Early stopping on held-back training rows: the criterion on hand-written logs, the run's record, the best
weights restored, and a resume that stops where the uninterrupted run stopped, with its weights."""

import csv
import json

import numpy as np
import pytest
import torch

from toydiff import Run, train_run
from toydiff.core import config as C
from toydiff.core.errors import RunInterrupted, ToydiffError
from toydiff.jobs.validation import held_back, validation_loss
from toydiff.jobs.workflow import resume_run
from toydiff.training.loop import early_stop

from test_reliability import interrupt_at_loss_call, same_weights


def test_the_criterion_stops_once_the_best_row_is_patience_steps_old():
    cfg = C.TrainConfig(steps=1000, patience=0.2, log_every=10)  # patience: 200 steps
    rows = [{"step": s, "val_loss": v} for s, v in ((100, 0.9), (200, 0.5), (300, 0.6), (390, 0.55))]
    assert not early_stop(rows, cfg)  # best at 200, 190 steps ago
    assert early_stop(rows + [{"step": 400, "val_loss": 0.7}], cfg)
    assert not early_stop(rows + [{"step": 400, "val_loss": 0.4}], cfg)  # a new best
    assert not early_stop([{"step": 400, "loss": 0.1}], cfg)  # no validation: never
    short = C.TrainConfig(steps=100, patience=0.01, log_every=10)  # at least two log rows of patience
    assert not early_stop([{"step": 10, "val_loss": 0.1}, {"step": 20, "val_loss": 0.2}], short)


def test_which_rows_are_held_back():
    file_cfg = C.with_overrides(C.ExperimentConfig(), ["data.path=x.csv"])
    held = held_back(file_cfg, 200, True)
    assert len(held) == 20 and len(set(held)) == 20 and held.max() < 200  # auto: 10% of a file's rows
    assert np.array_equal(held, held_back(file_cfg, 200, True))  # the run's seed decides
    assert held_back(C.ExperimentConfig(), 200, True) is None  # the zoo's fresh draws: off
    assert held_back(file_cfg, 200, False) is None  # a student's objective: off
    assert held_back(C.with_overrides(file_cfg, ["train.validation=0"]), 200, True) is None
    assert held_back(C.with_overrides(C.ExperimentConfig(), ["train.validation=0.2"]), 200, False) is None
    assert len(held_back(C.with_overrides(C.ExperimentConfig(), ["train.validation=0.2"]), 200, True)) == 40
    from toydiff import methods
    consistency = C.with_overrides(C.ExperimentConfig(), ["train.validation=0.2", "train.objective=consistency",
                                                          "sample.sampler=consistency"])
    with pytest.raises(ToydiffError, match="the consistency method has none to watch; set train.validation = 0"):
        methods.check(consistency)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """60 rows of a 3-D Gaussian: a network of 33k parameters overfits them within a hundred steps."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "c"])
        w.writerows(np.random.default_rng(0).normal(size=(60, 3)).tolist())
    return C.with_overrides(C.ExperimentConfig(), [
        f"data.path={path}", "schedule.T=50", "train.steps=400", "train.log_every=10", "train.checkpoint_every=50",
        "train.warmup_steps=5", "train.patience=0.1", "train.validation=0.2", "train.sizing=off"])


def test_a_small_table_stops_early_with_its_best_weights_and_says_so(tiny, tmp_path):
    lines = []
    run = train_run(tiny, tmp_path / "r", log=lines.append)
    info = json.loads((run.path / "run.json").read_text())
    with open(run.path / "train_log.csv", newline="") as f:
        log = list(csv.DictReader(f))
    losses = {int(r["step"]): float(r["val_loss"]) for r in log}
    best = min(losses, key=losses.get)
    assert info["stopped_early"] and info["steps"] == max(losses) < 400  # stopped, at a log row
    assert info["validation"]["best_step"] == best and info["validation"]["rows"] == 10
    assert max(losses) - best >= 40 and any("stopped early at step" in line for line in lines)
    # the weights written are the best row's: their held-back loss is the best one logged
    loaded = Run.load(run.path)
    from toydiff.training.loop import make_state
    from toydiff.core.runtime import torch_generator
    state = make_state(loaded.model, tiny.train, loaded.method.timesteps(tiny), torch_generator(0, "t"))
    state.ema = None  # the loaded model is the sampling weights
    x = torch.as_tensor(loaded.scaler.transform(loaded.data), dtype=torch.float32)
    held = held_back(tiny, len(x), True)
    value = validation_loss(loaded, state, loaded.method.objective(loaded), x[held], None)()
    assert value == pytest.approx(losses[best], rel=1e-5)
    assert resume_run(run.path).path == run.path  # a finished early stop is not trained further
    assert json.loads((run.path / "run.json").read_text())["steps"] == info["steps"]


def test_a_run_interrupted_after_its_best_row_resumes_to_the_same_stop_and_weights(tiny, tmp_path, monkeypatch):
    whole = train_run(tiny, tmp_path / "whole")
    stop = json.loads((whole.path / "run.json").read_text())["steps"]
    interrupt_at_loss_call(monkeypatch, stop - 15)  # after the best row, before the stop
    with pytest.raises(RunInterrupted):
        train_run(tiny, tmp_path / "cut")
    monkeypatch.undo()
    resumed = resume_run(tmp_path / "cut")
    assert json.loads((resumed.path / "run.json").read_text())["steps"] == stop
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert same_weights(whole.path / name, resumed.path / name), name
