"""NIfTI headers as clinics and other tools write them, and file names in any case (issue 12, item 2).

Every input is made here: unoriented files (qform_code = sform_code = 0), qform and sform that disagree,
a sheared sform, scl_slope/scl_inter rounding, label maps with more than 100 labels, noisy intensities,
and upper-case names (.NII.GZ, .NII, .DCM).
"""

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from cli_helpers import error_line, invoke
from geometry_helpers import rotation

from vertrefine import io
from vertrefine.cases import case_name, find_cases
from vertrefine.errors import InputError
from vertrefine.filetypes import compound_suffix, is_dicom_name, is_nifti_name, output_format
from vertrefine.nifti import orientation_affine, parse_orientation
from vertrefine.synth import synth_spine

GZIP_MAGIC = b"\x1f\x8b"


def _blocks(shape=(24, 20, 12)) -> np.ndarray:
    """Nibabel-ordered [i, j, k] array with L2 (21) and L3 (22) as two blocks."""
    array = np.zeros(shape, dtype=np.uint8)
    array[4:20, 3:9, 2:10] = 21
    array[4:20, 11:17, 2:10] = 22
    return array


def _save(path, array, *, qform=None, qcode=0, sform=None, scode=0, slope=None, inter=None, zooms=(1.0, 1.0, 3.0)):
    """Write a NIfTI with exactly the given qform/sform and codes (nibabel fills neither on its own)."""
    image = nib.Nifti1Image(array, None)
    image.header.set_zooms(zooms)
    image.set_qform(qform, code=qcode) if qform is not None else image.set_qform(None, code=0)
    image.set_sform(sform, code=scode) if sform is not None else image.set_sform(None, code=0)
    if slope is not None:
        image.header.set_slope_inter(slope, inter or 0.0)
    nib.save(image, str(path))
    return path


def _affine(zooms=(1.0, 1.0, 3.0), origin=(10.0, -20.0, 5.0), rotate=None) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = (np.eye(3) if rotate is None else rotate) @ np.diag(zooms)
    affine[:3, 3] = origin
    return affine


# --- orientation: qform_code = sform_code = 0 -------------------------------------------------------------


def test_an_unoriented_nifti_is_refused_by_every_command_with_one_line_naming_it(tmp_path):
    source = _save(tmp_path / "noorient.nii.gz", _blocks())
    commands = [
        ("degrade", source, "-o", tmp_path / "deg.nii.gz"),
        ("refine", source, "-o", tmp_path / "ref.nii.gz", "--model", "vae"),
    ]
    for command in commands:
        result = invoke(*command)
        assert result.exit_code == 2, result.output
        line = error_line(result)
        assert str(source) in line and "qform_code and sform_code are both 0" in line, line
        assert "--assume-orientation" in line
    scored = invoke("score", source, source)  # one pair of files that cannot be scored: bad input, exit code 2
    assert scored.exit_code == 2 and "Traceback" not in scored.output
    assert "qform_code and sform_code are both 0" in scored.output and "--assume-orientation" in scored.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noorient.nii.gz"]  # nothing written


@pytest.mark.parametrize(
    ("code", "direction"),
    [("LPS", np.eye(3)), ("RAS", np.diag([-1.0, -1.0, 1.0])), ("PIL", [[0, 0, 1], [1, 0, 0], [0, -1, 0]])],
)
def test_a_stated_orientation_gives_that_grid(tmp_path, code, direction):
    source = _save(tmp_path / "noorient.nii.gz", _blocks(), zooms=(0.8, 0.9, 3.0))
    volume = io.read_label_map(source, assume_orientation=code.lower())
    np.testing.assert_allclose(volume.geometry.direction_matrix, direction, atol=1e-12)
    np.testing.assert_allclose(volume.geometry.spacing, (0.8, 0.9, 3.0), rtol=1e-6)
    assert volume.geometry.origin == (0.0, 0.0, 0.0)
    assert nib.aff2axcodes(orientation_affine(code, (0.8, 0.9, 3.0))) == tuple(code)
    expected = f"orientation assumed {code} as stated (the file's qform_code and sform_code are 0)"
    assert volume.source.warnings == (expected,)


def test_outputs_of_a_stated_orientation_carry_it_so_nibabel_and_simpleitk_read_the_same_grid(tmp_path):
    source = _save(tmp_path / "noorient.nii.gz", _blocks())
    result = invoke("degrade", source, "-o", tmp_path / "deg.nii.gz", "--assume-orientation", "ras", "--slice-mm", "3")
    assert result.exit_code == 0, result.output
    assert "orientation assumed RAS" in result.output  # said once, as a warning of the case
    written = nib.load(tmp_path / "deg.nii.gz")
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 1)
    np.testing.assert_allclose(written.affine, orientation_affine("RAS", (1.0, 1.0, 3.0)), atol=1e-6)
    ours = io.read_label_map(tmp_path / "deg.nii.gz").geometry
    itk = sitk.ReadImage(str(tmp_path / "deg.nii.gz"))
    np.testing.assert_allclose(itk.GetDirection(), ours.direction, atol=1e-6)
    np.testing.assert_allclose(itk.GetOrigin(), ours.origin, atol=1e-4)
    np.testing.assert_allclose(itk.GetSpacing(), ours.spacing, atol=1e-6)
    assert nib.load(source).header["qform_code"] == 0  # the input is never modified


