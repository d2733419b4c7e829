"""The grid runner on a tiny grid: cells, seeds, outputs, resume, bad grids."""

import json

import pytest

from conftest import TINY
from toydiff.core import config as C
from toydiff.jobs import study
from toydiff.cli import main
from toydiff.core.errors import ToydiffError

FAST = TINY + ["eval.n=60", "eval.draws=3", "eval.w2_n=30", "eval.nll_n=0", "sample.n=60"]


def tiny_grid(seeds=2):
    axes = study.parse_axes({"schedule.T": [4, 6], "schedule": {"cos": {"schedule.name": "cosine"},
                                                                "poly": {"schedule.name": "polynomial"}}})
    return study.build_grid(C.ExperimentConfig(), axes, seeds, FAST)


def test_grid_is_the_cartesian_product():
    grid = tiny_grid()
    assert [c.name for c in grid.cells] == ["T=4,schedule=cos", "T=4,schedule=poly", "T=6,schedule=cos",
                                            "T=6,schedule=poly"]
    assert grid.cells[1].overrides == ("schedule.T=4", 'schedule.name="polynomial"')


@pytest.mark.serial  # two worker processes
def test_study_runs_every_cell_and_seed_and_resumes(tmp_path):
    grid = tiny_grid()
    rows = study.run_study(grid, tmp_path, jobs=2)
    assert len(rows) == 8 and {(r["cell"], r["seed"]) for r in rows} == {(c.name, s) for c in grid.cells
                                                                       for s in (0, 1)}
    assert all(0.0 <= r["knn_auc"] <= 1.0 for r in rows)
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert len(lines) == 9 and lines[0].startswith("cell,T,schedule,seed,")
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("\n") == 2 + 4 and "| 4 | cos |" in summary
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "study.html").read_text()  # the same table and the plot on one self-contained page
    assert page.count("<tr>") == 1 + 4 and "<td>cos</td>" in page and "data:image/png;base64," in page
    assert "http" not in page.replace("http-equiv", "")
    # resume: finished runs are not redone; an unfinished one (no result.json) is
    done = tmp_path / "runs" / "cell000-seed0" / "result.json"
    stamp = done.stat().st_mtime_ns
    (tmp_path / "runs" / "cell003-seed1" / "result.json").unlink()
    again = study.run_study(grid, tmp_path, jobs=1)
    assert done.stat().st_mtime_ns == stamp
    assert (tmp_path / "runs" / "cell003-seed1" / "result.json").is_file()
    key = lambda r: (r["cell"], r["seed"])  # noqa: E731
    assert [json.dumps(r, sort_keys=True) for r in sorted(again, key=key)][:7] == \
        [json.dumps(r, sort_keys=True) for r in sorted(rows, key=key)][:7]


def test_grid_file_and_builtin_guide(tmp_path):
    f = tmp_path / "g.toml"
    f.write_text('seeds = 2\nset = ["train.steps=5"]\n[axes]\n"data.scaling" = ["minmax", "standardize"]\n')
    grid = study.load_grid_file(f)
    assert grid.seeds == 2 and len(grid.cells) == 2 and grid.base.train.steps == 5
    guide = study.load_grid_file(study.builtin_grid_path("guide"))
    assert len(guide.cells) == 18 and guide.seeds == 3 and guide.base.model.arch == "guide"
    linear = [c for c in guide.cells if c.levels["schedule"] == "linear"][0]
    cfg = C.with_overrides(guide.base, list(linear.overrides))
    assert (cfg.schedule.name, cfg.schedule.power) == ("polynomial", 1.0)


@pytest.mark.parametrize("axes, message", [
    ({"schedule.T": []}, "must be a non-empty list"),
    ({"schedule.T": [0]}, "schedule.T must be >= 1"),
    ({"schedule.name": ["sigmoidal"]}, "unknown schedule 'sigmoidal'"),
    ({"data.nope": [1]}, "unknown config key 'data.nope'"),
])
def test_bad_grids_are_refused_before_anything_runs(axes, message):
    with pytest.raises(ToydiffError, match=message):
        study.build_grid(C.ExperimentConfig(), study.parse_axes(axes), 1, [])


def test_cli_study_errors(capsys, tmp_path):
    assert main(["study", "--out", str(tmp_path / "s")]) == 2
    assert "give the grid one way" in capsys.readouterr().err
    assert main(["study", "--builtin", "nope"]) == 2
    assert "unknown built-in study 'nope'; choose one of: guide" in capsys.readouterr().err
    assert main(["study", "--grid", "schedule.T", "--out", str(tmp_path / "s")]) == 2
    assert "--grid expects section.key=v1,v2" in capsys.readouterr().err
    assert main(["study", "--grid", "schedule.T=4", "--seeds", "0", "--out", str(tmp_path / "s")]) == 2
    assert "1..1000 seeds per cell" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"jobs": 0}, "--jobs must be in 1..1024, got 0"), ({"jobs": 2.5}, "--jobs must be in 1..1024"),
    ({"backend": "slurm"}, "unknown backend 'slurm'"),
    ({"gpus_per_cell": 1}, "--gpus-per-cell go with --backend ray"),
    ({"retries": 3}, "--retries go with --backend ray"),
    ({"backend": "ray", "retries": -1}, "--retries must be in 0..100"),
    ({"backend": "ray", "gpus_per_cell": 0}, "--gpus-per-cell must be in"),
    ({"seeds": 0}, "1..1000 seeds per cell, got 0"),
])
def test_the_python_api_refuses_what_the_command_refuses(tmp_path, kwargs, message):
    """The engine's options and the seeds are checked by run_study itself (toydiff.jobs.engines.check_options), before
    the study directory is made, so a notebook's call fails as `toydiff study` does."""
    import dataclasses
    grid = study.build_grid(C.ExperimentConfig(), study.parse_axes({"schedule.T": [4]}), 1, [])
    if "seeds" in kwargs:
        grid = dataclasses.replace(grid, seeds=kwargs.pop("seeds"))
    with pytest.raises(ToydiffError, match=message):
        study.run_study(grid, tmp_path / "s", **kwargs)
    assert not (tmp_path / "s").exists()
