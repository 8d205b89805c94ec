"""Outputs are checked before any case runs, a failure leaves no file, SIGTERM is Ctrl-C (issue 12, item 3)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import error_line, invoke
from dicom_helpers import make_series

from vertrefine import io
from vertrefine.errors import InputError, OutputError
from vertrefine.synth import synth_spine


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def spine_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("in")
    spine = synth_spine(41, levels=("L3",))
    io.write_label_map(spine, folder / "spine.nii.gz")
    return folder / "spine.nii.gz"


@pytest.fixture()
def no_compute(monkeypatch):
    """Any check that comes after the model is opened would surface as this error instead of its own line."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was opened before the outputs were checked")

    monkeypatch.setattr("vertrefine.refine.Refiner.from_bundle", refuse)  # what `vertrefine refine` opens it with


def test_unwritable_outputs_are_refused_before_the_model_is_opened_and_leave_nothing(spine_file, tmp_path, no_compute):
    (tmp_path / "a_file").write_text("x")
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(spine_file, cases / "one.nii.gz")
    shutil.copy(spine_file, cases / "two.nii.gz")
    before = _files(tmp_path)
    tried = [
        ((spine_file, "-o", tmp_path / "out.txt"), "unsupported output type"),
        ((spine_file, "-o", tmp_path / "new" / "out"), "unsupported output type"),
        ((spine_file, "-o", tmp_path / "a_file" / "out.nii.gz"), "a_file is a file"),
        ((spine_file, "-o", tmp_path / "o.nii.gz", "--qc", tmp_path / "a_file" / "q.png"), "--qc"),
        ((spine_file, "-o", tmp_path / "o.nii.gz", "--mesh", tmp_path / "a_file" / "m"), "--mesh"),
        ((spine_file, "-o", tmp_path / "o.nii.gz", "--save-prob", tmp_path / "p.png"), "--save-prob writes NIfTI"),
        ((cases, "-o", tmp_path / "a_file"), "must be a folder too"),
        ((cases, "-o", tmp_path / "out", "--qc", tmp_path / "a_file"), "--qc must be a folder too"),
    ]
    for args, expected in tried:
        result = invoke("refine", *args, "--model", "vae")
        assert result.exit_code == 2, (args, result.output)
        assert expected in error_line(result), (args, result.output)
        assert _files(tmp_path) == before, args  # no output, sidecar, folder or temporary file


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_before_computing(spine_file, tmp_path, no_compute):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = invoke("refine", spine_file, "-o", locked / "sub" / "o.nii.gz", "--model", "vae")
        assert result.exit_code == 2 and "not writable" in error_line(result)
    finally:
        locked.chmod(0o755)


def test_a_missing_output_folder_is_created(spine_file, tmp_path):
    result = invoke("refine", spine_file, "-o", tmp_path / "new" / "deeper" / "o.nii.gz", "--model", "vae")
    assert result.exit_code == 0, result.output
    assert _files(tmp_path / "new") == ["deeper", "deeper/o.json", "deeper/o.nii.gz"]


# --- DICOM SEG from a NIfTI input: --source-series -------------------------------------------------------


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory, spine_file):
    """A CT series on the NIfTI's grid, and one on another grid."""
    folder = tmp_path_factory.mktemp("series")
    geometry = io.read_label_map(spine_file).geometry
    images = np.zeros(geometry.shape, np.uint16)
    uid, _ = make_series(folder / "ct", images, spacing=geometry.spacing, origin=geometry.origin)
    make_series(folder / "other", images, spacing=(1.0, 1.0, 2.0), origin=geometry.origin)
    return uid, folder / "ct", folder / "other"


