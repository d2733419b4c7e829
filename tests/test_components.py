"""model.components: the support's pieces found in the training rows, drawn first by their shares (issue #29)."""

import json
import os

import numpy as np
import pytest
import torch
from scipy import stats

from toydiff import Run, train_run
from toydiff import methods
from toydiff.cli import main
from toydiff.core import config as C
from toydiff.core.errors import ToydiffError
from toydiff.data import datasets
from toydiff.data.components import MIN_DATA, find_components
from toydiff.jobs.workflow import resume_run

from test_reliability import interrupt_at_loss_call, same_weights

SMALL = ["data.n=600", "schedule.T=50", "model.width=16", "model.depth=1", "train.steps=40", "train.batch_size=128",
         "train.log_every=5", "train.checkpoint_every=10", "train.warmup_steps=5", "sample.steps=10", "sample.n=64",
         "model.components=-1"]


def frame(x):
    """Min-max into [-1, 1], the zoo's frame."""
    lo, hi = x.min(0), x.max(0)
    return 2 * (x - lo) / (hi - lo) - 1


def zoo(name, n=4000, **data):
    cfg = C.from_dict({"data": {"name": name, **data}})
    return datasets.load_dataset(cfg.data, n, np.random.default_rng(0))


def test_the_pieces_of_tables_whose_pieces_are_known():
    moons, which = zoo("moons")
    found = find_components(frame(moons))
    assert found.count == 2
    # each moon is one piece: the found labels are the dataset's own, up to their names
    assert len(set(zip(found.labels, which))) == 2
    ring, _ = zoo("gaussians")
    assert find_components(frame(ring)).count == 8
    rng = np.random.default_rng(1)
    assert find_components(rng.normal(size=(4000, 2))).count == 1
    touching = np.concatenate([rng.normal(size=(2000, 2)), rng.normal(size=(2000, 2)) + [3.0, 0.0]])
    assert find_components(touching).count == 1  # two clusters whose tails meet are one support


def test_shares_are_the_training_frequencies_and_the_numbering_follows_the_rows():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(size=(300, 3)) + 20, rng.normal(size=(700, 3))])
    found = find_components(x)
    assert found.count == 2 and found.shares == (0.3, 0.7)
    assert (found.labels[:300] == 0).all() and (found.labels[300:] == 1).all()
    record = found.record()
    assert record["count"] == 2 and record["shares"] == [0.3, 0.7] and record["radius"] > 0


def test_a_table_too_small_to_decide_is_one_piece_and_a_count_that_does_not_fit_is_an_error():
    rng = np.random.default_rng(3)
    few = np.concatenate([rng.normal(size=(30, 2)), rng.normal(size=(30, 2)) + 50])
    assert len(few) < MIN_DATA
    kept = find_components(few)
    assert kept.count == 1 and "too few" in kept.note
    with pytest.raises(ToydiffError, match="needs at least 100 training rows"):
        find_components(few, expected=2)
    moons, _ = zoo("moons")
    with pytest.raises(ToydiffError, match="model.components = 3, but the training rows fall into 2 pieces"):
        find_components(frame(moons), expected=3)


def test_a_run_of_one_piece_is_the_run_without_components(tmp_path):
    """Data with one piece behaves exactly as today: the same weights and samples, the finding recorded."""
    base = C.with_overrides(C.ExperimentConfig(), SMALL[:-1] + ["data.name=gaussians", "data.modes=1"])
    plain = train_run(C.with_overrides(base, ["model.components=1"]), tmp_path / "plain")
    found = train_run(base, tmp_path / "found")  # auto, the default: looks, and finds one
    assert same_weights(plain.path / "model.safetensors", found.path / "model.safetensors")
    assert np.array_equal(Run.load(plain.path).sample(50, seed=1), Run.load(found.path).sample(50, seed=1))
    assert found.dir.read_manifest()["components"]["count"] == 1
    assert not (found.path / "train_components.npy").exists()


