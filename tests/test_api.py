"""The Python API a notebook user meets, and the house rules behind it: configs from dicts and keywords checked
like TOML, names as strings everywhere, re-running a cell (if_exists), figures as Figures, "did you mean",
progress on long phases, a live loss log, a light `import toydiff`, and every run-directory file named once."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import toydiff
from conftest import TINY
from toydiff.core import config as C
from toydiff.cli import main
from toydiff.core.errors import ToydiffError

SRC = Path(toydiff.__file__).parent
QUICK = {"data": {"n": 256}, "schedule": {"T": 8}, "model": {"width": 16, "depth": 1},
         "train": {"steps": 30, "batch_size": 64, "warmup_steps": 0, "checkpoint_every": 20, "log_every": 10},
         "sample": {"n": 64}, "eval": {"n": 60, "draws": 3, "w2_n": 30, "nll_n": 0}}


def test_public_names_are_declared_and_resolve():
    assert set(toydiff.__all__) == set(toydiff._API) | {"__version__"}
    for name in toydiff.__all__:
        assert getattr(toydiff, name) is not None
    with pytest.raises(AttributeError):
        toydiff.nothing_here


def test_sections_from_dicts_and_keywords_are_checked_like_toml():
    cfg = C.ExperimentConfig(schedule={"T": 10}, model={"prediction": "eps"}, seed=3)
    assert cfg.schedule.T == 10 and cfg.schedule.name == "cosine" and cfg.model.prediction == "eps" and cfg.seed == 3
    assert cfg == C.loads(cfg.to_toml())
    assert C.ScheduleConfig(T=10, beta_end=1).beta_end == 1.0  # an int where a float belongs, as in TOML
    for kwargs, message in [({"schedule": {"T": "10"}}, "schedule.T must be an integer, got '10'"),
                            ({"schedule": {"nmae": "linear"}}, r"unknown config key 'schedule.nmae'.*\(did you mean 'name'\?\)"),
                            ({"schedule": 10}, r"\[schedule\] must be a table of keys"),
                            ({"sample": {"sampler": "dpmpp2m"}}, r"unknown sampler 'dpmpp2m'.*\(did you mean 'dpmpp-2m'\?\)"),
                            ({"seed": 1.5}, "seed must be an integer")]:
        with pytest.raises(ToydiffError, match=message):
            C.ExperimentConfig(**kwargs)
    with pytest.raises(ToydiffError, match="train.lr must be > 0"):
        C.TrainConfig(lr=0)
    with pytest.raises(ToydiffError, match=r"unknown config key 'sed'.*\(did you mean 'seed'\?\)"):
        toydiff.make_config(sed=3)


def test_a_prediction_is_accepted_by_name_everywhere():
    from toydiff.diffusion.parameterization import Prediction, to_eps, to_x0, training_target
    from toydiff.diffusion.schedules import NoiseSchedule
    from toydiff import methods
    from toydiff.methods.ddpm import Denoising
    from toydiff.training.loop import make_state, train
    x0, eps, ab = torch.randn(4, 2), torch.randn(4, 2), torch.full((4, 1), 0.3)
    for kind in Prediction:
        target = training_target(kind.value, x0, eps, ab)
        assert torch.equal(target, training_target(kind, x0, eps, ab))
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        assert torch.allclose(to_x0(kind.value, target, x_t, ab), x0, atol=1e-5)
        assert torch.allclose(to_eps(kind.value, target, x_t, ab), eps, atol=1e-5)
    cfg = C.ExperimentConfig(**{k: v for k, v in QUICK.items() if k in ("schedule", "train")})
    schedule = NoiseSchedule.from_config(cfg.schedule)
    model = torch.nn.Linear(2, 2)
    net = lambda x, t: model(x)  # noqa: E731
    net.parameters = model.parameters
    net.train, net.eval = model.train, model.eval
    state = make_state(model, cfg.train, methods.of(cfg).timesteps(cfg),
                       torch.Generator().manual_seed(0))
    state.model = net
    rows = train(state, schedule, torch.randn(256, 2), cfg.train, Denoising("eps"))
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    with pytest.raises(ToydiffError, match="unknown prediction 'score'"):
        training_target("score", x0, eps, ab)


def test_run_then_rerun_the_cell(tmp_path):
    out = tmp_path / "cell"
    first = toydiff.run(QUICK, out, quiet=True)
    assert first.path == out and first.samples.shape == (64, 2) and first.verdict.startswith(("indist", "dist", "inconclusive"))
    assert set(first.figures) == {"dataset", "forward", "samples", "vector_field", "schedules", "loss", "oracle"}
    with pytest.raises(ToydiffError, match="already exists and is not empty"):
        toydiff.run(QUICK, out, quiet=True)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = toydiff.run(QUICK, out, if_exists="reuse", quiet=True)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # not trained again
    assert np.array_equal(again.samples, first.samples.astype(np.float32)) and again.report == first.report
    with pytest.raises(ToydiffError, match=r"made with another configuration \(train.steps differ\)"):
        toydiff.run(QUICK, out, if_exists="reuse", quiet=True, train={"steps": 31})
    (out / "metrics.json").unlink()
    redone = toydiff.run(QUICK, out, if_exists="reuse", quiet=True)  # only what is missing is redone
    assert (out / "metrics.json").is_file() and redone.report["verdict"] == first.report["verdict"]
    with pytest.raises(ToydiffError, match="data.dim applies only"):  # refused before the old run is deleted
        toydiff.run(QUICK, out, if_exists="replace", quiet=True, data={"n": 256, "dim": 3})
    assert (out / "metrics.json").is_file()
    replaced = toydiff.run(QUICK, out, if_exists="replace", quiet=True, train={"steps": 31})
    assert replaced.run.config.train.steps == 31
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ToydiffError, match="is not a toydiff run directory; toydiff will not replace it"):
        toydiff.run(QUICK, other, if_exists="replace", quiet=True)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(ToydiffError, match="unknown if_exists 'overwrite'; choose one of: error, replace, reuse"):
        toydiff.run(QUICK, out, if_exists="overwrite")


def test_reuse_resumes_an_interrupted_run(tmp_path, monkeypatch):
    import toydiff.training.loop as tr
    from toydiff.core.errors import RunInterrupted
    original, calls = tr.diffusion_loss, {"n": 0}

    def stop_at_25(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt
        return original(*a, **kw)
    monkeypatch.setattr(tr, "diffusion_loss", stop_at_25)
    with pytest.raises(RunInterrupted):
        toydiff.run(QUICK, tmp_path / "cut", quiet=True)
    monkeypatch.undo()
    whole = toydiff.run(QUICK, tmp_path / "whole", quiet=True)
    resumed = toydiff.run(QUICK, tmp_path / "cut", if_exists="reuse", quiet=True)
    assert np.array_equal(resumed.samples, whole.samples)


def test_load_evaluate_and_figures(tmp_path):
    toydiff.run(QUICK, tmp_path / "r", quiet=True, evaluate=False)
    run = toydiff.load(tmp_path / "r")
    x = run.sample(80, seed=2, sampler="ddim", steps=4)
    report = toydiff.evaluate(run, x, quiet=True)
    assert report["n"] == 60 and set(report["metrics"]) >= {"mmd2", "knn_auc", "w2"}
    assert (tmp_path / "r" / "metrics.json").is_file()
    figs = toydiff.plot(run, x)
    assert set(figs) == {"dataset", "forward", "samples", "vector_field", "schedules", "loss", "oracle"}
    assert all(isinstance(f, Figure) for f in figs.values())
    with pytest.raises(ToydiffError, match="eval.n must be >= 20"):
        toydiff.evaluate(run, x, n=5)


def test_a_misspelled_flag_or_command_gets_a_suggestion(capsys):
    assert main(["sample", "runs/x", "--stpes", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized argument '--stpes' (did you mean '--steps'?)" in err
    assert "(see `toydiff sample --help`)" in err
    assert main(["rn"]) == 2
    assert "invalid choice: 'rn'" in (err := capsys.readouterr().err) and "(did you mean 'run'?)" in err
    assert main(["run", "--set", "schedule.nmae=linear"]) == 2
    assert "(did you mean 'name'?)" in capsys.readouterr().err


def test_the_command_line_imports_no_heavy_library():
    """--help, --version and argument errors answer at once: `import toydiff.cli` pulls in neither torch nor
    scikit-learn nor matplotlib (each is imported by the subcommand that uses it)."""
    code = ("import sys, toydiff, toydiff.cli; "
            "print(sorted(m for m in ('torch', 'sklearn', 'matplotlib', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_progress_lines_off_a_terminal_name_the_rate_and_time_left(monkeypatch, capsys):
    from toydiff.core import progress
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)
    with progress.Progress(40, "train", "step", stream=sys.stderr) as bar:
        for _ in range(3):
            bar.update()
        bar.set_postfix(loss="0.1234")
        bar.update()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4
    assert re.fullmatch(r"train: 4/40 step \(10%\), [0-9.e+]+ step/s, [0-9]+ s left, loss 0.1234", lines[-1])
    with progress.Progress(None, "ODE likelihood", "evaluation", enabled=False) as bar:
        bar.update()
    assert capsys.readouterr().err == ""


def test_the_loss_log_grows_as_training_goes(tmp_path, monkeypatch):
    """train.log_every rows reach train_log.csv as they are logged, not only at checkpoints."""
    from toydiff.runs.directory import RunDir
    seen = []
    original = RunDir.append_log

    def spy(self, row):
        seen.append(self.train_log.read_text().count("\n") if self.train_log.is_file() else 0)
        original(self, row)
    monkeypatch.setattr(RunDir, "append_log", spy)
    cfg = C.with_overrides(C.ExperimentConfig(), TINY + ["train.checkpoint_every=0"])
    toydiff.train_run(cfg, tmp_path / "live")
    assert seen == [0, 2, 3]  # header and one more row each time; no checkpoint in between
    assert (tmp_path / "live" / "train_log.csv").read_text().count("\n") == 4


def test_every_run_directory_file_is_named_in_rundir_alone():
    from toydiff.runs import directory as rundir
    names = [v for k, v in vars(rundir).items() if k.isupper() and isinstance(v, str) and "." in v]
    assert {"run.json", "config.toml", "model.safetensors", "metrics.json", "train_log.csv"} <= set(names)
    for path in SRC.rglob("*.py"):
        if path == Path(rundir.__file__):
            continue
        text = path.read_text()
        assert not [n for n in names if f'"{n}"' in text or f"'{n}'" in text], path.relative_to(SRC)


def test_layers_point_one_way():
    """The data package imports no schedule, oracle or torch; training does not import the likelihoods."""
    code = ("import sys, toydiff.data.datasets, toydiff.data.scaler, toydiff.data.tables; "
            "print(sorted(m for m in ('torch', 'toydiff.diffusion.oracle', 'toydiff.diffusion.schedules', "
            "'toydiff.diffusion.likelihood') if m in sys.modules)); import toydiff.training.loop; "
            "print('toydiff.diffusion.likelihood' in sys.modules, 'torchdiffeq' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split("\n")[:2] == ["[]", "False False"], out.stderr