def test_nifti_to_seg_needs_source_series_and_says_so_before_computing(spine_file, ct_series, tmp_path, no_compute):
    result = invoke("refine", spine_file, "-o", tmp_path / "o.dcm", "--model", "vae")
    assert result.exit_code == 2
    line = error_line(result)
    assert "--source-series DIR" in line and str(spine_file) in line
    _, _, other = ct_series
    result = invoke("refine", spine_file, "-o", tmp_path / "o.dcm", "--model", "vae", "--source-series", other)
    line = error_line(result)
    assert "not on the grid of the --source-series" in line and str(other) in line
    result = invoke("refine", spine_file, "-o", tmp_path / "o.nii.gz", "--model", "vae", "--source-series", other)
    assert "use it with a single input and a .dcm output" in error_line(result)
    result = invoke("refine", spine_file, "-o", tmp_path / "o.dcm", "--source-series", tmp_path / "nope")
    assert "does not exist" in error_line(result)
    degraded = invoke("degrade", spine_file, "-o", tmp_path / "d.dcm")  # degrade has no --source-series
    assert "write NIfTI" in error_line(degraded)
    assert _files(tmp_path) == []


def test_nifti_to_seg_with_source_series_references_that_series(spine_file, ct_series, tmp_path):
    import pydicom

    uid, ct, _ = ct_series
    result = invoke("refine", spine_file, "-o", tmp_path / "o.dcm", "--model", "vae", "--source-series", ct)
    assert result.exit_code == 0, result.output
    seg = pydicom.dcmread(tmp_path / "o.dcm")
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert io.read_label_map(tmp_path / "o.dcm").labels == [22]
    assert json.loads((tmp_path / "o.json").read_text())["source_series"] == str(ct)


def test_a_nifti_on_the_series_grid_with_flipped_rows_may_reference_it(spine_file, ct_series, tmp_path):
    from vertrefine.batch import plan_cases
    from vertrefine.refine_batch import check_refine_outputs
    from vertrefine.volume import Geometry, Volume

    _, ct, other = ct_series
    spine = io.read_label_map(spine_file)
    g, n = spine.geometry, spine.geometry.size_ijk
    flipped = Geometry(g.shape, g.spacing, g.index_to_physical([0, n[1] - 1, 0]), g.direction_matrix * [1, -1, 1])
    io.write_label_map(Volume(spine.array[:, ::-1, :].copy(), flipped), tmp_path / "dcm2niix.nii.gz")
    plan = plan_cases(tmp_path / "dcm2niix.nii.gz", tmp_path / "out.dcm")
    check_refine_outputs(plan, ct)  # the same voxels as the series (rows bottom-up, as dcm2niix writes them)
    with pytest.raises(InputError, match="not on the grid of the --source-series"):
        check_refine_outputs(plan, other)

    import pydicom

    flipped_volume = io.read_label_map(tmp_path / "dcm2niix.nii.gz")
    io.write_label_map(flipped_volume, tmp_path / "seg.dcm", source_images=ct)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    first = pydicom.dcmread(next(ct.iterdir()))
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert np.allclose(orientation, first.ImageOrientationPatient)  # frames in the series' own row order
    from vertrefine.spatial import resample_labels

    back = io.read_label_map(tmp_path / "seg.dcm")  # its frames with a segment; the same voxels where it has them
    np.testing.assert_array_equal(resample_labels(back, flipped, method="nearest").array, flipped_volume.array)


# --- two outputs, one sidecar ------------------------------------------------------------------------------


def test_an_output_whose_sidecar_belongs_to_another_output_is_refused(spine_file, ct_series, tmp_path, no_compute):
    _, ct, _ = ct_series
    (tmp_path / "out.nii.gz").write_bytes(b"an earlier result")
    result = invoke("refine", spine_file, "-o", tmp_path / "out.dcm", "--model", "vae", "--source-series", ct)
    line = error_line(result)
    assert "out.json would also be the sidecar of" in line and "out.nii.gz" in line

    cases, out = tmp_path / "cases", tmp_path / "out"
    cases.mkdir()
    out.mkdir()
    shutil.copy(spine_file, cases / "a.nii.gz")
    (out / "a.dcm").write_bytes(b"a SEG of an earlier run")
    result = invoke("refine", cases, "-o", out, "--model", "vae")
    assert "a.json would also be the sidecar of" in error_line(result)
    assert _files(out) == ["a.dcm"]

    shutil.copy(spine_file, cases / "a.NII")  # two inputs of one case name: refused by name
    result = invoke("refine", cases, "-o", out, "--model", "vae")
    line = error_line(result)
    assert "share the case name(s) a" in line and "a.NII" in line and "a.nii.gz" in line