@pytest.mark.parametrize("code", ["RAR", "RA", "XYZ", "RASL"])
def test_a_malformed_orientation_is_a_usage_error(tmp_path, code):
    with pytest.raises(ValueError, match="one of L/R"):
        parse_orientation(code)
    source = _save(tmp_path / "noorient.nii.gz", _blocks())
    result = invoke("score", source, source, "--assume-orientation", code)
    assert result.exit_code == 2 and "--assume-orientation" in result.output


# --- qform and sform ----------------------------------------------------------------------------------


def test_qform_and_sform_disagreeing_say_which_one_is_used(tmp_path):
    sform = _affine()
    shifted = _affine(origin=(13.0, -20.0, 5.0))  # 3 mm apart
    source = _save(tmp_path / "two.nii.gz", _blocks(), qform=shifted, qcode=1, sform=sform, scode=2)
    volume = io.read_label_map(source)
    (warning,) = volume.source.warnings
    assert "qform and sform disagree" in warning and "3.0 mm" in warning
    assert "the sform (code 2, aligned) is used" in warning
    np.testing.assert_allclose(volume.geometry.origin, (-10.0, 20.0, 5.0), atol=1e-4)  # the sform's, in LPS
    result = invoke("score", source, source)
    assert result.exit_code == 0, result.output
    assert "sform (code 2, aligned) is used" in result.output

    turned = _affine(rotate=rotation(2, 2.0))  # same origin, rotated 2 degrees
    volume = io.read_label_map(_save(tmp_path / "rot.nii.gz", _blocks(), qform=turned, qcode=1, sform=sform, scode=1))
    assert "2.0 degrees" in volume.source.warnings[0]


def test_qform_and_sform_within_a_millimetre_and_a_degree_give_no_warning(tmp_path):
    near = _affine(origin=(10.3, -20.0, 5.0), rotate=rotation(0, 0.2))
    source = _save(tmp_path / "near.nii.gz", _blocks(), qform=near, qcode=1, sform=_affine(), scode=1)
    assert io.read_label_map(source).source.warnings == ()


def test_a_sheared_sform_gives_way_to_the_qform_as_itk_does(tmp_path):
    sheared = _affine()
    sheared[0, 1] = 0.4
    qform = _affine(origin=(1.0, 2.0, 3.0))
    source = _save(tmp_path / "shear.nii.gz", _blocks(), qform=qform, qcode=1, sform=sheared, scode=2)
    volume = io.read_label_map(source)
    assert "sform (code 2, aligned) is sheared; the qform (code 1, scanner) is used" in volume.source.warnings[0]
    np.testing.assert_allclose(volume.geometry.origin, (-1.0, -2.0, 3.0), atol=1e-4)
    alone = _save(tmp_path / "shear_only.nii.gz", _blocks(), sform=sheared, scode=2)  # no qform to fall back on
    with pytest.raises(InputError, match="non-orthonormal"):
        io.read_label_map(alone)


# --- scl_slope / scl_inter ----------------------------------------------------------------------------


def test_scaling_that_makes_near_integer_labels_is_rounded(tmp_path):
    array = _blocks().astype(np.int16)
    source = _save(tmp_path / "scaled.nii.gz", array, qform=_affine(), qcode=1, slope=1.0000001, inter=0.0)
    assert not np.array_equal(np.asarray(nib.load(source).dataobj), array)  # 22.0000022, not 22
    volume = io.read_label_map(source)
    assert volume.labels == [21, 22] and volume.array.dtype == np.uint8
    np.testing.assert_array_equal(volume.array, array.transpose(2, 1, 0))
    near = array.astype(np.float32) * np.float32(1.0000001)
    floats = _save(tmp_path / "float.nii.gz", near, qform=_affine(), qcode=1)
    assert io.read_label_map(floats).labels == [21, 22]
    result = invoke("score", source, floats)
    assert result.exit_code == 0, result.output


def test_really_fractional_values_are_refused(tmp_path):
    array = _blocks().astype(np.int16)
    source = _save(tmp_path / "half.nii.gz", array, qform=_affine(), qcode=1, slope=0.5)  # 21 -> 10.5
    with pytest.raises(InputError, match="fractional values") as raised:
        io.read_label_map(source)
    assert str(source) in str(raised.value) and "0.5" in str(raised.value)


# --- many labels: label maps, not intensity images ----------------------------------------------------


