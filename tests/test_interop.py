"""diffusers interop: toydiff's DDPM and DDIM steps equal diffusers' step for step, and any compatible
diffusers scheduler drives a toydiff denoiser."""

import numpy as np
import pytest
import torch

from toydiff.core.config import ScheduleConfig
from toydiff.core.errors import ToydiffError
from toydiff.diffusion.oracle import GaussianMixture
from toydiff.diffusion.samplers import SAMPLERS
from toydiff.diffusion.schedules import NoiseSchedule

diffusers = pytest.importorskip("diffusers")
from toydiff.diffusion.interop import build_scheduler, compatible_schedulers, sample_diffusers  # noqa: E402

ANGLES = np.arange(8) * np.pi / 4
EIGHT = GaussianMixture(np.full(8, 1 / 8), 0.8 * np.c_[np.cos(ANGLES), np.sin(ANGLES)], np.full((8, 1), 0.08))
LINEAR = NoiseSchedule.from_config(ScheduleConfig(name="linear", T=1000))  # Ho et al.'s betas
TOL = 1e-5  # float32 on both sides, values of order 1: one step's rounding


def step_for_step(name, sched, steps, **options):
    """Run toydiff's sampler and, from each x_t it visits, diffusers' step(); return the largest difference
    between toydiff's x_{t-1} and diffusers' prediction of it from the same x_t, in units of float32 rounding
    (1 = at the tolerance). Both draw their noise from generators with one seed, in the same order, so the
    stochastic steps are comparable too."""
    s = LINEAR if steps == 1000 else LINEAR.respace(steps, "trailing")
    sched.set_timesteps(steps)
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    theirs_gen, expected, worst, count = torch.Generator().manual_seed(7), [], [0.0], [0]
    timesteps = iter(sched.timesteps)

    def check(x):
        if expected:
            prediction, tol = expected.pop()
            worst[0] = max(worst[0], float((x - prediction).abs().max()) / tol)
            count[0] += 1

    def callback(t, x_t, x0_hat):
        check(x_t)
        k = next(timesteps)
        assert int(k) + 1 == int(s.timesteps[t])  # diffusers' 0-based timestep is toydiff's t - 1
        ab = s.alpha_bar_at(torch.tensor([t]), x_t)
        eps = (x_t - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
        step_options = {"eta": options["eta"]} if "eta" in options else {}
        # diffusers keeps alpha_bar in float32, where 1 - alpha_bar near t = 1 carries an absolute error of
        # ~6e-8 (float32's spacing near 1), so its coefficients are that much off relative to 1 - alpha_bar
        tol = TOL + 5e-8 / (1 - s.alpha_bar64[t])
        expected.append((sched.step(eps, k, x_t, generator=theirs_gen, **step_options).prev_sample, tol))

    last = SAMPLERS.get(name)(_respaced(s), s, x_T, generator=torch.Generator().manual_seed(7), callback=callback,
                              **options)
    check(last)
    assert count[0] == steps
    return worst[0]


def _respaced(s):
    """The oracle's denoiser on a (respaced) schedule: index i is the training t s.timesteps[i]."""
    full = EIGHT.denoiser(LINEAR)
    return lambda x, i: full(x, s.model_t(i))


@pytest.mark.parametrize("steps", [1000, 50])
def test_ddpm_equals_diffusers_ddpm_scheduler_step_for_step(steps):
    """Same betas, same x_t, same noise, clipping off: toydiff's ancestral step on the trailing respacing and
    diffusers' DDPMScheduler (timestep_spacing = trailing) agree to float32 rounding at every step."""
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, trained_betas=LINEAR.betas64[1:].tolist(),
                                    variance_type="fixed_small", clip_sample=False, prediction_type="epsilon",
                                    timestep_spacing="trailing")
    assert step_for_step("ddpm", sched, steps) < 1


@pytest.mark.parametrize("steps, eta", [(1000, 0.0), (50, 0.0), (50, 1.0)])
def test_ddim_equals_diffusers_ddim_scheduler_step_for_step(steps, eta):
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, trained_betas=LINEAR.betas64[1:].tolist(),
                                    clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                    prediction_type="epsilon", timestep_spacing="trailing")
    assert step_for_step("ddim", sched, steps, eta=eta) < 1


def test_diffusers_dpm_solver_multistep_is_toydiffs_dpmpp_2m():
    """diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, final sigma 0) through the interop
    equals toydiff's DPM-Solver++(2M) on the same trailing timesteps (20 steps: no lower-order warm-down)."""
    s = NoiseSchedule.from_config(ScheduleConfig(name="cosine", T=1000))
    x_T = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    r = s.respace(20, "trailing")
    full = EIGHT.denoiser(s)
    ours = SAMPLERS.get("dpmpp-2m")(lambda x, i: full(x, r.model_t(i)), r, x_T.clone())
    theirs = sample_diffusers(full, s, x_T.clone(), scheduler="DPMSolverMultistepScheduler", steps=20)
    # the interop hands diffusers eps = (x - sqrt(abar) x0_hat) / sqrt(1 - abar), which diffusers turns back
    # into x0 = (x - sigma eps) / alpha: at alpha_T = 1e-4 that float32 round trip costs ~1e-3 relative on the
    # first x0 (2.6e-4 on the samples, measured); the algorithms themselves agree
    assert torch.allclose(ours, theirs, atol=1e-3), float((ours - theirs).abs().max())


