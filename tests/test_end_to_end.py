"""Slow end-to-end checks: real training runs judged by honest two-sample tests against fresh iid data."""

import json

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from toydiff.core import config as C
from toydiff import train_run
from toydiff.cli import main
from toydiff.data.datasets import moons, params
from toydiff.evaluation.metrics import knn_auc

pytestmark = pytest.mark.slow


def gaussian_fit_auc(train, reference, rng):
    """The AUC of the simplest generator: a Gaussian with the training data's mean and covariance."""
    fake = rng.multivariate_normal(train.mean(0), np.cov(train.T), size=len(reference))
    return knn_auc(fake, reference)


def exact_w2(a, b):
    """Exact 2-Wasserstein distance between two equal-size point clouds (optimal assignment)."""
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def test_short_training_beats_a_gaussian_fit(tmp_path):
    cfg = C.with_overrides(C.ExperimentConfig(), ["train.steps=1500", "train.log_every=500"])
    run = train_run(cfg, tmp_path / "run")
    rng = np.random.default_rng(11)
    reference = moons(3000, rng, noise=params(cfg.data).noise)[0]  # fresh iid data, never make_moons' skeleton
    scale = run.scaler.transform
    model_auc = knn_auc(scale(run.sample(3000, seed=5)), scale(reference))
    gauss_auc = gaussian_fit_auc(scale(run.data), scale(reference), rng)
    assert gauss_auc > 0.75
    assert model_auc < 0.6 and model_auc < gauss_auc - 0.15


def test_guide_preset_reproduces_the_guide(tmp_path, capsys):
    """`toydiff run --preset guide`: the guide's exact setting, judged against iid noise-free moons.

    An independent re-implementation of this setting, made for this project before toydiff existed,
    measured W2 = 0.195 +- 0.019 (3 training seeds, 2000 vs 2000 points, [-1, 1] frame): toydiff's
    reproduction must land there (docs/guide.md)."""
    out = tmp_path / "guide"
    # the evaluation runs whole (floors, both likelihoods) on fewer floor draws and held-out points: the
    # assertions below judge the reproduction independently of it
    assert main(["run", "--preset", "guide", "--quiet", "--out", str(out), "--set", "sample.n=2000",
                 "--set", "eval.draws=4", "--set", "eval.nll_n=200"]) == 0
    samples = np.load(out / "samples.npy")
    assert samples.shape == (2000, 2)
    assert json.loads((out / "metrics.json").read_text())["n"] == 2000
    assert {p.name for p in (out / "figures").iterdir()} == {
        "dataset.png", "forward.png", "samples.png", "vector_field.png", "schedules.png", "loss.png"}
    rng = np.random.default_rng(0)
    reference = moons(2000, rng, noise=0.0)[0]
    # the guide's frame: per-axis min-max of the moons, [-1, 2] x [-0.5, 1] onto [-1, 1]^2
    to_frame = lambda x: (x - [0.5, 0.25]) / [1.5, 0.75]  # noqa: E731
    w2 = exact_w2(to_frame(samples), to_frame(reference))
    # measured here: 0.206 +- 0.006 over 5 reference draws, whose own floor is 0.086 +- 0.036
    assert 0.14 < w2 < 0.28, w2
    gauss_auc = gaussian_fit_auc(to_frame(moons(1000, rng, 0.0)[0]), to_frame(reference), rng)
    assert knn_auc(to_frame(samples), to_frame(reference)) < gauss_auc - 0.1
