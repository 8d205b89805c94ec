"""refine's numpy reverse step follows exactly the chain that training samples negatives with (torch)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vertrefine.sampler import SamplerSettings, reverse_step  # noqa: E402
from vertrefine.schedule import DiffusionSchedule  # noqa: E402
from vertrefine.train.models import EnergyMLP, ModelConfig  # noqa: E402
from vertrefine.train.objectives import LangevinConfig, reverse_step_langevin  # noqa: E402


def test_numpy_reverse_step_equals_the_training_langevin_without_noise():
    torch.manual_seed(0)
    energy = EnergyMLP(ModelConfig(latent=8, energy_hidden=32, timesteps=20)).eval()
    torch.nn.init.normal_(energy.time.weight, std=0.3)
    schedule = DiffusionSchedule()
    z_next = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    t = 4

    def energy_and_grad(z, steps):
        with torch.no_grad():
            e, g = energy.energy_and_grad(torch.from_numpy(z), torch.from_numpy(steps))
        return e.numpy(), g.numpy()

    settings = SamplerSettings(langevin_steps=40, noise_scale=0.0)
    ours = reverse_step(energy_and_grad, z_next, t, schedule, settings, np.random.default_rng(0))
    sigma = torch.full((4, 1), float(schedule.sigmas[t + 1]))
    steps = torch.full((4,), t, dtype=torch.long)
    langevin = LangevinConfig(settings)  # the very settings refine runs
    y = reverse_step_langevin(energy, torch.from_numpy(z_next), steps, sigma, langevin, torch.Generator())
    assert np.allclose(ours, y.numpy() / schedule.a_s[t + 1], atol=1e-5)
