"""`vertrefine train` and `vertrefine export` from the command line: the tiny preset end to end."""

import json

import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")

from vertrefine.bundle import verify_bundle  # noqa: E402
from vertrefine.cli import app  # noqa: E402

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("runs") / "tiny"
    result = invoke("train", "--preset", "tiny", "--model", "lsd-ebm", "--epochs", "2", "--keep-cut", "--out", run)
    assert result.exit_code == 0, result.output
    return run, result.output


def test_tiny_preset_trains_logs_and_exports_a_verified_bundle(tiny_run):
    run, output = tiny_run
    assert "epoch 2/2" in output and "val Dice" in output
    header, *rows = (run / "log.csv").read_text().splitlines()
    assert "val_dice" in header and len(rows) == 2
    manifest = verify_bundle(run / "bundle")
    assert manifest["kind"] == "lsd-ebm"
    assert sorted(p.name for p in (run / "bundle").iterdir()) == [
        "decoder.onnx",
        "encoder.onnx",
        "energy.onnx",
        "manifest.json",
    ]
    command = manifest["recipe"]["command"]
    assert command.startswith("vertrefine train --out ") and "--preset tiny" in command and "--epochs 2" in command
    assert "--keep-cut" in command and "--resume" not in command and "PosixPath" not in command  # retypeable


def test_resume_continues_to_more_epochs_and_refuses_changed_options(tiny_run):
    run, _ = tiny_run
    changed = invoke("train", "--resume", "--out", run, "--latent", "16", "--epochs", "3")
    assert changed.exit_code == 2 and "cannot change latent" in changed.output
    result = invoke("train", "--resume", "--out", run, "--epochs", "3")
    assert result.exit_code == 0, result.output
    assert "epoch 3/3" in result.output and "epoch 1/" not in result.output
    assert len((run / "log.csv").read_text().splitlines()) == 4


def test_export_as_vae_writes_the_autoencoder_alone(tiny_run, tmp_path):
    run, _ = tiny_run
    result = invoke("export", run, "-o", tmp_path / "vae", "--as", "vae")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "vae" / "manifest.json").read_text())
    assert manifest["kind"] == "vae" and "energy" not in manifest["files"]
    assert not (tmp_path / "vae" / "energy.onnx").exists()
    original = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["files"]["encoder"]["sha256"] == original["files"]["encoder"]["sha256"]


def test_export_of_a_folder_without_checkpoint_is_one_error_line(tmp_path):
    result = invoke("export", tmp_path, "-o", tmp_path / "b")
    assert result.exit_code == 2
    assert result.output.count("error:") == 1 and "checkpoint" in result.output


def test_train_without_data_is_refused(tmp_path):
    result = invoke("train", "--out", tmp_path / "r")
    assert result.exit_code == 2 and "--data is required" in result.output


def test_info_lists_bundles_found_through_vertrefine_weights(tiny_run, tmp_path):
    run, _ = tiny_run
    result = runner.invoke(app, ["info"], env={"COLUMNS": "300", "VERTREFINE_WEIGHTS": str(run)})
    assert result.exit_code == 0, result.output
    assert "lsd-ebm (latent 2x16x16x16)" in result.output
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    result = runner.invoke(app, ["info"], env={"COLUMNS": "300", "VERTREFINE_WEIGHTS": str(tmp_path)})
    assert "unusable bundle" in result.output
