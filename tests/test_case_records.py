"""A case's seed comes from its name (issue 12, item 6) and its sidecar says what made it (item 7)."""

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import nibabel as nib
import numpy as np
import pytest
from cli_helpers import invoke

from vertrefine import io
from vertrefine.cases import case_seed
from vertrefine.synth import synth_spine

FAST = ("--t-refine", "2", "--langevin-steps", "5", "--fine-inputs", "refine")  # 1 mm synthetic spines


def _data(path):
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases")
    for seed, name in ((51, "a_first"), (52, "b"), (53, "c")):
        io.write_label_map(synth_spine(seed, levels=("L3",)), folder / f"{name}.nii.gz")
    return folder


def test_a_case_seed_is_a_stable_hash_of_the_seed_and_the_name():
    seeds = {case_seed(seed, name) for seed in (0, 1) for name in ("b", "c", "b.nii.gz")}
    assert len(seeds) == 6 and all(0 <= s < 2**32 for s in seeds)
    code = "from vertrefine.cases import case_seed; print(case_seed(7, 'spine_003'))"
    runs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONHASHSEED": salt}, check=True
        ).stdout
        for salt in ("1", "2")
    }
    assert runs == {f"{case_seed(7, 'spine_003')}\n"}  # not Python's salted hash()


def test_removing_an_unrelated_case_changes_no_other_refined_case(cases, tmp_path):
    everything = invoke("refine", cases, "-o", tmp_path / "all", *FAST, "--seed", "3")
    assert everything.exit_code == 0, everything.output
    fewer = tmp_path / "fewer"
    shutil.copytree(cases, fewer)
    (fewer / "a_first.nii.gz").unlink()  # the first case: every other case moves up one place
    result = invoke("refine", fewer, "-o", tmp_path / "some", *FAST, "--seed", "3")
    assert result.exit_code == 0, result.output
    for name in ("b", "c"):
        np.testing.assert_array_equal(
            _data(tmp_path / "all" / f"{name}.nii.gz"), _data(tmp_path / "some" / f"{name}.nii.gz")
        )
        sidecar = json.loads((tmp_path / "some" / f"{name}.json").read_text())
        assert sidecar["seed"] == 3 and sidecar["case_seed"] == case_seed(3, name)
    alone = invoke("refine", cases / "c.nii.gz", "-o", tmp_path / "c.nii.gz", *FAST, "--seed", "3")
    assert alone.exit_code == 0 and f"seed {case_seed(3, 'c')}" in alone.output
    np.testing.assert_array_equal(_data(tmp_path / "all" / "c.nii.gz"), _data(tmp_path / "c.nii.gz"))
    other = invoke("refine", cases / "c.nii.gz", "-o", tmp_path / "c4.nii.gz", *FAST, "--seed", "4")
    assert other.exit_code == 0
    assert not np.array_equal(_data(tmp_path / "c.nii.gz"), _data(tmp_path / "c4.nii.gz"))  # the seed matters


def test_removing_an_unrelated_case_changes_no_other_degraded_case(cases, tmp_path):
    assert invoke("degrade", cases, "-o", tmp_path / "all", "--seed", "5").exit_code == 0
    fewer = tmp_path / "fewer"
    shutil.copytree(cases, fewer)
    (fewer / "a_first.nii.gz").unlink()
    assert invoke("degrade", fewer, "-o", tmp_path / "some", "--seed", "5").exit_code == 0
    for name in ("b", "c"):
        np.testing.assert_array_equal(
            _data(tmp_path / "all" / f"{name}.nii.gz"), _data(tmp_path / "some" / f"{name}.nii.gz")
        )
    assert invoke("degrade", cases / "c.nii.gz", "-o", tmp_path / "c6.nii.gz", "--seed", "6").exit_code == 0
    assert not np.array_equal(_data(tmp_path / "all" / "c.nii.gz"), _data(tmp_path / "c6.nii.gz"))


