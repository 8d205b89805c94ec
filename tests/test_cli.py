"""End-to-end command-line behaviour a user relies on: synth -> degrade -> score, batches, bad inputs."""

import json

import nibabel as nib
import numpy as np
import pytest
from cli_helpers import error_line, invoke


@pytest.fixture(scope="module")
def spines(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spines")
    result = invoke("synth", folder, "--cases", "2", "--seed", "123")
    assert result.exit_code == 0, result.output
    return folder


def test_synth_writes_named_spines_with_lumbar_labels(spines):
    files = sorted(p.name for p in spines.iterdir())
    assert files == ["spine_00123.nii.gz", "spine_00124.nii.gz"]
    image = nib.load(spines / files[0])
    assert sorted(np.unique(np.asarray(image.dataobj)).tolist()) == [0, 20, 21, 22, 23, 24]
    assert np.allclose(image.header.get_zooms(), 1.0)


def test_synth_patches_are_binary_128_cubes(tmp_path):
    result = invoke("synth", tmp_path, "--cases", "1", "--seed", "5", "--patches")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"spine_00005_L{i}.nii.gz" for i in range(1, 6)]
    data = np.asarray(nib.load(tmp_path / names[0]).dataobj)
    assert data.shape == (128, 128, 128) and set(np.unique(data).tolist()) == {0, 1}


