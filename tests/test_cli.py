"""The command line, in-process: the main job, each verb, and one-line errors with exit code 2."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY
from toydiff.cli import main


def _sets(items):
    return [a for item in items for a in ("--set", item)]


@pytest.fixture
def run_dir(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--no-eval", "--out", str(out)] + _sets(TINY)) == 0  # eval: test_evaluation.py
    capsys.readouterr()
    return out


def test_run_writes_weights_samples_the_five_figures_the_oracle_s_and_the_loss_curve(run_dir):
    assert (run_dir / "model.safetensors").is_file()
    samples = np.load(run_dir / "samples.npy")
    assert samples.shape == (64, 2) and np.isfinite(samples).all()
    assert (run_dir / "samples.csv").read_text().splitlines()[0] == "x1,x2"
    figures = {p.name for p in (run_dir / "figures").iterdir()}
    assert figures == {"dataset.png", "forward.png", "samples.png", "vector_field.png", "schedules.png", "loss.png",
                       "oracle.png"}  # the noisy moons' exact law is known: the learned field beside the true one
    for f in (run_dir / "figures").iterdir():
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_and_plot_need_only_the_run_directory(run_dir, tmp_path, capsys):
    out = tmp_path / "s.csv"
    assert main(["sample", str(run_dir), "--n", "7", "--seed", "1", "--out", str(out),
                 "--trajectory", str(tmp_path / "path.npy")]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "x1,x2" and len(lines) == 8
    assert np.load(tmp_path / "path.npy").shape == (9, 7, 2)  # T = 8: x_8 .. x_0
    (run_dir / "figures" / "samples.png").unlink()
    assert main(["plot", str(run_dir)]) == 0
    assert (run_dir / "figures" / "samples.png").is_file()
    assert "figure:" in capsys.readouterr().out


def test_animate_writes_a_gif_of_the_reverse_and_the_forward_process(run_dir, tmp_path, capsys):
    """Frames as asked (the reverse path has T + 1 = 9 states here, so 9 at most), fixed size, a few hundred kB;
    the default paths are the run's figures folder."""
    from PIL import Image

    assert main(["animate", str(run_dir), "--frames", "6", "--n", "300", "--quiet"]) == 0
    gif = run_dir / "figures" / "reverse.gif"
    with Image.open(gif) as im:
        assert im.n_frames == 6 and im.size == (320, 320)
    assert gif.stat().st_size < 5_000_000
    assert main(["animate", str(run_dir), "--frames", "30", "--n", "300", "--quiet", "--out",
                 str(tmp_path / "r.gif")]) == 0
    with Image.open(tmp_path / "r.gif") as im:
        assert im.n_frames == 9  # every state of the 8-step path, x_T .. x_0
    assert main(["animate", str(run_dir), "--forward", "--frames", "5", "--n", "300"]) == 0
    with Image.open(run_dir / "figures" / "forward.gif") as im:
        assert im.n_frames == 5
    assert main(["animate", str(run_dir), "--frames", "4", "--n", "300", "--quiet", "--out",
                 str(tmp_path / "r.webp")]) == 0
    with Image.open(tmp_path / "r.webp") as im:
        assert im.format == "WEBP" and im.n_frames == 4 and im.size == (320, 320)
    assert "animation:" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--out", "x.png"], "--out must end in .gif or .webp"),
    (["--frames", "1"], "--frames in 2..1000, got --n 2000 --frames 1"),
    (["--n", "0"], "--n must be in 1..100,000"), (["--frames", "100000"], "--frames in 2..1000"),
    (["--out", "nowhere/x.gif"], "does not exist"),
    (["--out", "/proc/x.gif"], "cannot write '/proc/x.gif'"),
])
def test_bad_animate_input_is_one_line_and_writes_nothing(run_dir, tmp_path, capsys, args, message):
    before = sorted(p.name for p in (run_dir / "figures").iterdir())
    assert main(["animate", str(run_dir)] + [a.replace("nowhere", str(tmp_path / "nowhere")) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert sorted(p.name for p in (run_dir / "figures").iterdir()) == before


def test_an_animation_s_bounds_are_its_own_in_the_python_api(run_dir):
    from toydiff import load
    from toydiff.core.errors import ToydiffError
    from toydiff.pictures.figures import forward_frames, reverse_frames
    run = load(run_dir)
    for frames_of, n, count in ((reverse_frames, 0, 5), (forward_frames, 10, 1), (reverse_frames, 10, 2.5)):
        with pytest.raises(ToydiffError, match="--n must be in 1..100,000 and --frames in 2..1000"):
            frames_of(run, n, count)


def test_animate_needs_a_run_directory(tmp_path, capsys):
    assert main(["animate", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


def test_config_prints_resolved_toml(capsys, tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[schedule]\nT = 25\n")
    assert main(["config", "--preset", "guide", "--config", str(f), "--set", "train.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "T = 25" in out and "steps = 7" in out and 'arch = "guide"' in out


@pytest.mark.parametrize("argv, message", [
    (["run", "--preset", "nope"], "unknown preset 'nope'; choose one of: default, fast, guide"),
    (["run", "--set", "data.name=spiral"], "unknown dataset 'spiral'; choose one of: moons, sklearn-moons"),
    (["run", "--set", "schedule.name=sig"], "unknown schedule 'sig'; choose one of: linear, polynomial, cosine, sigmoid"),
    (["run", "--set", "model.arch=unet"], "unknown model 'unet'; choose one of: guide, mlp"),
    (["run", "--set", "schedule.T=0"], "schedule.T must be >= 1"),
    (["run", "--set", "schedule.beta_end=2", "--set", "schedule.name=linear"], "is outside (0, 1]"),
    (["run", "--set", "train.stepz=3"], "unknown config key 'train.stepz'"),
    (["run", "--set", "sample.n=-5"], "sample.n must be >= 1"),
    (["run", "--device", "tpu"], "unknown device 'tpu'"),
    (["run", "--set", "sample.variance=medium"], "unknown sample.variance 'medium'; choose one of: auto, small, large, learned"),
    (["run", "--set", "sample.sampler=heun", "--set", "sample.eta=0.5"], "applies only to the ddim sampler"),
    (["run", "--set", "sample.spacing=even"], "unknown sample.spacing 'even'"),
    (["run", "--set", "sample.spacing=even"], "unknown sample.spacing 'even'; choose one of: auto, trailing"),
    (["run", "--config", "/nonexistent.toml"], "config file '/nonexistent.toml' does not exist"),
    (["sample", "/nonexistent/run"], "run directory '/nonexistent/run' does not exist"),
    (["plot", "/"], "is not a toydiff run directory"),
    (["fly"], "invalid choice: 'fly'"),
    (["sample"], "the following arguments are required: RUN_DIR"),
    (["run", "--set"], "expected one argument"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    if argv[0] == "run":
        argv = argv + ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("toydiff: error: ") and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "number of samples must be in 1..100,000,000"), (["--n", "1000000000"], "must be in 1..100,000,000"),
    (["--out", "x.txt"], "--out must end in .npy or .csv"),
    (["--batch-size", "-1"], "batch_size must be >= 1"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--seed", "-1"], "sampling seed must be an integer in [0, 2^63)"),
])
def test_bad_sample_flags(run_dir, args, message, capsys):
    before = (run_dir / "samples.npy").read_bytes()
    assert main(["sample", str(run_dir)] + args) == 2
    assert message in capsys.readouterr().err
    assert (run_dir / "samples.npy").read_bytes() == before


def test_existing_output_is_not_touched(run_dir, capsys):
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert main(["run", "--out", str(run_dir)] + _sets(TINY)) == 2
    assert "already exists" in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_real_process_exits_2_without_traceback():
    r = subprocess.run([sys.executable, "-m", "toydiff", "run", "--set", "schedule.T=-3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "toydiff: error: schedule.T must be >= 1, got -3"


def test_quiet_run_still_warns_about_alpha_bar_T(tmp_path, capsys):
    argv = ["train", "--quiet", "--out", str(tmp_path / "w")] + _sets(TINY + ["schedule.name=linear"])
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: alpha_bar_T = 0.9") and err.count("\n") == 1
