"""A two-network method for the tests: the VP diffusion with a critic trained beside the model.

Each step first updates the critic, a small MLP that tells the batch's data from the model's one-step x0_hat
(the logistic loss of a GAN discriminator), then the model on L_simple plus `weight` times the non-saturating
generator loss of the critic on its x0_hat (adversarial diffusion distillation's pattern, Sauer et al. 2023,
on the denoiser rather than a student). It is a real method of the wing's seam (its own network in the training
state, its own AdamW, a step of two updates), installed in place of "ddpm" for a test by `installed()`, or in
a subprocess by `python -m critic_method ARGV...` (the toydiff command line with it installed).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from toydiff import methods
from toydiff.methods.ddpm import Denoising, VPDiffusionMethod
from toydiff.diffusion.parameterization import to_x0
from toydiff.core.runtime import derive_seed


@dataclass(frozen=True)
class CriticDenoising(Denoising):
    critic: Optional[nn.Module] = None
    weight: float = 0.05
    updates = ("critic", "model")

    def _x0_hat(self, model, schedule, x0, generator):
        t = torch.randint(1, schedule.T + 1, (x0.shape[0],), generator=generator, device=x0.device)
        _, x_t = schedule.noise(x0, t, generator)
        return to_x0(self.prediction, model(x_t, t), x_t, schedule.gather(schedule.alpha_bar, t, x0))

    def loss(self, model, schedule, x0, generator=None, **kw):
        base = super().loss(model, schedule, x0, generator, **kw)
        return base + self.weight * F.softplus(-self.critic(self._x0_hat(model, schedule, x0, generator))).mean()

    def update_loss(self, network, model, schedule, x0, generator=None, **kw):
        assert network == "critic"
        with torch.no_grad():
            fake = self._x0_hat(model, schedule, x0, generator)
        return F.softplus(-self.critic(x0)).mean() + F.softplus(self.critic(fake)).mean()


class CriticDDPM(VPDiffusionMethod):
    others = ("critic",)

    def other_networks(self, cfg, dim, device):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, "init-critic"))
            critic = nn.Sequential(nn.Linear(dim, 32), nn.SiLU(), nn.Linear(32, 1))
        return {"critic": critic.to(device)}

    def objective(self, run, others=None):
        d = Denoising.from_config(run.config)
        return CriticDenoising(d.prediction, d.weighting, d.gamma, d.learned_variance, d.vlb_weight,
                               critic=others["critic"])


@contextlib.contextmanager
def installed():
    """CriticDDPM in the place of the "ddpm" method while the block runs."""
    import pytest

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(methods.METHODS._items, "ddpm", CriticDDPM())
        yield


if __name__ == "__main__":  # the command line with the critic method installed (for a real subprocess to kill)
    from toydiff.cli import main

    methods.METHODS._items["ddpm"] = CriticDDPM()
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1:]))
