"""Class labels, label dropout, classifier-free guidance and per-class sampling."""

import numpy as np
import pytest
import torch

from toydiff import Run, train_run
from toydiff.core import config as C
from toydiff.cli import main
from toydiff.core.config import ScheduleConfig
from toydiff.data.datasets import moons_distance
from toydiff.core.errors import ToydiffError
from toydiff.diffusion.models import MLP
from toydiff.diffusion.parameterization import Denoiser, Prediction
from toydiff.diffusion.schedules import NoiseSchedule

COND = ["data.n=2000", "schedule.T=100", "model.width=32", "model.depth=2", "train.steps=1500",
        "train.batch_size=256", "train.warmup_steps=50", "model.conditional=true", "sample.n=200", "sample.steps=50"]


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory, unchanged):
    torch.set_num_threads(1)
    run = train_run(C.with_overrides(C.ExperimentConfig(), COND), tmp_path_factory.mktemp("cond") / "run")
    unchanged(run.path)
    return run


def on_outer_arc(x: np.ndarray) -> np.ndarray:
    """Whether each point is nearer the outer moon's circle (centre 0, 0) than the inner one's (1, 0.5)."""
    return np.abs(np.hypot(x[:, 0], x[:, 1]) - 1) < np.abs(np.hypot(x[:, 0] - 1, x[:, 1] - 0.5) - 1)


def test_each_label_samples_its_own_moon(cond_run):
    """Moons label 0 is the outer arc, 1 the inner (data.moons); -1 mixes them in the training proportions."""
    assert on_outer_arc(cond_run.sample(1000, label=0)).mean() > 0.9
    assert on_outer_arc(cond_run.sample(1000, label=1)).mean() < 0.1
    assert 0.4 < on_outer_arc(cond_run.sample(1000, label=-1)).mean() < 0.6


def test_guidance_above_one_sharpens_the_classes(cond_run):
    """Guidance trades diversity for fidelity: samples at w = 3 sit closer to the arcs than at w = 1."""
    plain = np.median(moons_distance(cond_run.sample(2000, label=-1, guidance=1.0)))
    guided = np.median(moons_distance(cond_run.sample(2000, label=-1, guidance=3.0)))
    assert guided < 0.8 * plain


def test_conditional_run_reloads_with_its_labels(cond_run):
    again = Run.load(cond_run.path)
    assert again.classes == 2 and np.array_equal(again.labels, cond_run.labels)
    assert np.array_equal(again.sample(50, seed=3, label=1, guidance=2.0),
                          cond_run.sample(50, seed=3, label=1, guidance=2.0))


class Lookup(torch.nn.Module):
    """out = (y + 1) * [1, 10] per point: a 'network' whose conditional and null outputs are known."""
    classes = 2

    def forward(self, x_t, t, y=None):
        y = torch.full((x_t.shape[0],), 2) if y is None else y
        return (y[:, None] + 1).to(x_t) * torch.tensor([1.0, 10.0]).to(x_t)


def test_guidance_is_u_plus_w_times_c_minus_u():
    s = NoiseSchedule.from_config(ScheduleConfig(T=10))
    x, t, y = torch.zeros(3, 2), torch.tensor([3, 5, 7]), torch.tensor([0, 1, 0])
    for w in (0.0, 1.0, 2.5):
        d = Denoiser(Lookup(), s, Prediction.X0, labels=y, guidance=w)
        c, u = (y[:, None] + 1) * torch.tensor([1.0, 10.0]), 3 * torch.tensor([1.0, 10.0])
        assert torch.allclose(d(x, t), u + w * (c - u))
    assert torch.allclose(Denoiser(Lookup(), s, Prediction.X0)(x, t), 3 * torch.tensor([1.0, 10.0]).expand(3, 2))


def test_guidance_with_a_shared_t_equals_guidance_row_by_row():
    """Samplers pass t as (1,): both halves of the guided batch must see it."""
    torch.manual_seed(0)
    s = NoiseSchedule.from_config(ScheduleConfig(T=10))
    net = MLP(2, 10, width=8, depth=1, classes=2)
    x, y = torch.randn(5, 2), torch.tensor([0, 1, 1, 0, 1])
    d = Denoiser(net, s, Prediction.V, labels=y, guidance=2.5)
    assert torch.allclose(d(x, torch.tensor([4])), d(x, torch.full((5,), 4)), atol=1e-6)


def test_the_null_label_is_the_default():
    net = MLP(2, 10, width=8, depth=1, classes=3)
    x, t = torch.randn(4, 2), torch.tensor([1, 2, 3, 4])
    assert torch.equal(net(x, t), net(x, t, torch.full((4,), 3)))