def test_each_sample_draws_its_piece_by_the_training_shares(tmp_path):
    """The network sees each sample's piece, drawn by the shares (a chi-square test at a fixed seed), and
    the samples come back without labels."""
    cfg = C.with_overrides(C.ExperimentConfig(), SMALL)
    run = Run.load(train_run(cfg, tmp_path / "r").path)
    shares = np.asarray(run.pieces.shares)
    assert run.pieces.count == 2 and np.allclose(shares, np.bincount(run.pieces.labels) / len(run.pieces.labels))
    seen = []
    hook = run.model.register_forward_pre_hook(lambda m, args: seen.append(args[2].clone()) if len(seen) == 0 else None)
    drawn = run.draw(2000, seed=5, batch_size=2000)
    hook.remove()
    assert drawn.labels is None and drawn.samples.shape == (2000, 2)
    counts = np.bincount(seen[0].numpy(), minlength=2)
    assert stats.chisquare(counts, shares * 2000).pvalue > 0.01
    assert torch.equal(torch.as_tensor(run.draw(40, seed=5).samples), torch.as_tensor(run.draw(40, seed=5).samples))


def test_a_run_of_pieces_killed_and_resumed_is_bit_for_bit_the_uninterrupted_one(tmp_path, monkeypatch):
    cfg = C.with_overrides(C.ExperimentConfig(), SMALL)
    whole = train_run(cfg, tmp_path / "whole")
    interrupt_at_loss_call(monkeypatch, 17)
    with pytest.raises(Exception, match="interrupted: saved step 17"):
        train_run(cfg, tmp_path / "cut")
    monkeypatch.undo()
    resumed = resume_run(tmp_path / "cut")
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert same_weights(whole.path / name, resumed.path / name), name
    assert np.array_equal(Run.load(whole.path).sample(30, seed=4), Run.load(resumed.path).sample(30, seed=4))


