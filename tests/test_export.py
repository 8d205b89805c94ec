"""Bundle export: ONNX parity with torch, dynamic batch, single files, manifest checks and refusals."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from vertrefine import bundle as bundle_mod  # noqa: E402
from vertrefine.bundle import FILES, MANIFEST_NAME, load_bundle, read_manifest, sha256_file, verify_bundle  # noqa: E402
from vertrefine.errors import InputError, OutputError  # noqa: E402
from vertrefine.schedule import DiffusionSchedule  # noqa: E402
from vertrefine.train import export as export_mod  # noqa: E402
from vertrefine.train.export import export_bundle, export_run, load_checkpoint_model  # noqa: E402
from vertrefine.train.models import ModelConfig, VertebraModel  # noqa: E402

SMALL = dict(latent=16, encoder_widths=(4, 8, 8, 16), decoder_widths=(16, 8, 8, 4), energy_hidden=64)
SPATIAL = dict(
    latent=2, latent_grid=16, res_blocks=1, encoder_widths=(4, 8), decoder_widths=(8, 4), energy_widths=(4, 4, 4)
)
"""The spatial latent (2 x 16^3) with the energy CNN: the shipped form, small."""
SAMPLER = dict(t_refine=8, langevin_steps=30, step_size=0.01, noise_scale=0.01, init="encoder")
SCHEDULE = DiffusionSchedule()


def make_model(kind: str, seed: int = 0, **overrides) -> VertebraModel:
    """``kind`` is a model kind, or 'KIND/spatial' for the spatial latent."""
    kind, _, form = kind.partition("/")
    torch.manual_seed(seed)
    model = VertebraModel(ModelConfig(kind=kind, **{**(SPATIAL if form else SMALL), **overrides}))
    if model.energy is not None:  # trained embeddings are not zero: make t matter in the parity tests
        for name, embedding in model.energy.named_children():
            if name.startswith("time"):
                torch.nn.init.normal_(embedding.weight, std=0.5)
    return model.eval()


def export(model: VertebraModel, out: Path, exporter: str = "torchscript") -> Path:
    """Export with the fast TorchScript exporter by default (dynamo takes ~4 s a module); after writing,
    the checks and the bundle do not depend on the exporter. The "auto" and "dynamo" paths have their own tests."""
    return export_bundle(
        model,
        out,
        schedule=SCHEDULE,
        sampler_defaults=SAMPLER,
        recipe={"command": "test"},
        metrics={"dice": 0.9},
        exporter=exporter,
    )


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, tuple[VertebraModel, Path]]:
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for kind in ("vae", "lebm", "lsd-ebm", "vae/spatial", "lsd-ebm/spatial"):
        model = make_model(kind)
        out[kind] = (model, export(model, root / kind.replace("/", "-")))
    return out


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def patch_batch(batch: int, side: int = 128, seed: int = 0) -> np.ndarray:
    """Balls of random centre and radius: shapes with structure, not only noise."""
    rng = np.random.default_rng(seed)
    grid = np.indices((side, side, side), dtype=np.float32)
    out = np.zeros((batch, 1, side, side, side), np.float32)
    for b in range(batch):
        centre = rng.uniform(0.3 * side, 0.7 * side, 3)[:, None, None, None]
        out[b, 0] = ((grid - centre) ** 2).sum(0) < rng.uniform(0.1, 0.3) ** 2 * side**2
    return out


def check_autoencoder_parity(model: VertebraModel, folder: Path, batches=(1, 3)) -> None:
    enc, dec = session(folder / FILES["encoder"]), session(folder / FILES["decoder"])
    for batch in batches:
        x = patch_batch(batch, model.config.patch, seed=batch)
        mu, logvar = enc.run(None, {"x": x})
        with torch.no_grad():
            mu_t, logvar_t = model.encoder(torch.from_numpy(x))
        assert mu.shape == logvar.shape == (batch, *model.config.latent_shape)
        assert np.abs(mu - mu_t.numpy()).max() < 1e-4
        assert np.abs(logvar - logvar_t.numpy()).max() < 1e-4
        z = np.random.default_rng(batch).standard_normal((batch, *model.config.latent_shape)).astype(np.float32)
        (prob,) = dec.run(None, {"z": z})
        with torch.no_grad():
            prob_t = model.decoder(torch.from_numpy(z)).numpy()
        assert prob.shape == (batch, 1) + (model.config.patch,) * 3
        assert np.abs(prob - prob_t).max() < 1e-4


@pytest.mark.parametrize("kind", ["vae", "lebm", "lsd-ebm", "vae/spatial", "lsd-ebm/spatial"])
def test_encoder_decoder_match_torch_at_batch_1_and_3(bundles, kind):
    model, folder = bundles[kind]
    check_autoencoder_parity(model, folder)


@pytest.mark.parametrize("kind", ["lebm", "lsd-ebm", "lsd-ebm/spatial"])
def test_energy_and_gradient_match_torch_and_autograd(bundles, kind):
    model, folder = bundles[kind]
    energy = session(folder / FILES["energy"])
    steps = model.config.energy_timesteps
    for batch in (1, 3):
        rng = np.random.default_rng(batch)
        z = (2.0 * rng.standard_normal((batch, *model.config.latent_shape))).astype(np.float32)
        t = rng.integers(0, steps, batch).astype(np.int64)
        e, grad = energy.run(None, {"z": z, "t": t})
        z_t = torch.from_numpy(z).requires_grad_(True)
        e_t = model.energy(z_t, torch.from_numpy(t))
        (grad_autograd,) = torch.autograd.grad(e_t.sum(), z_t)
        with torch.no_grad():
            e_ref, grad_ref = model.energy.energy_and_grad(torch.from_numpy(z), torch.from_numpy(t))
        assert e.shape == (batch,) and grad.shape == (batch, *model.config.latent_shape)
        for got, want in ((e, e_ref), (grad, grad_ref), (grad, grad_autograd)):
            want = want.detach().numpy()
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("kind", ["lsd-ebm", "lsd-ebm/spatial"])
def test_lsd_ebm_energy_depends_on_t(bundles, kind):
    model, folder = bundles[kind]
    z = np.zeros((2, *model.config.latent_shape), np.float32)
    e, _ = session(folder / FILES["energy"]).run(None, {"z": z, "t": np.array([0, 7], np.int64)})
    assert abs(e[0] - e[1]) > 1e-6


def test_default_config_encoder_decoder_parity(tmp_path):
    model = make_model("vae", **{k: getattr(ModelConfig(), k) for k in SMALL})
    assert model.config == ModelConfig(kind="vae")
    folder = export(model, tmp_path / "bundle")
    check_autoencoder_parity(model, folder, batches=(1, 2))
    sizes = {name: (folder / FILES[name]).stat().st_size for name in ("encoder", "decoder")}
    assert all(size < bundle_mod.MAX_FILE_BYTES for size in sizes.values()), sizes


@pytest.mark.parametrize("kind", ["vae", "lebm", "lsd-ebm"])
def test_bundle_files_are_single_and_load(bundles, kind):
    model, folder = bundles[kind]
    expected = {MANIFEST_NAME, FILES["encoder"], FILES["decoder"]} | ({FILES["energy"]} if kind != "vae" else set())
    assert {p.name for p in folder.iterdir()} == expected  # no .data side files; vae has no energy.onnx
    for name in expected - {MANIFEST_NAME}:
        proto = onnx.load(str(folder / name), load_external_data=False)
        assert proto.ir_version <= 10
        assert any(o.domain in ("", "ai.onnx") and o.version >= 18 for o in proto.opset_import)
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
        for value in list(proto.graph.input) + list(proto.graph.output):
            assert value.type.tensor_type.shape.dim[0].dim_param == "B"
        session(folder / name)


def test_manifest_content_and_checksums(bundles):
    model, folder = bundles["lsd-ebm"]
    manifest = verify_bundle(folder)
    assert manifest == json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["kind"] == "lsd-ebm" and manifest["latent_size"] == 16
    assert manifest["patch_size"] == 128 and manifest["spacing_mm"] == 1.0
    assert ModelConfig.from_dict(manifest["model_config"]) == model.config
    assert DiffusionSchedule(**manifest["schedule"]) == SCHEDULE
    assert manifest["sampler_defaults"] == SAMPLER
    assert manifest["metrics"] == {"dice": 0.9} and manifest["recipe"] == {"command": "test"}
    assert manifest["flops"]["encoder"] > 0 and manifest["parameters"]["energy"] > 0
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(folder / FILES[name])
        assert entry["exporter"] in ("dynamo", "torchscript")
        assert max(entry["parity_error"].values()) < 1e-4
    assert manifest["files"]["energy"]["inputs"]["t"]["dtype"] == "int64"
    loaded = load_bundle(folder)
    assert (loaded.kind, loaded.latent, loaded.patch, loaded.has_energy) == ("lsd-ebm", 16, 128, True)
    assert loaded.files["energy"] == folder / "energy.onnx" and loaded.diffusion_schedule() == SCHEDULE
    assert not load_bundle(bundles["vae"][1]).has_energy


def test_spatial_manifest_names_the_latent_grid(bundles):
    model, folder = bundles["lsd-ebm/spatial"]
    manifest = verify_bundle(folder)
    assert manifest["latent_shape"] == [2, 16, 16, 16] and manifest["latent_size"] == 2 * 16**3
    assert manifest["files"]["energy"]["inputs"]["z"]["shape"] == ["B", 2, 16, 16, 16]
    loaded = load_bundle(folder)
    assert loaded.latent_shape == (2, 16, 16, 16)
    broken = copy_bundle(folder, folder.parent / "broken-shape")
    manifest["latent_shape"] = [3, 16, 16, 16]
    (broken / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="latent_shape"):
        read_manifest(broken)


def test_shipped_training_config_exports_with_parity(tmp_path):
    """The default `vertrefine train` model (spatial latent, energy CNN) exports under the size limit."""
    from vertrefine.train.config import TrainConfig

    config = TrainConfig.from_options(out=tmp_path / "run", data_dir=tmp_path).model_config_dict()
    torch.manual_seed(0)
    model = VertebraModel(ModelConfig(**config)).eval()
    folder = export(model, tmp_path / "bundle")
    check_autoencoder_parity(model, folder, batches=(1, 2))
    assert all((folder / FILES[n]).stat().st_size < bundle_mod.MAX_FILE_BYTES for n in ("encoder", "decoder", "energy"))


def copy_bundle(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def assert_one_line(exc: pytest.ExceptionInfo, *words: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("name", ["encoder", "energy"])
def test_tampered_file_is_refused(bundles, tmp_path, name):
    folder = copy_bundle(bundles["lsd-ebm"][1], tmp_path / "b")
    path = folder / FILES[name]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    read_manifest(folder)  # the schema is still fine: only the checksum finds it
    with pytest.raises(InputError) as exc:
        verify_bundle(folder)
    assert_one_line(exc, FILES[name], "corrupt or was modified", "re-export")


def edit_manifest(folder: Path, change) -> None:
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda f: (f / MANIFEST_NAME).write_text('{"format_version": 1, "kind": '), ("not valid JSON",)),
        (lambda f: (f / MANIFEST_NAME).write_bytes(b"\xff\xfe\x00garbage"), ("manifest",)),
        (lambda f: (f / MANIFEST_NAME).write_text("[1, 2]"), ("not a JSON object",)),
        (lambda f: (f / MANIFEST_NAME).unlink(), ("no manifest.json",)),
        (lambda f: edit_manifest(f, lambda m: m.update(format_version=99)), ("format_version 99",)),
        (lambda f: edit_manifest(f, lambda m: m.update(kind="gan")), ("unknown model kind",)),
        (lambda f: edit_manifest(f, lambda m: m.update(latent_size="16")), ("latent_size",)),
        (lambda f: edit_manifest(f, lambda m: m.update(schedule={"steps": 3})), ("schedule",)),
        (lambda f: edit_manifest(f, lambda m: m["sampler_defaults"].pop("t_refine")), ("t_refine",)),
        (lambda f: edit_manifest(f, lambda m: m["files"].pop("energy")), ("energy",)),
        (lambda f: edit_manifest(f, lambda m: m["files"]["decoder"].update(path="../x.onnx")), ("files.decoder.path",)),
        (lambda f: (f / FILES["decoder"]).unlink(), ("decoder model", "missing")),
    ],
)
def test_damaged_manifest_or_bundle_is_refused(bundles, tmp_path, damage, words):
    folder = copy_bundle(bundles["lsd-ebm"][1], tmp_path / "b")
    damage(folder)
    with pytest.raises(InputError) as exc:
        verify_bundle(folder)
    assert_one_line(exc, *words)


def test_missing_bundle_folder_is_refused(tmp_path):
    with pytest.raises(InputError) as exc:
        load_bundle(tmp_path / "nowhere")
    assert_one_line(exc, "nowhere", "bundle folder not found")


def test_torchscript_fallback_is_recorded(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("dynamo cannot trace this\nsecond line")

    monkeypatch.setattr(export_mod, "_export_dynamo", broken)
    model = make_model("lebm", seed=1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folder = export(model, tmp_path / "b", exporter="auto")
    assert model.training  # export works on a copy: the caller's model is left as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    entry = verify_bundle(folder)["files"]["energy"]
    assert entry["exporter"] == "torchscript"
    assert entry["exporter_note"] == "dynamo exporter failed (RuntimeError: dynamo cannot trace this)"
    with pytest.raises(OutputError, match="dynamo ONNX exporter failed"):
        export(model, tmp_path / "c", exporter="dynamo")
    assert not (tmp_path / "c").exists()


def test_auto_exporter_prefers_dynamo(tmp_path):
    """Exporter "auto" uses the dynamo exporter where onnxscript is installed (its output held to the same parity),
    and otherwise the TorchScript exporter, saying why in the manifest."""
    model = make_model("lsd-ebm", seed=2)
    folder = export(model, tmp_path / "b", exporter="auto")
    files = verify_bundle(folder)["files"]
    if importlib.util.find_spec("onnxscript") is None:
        assert all(e["exporter"] == "torchscript" and "onnxscript" in e["exporter_note"] for e in files.values())
    else:
        assert all(e["exporter"] == "dynamo" and "exporter_note" not in e for e in files.values())
        check_autoencoder_parity(model, folder, batches=(3,))
        assert max(files["energy"]["parity_error"].values()) < 1e-6


def test_failed_export_leaves_no_half_bundle(tmp_path, monkeypatch):
    real = export_mod.finalize_onnx

    def fail_on_energy(path, spec):
        if path.name == FILES["energy"]:
            raise OutputError("boom")
        return real(path, spec)

    monkeypatch.setattr(export_mod, "finalize_onnx", fail_on_energy)
    with pytest.raises(OutputError, match="boom"):
        export(make_model("lsd-ebm"), tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_file_over_the_size_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "MAX_FILE_BYTES", 10_000)
    with pytest.raises(OutputError) as exc:
        export(make_model("vae"), tmp_path / "b")
    assert_one_line(exc, "encoder.onnx", "over the 0.01 MB limit")
    assert list(tmp_path.iterdir()) == []


def test_replaces_an_earlier_bundle_but_not_other_folders(bundles, tmp_path):
    folder = copy_bundle(bundles["lsd-ebm"][1], tmp_path / "b")
    model = make_model("vae", seed=3)
    export(model, folder)
    assert verify_bundle(folder)["kind"] == "vae" and not (folder / FILES["energy"]).exists()
    other = tmp_path / "run"
    other.mkdir()
    (other / "log.csv").write_text("epoch\n")
    with pytest.raises(OutputError, match="other than a bundle"):
        export(model, other)
    assert [p.name for p in other.iterdir()] == ["log.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "run"]  # no temporary folders left


def write_checkpoint(run: Path, model: VertebraModel, **changes) -> Path:
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = {
        "model_config": model.config.as_dict(),
        "schedule": SCHEDULE.as_dict(),
        "model_state": model.state_dict(),
        "sampler_defaults": SAMPLER,
        "recipe": {"command": "vertrefine train", "epochs": 2},
        "metrics": {"val_dice": 0.91},
        **changes,
    }
    path = run / "checkpoints" / "last.pt"
    torch.save(checkpoint, path)
    return path


def test_export_run_from_checkpoint(tmp_path):
    model = make_model("lsd-ebm", seed=4)
    path = write_checkpoint(tmp_path / "run", model)
    loaded, schedule, meta = load_checkpoint_model(tmp_path / "run")
    assert loaded.config == model.config and schedule == SCHEDULE and meta["metrics"] == {"val_dice": 0.91}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    folder = export_run(tmp_path / "run", tmp_path / "bundle", exporter="torchscript")
    manifest = verify_bundle(folder)
    assert manifest["recipe"]["epochs"] == 2 and manifest["recipe"]["checkpoint"] == str(path)
    check_autoencoder_parity(model, folder, batches=(1,))


class NotWeights:
    pass


def test_unsafe_or_incomplete_checkpoints_are_refused(tmp_path):
    model = make_model("vae")
    with pytest.raises(InputError, match="no checkpoint found"):
        load_checkpoint_model(tmp_path)
    write_checkpoint(tmp_path / "a", model, recipe={"object": NotWeights()})
    with pytest.raises(InputError) as exc:
        load_checkpoint_model(tmp_path / "a")
    assert_one_line(exc, "weights-only checkpoint")
    write_checkpoint(tmp_path / "b", model, model_state={})
    with pytest.raises(InputError, match="do not match the model configuration"):
        load_checkpoint_model(tmp_path / "b")
    path = write_checkpoint(tmp_path / "c", model)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["schedule"]
    torch.save(checkpoint, path)
    with pytest.raises(InputError, match="lacks schedule"):
        load_checkpoint_model(path)


def test_precise_group_norm_equals_torch_group_norm():
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 16)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = 3.0 + torch.randn(2, 16, 6, 5, 4)
    with torch.no_grad():
        assert torch.allclose(export_mod.PreciseGroupNorm(norm)(x), norm(x), atol=1e-5)
    model = export_mod.use_precise_group_norm(make_model("vae"))
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())


def test_default_export_is_torchscript_without_a_fallback_note_and_records_derived_ranges(tmp_path):
    """TorchScript is the chosen exporter (docs in vertrefine.train.export), not a fallback: nothing to explain
    in the manifest. An lsd-ebm bundle carries the sampler ranges refine accepts, holding its defaults."""
    model = make_model("lsd-ebm", seed=5)
    folder = export_bundle(model, tmp_path / "b", schedule=SCHEDULE, sampler_defaults=SAMPLER, recipe={}, metrics={})
    manifest = verify_bundle(folder)
    assert all(e["exporter"] == "torchscript" and "exporter_note" not in e for e in manifest["files"].values())
    validated = manifest["validated"]
    assert validated["basis"].startswith("derived") and validated["ranges"] == bundle_mod.derived_ranges(SCHEDULE)
    assert load_bundle(folder).sampler_ranges["step_size"] == [0.0, round(2 * SCHEDULE.sigmas[1] ** 2, 4)]
    with pytest.raises(ValueError, match="step_size 0.05 is outside its range 0..0.0121"):
        export_bundle(
            model,
            tmp_path / "c",
            schedule=SCHEDULE,
            sampler_defaults={**SAMPLER, "step_size": 0.05},
            recipe={},
            metrics={},
        )
    assert not (tmp_path / "c").exists()
    vae = export_bundle(
        make_model("vae"), tmp_path / "v", schedule=SCHEDULE, sampler_defaults={}, recipe={}, metrics={}
    )
    assert "validated" not in verify_bundle(vae)  # no sampler, no ranges


def test_export_creates_missing_parent_folders_and_refuses_a_file_in_the_way(tmp_path):
    write_checkpoint(tmp_path / "run", make_model("vae", seed=6))
    folder = export_run(tmp_path / "run", tmp_path / "new" / "deeper" / "bundle")
    assert verify_bundle(folder)["kind"] == "vae"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        export_run(tmp_path / "run", tmp_path / "file" / "bundle")


def test_export_overrides_outside_the_schedules_ranges_are_refused_in_one_line(tmp_path):
    write_checkpoint(tmp_path / "run", make_model("lsd-ebm", seed=7))
    for overrides, text in (
        ({"t_refine": 20}, "t_refine 20 (--t-refine)"),
        ({"guidance_steps": 50}, "--guidance-steps"),
    ):
        with pytest.raises(InputError) as exc:
            export_run(tmp_path / "run", tmp_path / "b", sampler_overrides=overrides)
        assert_one_line(exc, text, "outside")
    assert not (tmp_path / "b").exists()


def test_exporting_an_lebm_run_says_refine_cannot_run_it(tmp_path):
    from typer.testing import CliRunner

    from vertrefine.cli import app

    write_checkpoint(tmp_path / "run", make_model("lebm", seed=8))
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "refine` cannot run it" in result.output and "--as vae" in result.output
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "-o", str(tmp_path / "v"), "--as", "vae"])
    assert result.exit_code == 0 and "warning" not in result.output
