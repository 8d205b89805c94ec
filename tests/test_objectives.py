"""LSD-EBM training objective: what the energy learns from."""

import pytest

torch = pytest.importorskip("torch")

from vertrefine.sampler import SamplerSettings  # noqa: E402
from vertrefine.schedule import DiffusionSchedule  # noqa: E402
from vertrefine.train.models import ModelConfig, VertebraModel  # noqa: E402
from vertrefine.train.objectives import LangevinConfig, make_objective  # noqa: E402


def _energy_logs(objective, x, target):
    _, logs = objective(x, target, torch.Generator().manual_seed(7))
    return logs["energy_pos"], logs["energy_neg"]


@pytest.mark.parametrize("on_clean", [True, False])
def test_energy_positives_come_from_the_clean_target_unless_asked_otherwise(on_clean):
    torch.manual_seed(0)
    config = ModelConfig(kind="lsd-ebm", latent=8, patch=32, encoder_widths=(4, 8), decoder_widths=(8, 4),
                         energy_hidden=16)  # fmt: skip
    model = VertebraModel(config)
    objective = make_objective(
        model, DiffusionSchedule(), LangevinConfig(SamplerSettings(langevin_steps=3)), energy_on_clean=on_clean
    )
    target = (torch.rand(2, 1, 16, 16, 16) > 0.5).float()
    thick_a = torch.rand(2, 1, 16, 16, 16)
    thick_b = torch.rand(2, 1, 16, 16, 16)
    first, second = _energy_logs(objective, thick_a, target), _energy_logs(objective, thick_b, target)
    if on_clean:
        assert first == second  # the energy's data does not depend on the thick-slice input
    else:
        assert first != second
