"""Config: strict keys and types, TOML round trip, --set overrides, the guide preset."""

import pytest

from toydiff.core import config as C
from toydiff.core.errors import ToydiffError


def test_defaults_round_trip_through_toml():
    cfg = C.ExperimentConfig()
    assert C.loads(cfg.to_toml()) == cfg


def test_guide_preset_is_the_guides_setting():
    g = C.preset("guide")
    assert (g.data.name, g.data.n, g.data.noise, g.data.scaling) == ("sklearn-moons", 1000, 0.0, "minmax")
    assert (g.schedule.name, g.schedule.T, g.schedule.beta_max, g.schedule.power) == ("polynomial", 10, 0.99, 4.0)
    assert g.model.arch == "guide" and g.model.prediction == "eps"
    t = g.train
    assert (t.steps, t.batch_size, t.lr, t.weight_decay, t.beta1, t.beta2) == (5000, 0, 1e-2, 1e-4, 0.9, 0.999)
    assert (t.lr_schedule, t.warmup_steps, t.grad_clip) == ("constant", 0, 0.0)
    assert g.sample.sampler == "ddpm"


def test_overrides_parse_toml_values_and_bare_words():
    cfg = C.with_overrides(C.ExperimentConfig(), ["schedule.T=100", "data.name=sklearn-moons", "train.lr=1e-3",
                                                  "plot.field_t=[2, 5]", "seed=7", 'model.arch="guide"'])
    assert cfg.schedule.T == 100 and cfg.data.name == "sklearn-moons" and cfg.train.lr == 1e-3
    assert cfg.plot.field_t == (2, 5) and cfg.seed == 7 and cfg.model.arch == "guide"


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert C.with_overrides(C.ExperimentConfig(), ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ToydiffError, match="schedule.T must be an integer, got 10.5"):
        C.with_overrides(C.ExperimentConfig(), ["schedule.T=10.5"])


@pytest.mark.parametrize("item, match", [
    ("data.nn=5", "unknown config key 'data.nn'; valid keys in \\[data\\]: name, n, noise, scale, modes, dim, scaling"),
    ("dataset.n=5", "unknown config section 'dataset'"),
    ("speed=5", "unknown config key 'speed'"),
    ("train.steps=many", "train.steps must be an integer, got 'many'"),
    ("train.steps=true", "train.steps must be an integer, got True"),
    ("data.name=3", "data.name must be a string, got 3"),
    ("plot.field_t=[1.5]", "plot.field_t must be list of integers"),
    ("noequals", "--set expects section.key=value"),
    ("a.b.c=1", "--set expects section.key=value"),
    ("data=3", "\\[data\\] is a section; set one of its keys, --set data.KEY=VALUE"),
    ("schedule.T=0", "schedule.T must be >= 1, got 0"),
    ("sample.n=0", "sample.n must be >= 1, got 0"),
    ("train.lr=-1", "train.lr must be > 0"),
    ("seed=-1", "seed must be an integer in \\[0, 2\\^63\\)"),
    ("train.lr_schedule=step", "unknown train.lr_schedule 'step'; choose one of: constant, cosine"),
])
def test_bad_overrides_are_refused_with_the_reason(item, match):
    with pytest.raises(ToydiffError, match=match):
        C.with_overrides(C.ExperimentConfig(), [item])


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\nname = 1")
    with pytest.raises(ToydiffError, match="is not valid TOML"):
        C.read_toml(bad)
    with pytest.raises(ToydiffError, match="does not exist"):
        C.read_toml(tmp_path / "missing.toml")
    (tmp_path / "unknown.toml").write_text("[model]\nlayers = 3\n")
    with pytest.raises(ToydiffError, match="unknown config key 'model.layers'"):
        C.load(tmp_path / "unknown.toml")


def test_merged_keeps_unnamed_keys():
    cfg = C.merged(C.preset("guide"), {"schedule": {"T": 20}})
    assert cfg.schedule.T == 20 and cfg.schedule.name == "polynomial" and cfg.model.arch == "guide"


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ToydiffError, match="unknown preset 'quick'; choose one of: default, fast, guide"):
        C.preset("quick")