@pytest.mark.parametrize("name, solver_type", [("dpmpp-2m-sde", "midpoint"), ("dpmpp-2m-sde-heun", "heun")])
def test_diffusers_sde_dpm_solver_is_toydiffs_2m_sde_in_both_forms(name, solver_type):
    """diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_type=...) on the same 20
    trailing timesteps, with the same exact denoiser and noise drawn from one seed in the same order, lands
    on toydiff's samples: dpmpp-2m-sde is the midpoint form (diffusers' default), dpmpp-2m-sde-heun the other."""
    s = NoiseSchedule.from_config(ScheduleConfig(name="cosine", T=1000))
    x_T = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    r = s.respace(20, "trailing")
    full = EIGHT.denoiser(s)
    ours = SAMPLERS.get(name)(lambda x, i: full(x, r.model_t(i)), r, x_T.clone(),
                              generator=torch.Generator().manual_seed(3))
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, trained_betas=s.betas64[1:].tolist(), prediction_type="epsilon",
        algorithm_type="sde-dpmsolver++", solver_type=solver_type, timestep_spacing="trailing", thresholding=False)
    sched.set_timesteps(20)
    x, gen = x_T.clone() * sched.init_noise_sigma, torch.Generator().manual_seed(3)
    for k in sched.timesteps:  # diffusers' timestep k is toydiff's t = k + 1
        t = torch.tensor([int(k) + 1])
        ab = s.alpha_bar_at(t, x)
        eps = (x - ab.sqrt() * full(x, t)) / (1 - ab).sqrt()
        x = sched.step(eps, k, x, generator=gen).prev_sample
    other = SAMPLERS.get({"dpmpp-2m-sde": "dpmpp-2m-sde-heun"}.get(name, "dpmpp-2m-sde"))(
        lambda x, i: full(x, r.model_t(i)), r, x_T.clone(), generator=torch.Generator().manual_seed(3))
    gap = float((ours - x).abs().max())
    assert gap < 1e-3, gap  # the float32 eps round trip at alpha_T = 1e-4, as for dpmpp-2m above (1.5e-4 measured)
    assert float((other - x).abs().max()) > 100 * gap  # the two forms differ by far more (0.19 measured)


def test_interop_ddpm_is_toydiffs_ddpm_with_the_same_generator():
    s = LINEAR.respace(100, "trailing")
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    ours = SAMPLERS.get("ddpm")(_respaced(s), s, x_T.clone(), generator=torch.Generator().manual_seed(3))
    theirs = sample_diffusers(EIGHT.denoiser(LINEAR), LINEAR, x_T.clone(), scheduler="DDPMScheduler", steps=100,
                              generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ours, theirs, atol=5e-5)


def test_compatible_list_and_bad_names():
    names = compatible_schedulers()
    assert {"DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"} <= set(names)
    assert not any("Inverse" in n for n in names)
    with pytest.raises(ToydiffError, match="unknown diffusers scheduler 'NoSuchScheduler'; choose one of: .*DDPMScheduler"):
        build_scheduler("NoSuchScheduler", LINEAR)
    with pytest.raises(ToydiffError, match=r"unknown diffusers scheduler 'DDIMSchedular'.*\(did you mean 'DDIMScheduler'\?\)"):
        build_scheduler("DDIMSchedular", LINEAR)
    with pytest.raises(ToydiffError, match="not a diffusers scheduler toydiff can drive"):
        build_scheduler("DDIMInverseScheduler", LINEAR)
    with pytest.raises(ToydiffError, match="has no Karras sigmas"):
        build_scheduler("DDIMScheduler", LINEAR, "karras")


def test_missing_diffusers_is_a_one_line_fix(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(ToydiffError, match=r"pip install 'toydiff\[diffusers\]'"):
        build_scheduler("DDPMScheduler", LINEAR)


def test_cli_samples_through_a_diffusers_scheduler(tmp_path, tiny_cfg, capsys):
    from toydiff import train_run
    from toydiff.cli import main
    run = train_run(tiny_cfg, tmp_path / "run")
    out = tmp_path / "x.npy"
    assert main(["sample", str(run.path), "--sampler", "diffusers:EulerDiscreteScheduler", "--steps", "5",
                 "--n", "20", "--out", str(out)]) == 0
    assert np.load(out).shape == (20, 2)
    assert main(["sample", str(run.path), "--sampler", "diffusers:Nope", "--out", str(tmp_path / "y.npy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown diffusers scheduler 'Nope'" in err and not (tmp_path / "y.npy").exists()