def test_conditioning_errors(cond_run, tiny_cfg, tmp_path):
    with pytest.raises(ToydiffError, match="model knows classes 0..1"):
        cond_run.sample(10, label=2)
    with pytest.raises(ToydiffError, match="need a class-conditional model"):
        train_run(C.with_overrides(tiny_cfg, ["sample.guidance=2.0"]), tmp_path / "a")
    with pytest.raises(ToydiffError, match="use model.arch=mlp"):
        train_run(C.with_overrides(tiny_cfg, ["model.arch=guide", "model.conditional=true"]), tmp_path / "b")
    with pytest.raises(ToydiffError, match="labels were given to a network trained without them"):
        MLP(2, 10, width=8, depth=1)(torch.zeros(1, 2), torch.tensor([1]), torch.tensor([0]))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_samples_one_class(cond_run, tmp_path, capsys):
    out = tmp_path / "inner.npy"
    assert main(["sample", str(cond_run.path), "--n", "300", "--label", "1", "--guidance", "1.5",
                 "--out", str(out)]) == 0
    assert on_outer_arc(np.load(out)).mean() < 0.1
    assert main(["sample", str(cond_run.path), "--label", "5", "--out", str(tmp_path / "x.npy")]) == 2
    assert "'5' is not a class" in capsys.readouterr().err and not (tmp_path / "x.npy").exists()


def test_each_class_is_judged_on_its_own_and_a_mixed_up_class_is_caught(tmp_path, monkeypatch):
    """A conditional run's report judges each class against that class's own reference, beside the pooled
    verdict. With a "model" whose samples are exact draws of the data, class by class, every class passes;
    when it draws class 0 for label 1, the pooled samples look half right but class 1 is flagged, by its
    metrics and by the class-accuracy check (a classifier fitted to the training rows)."""
    from toydiff.evaluation.judge import evaluate_run
    from toydiff.evaluation.reference import class_targets
    cfg = C.with_overrides(C.ExperimentConfig(), ["model.conditional=true", "data.n=2000", "schedule.T=8",
                                                  "model.width=16", "model.depth=1", "train.steps=5",
                                                  "eval.n=1000", "eval.draws=10", "eval.w2_n=200", "eval.nll_n=0"])
    run = train_run(cfg, tmp_path / "run")
    draws = class_targets(cfg, 2)

    def exact(self, n, seed=None, label=-1, mix_up=False, **kw):
        rng = np.random.default_rng(seed or 0)
        if label < 0:
            return np.concatenate([draws[0].draw(rng, n // 2), draws[1].draw(rng, n - n // 2)])
        return draws[0 if mix_up else label].draw(rng, n)
    monkeypatch.setattr(Run, "sample", exact)
    report = evaluate_run(run, run.sample(1000))
    assert set(report["per_class"]) == {"0", "1"}
    assert all(not row["flagged"] for row in report["per_class"].values()), report["per_class"]
    monkeypatch.setattr(Run, "sample", lambda self, n, seed=None, label=-1, **kw:
                        exact(self, n, seed, label, mix_up=label == 1))
    report = evaluate_run(run, run.sample(1000))
    assert not report["per_class"]["0"]["flagged"]
    one = report["per_class"]["1"]
    assert "class_accuracy" in one["flagged"] and one["class_accuracy"]["samples"] < 0.1 < 0.9 < \
        one["class_accuracy"]["reference"]
    assert one["verdict"].startswith("distinguishable from data at n = 500: the classifier names the class of")


def test_a_conditional_run_is_judged_class_by_class_on_the_file_it_is_given(tmp_path, capsys):
    """Issue #28: `toydiff eval RUN --data FILE` on a conditional run trained without held-out rows judges the
    file's rows, pooled and class by class (the file's label column matched by value); a file without the label
    column is judged pooled and says so; a label the run never trained on is refused before anything is
    computed, and metrics.json is left as it was."""
    import json
    rng = np.random.default_rng(5)

    def table(n):
        kind = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 2)) + np.where(kind[:, None] == 1, 3.0, -3.0)
        return x, np.array(["down", "up"])[kind]

    def write(path, x, kind, label=True):
        lines = ["a,b" + (",kind" if label else "")] + [
            f"{r[0]!r},{r[1]!r}" + (f",{k}" if label else "") for r, k in zip(x.tolist(), kind)]
        path.write_text("\n".join(lines) + "\n")
        return path
    train = write(tmp_path / "train.csv", *table(600))
    test = write(tmp_path / "test.csv", *table(300))
    run = tmp_path / "run"
    assert main(["train", "--quiet", "--data", str(train), "--label-column", "kind", "--out", str(run),
                 "--set", "data.holdout=0", "--set", "train.steps=200", "--set", "schedule.T=20",
                 "--set", "model.width=32", "--set", "model.depth=1", "--set", "eval.nll_n=0"]) == 0
    assert main(["eval", str(run), "--data", str(test), "--n", "200", "--draws", "4", "--quiet"]) == 0
    report = json.loads((run / "metrics.json").read_text())
    assert set(report["per_class"]) == {"down", "up"} and report["reference"]["rows"] == 300
    assert all(row["n"] >= 20 for row in report["per_class"].values())
    capsys.readouterr()
    x, kind = table(100)
    assert main(["eval", str(run), "--data", str(write(tmp_path / "plain.csv", x, kind, label=False)), "--n", "100",
                 "--draws", "4"]) == 0
    assert "the classes are not judged one by one" in capsys.readouterr().err
    assert "per_class" not in json.loads((run / "metrics.json").read_text())
    before = (run / "metrics.json").read_bytes()
    bad = write(tmp_path / "bad.csv", x, np.where(kind == "up", "sideways", kind))
    assert main(["eval", str(run), "--data", str(bad), "--n", "100", "--draws", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has the label 'sideways', which is not a class of the run (down, up)" in err
    assert (run / "metrics.json").read_bytes() == before
