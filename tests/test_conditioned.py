"""The input-conditioned decoder: it starts by trusting its input, exports with the input patch, and refine
feeds it each vertebra's patch (issue 19: keep what a thick-slice input shows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vertrefine.errors import InputError  # noqa: E402
from vertrefine.refine import Refiner  # noqa: E402
from vertrefine.schedule import DiffusionSchedule  # noqa: E402
from vertrefine.synth import synth_spine  # noqa: E402
from vertrefine.train.config import TrainConfig  # noqa: E402
from vertrefine.train.export import export_bundle  # noqa: E402
from vertrefine.train.models import ModelConfig, VertebraModel, conv_flops  # noqa: E402
from vertrefine.train.objectives import decoder_input  # noqa: E402

CONDITIONED = dict(
    latent=2, latent_grid=16, res_blocks=1, encoder_widths=(4, 8), decoder_widths=(8, 4), energy_widths=(4, 4, 4),
    input_widths=(2, 4, 4), conditioned=True,
)  # fmt: skip


def _model(kind: str = "lsd-ebm", seed: int = 0) -> VertebraModel:
    torch.manual_seed(seed)
    return VertebraModel(ModelConfig(kind=kind, **CONDITIONED)).eval()


def _ball(radius: float, size: int = 128) -> np.ndarray:
    k, j, i = np.indices((size,) * 3) - (size - 1) / 2
    return (k**2 + (j / 1.3) ** 2 + i**2 <= radius**2).astype(np.float32)


def test_an_untrained_conditioned_decoder_returns_its_input_as_the_2mm_occupancy_holds_it():
    model = _model()
    x = torch.from_numpy(_ball(20.5))[None, None]
    with torch.no_grad():
        probability = model.decoder(torch.randn(1, 2, 16, 16, 16), x)
        low = torch.nn.functional.avg_pool3d(x, 2)
        upsampled = torch.nn.functional.interpolate(low, scale_factor=2, mode="trilinear", align_corners=False)
    assert torch.equal(probability > 0.5, upsampled > 0.5)  # trust only: the input's occupancy, thresholded
    a, b = probability > 0.5, x > 0.5
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.98


def test_the_trust_and_bias_decide_the_logit_voxel_by_voxel():
    model = _model(seed=1)
    with torch.no_grad():
        model.decoder.head.weight.normal_(std=0.5)  # a trained head: trust and bias vary in space
        z, x = torch.randn(1, 2, 16, 16, 16), torch.from_numpy(_ball(30.0))[None, None]
        low = torch.nn.functional.avg_pool3d(x, 2)
        a, b = model.decoder.trust_and_bias(z, low)
        logits = model.decoder.logits(z, x)
        up = lambda m: torch.nn.functional.interpolate(m, scale_factor=2, mode="trilinear", align_corners=False)  # noqa: E731
    assert bool((a >= 0).all())
    torch.testing.assert_close(logits, up(b) + up(a) * (2 * up(low) - 1))
    torch.testing.assert_close(model.decoder.logits_lowres(z, low), b + a * (2 * low - 1))


def test_decoder_input_dropout_empties_whole_rows_only():
    x = torch.ones(64, 1, 4, 4, 4)
    out = decoder_input(x, 0.5, torch.Generator().manual_seed(0))
    rows = out.flatten(1).mean(1)
    assert set(rows.tolist()) == {0.0, 1.0} and 10 < int((rows == 0).sum()) < 54
    assert decoder_input(x, 0.0, torch.Generator()) is x


def test_a_conditioned_decoder_needs_a_spatial_latent_and_no_lebm():
    with pytest.raises(ValueError, match="spatial latent"):
        ModelConfig(kind="vae", latent=16, conditioned=True)
    with pytest.raises(ValueError, match="spatial latent"):
        ModelConfig(kind="lebm", **CONDITIONED)
    with pytest.raises(InputError, match="--conditioned"):
        TrainConfig.from_options(out="run", conditioned=True, latent_grid=0)
    assert conv_flops(ModelConfig(kind="vae", **CONDITIONED))["decoder"] > 0


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conditioned") / "bundle"
    return export_bundle(
        _model(),
        out,
        schedule=DiffusionSchedule(),
        sampler_defaults=dict(t_refine=3, langevin_steps=5, step_size=0.01, noise_scale=0.01, init="previous",
                              guidance=0.25, guidance_steps=1),
        recipe={"command": "test"},
        metrics={},
    )  # fmt: skip


def test_the_exported_decoder_takes_the_input_patch_and_refine_feeds_it(bundle):
    import onnxruntime as ort

    session = ort.InferenceSession(str(bundle / "decoder.onnx"), providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in session.get_inputs()) == ["x", "z"]
    refiner = Refiner.from_bundle(bundle, device="cpu", fine_inputs="refine", consistency="none")
    assert refiner.bundle.conditioned
    spine = synth_spine(3, levels=("L2", "L3"))
    with pytest.raises(ValueError, match="input patches"):
        next(refiner.sessions.decode_chunks(np.zeros((1, 2, 16, 16, 16), np.float32)))
    result = refiner(spine, seed=0)  # an untrained conditioned model keeps what the input shows
    for label in (21, 22):
        a, b = result.labels.array == label, spine.array == label
        assert 2 * np.count_nonzero(a & b) / (a.sum() + b.sum()) > 0.97