@pytest.mark.parametrize("flags, needle", [
    (["--set", "model.components=3"], "model.components = 3, but the training rows fall into 2 pieces"),
    (["--set", "model.components=2", "--set", "model.conditional=true"], "cannot be combined yet"),
    (["--set", "model.components=-1", "--set", "model.conditional=true"], "cannot be combined yet"),
    (["--set", "model.components=-2"], "model.components must be >= -1"),
    (["--set", "model.components=-1", "--set", "model.arch=guide"], "the guide's network has one output and no labels"),
    (["--set", "model.components=-1", "--set", "train.objective=meanflow", "--set", "schedule.process=flow",
      "--set", "sample.sampler=meanflow"], "model.components=0 (auto) or 1"),
    (["--set", "model.components=2", "--set", "train.objective=consistency", "--set", "sample.sampler=consistency"],
     "model.components=0 (auto) or 1"),
])
def test_bad_component_settings_are_one_line_exit_2_and_nothing_is_written(tmp_path, capsys, flags, needle):
    out = tmp_path / "r"
    code = main(["run", "--out", str(out), "--quiet", "--set", "train.steps=2", "--set", "data.n=400", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.parametrize("damage", ["missing", "another count", "shares"])
def test_a_damaged_record_of_pieces_is_one_line_on_load(tmp_path, damage):
    run = train_run(C.with_overrides(C.ExperimentConfig(), SMALL), tmp_path / "r")
    if damage == "missing":
        (run.path / "train_components.npy").unlink()
    elif damage == "another count":
        np.save(run.path / "train_components.npy", np.zeros(len(run.data), dtype=np.int64))
    else:
        info = json.loads((run.path / "run.json").read_text())
        info["components"]["shares"] = [0.9, 0.5]
        (run.path / "run.json").write_text(json.dumps(info))
    with pytest.raises(ToydiffError, match="is damaged: train_components.npy is missing or does not match"
                       if damage != "shares" else "is damaged: components.shares should be 2 shares summing to 1"):
        Run.load(run.path)


@pytest.mark.slow
@pytest.mark.parametrize("condition", [[], ["--set", "model.conditional=true"]], ids=["pieces", "classes"])
def test_a_progressive_student_of_a_conditioned_teacher_matches_it_piece_by_piece(tmp_path, monkeypatch, condition):
    """One round (the first grid set to 8 steps): on a fixed noise batch and fixed pieces (or classes: the
    moons' two, model.conditional), the student's 4 DDIM steps land nearer the teacher's 8 than the teacher's own
    4 do, as an unconditional student's do; the student records and draws its teacher's pieces (or classes)."""
    from toydiff.methods import progressive

    monkeypatch.setattr(progressive, "PROGRESSIVE_START", 8)
    teacher = tmp_path / "t"
    assert main(["train", "--quiet", "--out", str(teacher), "--set", "train.steps=400", "--set",
                 "train.batch_size=256", *condition]) == 0
    out = tmp_path / "s"
    assert main(["distill", str(teacher), "--out", str(out), "--method", "progressive", "--steps", "4",
                 "--train-steps", "1500", "--quiet", "--no-eval"]) == 0
    t, s = Run.load(teacher), Run.load(out)
    if condition:
        assert t.pieces is None and s.pieces is None and s.classes == t.classes == 2
        assert np.array_equal(s.labels, t.labels) and s.class_names == t.class_names
    else:
        assert s.pieces.count == t.pieces.count == 2 and s.pieces.shares == t.pieces.shares
    assert s.model.classes == 2
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    pieces = torch.arange(2000) % 2

    def ddim(run, k):
        plan = run.plan(run.settings(sampler="ddim", steps=k, spacing="trailing"))
        return plan.run(run.denoiser_for(pieces), z.clone(), noise=None)
    teacher_8, teacher_4, student_4 = ddim(t, 8), ddim(t, 4), ddim(s, 4)
    err = lambda a: float((a - teacher_8).norm(dim=1).mean())  # noqa: E731
    assert err(student_4) < 0.2 * err(teacher_4), (err(student_4), err(teacher_4))
    # the two pieces' endpoints differ: the student was taught each piece, not their average
    assert float((teacher_8[pieces == 0].mean(0) - teacher_8[pieces == 1].mean(0)).norm()) > 0.5
    assert float((student_4[pieces == 0].mean(0) - teacher_8[pieces == 0].mean(0)).norm()) < 0.1
    drawn = s.draw(400, seed=2)
    assert (drawn.labels is not None) == bool(condition) and (drawn.pieces is not None) != bool(condition)


def test_a_draw_starts_from_the_noise_initial_noise_replays_whatever_its_batches(tmp_path):
    teacher = train_run(C.with_overrides(C.ExperimentConfig(), SMALL), tmp_path / "t")
    drawn = teacher.draw(50, seed=7, batch_size=16, sampler="ddim", steps=4, trajectory=True)
    assert np.array_equal(drawn.trajectory[0], teacher.initial_noise(50, seed=7).numpy())
    assert drawn.labels is None and sorted(set(drawn.pieces)) == [0, 1]  # pieces, not classes


@pytest.mark.parametrize("condition", [[], ["model.components=0", "model.conditional=true", "sample.guidance=2.0"]],
                         ids=["pieces", "classes"])
def test_a_reflow_student_of_a_conditioned_teacher_learns_each_pair_in_its_piece(tmp_path, condition):
    """The student's rows are the teacher's ODE samples, each with the x_T it started from and the piece (or
    class, at the teacher's guidance) it was drawn in: the teacher's own sampler, run from that x_T in that piece,
    lands on the row. A class-conditional student samples at guidance 1: its map is the guided one."""
    from toydiff.methods.reflow import TEACHER_SAMPLER

    teacher = train_run(C.with_overrides(C.ExperimentConfig(), SMALL + condition), tmp_path / "t")
    assert main(["distill", str(teacher.path), "--out", str(tmp_path / "s"), "--method", "reflow", "--pairs", "300",
                 "--train-steps", "20", "--quiet", "--no-eval"]) == 0
    s = Run.load(tmp_path / "s")
    z = torch.as_tensor(np.load(tmp_path / "s" / "train_noise.npy"))
    pieces = torch.as_tensor(s.row_labels)
    if condition:
        assert s.pieces is None and s.classes == 2 and s.config.sample.guidance == 1.0
    else:
        assert s.pieces.shares == pytest.approx(teacher.pieces.shares, abs=1e-6)  # drawn by its teacher's shares
    assert s.model.classes == 2 and len(pieces) == 300
    assert 0.3 < float(pieces.float().mean()) < 0.7  # both pieces, about as often as the teacher's shares
    plan = teacher.plan(teacher.settings(**TEACHER_SAMPLER))
    denoise = teacher.denoiser_for(pieces, guidance=teacher.config.sample.guidance)
    landed = teacher.scaler.inverse(plan.run(denoise, z.clone(), noise=None).double().numpy())
    assert np.allclose(landed, s.data, atol=1e-4)
    assert s.sample(40, seed=1).shape == (40, 2)


def test_consistency_distillation_of_a_model_of_pieces_conditions_teacher_and_student_on_each_rows_piece(tmp_path):
    """The loss recomputed by hand on a fixed batch (Song et al. 2023, Algorithm 2), teacher and student each
    given the rows' pieces; the pieces change it (they reach both networks), and the distilled student draws its
    teacher's pieces by its teacher's shares."""
    from toydiff.diffusion.losses import ddim_step
    from toydiff.methods.consistency import CONSISTENCY_GRID

    cfg = C.with_overrides(C.ExperimentConfig(), SMALL + ["schedule.T=100"])  # room for the 64-step grid
    teacher = Run.load(train_run(cfg, tmp_path / "t").path)
    assert main(["distill", str(teacher.path), "--out", str(tmp_path / "s"), "--method", "consistency", "--steps",
                 "2", "--train-steps", "10", "--quiet", "--no-eval"]) == 0
    s = Run.load(tmp_path / "s")
    assert s.model.classes == 2 and s.pieces.shares == teacher.pieces.shares
    assert s.sample(40, seed=1).shape == (40, 2)
    lesson = methods.STUDENTS.get("consistency").lesson(teacher, s, 2, 0, False, lambda m: None)
    schedule, x0 = teacher.schedule, torch.as_tensor(teacher.scaler.transform(teacher.data[:256]), dtype=torch.float32)
    y = torch.as_tensor(teacher.pieces.labels[:256])
    loss = lesson.objective.loss(s.model, schedule, x0, torch.Generator().manual_seed(9), labels=y)
    # by hand, the same draws in the same order: n ~ U{1..N}, then q(x_t | x0)'s noise
    g = torch.Generator().manual_seed(9)
    grid = schedule.respace(CONSISTENCY_GRID).timesteps_t
    i = torch.randint(1, grid.numel(), (256,), generator=g)
    t, u = grid[i], grid[i - 1]
    eps = torch.randn(x0.shape, generator=g)
    ab = schedule.alpha_bar
    x_t = ab[t].sqrt()[:, None] * x0 + (1 - ab[t]).sqrt()[:, None] * eps
    with torch.no_grad():
        x_u = ddim_step(x_t, teacher.denoiser_for(y)(x_t, t), ab[t][:, None], ab[u][:, None])
        target = torch.where((u == 0)[:, None], x_u, s.denoiser_for(y)(x_u, u))
        by_hand = ((s.denoiser_for(y)(x_t, t) - target) ** 2).mean(1).mean()
    assert float(loss.detach()) == pytest.approx(float(by_hand), rel=1e-5)
    flipped = lesson.objective.loss(s.model, schedule, x0, torch.Generator().manual_seed(9), labels=1 - y)
    assert abs(float(flipped.detach()) - float(loss.detach())) > 1e-3 * float(loss.detach())


def test_auto_finds_pieces_where_it_was_measured_and_keeps_one_elsewhere(tmp_path):
    """model.components = 0 (the default) finds the moons' two pieces; a file's table, class labels, the guide's
    network and MeanFlow keep one piece without looking; -1 finds them in a file too."""
    from toydiff.jobs.workflow import expected_pieces

    cfg = lambda *o: C.with_overrides(C.ExperimentConfig(), list(o))  # noqa: E731
    assert C.ExperimentConfig().model.components == 0 and expected_pieces(cfg()) == 0
    assert expected_pieces(cfg("data.path=t.csv")) is None
    assert expected_pieces(cfg("data.path=t.csv", "model.components=-1")) == 0
    assert expected_pieces(cfg("model.conditional=true")) is None
    assert expected_pieces(cfg("model.arch=guide")) is None
    assert expected_pieces(cfg("train.objective=meanflow", "schedule.process=flow", "sample.sampler=meanflow")) is None
    assert expected_pieces(cfg("model.components=1")) is None and expected_pieces(cfg("model.components=3")) == 3
    rng = np.random.default_rng(4)
    table = tmp_path / "t.csv"
    x = np.concatenate([rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) + 30])
    table.write_text("a,b\n" + "\n".join(f"{a},{b}" for a, b in x))
    small = [o for o in SMALL if not o.startswith(("data.n", "model.components"))] + [f"data.path={table}"]
    assert "components" not in train_run(cfg(*small), tmp_path / "auto").dir.read_manifest()
    # in minmax frame: the quantile scaling a table gets by default maps each column onto a normal, closing gaps
    assert train_run(cfg(*small, "model.components=-1", "data.scaling=minmax"), tmp_path / "found").pieces.count == 2