def test_a_label_map_with_more_than_100_labels_is_a_label_map(tmp_path):
    """TotalSegmentator writes 117 classes: regions, each of one value."""
    array = np.zeros((60, 40, 30), dtype=np.uint8)
    label = 0
    for i in range(0, 60, 5):
        for j in range(0, 40, 4):
            label += 1
            array[i : i + 5, j : j + 4, 3 : 3 + (label % 20) + 5] = label  # 120 touching blocks
    source = _save(tmp_path / "total.nii.gz", array, qform=_affine(), qcode=1)
    volume = io.read_label_map(source)
    assert volume.labels == list(range(1, 121))
    assert io.region_fraction(volume.array) > 0.7


def test_noisy_intensities_with_many_values_are_refused_as_intensity_images(tmp_path):
    rng = np.random.default_rng(0)
    mr = np.clip(rng.normal(120, 40, size=(40, 40, 20)), 1, 255).astype(np.uint8)
    source = _save(tmp_path / "mr.nii.gz", mr, qform=_affine(), qcode=1)
    with pytest.raises(InputError, match="vary from voxel to voxel") as raised:
        io.read_label_map(source)
    assert "segment it first" in str(raised.value)
    assert io.region_fraction(mr) < 0.1


# --- file names in any case -----------------------------------------------------------------------------


def test_file_type_detection_ignores_case():
    assert [compound_suffix(n) for n in ("a.NII.GZ", "b.Nii", "c.DCM", "d", "e.tar.GZ")] == [
        ".nii.gz",
        ".nii",
        ".dcm",
        "",
        ".tar.gz",
    ]
    assert is_nifti_name("x/A.NII.GZ") and is_nifti_name("b.nii") and not is_nifti_name("c.gz")
    assert is_dicom_name("IM0001.IMA") and is_dicom_name("s.DICOM") and not is_dicom_name("a.nii")
    assert [output_format(n) for n in ("o.NII.GZ", "o.Nii", "o.DCM", "o.dicom", "o.png", "o")] == [
        "nifti",
        "nifti",
        "dicom-seg",
        "dicom-seg",
        None,
        None,
    ]
    assert [case_name(n) for n in ("A.NII.GZ", "b.NII", "Seg.DCM", "IM1.IMA", "series")] == [
        "A",
        "b",
        "Seg",
        "IM1",
        "series",
    ]
    assert io.is_dicom_output("SEG.DCM") and not io.is_dicom_output("x.NII.GZ")


def test_upper_case_names_work_in_degrade_score_discovery_and_seg_output(tmp_path):
    from dicom_helpers import make_series

    spine = synth_spine(31, levels=("L3",))
    folder = tmp_path / "in"
    folder.mkdir()
    io.write_label_map(spine, folder / "CASE_A.NII.GZ")
    assert (folder / "CASE_A.NII.GZ").read_bytes()[:2] == GZIP_MAGIC  # compressed, as .nii.gz
    io.write_label_map(spine, folder / "CASE_B.NII")
    ct = tmp_path / "ct"
    geometry = spine.geometry
    make_series(ct, np.zeros(geometry.shape, np.uint16), spacing=geometry.spacing, origin=geometry.origin)
    io.write_label_map(spine, folder / "CASE_C.DCM", source_images=ct)
    assert sorted(p.name for p in tmp_path.rglob("*.part*")) == []
    assert [c.name for c in find_cases(folder)] == ["CASE_A", "CASE_B", "CASE_C"]
    assert io.read_label_map(folder / "CASE_C.DCM").labels == spine.labels

    result = invoke("degrade", folder, "-o", tmp_path / "deg", "--slice-mm", "3")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "deg").iterdir()) == ["CASE_A.NII.GZ", "CASE_B.NII", "CASE_C.dcm"]
    assert (tmp_path / "deg" / "CASE_A.NII.GZ").read_bytes()[:2] == GZIP_MAGIC

    single = invoke("degrade", folder / "CASE_A.NII.GZ", "-o", tmp_path / "ONE.NII.GZ", "--slice-mm", "3")
    assert single.exit_code == 0, single.output
    seg = invoke("degrade", folder / "CASE_C.DCM", "-o", tmp_path / "SEG_OUT.DCM", "--slice-mm", "3")
    assert seg.exit_code == 0, seg.output
    assert io.read_label_map(tmp_path / "SEG_OUT.DCM").source.kind == "dicom-seg"

    scored = invoke("score", tmp_path / "deg", folder, "--region", "image")
    assert scored.exit_code == 0, scored.output
    assert "unpaired" not in scored.output and "L3" in scored.output


def test_upper_case_names_work_in_refine_and_its_extras(tmp_path):
    io.write_label_map(synth_spine(32, levels=("L3",)), tmp_path / "CASE.NII.GZ")
    out = tmp_path / "out"
    extras = ("--save-prob", out / "P.NII.GZ", "--qc", out / "Q.PNG")
    result = invoke("refine", tmp_path / "CASE.NII.GZ", "-o", out / "OUT.NII.GZ", "--model", "vae", *extras)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["OUT.NII.GZ", "OUT.json", "P.NII.GZ", "Q.PNG"]
    assert (out / "OUT.NII.GZ").read_bytes()[:2] == GZIP_MAGIC and io.read_label_map(out / "OUT.NII.GZ").labels == [22]