def test_a_folder_where_a_cases_extra_output_goes_is_refused_and_kept(spine_file, tmp_path, no_compute):
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(spine_file, cases / "a.nii.gz")
    shutil.copy(spine_file, cases / "b.nii.gz")
    (tmp_path / "qc" / "a.png").mkdir(parents=True)  # a user's folder where a's QC image would go
    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "b").write_text("a file where b's mesh folder would go")
    for extra, words in (("--qc", "a.png: a folder has the name of this --qc output"), ("--mesh", "needs a folder")):
        result = invoke("refine", cases, "-o", tmp_path / "out", "--model", "vae", extra, tmp_path / extra[2:])
        assert result.exit_code == 2 and words in error_line(result)
    assert (tmp_path / "qc" / "a.png").is_dir() and not (tmp_path / "out").exists()


def test_a_sidecar_path_that_is_a_folder_is_refused_before_the_model_is_opened(spine_file, tmp_path, no_compute):
    (tmp_path / "out.json").mkdir()
    result = invoke("refine", spine_file, "-o", tmp_path / "out.nii.gz", "--model", "vae")
    assert result.exit_code == 2
    line = error_line(result)
    assert "out.json is a folder" in line and "out.nii.gz" in line
    assert _files(tmp_path) == ["out.json"]


# --- a case that fails while writing leaves none of its files ---------------------------------------------


def test_a_case_failing_at_its_last_write_leaves_no_sidecar_or_extras(spine_file, tmp_path, monkeypatch):
    from vertrefine import refine_batch

    real = refine_batch.write_label_map

    def failing(volume, path, **kwargs):
        if "bad" in path.name:
            raise OutputError(f"{path}: disk full")
        return real(volume, path, **kwargs)

    monkeypatch.setattr(refine_batch, "write_label_map", failing)
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(spine_file, cases / "bad.nii.gz")
    shutil.copy(spine_file, cases / "good.nii.gz")
    extras = ("--qc", tmp_path / "qc", "--mesh", tmp_path / "mesh")
    result = invoke("refine", cases, "-o", tmp_path / "out", "--model", "vae", "--fine-inputs", "refine", *extras)
    assert result.exit_code == 1 and "disk full" in result.output, result.output
    assert _files(tmp_path / "out") == ["good.json", "good.nii.gz"]
    assert _files(tmp_path / "qc") == ["good.png"]
    assert _files(tmp_path / "mesh") == ["good", "good/L3.stl"]

    s = tmp_path / "s"
    extras = ("--qc", s / "qc" / "q.png", "--mesh", s / "mesh", "--save-prob", s / "p.nii.gz")
    single = invoke("refine", cases / "bad.nii.gz", "-o", s / "bad.nii.gz", "--model", "vae", *extras)
    assert "disk full" in error_line(single)
    assert _files(s) == []


# --- SIGTERM --------------------------------------------------------------------------------------------


def test_sigterm_leaves_no_partial_file_and_the_hint_names_skip_existing(spine_file, tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("a", "b"):
        shutil.copy(spine_file, cases / f"{name}.nii.gz")
    out = tmp_path / "out"
    code = (
        "import os, signal\n"
        "import vertrefine.nifti as nifti\n"
        "real = nifti.nib.save\n"
        "def save(image, path):\n"
        "    real(image, path)  # the .part file of this output is complete on disk now\n"
        "    if os.path.basename(path).startswith('.b.nii.gz'):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "nifti.nib.save = save\n"
        "from vertrefine.cli import app\n"
        f"app(['refine', {str(cases)!r}, '-o', {str(out)!r}, '--model', 'vae', '--fine-inputs', 'refine',"
        " '--group-size', '1'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 143, result.stderr
    assert "terminated (SIGTERM)" in result.stderr and "--skip-existing" in result.stderr
    assert "Traceback" not in result.stderr
    assert _files(out) == ["a.json", "a.nii.gz"]  # b: no .part file and no stale sidecar
    again = invoke("refine", cases, "-o", out, "--model", "vae", "--fine-inputs", "refine", "--skip-existing")
    assert again.exit_code == 0 and "1 done, 1 skipped, 0 failed" in again.output, again.output