def test_degrade_keeps_header_labels_and_is_seeded(spines, tmp_path):
    source = spines / "spine_00123.nii.gz"
    for name in ("a.nii.gz", "b.nii.gz"):
        result = invoke("degrade", source, "-o", tmp_path / name, "--slice-mm", "5", "--seed", "3")
        assert result.exit_code == 0, result.output
    original, a, b = (nib.load(p) for p in (source, tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"))
    assert a.header.binaryblock == original.header.binaryblock
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    assert not np.array_equal(np.asarray(a.dataobj), np.asarray(original.dataobj))
    assert sorted(np.unique(np.asarray(a.dataobj)).tolist()) == [0, 20, 21, 22, 23, 24]


def test_score_reports_paper_metrics_and_writes_json_and_csv(spines, tmp_path):
    source = spines / "spine_00123.nii.gz"
    pred = tmp_path / "pred"
    pred.mkdir()
    assert invoke("degrade", source, "-o", pred / source.name, "--seed", "1").exit_code == 0
    # spine_00124 has no prediction: listed, scored as an empty prediction (in the means), exit code 1
    result = invoke("score", pred, spines, "--json", tmp_path / "m.json")
    assert result.exit_code == 1, result.output
    assert "missing prediction" in result.output and "spine_00124" in result.output
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["summary"]["missing_predictions"] == ["spine_00124"]
    missing = [row for row in report["cases"] if row["case"] == "spine_00124"]
    assert len(missing) == 5 and all(row["prediction_missing"] and row["dsc"] == 0.0 for row in missing)
    assert report["summary"]["overall"]["n"] == 10

    other = spines / "spine_00124.nii.gz"
    assert invoke("degrade", other, "-o", pred / other.name, "--seed", "1").exit_code == 0
    result = invoke("score", pred, spines, "--json", tmp_path / "s.json", "--csv", tmp_path / "s.csv")
    assert result.exit_code == 0, result.output
    assert "missing prediction" not in result.output
    assert "DSC" in result.output and "HD95" in result.output
    report = json.loads((tmp_path / "s.json").read_text())
    assert [row["level"] for row in report["cases"]] == ["L1", "L2", "L3", "L4", "L5"] * 2
    assert {"case", "label", "dsc", "vs", "sen", "spec", "nmi", "ck", "hd95_mm", "assd_mm"} <= set(report["cases"][0])
    assert all(0.6 < row["dsc"] < 0.95 for row in report["cases"])
    assert report["cases"][0]["case"] == "spine_00123"
    assert (tmp_path / "s.csv").read_text().splitlines()[0].startswith("case,label,level,dsc")


def test_batch_goes_on_past_a_bad_case_and_resumes(spines, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("spine_00123.nii.gz", "spine_00124.nii.gz"):
        (inputs / name).write_bytes((spines / name).read_bytes())
    (inputs / "broken.nii.gz").write_bytes(b"not a nifti file at all")
    out = tmp_path / "out"
    result = invoke("degrade", inputs, "-o", out)
    assert result.exit_code == 1
    assert "broken" in result.output and "2 done, 0 skipped, 1 failed" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["spine_00123.nii.gz", "spine_00124.nii.gz"]
    (inputs / "broken.nii.gz").unlink()
    again = invoke("degrade", inputs, "-o", out, "--skip-existing")
    assert again.exit_code == 0 and "0 done, 2 skipped, 0 failed" in again.output


def test_output_equal_to_input_is_refused(spines):
    source = spines / "spine_00123.nii.gz"
    before = source.read_bytes()
    result = invoke("degrade", source, "-o", source)
    assert result.exit_code == 2 and "input" in result.output
    assert source.read_bytes() == before


def test_intensity_image_gives_one_line_and_no_output(tmp_path):
    ct = np.random.default_rng(0).normal(40, 300, (20, 20, 20)).astype(np.float32)
    nib.save(nib.Nifti1Image(ct, np.eye(4)), tmp_path / "ct.nii.gz")
    result = invoke("degrade", tmp_path / "ct.nii.gz", "-o", tmp_path / "o.nii.gz")
    assert result.exit_code == 2
    line = error_line(result)
    assert "ct.nii.gz" in line and "segment it first" in line
    assert not (tmp_path / "o.nii.gz").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ct.nii.gz"]  # no partial or temporary file


def test_bad_paths_and_grids_give_one_error_line(spines, tmp_path):
    assert "does not exist" in error_line(invoke("degrade", tmp_path / "nope.nii.gz", "-o", tmp_path / "o.nii.gz"))
    other_grid = tmp_path / "g"
    other_grid.mkdir()
    image = nib.load(spines / "spine_00123.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:, :, :-3], image.affine), other_grid / "spine_00123.nii.gz")
    result = invoke("score", other_grid / "spine_00123.nii.gz", spines / "spine_00123.nii.gz", "--region", "image")
    assert result.exit_code == 2 and "--resample" in result.output  # one pair: a usage error
    resampled = invoke(
        "score", other_grid / "spine_00123.nii.gz", spines / "spine_00123.nii.gz", "--region", "image", "--resample"
    )
    assert resampled.exit_code == 0, resampled.output


def test_dicom_seg_output_without_a_dicom_source_is_refused_without_partial_file(spines, tmp_path):
    result = invoke("degrade", spines / "spine_00123.nii.gz", "-o", tmp_path / "seg.dcm")
    assert result.exit_code == 2
    assert "DICOM" in error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_folder_of_dicom_seg_and_series_cases_gives_seg_outputs_referencing_their_series(tmp_path):
    import pydicom
    from dicom_helpers import lumbar_bars, make_series

    from vertrefine import io
    from vertrefine.volume import Geometry, Volume

    labels = lumbar_bars((8, 32, 32))
    ct_uid, _ = make_series(tmp_path / "ct", np.zeros_like(labels, dtype=np.uint16) + 100, spacing=(1.0, 1.0, 3.0))
    cases = tmp_path / "cases"
    label_series_uid, _ = make_series(cases / "label_series", labels, spacing=(1.0, 1.0, 3.0), modality="OT")
    geometry = Geometry(labels.shape, (1.0, 1.0, 3.0), (-10.0, 20.0, 30.0))
    io.write_dicom_seg(Volume(labels, geometry), cases / "seg_case.dcm", source_images=tmp_path / "ct")

    result = invoke("degrade", cases, "-o", tmp_path / "out", "--slice-mm", "6", "--axis", "axial")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["label_series.dcm", "seg_case.dcm"]
    for name, series_uid in (("seg_case.dcm", ct_uid), ("label_series.dcm", label_series_uid)):
        seg = pydicom.dcmread(tmp_path / "out" / name)
        assert seg.Modality == "SEG"
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
        assert {s.SegmentLabel for s in seg.SegmentSequence} <= {"L1", "L2", "L3", "L4", "L5"}


def test_a_study_folder_with_a_seg_beside_its_mr_series_runs_the_seg_only(tmp_path):
    import pydicom
    from dicom_helpers import lumbar_bars, make_series

    from vertrefine import io
    from vertrefine.volume import Geometry, Volume

    labels = lumbar_bars((8, 32, 32))
    study = tmp_path / "study"  # as a PACS export holds it: the MR series and the SEG made on it
    mr = (np.random.default_rng(0).integers(0, 900, labels.shape) + 400 * (labels > 0)).astype(np.uint16)
    mr_uid, _ = make_series(study / "mr", mr, spacing=(1.0, 1.0, 3.0), modality="MR")
    geometry = Geometry(labels.shape, (1.0, 1.0, 3.0), (-10.0, 20.0, 30.0))
    io.write_dicom_seg(Volume(labels, geometry), study / "seg.dcm", source_images=study / "mr")

    result = invoke("degrade", study, "-o", tmp_path / "out", "--slice-mm", "6", "--axis", "axial")
    assert result.exit_code == 0, result.output
    assert "not a case: the image series that seg.dcm segments" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["seg.dcm"]
    assert pydicom.dcmread(tmp_path / "out" / "seg.dcm").ReferencedSeriesSequence[0].SeriesInstanceUID == mr_uid
