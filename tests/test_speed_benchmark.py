"""benchmarks/speed.py's reference sampler: its autograd Langevin is the explicit-gradient chain refine runs."""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from vertrefine.refine import Refiner  # noqa: E402
from vertrefine.sampler import SamplerSettings, reverse_step  # noqa: E402
from vertrefine.schedule import DiffusionSchedule  # noqa: E402
from vertrefine.train.export import export_bundle  # noqa: E402
from vertrefine.train.models import ModelConfig, VertebraModel  # noqa: E402
from vertrefine.volume import Geometry, Volume  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(latent=8, patch=32, encoder_widths=(4, 8), decoder_widths=(8, 4), energy_hidden=32)


def _load_speed():
    spec = importlib.util.spec_from_file_location("benchmarks_speed_under_test", ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


speed = _load_speed()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny lsd-ebm bundle (random weights, non-zero time embeddings) and the reference side over it."""
    torch.manual_seed(0)
    model = VertebraModel(ModelConfig(kind="lsd-ebm", **TINY)).eval()
    torch.nn.init.normal_(model.energy.time.weight, std=0.5)
    folder = export_bundle(
        model,
        tmp_path_factory.mktemp("speed") / "bundle",
        schedule=DiffusionSchedule(),
        sampler_defaults=dict(t_refine=6, langevin_steps=2, step_size=0.01, noise_scale=0.01, init="noise"),
        recipe={"command": "test"},
        metrics={},
        exporter="torchscript",
    )
    return folder, speed.ReferenceSide(folder)


def test_autograd_gradient_equals_the_explicit_gradient(tiny):
    _, side = tiny
    energy, schedule = side.model.energy, side.schedule
    generator = torch.Generator().manual_seed(1)
    for t in (0, 3, 5):
        sigma = float(schedule.sigmas[t + 1])
        y = 2.0 * torch.randn(3, TINY["latent"], generator=generator)
        z_next = torch.randn(3, TINY["latent"], generator=generator)
        steps = torch.full((3,), t, dtype=torch.long)
        got = speed.reference_potential_grad(energy, y, z_next, steps, sigma)
        with torch.no_grad():
            _, grad_energy = energy.energy_and_grad(y, steps)
        want = grad_energy + (y - z_next) / sigma**2
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        # the energy term matters: without it the gradient would be the Gaussian term alone
        assert float((got - (y - z_next) / sigma**2).abs().max()) > 1e-4


def test_reference_reverse_step_is_the_explicit_langevin_chain(tiny):
    """Two steps of the reference (autograd) against the same chain written with the explicit gradient."""
    _, side = tiny
    energy, schedule = side.model.energy, side.schedule
    settings = replace(speed.REFERENCE, langevin_steps=2)
    t = 4
    z_next = torch.randn(1, TINY["latent"], generator=torch.Generator().manual_seed(2))
    got = speed.reference_reverse_step(energy, z_next, t, schedule, settings, torch.Generator().manual_seed(3))

    generator = torch.Generator().manual_seed(3)
    sigma = float(schedule.sigmas[t + 1])
    y = torch.randn(z_next.shape, generator=generator)  # fresh noise start, as the original code
    steps = torch.full((1,), t, dtype=torch.long)
    with torch.no_grad():
        for _ in range(2):
            _, grad_energy = energy.energy_and_grad(y, steps)
            y = y - 0.005 * (grad_energy + (y - z_next) / sigma**2)
            y = y + math.sqrt(0.01) * 0.01 * torch.randn(y.shape, generator=generator)
    torch.testing.assert_close(got, y / float(schedule.a_s[t + 1]), rtol=1e-5, atol=1e-6)


class _Replay:
    """A numpy ``standard_normal`` source that gives back recorded draws, in order."""

    def __init__(self, draws: list[np.ndarray]) -> None:
        self.draws = list(draws)

    def standard_normal(self, shape, dtype=np.float32):
        draw = self.draws.pop(0)
        assert draw.shape == tuple(shape)
        return draw.astype(dtype)


def test_reference_reverse_step_matches_refines_numpy_sampler_on_onnx(tiny):
    """Same start and noise: the torch autograd reference and refine's numpy + ONNX sampler agree."""
    folder, side = tiny
    sessions = Refiner.from_bundle(folder, device="cpu", threads=1).sessions  # as refine opens the bundle
    settings = replace(speed.REFERENCE, langevin_steps=3)
    t, seed = 2, 5
    z_next = torch.randn(1, TINY["latent"], generator=torch.Generator().manual_seed(4))
    got = speed.reference_reverse_step(
        side.model.energy, z_next, t, side.schedule, settings, torch.Generator().manual_seed(seed)
    )
    generator = torch.Generator().manual_seed(seed)
    draws = [torch.randn(z_next.shape, generator=generator).numpy() for _ in range(1 + settings.langevin_steps)]
    numpy_settings = SamplerSettings(langevin_steps=3, step_size=0.01, noise_scale=0.01, init="noise")
    want = reverse_step(sessions.energy_and_grad, z_next.numpy(), t, side.schedule, numpy_settings, _Replay(draws))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)


def test_reference_pipeline_runs_one_vertebra_after_the_other(tiny):
    _, side = tiny
    array = np.zeros((40, 30, 30), np.int16)
    array[4:16, 8:22, 8:22] = 21
    array[22:34, 8:22, 8:22] = 20
    volume = Volume(array, Geometry(shape=array.shape, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)))
    labels, seconds = side.refine(volume, seed=0, settings=replace(speed.REFERENCE, langevin_steps=2))
    assert labels.array.shape == array.shape
    assert set(np.unique(labels.array)) <= {0, 20, 21}
    assert set(seconds) == {"total", "encode", "sample", "decode", "other"}
    assert seconds["other"] >= 0 and seconds["total"] >= seconds["sample"] > 0
