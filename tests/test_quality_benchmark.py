"""benchmarks/quality.py's paired statistics and benchmarks/lebm_baseline.py's LEBM row."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import torch.nn.functional as F  # noqa: E402

from benchmarks.lebm_baseline import LebmRefiner, train_prior  # noqa: E402
from benchmarks.quality import paired_difference  # noqa: E402
from vertrefine.schedule import DiffusionSchedule  # noqa: E402
from vertrefine.train.export import export_bundle  # noqa: E402
from vertrefine.train.models import ModelConfig, VertebraModel  # noqa: E402

TINY = dict(latent=8, patch=32, encoder_widths=(4, 8), decoder_widths=(8, 4), energy_hidden=32)


def _rows(values: dict[tuple[str, int], float]) -> list[dict]:
    return [{"case": c, "label": lab, "dsc": v} for (c, lab), v in values.items()]


def test_paired_difference_matches_vertebrae_by_case_and_label():
    base = _rows({("a", 20): 0.80, ("a", 21): 0.90, ("b", 20): 0.70})
    other = _rows({("b", 20): 0.75, ("a", 21): 0.88, ("a", 20): 0.84})  # another order
    other.append({"case": "a", "label": 99, "dsc": 0.0, "extra": True})  # prediction-only: ignored
    d = paired_difference(other, base)
    assert d["n"] == 3
    assert d["mean"] == pytest.approx((0.04 - 0.02 + 0.05) / 3)
    assert d["wins"] == pytest.approx(2 / 3)
    assert d["ci95"] == pytest.approx(1.96 * np.std([0.04, -0.02, 0.05], ddof=1) / np.sqrt(3))


@pytest.fixture(scope="module")
def tiny_lebm(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("lebm")
    model = VertebraModel(ModelConfig(kind="lsd-ebm", **TINY)).eval()
    bundle = export_bundle(
        model,
        folder / "bundle",
        schedule=DiffusionSchedule(),
        sampler_defaults=dict(t_refine=2, langevin_steps=2, step_size=0.01, noise_scale=0.01, init="previous"),
        recipe={"command": "test"},
        metrics={},
        exporter="torchscript",
    )
    config = ModelConfig(kind="lebm", **TINY)
    rng = np.random.default_rng(0)
    mu = (2.0 + 0.1 * rng.standard_normal((64, 8))).astype(np.float32)  # data far from N(0, I)
    latents = np.stack([mu, np.full_like(mu, -6.0)], axis=1)
    energy, log = train_prior(latents, config, updates=40, batch=16, lr=1e-3, seed=0)
    prior = folder / "prior.pt"
    torch.save({"energy_state": energy.state_dict(), "model_config": config.as_dict(), "record": {}}, prior)
    return bundle, prior, energy, log, model


def test_trained_prior_gives_the_data_lower_energy_than_prior_samples(tiny_lebm):
    _, _, energy, log, _ = tiny_lebm
    t = torch.zeros(64, dtype=torch.long)
    with torch.no_grad():
        e_data = energy(torch.full((64, 8), 2.0), t).mean()
        e_noise = energy(torch.randn(64, 8, generator=torch.Generator().manual_seed(1)), t).mean()
    assert e_data < e_noise
    assert log[-1]["energy_pos"] < log[-1]["energy_neg"]


def test_posterior_langevin_fits_the_input_through_the_decoder(tiny_lebm):
    bundle, prior, _, _, model = tiny_lebm
    refiner = LebmRefiner(bundle, prior, steps=0, step_size=1e-3)
    start = np.zeros((2, 8), np.float32)
    with torch.no_grad():
        target_z = torch.randn(2, 8, generator=torch.Generator().manual_seed(3)) * 2
        patches = (model.decoder(target_z)[:, 0] > 0.5).float().numpy()
    assert np.array_equal(refiner.posterior(start, patches, seed=0), start)  # no steps: the encoder's mean

    refiner.steps = 60
    z = refiner.posterior(start, patches, seed=0)
    lowres = torch.from_numpy(patches).reshape(2, 1, 16, 2, 16, 2, 16, 2).mean(dim=(3, 5, 7))

    def nll(latent: np.ndarray) -> float:
        logits = refiner.model.decoder.logits_lowres(torch.from_numpy(latent))
        return F.binary_cross_entropy_with_logits(logits, lowres, reduction="sum").item()

    reachable = nll(start) - nll(target_z.numpy())  # what the decoder can explain of the input
    assert reachable > 0
    assert nll(start) - nll(z) > 0.5 * reachable
