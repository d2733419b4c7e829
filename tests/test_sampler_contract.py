"""The contract every sampler keeps, run over the sampler registry (and a diffusers scheduler through the plan):
a new sampler is covered by registering it.

    sampler(denoise, schedule, x_T, *, generator=None, callback=None) -> x_0

- the output has x_T's shape, for D = 1, 2, 5;
- callback(t, x_t, x0_hat) sees decreasing t ending at 1; a fixed-step sampler sees t = T..1 once each,
  starting from x_T itself;
- the same seed gives the same samples; a sampler that draws noise gives other samples for another seed;
- a per-sample noise stream (runtime.NoiseStream) makes the samples independent of the batching (an adaptive
  solver picks its steps from the whole batch's error estimate, so there only to about its tolerance);
- driven by the exact denoiser of a Gaussian mixture, the output is finite and lands on the mixture: its
  weights, its means, and its spread to within the discretisation error of 40 steps (how close each
  sampler gets with more steps is tests/test_samplers.py's business); the consistency sampler, made for
  a consistency function rather than a denoiser, is held to a Gaussian's exact ODE map instead. The meanflow
  sampler also tells the denoiser where each step lands (denoise(x_t, t, r)); a denoiser that ignores r (as
  here) makes it deterministic DDIM, and its exact mean velocity is tests/test_meanflow.py's business.

Every registered vocabulary has its implementation (config <-> registries).
"""

import numpy as np
import pytest
import torch

from toydiff.core import config as C
from toydiff.core.config import SampleConfig, ScheduleConfig
from toydiff.diffusion.oracle import GaussianMixture
from toydiff.core.runtime import NoiseStream
from toydiff.diffusion.samplers import SAMPLERS
from toydiff.diffusion.sampling import VPDiffusion, make_plan
from toydiff.diffusion.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.from_config(ScheduleConfig(name="cosine", T=40))
# the samplers marked as drawing noise after x_T (samplers.stochastic; ddim only at eta > 0): the mark is checked
# against what each sampler does (test_same_seed_same_samples)
STOCHASTIC = {name for name in SAMPLERS.names() if getattr(SAMPLERS.get(name), "stochastic", False)}


def mixture(dim: int) -> GaussianMixture:
    means = np.stack([np.full(dim, -0.5), np.full(dim, 0.5)])
    return GaussianMixture(np.array([0.3, 0.7]), means, np.full((2, 1), 0.1))


def ignoring_r(denoise):
    return lambda x, t, *r: denoise(x, t)


def run(name, x_T, generator, dim=2, callback=None):
    denoise = ignoring_r(mixture(dim).denoiser(SCHEDULE))
    return SAMPLERS.get(name)(denoise, SCHEDULE, x_T, generator=generator, callback=callback)


def test_the_contract_covers_every_registered_sampler():
    assert set(SAMPLERS.names()) == set(C.SAMPLERS) and STOCHASTIC


@pytest.mark.parametrize("name", SAMPLERS.names())
@pytest.mark.parametrize("dim", [1, 2, 5])
def test_shape_is_kept(name, dim):
    x_T = torch.randn(6, dim, generator=torch.Generator().manual_seed(0))
    assert run(name, x_T, torch.Generator().manual_seed(1), dim).shape == (6, dim)


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_callback_order(name):
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    seen = []
    run(name, x_T, torch.Generator().manual_seed(1), callback=lambda t, x_t, x0: seen.append((t, x_t.clone())))
    ts = [t for t, _ in seen]
    assert ts and ts[-1] == 1 and all(a > b for a, b in zip(ts, ts[1:]))
    if not getattr(SAMPLERS.get(name), "adaptive", False):
        assert ts == list(range(SCHEDULE.T, 0, -1))
        assert torch.allclose(seen[0][1], x_T, atol=1e-5)  # the first step starts from x_T


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_same_seed_same_samples(name):
    x_T = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    a = run(name, x_T.clone(), torch.Generator().manual_seed(7))
    b = run(name, x_T.clone(), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    c = run(name, x_T.clone(), torch.Generator().manual_seed(8))
    assert torch.equal(a, c) != (name in STOCHASTIC)


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_a_noise_stream_makes_samples_independent_of_the_batches(name):
    def batch(start, n):
        stream = NoiseStream(11, start, n)
        return run(name, stream.randn((n, 2)), stream)
    whole = batch(0, 30)
    parts = torch.cat([batch(0, 7), batch(7, 16), batch(23, 7)])
    adaptive = getattr(SAMPLERS.get(name), "adaptive", False)
    assert torch.allclose(whole, parts, atol=2e-2 if adaptive else 1e-5)  # adaptive: 4e-3 measured


# the consistency sampler steps with a consistency function (the end of the ODE path through x_t), which a
# denoiser's posterior mean is not: its exactness is checked with a Gaussian's closed-form ODE map instead
# (tests/test_distill.py)
@pytest.mark.parametrize("name", [n for n in SAMPLERS.names() if n != "consistency"])
def test_the_exact_denoiser_gives_finite_samples_near_the_data(name):
    n = 4000
    x = run(name, torch.randn(n, 2, generator=torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    assert torch.isfinite(x).all()
    upper = x[:, 0] > 0  # the mixture: 0.3 N((-0.5, -0.5), 0.1^2 I) + 0.7 N((0.5, 0.5), 0.1^2 I)
    assert abs(upper.double().mean().item() - 0.7) < 0.03  # 4 standard errors
    for part, mean in ((x[upper], 0.5), (x[~upper], -0.5)):
        assert torch.allclose(part.mean(0), torch.full((2,), mean), atol=0.01)
        assert ((part.std(0) > 0.07) & (part.std(0) < 0.11)).all()  # 0.1, less 40 steps' under-dispersion


@pytest.mark.parametrize("name", SAMPLERS.names() + ["diffusers:EulerDiscreteScheduler"])
def test_every_sampler_runs_through_the_plan(name):
    """The plan binds each sampler's own options (and nothing it lacks) and walks the grid it should."""
    if name.startswith("diffusers:"):
        pytest.importorskip("diffusers")
    plan = make_plan(SampleConfig(sampler=name, steps=10, spacing="trailing"), VPDiffusion(SCHEDULE))
    x = plan.run(lambda x, t, *r: torch.zeros_like(x), torch.randn(5, 2), noise=NoiseStream(0, 0, 5),
                 generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 2) and torch.isfinite(x).all()
    adaptive = getattr(SAMPLERS.get(name), "adaptive", False) if name in SAMPLERS else False
    assert plan.grid.T == (SCHEDULE.T if adaptive or plan.own_generator else 10)


def test_every_vocabulary_has_its_implementation():
    from toydiff.data.datasets import DATASETS
    from toydiff.diffusion.losses import TIMESTEP_SAMPLERS
    from toydiff.methods import METHODS, STUDENTS
    from toydiff.diffusion.models import MODELS
    from toydiff.diffusion.parameterization import Prediction
    from toydiff.diffusion.schedules import BETA_SCHEDULES
    for registry in (SAMPLERS, DATASETS, BETA_SCHEDULES, MODELS, TIMESTEP_SAMPLERS, METHODS, STUDENTS):
        assert registry.missing() == [], registry.kind
    assert [p.value for p in Prediction] == list(C.PREDICTIONS)


def test_an_undeclared_name_cannot_be_registered():
    with pytest.raises(KeyError, match="not in its vocabulary"):
        SAMPLERS.register("my-sampler")
