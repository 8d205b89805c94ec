"""Case discovery and the batch planner: naming, DICOM folders as one case, never overwriting inputs."""

from pathlib import Path

import pytest

from vertrefine.batch import plan_cases
from vertrefine.cases import case_name, find_cases
from vertrefine.errors import InputError, OutputError


def _dicom_file(path: Path, modality: str = "CT") -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.Modality = modality
    ds.save_as(path, enforce_file_format=True)


def test_case_names_strip_known_suffixes():
    assert case_name("a/spine_001.nii.gz") == "spine_001"
    assert case_name("spine_001.nii") == "spine_001"
    assert case_name("seg.dcm") == "seg"
    assert case_name("folder/series_7") == "series_7"


def test_find_cases_lists_nifti_dicom_files_and_series_folders(tmp_path):
    (tmp_path / "b.nii.gz").write_bytes(b"x")
    (tmp_path / "a.nii").write_bytes(b"x")
    (tmp_path / ".a2.nii.gz.part.nii.gz").write_bytes(b"x")  # interrupted write: ignored
    (tmp_path / "notes.txt").write_text("x")
    series = tmp_path / "series"
    series.mkdir()
    _dicom_file(series / "IM0001")  # no suffix, recognised by its preamble
    _dicom_file(tmp_path / "seg.dcm", modality="SEG")
    (tmp_path / "empty").mkdir()
    assert [c.name for c in find_cases(tmp_path)] == ["a", "b", "seg", "series"]
    # a folder that itself holds DICOM files is one case
    assert [(c.name, c.path) for c in find_cases(series)] == [("series", series)]


def test_find_cases_refuses_two_inputs_with_the_same_case_name(tmp_path):
    (tmp_path / "a.nii").write_bytes(b"x")
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    with pytest.raises(InputError, match="share the case name"):
        find_cases(tmp_path)


def test_plan_refuses_output_equal_to_input(tmp_path):
    source = tmp_path / "in.nii.gz"
    source.write_bytes(b"x")
    with pytest.raises(OutputError, match="input"):
        plan_cases(source, source)
    folder = tmp_path / "cases"
    folder.mkdir()
    (folder / "a.nii.gz").write_bytes(b"x")
    (folder / "b.nii.gz").write_bytes(b"x")
    with pytest.raises(OutputError, match="input folder"):
        plan_cases(folder, folder)


def test_plan_folder_mode_maps_names_and_dicom_to_seg(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.nii.gz").write_bytes(b"x")
    series = folder / "ct_series"
    series.mkdir()
    _dicom_file(series / "1.dcm")
    plan = plan_cases(folder, tmp_path / "out")
    assert [(c.name, d.name) for c, d in plan] == [("a", "a.nii.gz"), ("ct_series", "ct_series.dcm")]
    assert not (tmp_path / "out").exists()  # planning checks the outputs and creates nothing


def test_plan_missing_input_and_empty_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        plan_cases(tmp_path / "nope.nii.gz", tmp_path / "o.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no NIfTI or DICOM"):
        plan_cases(tmp_path / "empty", tmp_path / "o")