def test_the_sidecar_records_input_digest_command_time_warnings_extras_and_grids(tmp_path):
    spine = synth_spine(54, levels=("L3",))
    io.write_label_map(spine, tmp_path / "plain.nii.gz")
    image = nib.load(tmp_path / "plain.nii.gz")
    qform = image.affine.copy()
    qform[0, 3] += 2.5  # a qform 2.5 mm off the sform: a header warning to record
    image.set_qform(qform, code=1)
    nib.save(image, tmp_path / "in.nii.gz")
    out = tmp_path / "out"
    extras = ("--qc", out / "qc.png", "--mesh", out / "mesh", "--save-prob", out / "p.nii.gz")
    extras += ("--uncertainty", out / "u.nii.gz", "--samples", "2")
    started = datetime.now(timezone.utc)
    result = invoke("refine", tmp_path / "in.nii.gz", "-o", out / "r.nii.gz", *FAST, *extras)
    assert result.exit_code == 0, result.output
    assert "qform and sform disagree" in result.output  # said on the console, and recorded
    record = json.loads((out / "r.json").read_text())

    assert record["input_sha256"] == {
        "sha256": hashlib.sha256((tmp_path / "in.nii.gz").read_bytes()).hexdigest(),
        "files": 1,
    }
    assert record["command"].startswith("vertrefine refine ") and "--samples 2" in record["command"]
    assert str(out / "qc.png") in record["command"]
    words = shlex.split(record["command"])  # retypeable: the input is a bare argument, as the user gave it
    assert words[2] == str(tmp_path / "in.nii.gz") and "input_path" not in words
    retyped = invoke(*words[1:], "-o", out / "again.nii.gz")  # the same command, another output
    assert retyped.exit_code == 0, retyped.output
    created = datetime.fromisoformat(record["created_utc"].replace("Z", "+00:00"))
    assert record["created_utc"].endswith("Z") and started - timedelta(seconds=2) <= created <= datetime.now(
        timezone.utc
    )
    assert any("qform and sform disagree" in w and "2.5 mm" in w for w in record["warnings"])
    paths = record["extra_outputs"]
    assert paths["qc"] == str(out / "qc.png") and paths["probability"] == str(out / "p.nii.gz")
    assert paths["uncertainty"] == str(out / "u.nii.gz") and paths["meshes"] == [str(out / "mesh" / "L3.stl")]
    assert all((out / p).exists() for p in (paths["qc"], paths["probability"], paths["uncertainty"], *paths["meshes"]))

    grid = record["input_grid"]  # one axis order, named: ITK (i, j, k) = nibabel's array order
    assert grid["size_ijk"] == list(image.shape)
    np.testing.assert_allclose(grid["spacing_ijk_mm"], image.header.get_zooms(), rtol=1e-6)
    assert set(grid) == {"size_ijk", "spacing_ijk_mm", "origin_lps_mm", "direction_lps"}
    assert record["working_grid"]["spacing_ijk_mm"] == [1.0, 1.0, 1.0]
    assert record["output_grid"]["size_ijk"] == list(nib.load(out / "r.nii.gz").shape)


def test_the_sidecar_digest_of_a_dicom_series_covers_its_files(tmp_path):
    from dicom_helpers import make_series

    spine = synth_spine(55, levels=("L3",))
    geometry = spine.geometry
    series = tmp_path / "series"
    make_series(series, spine.array.astype(np.uint16), spacing=geometry.spacing, origin=geometry.origin, modality="OT")
    result = invoke("refine", series, "-o", tmp_path / "r.dcm", "--model", "vae", "--fine-inputs", "refine")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "r.json").read_text())
    files = sorted(p for p in series.iterdir())
    listing = "".join(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n" for f in files)
    assert record["input_sha256"] == {"sha256": hashlib.sha256(listing.encode()).hexdigest(), "files": len(files)}
    assert record["extra_outputs"] == {} and record["warnings"] == []
