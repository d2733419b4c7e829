"""Networks: the guide's architecture counted by hand, shapes for any D, the registry."""

import pytest
import torch

from toydiff.core.config import ModelConfig
from toydiff.core.errors import ToydiffError
from toydiff.diffusion.models import MODELS, GuideNoisePredictor, build_model, count_parameters, sinusoidal_embedding


def test_guide_network_is_the_guides():
    T = 10
    net = GuideNoisePredictor(dim=2, T=T)
    # Linear(T, 1) + Linear(3, 100) + 2 x Linear(100, 100) + Linear(100, 20) + Linear(20, 2)
    by_hand = (T + 1) + (3 * 100 + 100) + 2 * (100 * 100 + 100) + (100 * 20 + 20) + (20 * 2 + 2)
    assert count_parameters(net) == by_hand == 22_673
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in net.modules()) == 4


def test_guide_time_encoding_is_one_hot_of_t_minus_one():
    net = GuideNoisePredictor(dim=2, T=5)
    with torch.no_grad():
        net.t_encoder.weight.copy_(torch.arange(5.0)[None, :])
        net.t_encoder.bias.zero_()
        t = torch.tensor([1, 3, 5])
        emb = net.t_encoder(torch.nn.functional.one_hot(t - 1, 5).float())
    assert emb.squeeze(1).tolist() == [0.0, 2.0, 4.0]


@pytest.mark.parametrize("arch", MODELS.names())
@pytest.mark.parametrize("dim", [1, 2, 5])
def test_output_shape_matches_input_for_any_dimension(arch, dim):
    net = build_model(ModelConfig(arch=arch, width=16, depth=2, fourier_octaves=2), dim=dim, T=10)
    x, t = torch.randn(6, dim), torch.tensor([1, 2, 3, 8, 9, 10])
    out = net(x, t)
    assert out.shape == (6, dim) and torch.isfinite(out).all()


def test_mlp_depends_on_t():
    net = build_model(ModelConfig(width=16, depth=1), dim=2, T=10)
    x = torch.randn(1, 2).expand(2, 2)
    out = net(x, torch.tensor([1, 10]))
    assert not torch.allclose(out[0], out[1])


def test_sinusoidal_embedding_formula():
    emb = sinusoidal_embedding(torch.tensor([0.0, 3.0]), dim=4, max_period=100.0)
    # frequencies 100^(-0/2) = 1 and 100^(-1/2) = 0.1
    expect = torch.tensor([[1, 1, 0, 0], [torch.cos(torch.tensor(3.0)), torch.cos(torch.tensor(0.3)),
                                          torch.sin(torch.tensor(3.0)), torch.sin(torch.tensor(0.3))]])
    assert torch.allclose(emb, expect, atol=1e-6)


def test_unknown_model_lists_the_choices():
    with pytest.raises(ToydiffError, match="unknown model 'unet'; choose one of: guide, mlp"):
        build_model(ModelConfig(arch="unet"), dim=2, T=10)


@pytest.mark.parametrize("arch", MODELS.names())
def test_fractional_t_interpolates_and_integer_t_is_unchanged(arch):
    """The likelihood ODE calls networks at fractional t: integer-valued floats must agree with longs."""
    net = build_model(ModelConfig(arch=arch, width=16, depth=1), dim=2, T=10)
    x = torch.randn(3, 2)
    t = torch.tensor([1, 5, 10])
    assert torch.allclose(net(x, t), net(x, t.double().float()), atol=1e-6)
    if arch == "guide":  # piecewise linear in t between the one-hot neighbours
        emb = net._one_hot(torch.tensor([2.25]))
        assert torch.allclose(emb, torch.tensor([[0, 0.75, 0.25, 0, 0, 0, 0, 0, 0, 0]]))


@pytest.mark.parametrize("arch,variance,classes", [("guide", "fixed", 0), ("mlp", "fixed", 0),
                                                   ("mlp", "learned", 0), ("mlp", "fixed", 3)])
def test_a_shared_t_of_shape_one_equals_the_same_t_on_every_row(arch, variance, classes):
    """Samplers call networks with t (1,) for the whole batch; row by row it must be the per-row call."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(arch=arch, width=16, depth=2, variance=variance), dim=3, T=50, classes=classes)
    x = torch.randn(7, 3)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2]) if classes else None
    for t in (1, 17, 50):
        shared = net(x, torch.tensor([t])) if y is None else net(x, torch.tensor([t]), y)
        rows = net(x, torch.full((7,), t)) if y is None else net(x, torch.full((7,), t), y)
        assert shared.shape == rows.shape == (7, 3 * (2 if variance == "learned" else 1))
        assert torch.allclose(shared, rows, atol=1e-6)


def test_auto_width_is_64_for_the_zoo_and_grows_with_a_tables_frame():
    """model.width = 0: 64 hidden units up to 16 frame coordinates (the moons network keeps its 33k parameters),
    then 4 per coordinate as a power of two, at most 512; a width that is set is kept."""
    from toydiff.diffusion.models import width
    auto = ModelConfig()
    assert auto.width == 0
    assert [width(auto, d) for d in (2, 16, 17, 30, 64, 65, 1000)] == [64, 64, 128, 128, 256, 512, 512]
    assert width(auto) == 64 and width(ModelConfig(width=96), 64) == 96
    net = build_model(auto, 2, 1000)
    assert net.inp.out_features == 64 and count_parameters(build_model(auto, 30, 1000)) > count_parameters(net)
    with pytest.raises(ToydiffError, match="model.width must be >= 0"):
        ModelConfig(width=-1)
