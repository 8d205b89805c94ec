"""Option values a user can get wrong: refine's sampler options against the bundle's validated ranges,
every knob of degrade, synth's output folder, train's --data. Each is refused in one line, exit code 2."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from vertrefine.bundle import default_bundle_dir, load_bundle, read_manifest, verify_bundle
from vertrefine.cli import app
from vertrefine.errors import InputError
from vertrefine.io import read_label_map, write_label_map
from vertrefine.synth import synth_spine

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def spine(tmp_path_factory):
    path = tmp_path_factory.mktemp("spine") / "spine.nii.gz"
    write_label_map(synth_spine(31, levels=("L2", "L3")), path)
    return path


# ------------------------------------------------------------------------------ refine: sampler ranges


def test_the_shipped_bundle_records_measured_ranges_that_hold_its_defaults():
    manifest = verify_bundle(default_bundle_dir("lsd-ebm"))  # the ONNX files still match their sha256s
    validated = manifest["validated"]
    assert validated["basis"].startswith("measured")
    for key, (low, high) in validated["ranges"].items():
        assert low <= manifest["sampler_defaults"][key] <= high, key
    assert validated["ranges"]["step_size"][1] < 0.04  # 0.04 and more made every vertebra vanish


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--step-size", "0.04"),
        ("--step-size", "0.05"),
        ("--step-size", "0.06"),
        ("--step-size", "0.5"),
        ("--step-size", "1.0"),
        ("--t-refine", "20"),
        ("--langevin-steps", "100000"),
    ],
)
def test_sampler_options_outside_the_validated_range_are_refused(spine, tmp_path, option, value):
    result = invoke("refine", spine, "-o", tmp_path / "o.nii.gz", option, value)
    line = _error_line(result)
    ranges = load_bundle(default_bundle_dir("lsd-ebm")).sampler_ranges
    low, high = ranges[option[2:].replace("-", "_")]
    assert f"{option} {float(value):g} is outside {low:g}..{high:g}" in line and "validated" in line
    assert list(tmp_path.iterdir()) == []


def test_sampler_options_need_the_sampling_model(spine, tmp_path):
    line = _error_line(invoke("refine", spine, "-o", tmp_path / "o.nii.gz", "--model", "vae", "--guidance", "0.5"))
    assert "--guidance" in line and "lsd-ebm" in line


def _bundle_copy(tmp_path, change) -> object:
    folder = tmp_path / "bundle"
    shutil.copytree(default_bundle_dir("lsd-ebm"), folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_a_diverging_chain_is_reported_and_the_input_kept(spine, tmp_path):
    """A bundle whose manifest (wrongly) allows a step size of 0.5: every chain diverges; the console says
    none was refined and why, and the written map is the input, voxel for voxel (exit code 0: it is complete)."""
    folder = _bundle_copy(tmp_path, lambda m: m["validated"]["ranges"].update(step_size=[0.0001, 1.0]))
    out = tmp_path / "o.nii.gz"
    options = ("--step-size", "0.5", "--t-refine", "2", "--fine-inputs", "refine")  # a 1 mm spine: refine it
    result = invoke("refine", spine, "-o", out, "--weights", folder, *options)
    assert result.exit_code == 0, result.output
    assert "done (2 kept as input;" in result.output
    assert result.output.count("sampler diverged") == 2
    np.testing.assert_array_equal(read_label_map(out).array, read_label_map(spine).array)
    sidecar = json.loads((tmp_path / "o.json").read_text())
    assert all(v["decision"] == "kept input" for v in sidecar["vertebrae"])


def test_manifest_ranges_are_checked_and_older_bundles_get_ranges_from_their_schedule(tmp_path, spine):
    outside = _bundle_copy(tmp_path / "a", lambda m: m["validated"]["ranges"].update(t_refine=[0, 3]))
    with pytest.raises(InputError, match="t_refine 6 lies outside its validated range 0..3"):
        read_manifest(outside)
    malformed = _bundle_copy(tmp_path / "b", lambda m: m["validated"]["ranges"].update(step_size=[0.1, 0.01]))
    with pytest.raises(InputError, match="low <= high"):
        read_manifest(malformed)
    unknown = _bundle_copy(tmp_path / "c", lambda m: m["validated"]["ranges"].update(threshold=[0, 1]))
    with pytest.raises(InputError, match="not a sampler setting"):
        read_manifest(unknown)
    older = _bundle_copy(tmp_path / "d", lambda m: m.pop("validated"))
    ranges = load_bundle(older).sampler_ranges
    assert ranges["t_refine"] == [0, 19] and ranges["step_size"] == [0.0, 0.0121]  # 2 sigma_1^2 of the schedule
    line = _error_line(invoke("refine", spine, "-o", tmp_path / "o.nii.gz", "--weights", older, "--step-size", "0.02"))
    assert "0..0.0121" in line and "derived from the diffusion schedule" in line


# ------------------------------------------------------------------------------ degrade and synth

BAD_DEGRADE = [
    (("--slice-mm", "0.1"), "--slice-mm"),
    (("--slice-mm", "1000"), "--slice-mm"),
    (("--slice-mm", "nan"), "--slice-mm"),
    (("--in-plane-mm", "-1"), "--in-plane-mm"),
    (("--in-plane-mm", "50"), "--in-plane-mm"),
    (("--boundary-amplitude-mm", "-1"), "--boundary-amplitude-mm"),
    (("--boundary-amplitude-mm", "100"), "--boundary-amplitude-mm"),
    (("--boundary-sigma-mm", "0"), "--boundary-sigma-mm"),
    (("--threshold-jitter", "0.5"), "--threshold-jitter"),
    (("--posterior-loss-mm", "200"), "--posterior-loss-mm"),
    (("--truncation", "2"), "--truncation"),
    (("--islands", "inf"), "--islands"),
    (("--islands", "-1"), "--islands"),
    (("--island-radius-mm", "4", "1"), "--island-radius-mm"),
    (("--island-radius-mm", "0", "0"), "--island-radius-mm"),
    (("--island-radius-mm", "-1", "2"), "--island-radius-mm"),
]


@pytest.mark.parametrize(("extra", "option"), BAD_DEGRADE)
def test_bad_degrade_options_are_one_line_naming_the_option(spine, tmp_path, extra, option):
    line = _error_line(invoke("degrade", spine, "-o", tmp_path / "d.nii.gz", *extra))
    assert line.startswith(f"error: {option} ")
    assert list(tmp_path.iterdir()) == []


def test_degrade_api_names_the_bad_knob():
    from vertrefine.degrade import degrade, option_problem

    volume = synth_spine(31, levels=("L2",))
    with pytest.raises(ValueError, match="island_radius_mm takes the smallest radius first"):
        degrade(volume, island_radius_mm=(4.0, 1.0))
    assert option_problem(slice_mm=5.0, boundary_amplitude_mm=None, island_radius_mm=(1.5, 4.0)) is None


def test_synth_into_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    for target in (blocker, blocker / "sub"):
        line = _error_line(invoke("synth", target, "--cases", "1"))
        assert "is a file, not a folder" in line and str(blocker) in line
    assert blocker.read_text() == "not a folder"
    assert invoke("synth", tmp_path / "new" / "deeper", "--cases", "1").exit_code == 0  # parents are created
    assert [p.name for p in (tmp_path / "new" / "deeper").iterdir()] == ["spine_00000.nii.gz"]


# ------------------------------------------------------------------------------ train --data


def test_train_data_takes_a_file_or_a_folder(tmp_path, spine):
    pytest.importorskip("torch")
    from vertrefine.train.patch_cache import find_training_cases

    assert [(c.name, c.path) for c in find_training_cases(spine)] == [("spine", spine)]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not a label map"):
        find_training_cases(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="does not exist"):
        find_training_cases(tmp_path / "missing")


def test_train_refuses_a_step_size_its_own_schedule_would_diverge_with(tmp_path):
    pytest.importorskip("torch")
    from vertrefine.train.config import TrainConfig

    assert TrainConfig.from_options("default", out=tmp_path, data_dir=tmp_path, timesteps=20).timesteps == 20
    with pytest.raises(InputError, match="use fewer --steps"):
        TrainConfig.from_options("default", out=tmp_path, data_dir=tmp_path, timesteps=50)
