"""model_from_bundle: the torch model rebuilt from a bundle's manifest and ONNX initializers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from vertrefine.bundle import FILES, MANIFEST_NAME, sha256_file  # noqa: E402
from vertrefine.errors import InputError  # noqa: E402
from vertrefine.schedule import DiffusionSchedule  # noqa: E402
from vertrefine.train.export import export_bundle  # noqa: E402
from vertrefine.train.from_bundle import model_from_bundle, module_state_from_onnx  # noqa: E402
from vertrefine.train.models import ModelConfig, VertebraModel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# 32^3 patches keep export and checks well under a second; the architecture is the default one, smaller.
TINY = dict(latent=8, patch=32, encoder_widths=(4, 8), decoder_widths=(8, 4), energy_hidden=32)
SPATIAL = dict(TINY, latent=2, latent_grid=4, res_blocks=1, energy_widths=(4, 4, 4))
SAMPLER = dict(t_refine=6, langevin_steps=5, step_size=0.01, noise_scale=0.01, init="noise")


def make_model(kind: str, seed: int = 0) -> VertebraModel:
    """An untrained model: its GroupNorm weights are all ones and biases all zeros, so the TorchScript
    exporter merges them (equal values) into one initializer plus Identity copies, a case the loader handles.
    'KIND/spatial' is the spatial latent with the energy CNN."""
    kind, _, form = kind.partition("/")
    torch.manual_seed(seed)
    model = VertebraModel(ModelConfig(kind=kind, **(SPATIAL if form else TINY)))
    if model.energy is not None:
        for name, embedding in model.energy.named_children():
            if name.startswith("time"):
                torch.nn.init.normal_(embedding.weight, std=0.5)
    return model.eval()


def export(model: VertebraModel, out: Path) -> Path:
    return export_bundle(
        model,
        out,
        schedule=DiffusionSchedule(),
        sampler_defaults=SAMPLER,
        recipe={"command": "test"},
        metrics={},
        exporter="torchscript",
    )


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, tuple[VertebraModel, Path]]:
    root = tmp_path_factory.mktemp("from_bundle")
    kinds = ("vae", "lsd-ebm", "lsd-ebm/spatial")
    return {kind: (model := make_model(kind), export(model, root / kind.replace("/", "-"))) for kind in kinds}


def assert_same_outputs(original: VertebraModel, rebuilt: VertebraModel, seed: int = 0) -> None:
    """Encoder, decoder and (when present) energy with its gradient agree to 1e-5 on random inputs."""
    config = original.config
    generator = torch.Generator().manual_seed(seed)
    x = (torch.rand(3, 1, config.patch, config.patch, config.patch, generator=generator) > 0.7).float()
    z = torch.randn(3, *config.latent_shape, generator=generator)
    with torch.no_grad():
        for got, want in zip(rebuilt.encoder(x), original.encoder(x), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rebuilt.decoder(z), original.decoder(z), atol=1e-5, rtol=1e-5)
        if original.energy is None:
            assert rebuilt.energy is None
            return
        t = torch.randint(0, config.energy_timesteps, (3,), generator=generator)
        torch.testing.assert_close(rebuilt.energy(z, t), original.energy(z, t), atol=1e-5, rtol=1e-5)
        for got, want in zip(rebuilt.energy.energy_and_grad(z, t), original.energy.energy_and_grad(z, t), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["vae", "lsd-ebm", "lsd-ebm/spatial"])
def test_rebuilt_model_reproduces_the_exported_one(bundles, kind):
    original, folder = bundles[kind]
    rebuilt = model_from_bundle(folder)
    assert rebuilt.config == original.config
    assert not rebuilt.training
    assert_same_outputs(original, rebuilt)
    want = original.state_dict()
    got = rebuilt.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_merged_duplicates_are_identity_copies_in_the_export(bundles):
    """The premise of the test above: the exporter merged the equal GroupNorm weights of the untrained model."""
    _, folder = bundles["lsd-ebm"]
    graph = onnx.load(str(folder / FILES["encoder"])).graph
    initializers = {t.name for t in graph.initializer}
    assert "features.0.4.weight" not in initializers
    assert any(n.op_type == "Identity" and n.output[0] == "features.0.4.weight" for n in graph.node)


def _rename_weights(path: Path, extra_same_shape: bool = False) -> dict[str, str]:
    """Rename every weight of an ONNX file as an exporter might (onnx::W_n); returns {old: new}.

    ``extra_same_shape`` also feeds one more float initializer, shaped like the first conv bias, into the
    graph right after the first conv: the position mapping then cannot tell which one is the bias.
    """
    model = onnx.load(str(path))
    graph = model.graph
    names = [t.name for t in graph.initializer] + [
        n.output[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in {t.name for t in graph.initializer}
    ]
    renamed = {old: f"onnx::W_{i}" for i, old in enumerate(names)}
    for tensor in graph.initializer:
        tensor.name = renamed.get(tensor.name, tensor.name)
    for node in graph.node:
        node.input[:] = [renamed.get(v, v) for v in node.input]
        node.output[:] = [renamed.get(v, v) for v in node.output]
    if extra_same_shape:
        first = next(i for i, n in enumerate(graph.node) if n.op_type in ("Conv", "ConvTranspose", "Gemm"))
        conv = graph.node[first]
        bias = next(t for t in graph.initializer if t.name == conv.input[2])
        extra = onnx.numpy_helper.from_array(np.ones(tuple(bias.dims), np.float32), "onnx::Extra_0")
        graph.initializer.append(extra)
        add = onnx.helper.make_node("Add", [conv.output[0], "onnx::Extra_0"], ["extra_out"])
        graph.node.insert(first + 1, add)
    onnx.save(model, str(path))
    return renamed


def _refresh_checksums(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    for entry in manifest["files"].values():
        entry["sha256"] = sha256_file(folder / entry["path"])
        entry["bytes"] = (folder / entry["path"]).stat().st_size
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_renamed_initializers_are_mapped_by_graph_position(bundles, tmp_path):
    original, folder = bundles["lsd-ebm"]
    copy = tmp_path / "renamed"
    copy.mkdir()
    for entry in folder.iterdir():
        (copy / entry.name).write_bytes(entry.read_bytes())
    for name in ("encoder", "decoder", "energy"):
        renamed = _rename_weights(copy / FILES[name])
        assert all(new.startswith("onnx::") for new in renamed.values())
    _refresh_checksums(copy)
    rebuilt = model_from_bundle(copy)  # verify=True: ONNX Runtime must agree with the rebuilt modules
    assert_same_outputs(original, rebuilt)


def test_ambiguous_position_mapping_is_refused(bundles, tmp_path):
    _, folder = bundles["lsd-ebm"]
    path = tmp_path / "decoder.onnx"
    path.write_bytes((folder / FILES["decoder"]).read_bytes())
    _rename_weights(path, extra_same_shape=True)
    module = VertebraModel(ModelConfig(kind="lsd-ebm", **TINY)).decoder
    with pytest.raises(InputError, match="ambiguous"):
        module_state_from_onnx(module, "decoder", path)


def test_model_config_that_does_not_fit_the_weights_is_refused(bundles, tmp_path):
    _, folder = bundles["vae"]
    copy = tmp_path / "wrong"
    copy.mkdir()
    for entry in folder.iterdir():
        (copy / entry.name).write_bytes(entry.read_bytes())
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["model_config"]["encoder_widths"] = [4, 16]
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="shape"):
        model_from_bundle(copy)


def test_shipped_lsd_ebm_bundle_decoder_matches_onnx():
    folder = ROOT / "weights" / "lsd-ebm"
    model = model_from_bundle(folder)
    assert model.energy is not None and model.config.latent_shape == (8, 16, 16, 16)
    z = np.random.default_rng(0).standard_normal((1, *model.config.latent_shape)).astype(np.float32)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(folder / FILES["decoder"]), options, providers=["CPUExecutionProvider"])
    (want,) = session.run(None, {"z": z})
    with torch.no_grad():
        got = model.decoder(torch.from_numpy(z)).numpy()
    assert got.shape == want.shape == (1, 1, 128, 128, 128)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
