"""Case discovery and the batch planner: naming, DICOM folders as one case, never overwriting inputs."""

from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from vertrefine.batch import plan_cases
from vertrefine.cases import Case, case_name, find_cases, find_cases_and_sources
from vertrefine.errors import InputError, OutputError


def _dicom_file(
    path: Path,
    modality: str = "CT",
    series_uid: str = "",
    references: str = "",
    media_uid: str = "",
    frames: list[Dataset] | None = None,
) -> None:
    ds = Dataset()
    if frames:
        ds.PerFrameFunctionalGroupsSequence = frames
    if series_uid:
        ds.SeriesInstanceUID = series_uid
    if references:
        item = Dataset()
        item.SeriesInstanceUID = references
        ds.ReferencedSeriesSequence = [item]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPInstanceUID = media_uid or generate_uid()
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


def test_the_image_series_a_seg_segments_is_not_a_case(tmp_path):
    study = tmp_path / "study"  # as exported from PACS: the MR series, its SEG, and another series
    (study / "mr").mkdir(parents=True)
    (study / "other").mkdir()
    for n in range(3):
        _dicom_file(study / "mr" / f"{n}.dcm", "MR", series_uid="1.2.3.1")
        _dicom_file(study / "other" / f"{n}.dcm", "CT", series_uid="1.2.3.2")
    _dicom_file(study / "seg.dcm", "SEG", series_uid="1.2.3.9", references="1.2.3.1")
    cases, sources = find_cases_and_sources(study)
    assert [c.name for c in cases] == ["other", "seg"]
    assert sources == [(study / "mr", study / "seg.dcm")]
    notes: list[str] = []
    plan = plan_cases(study, tmp_path / "out", note=notes.append)
    assert [case.name for case, _ in plan] == ["other", "seg"]
    assert notes == [f"{study / 'mr'}: not a case: the image series that seg.dcm segments"]

    blank = tmp_path / "blank"  # a de-identified study: the series' UIDs blanked, the SEG names its instances only
    (blank / "ct").mkdir(parents=True)
    _dicom_file(blank / "ct" / "1.dcm", "CT", media_uid="1.2.3.77")
    source, frame, derivation = Dataset(), Dataset(), Dataset()
    source.ReferencedSOPInstanceUID = "1.2.3.77"
    derivation.SourceImageSequence = [source]
    frame.DerivationImageSequence = [derivation]
    _dicom_file(blank / "seg.dcm", "SEG", frames=[frame])
    assert find_cases_and_sources(blank) == ([Case("seg", blank / "seg.dcm")], [(blank / "ct", blank / "seg.dcm")])

    flat = tmp_path / "flat"  # slices and SEG files in one folder
    flat.mkdir()
    for n in range(3):
        _dicom_file(flat / f"im{n}.dcm", "MR", series_uid="1.2.3.1")
    _dicom_file(flat / "seg_a.dcm", "SEG", references="1.2.3.1")
    assert [(c.name, c.path) for c in find_cases(flat)] == [("flat", flat)]  # one SEG: the folder is one case
    with pytest.raises(OutputError, match="a single case, so -o names its output file"):
        plan_cases(flat, tmp_path / "out_flat")
    _dicom_file(flat / "seg_b.dcm", "SEG", references="1.2.3.1")
    assert [c.name for c in find_cases(flat)] == ["seg_a", "seg_b"]  # several: each SEG is a case


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
    for name in ("out.nii.gz", "OUT.NII", "out.dcm"):  # a file name for a folder of cases: refused, nothing made
        with pytest.raises(OutputError, match="must be a folder"):
            plan_cases(folder, tmp_path / name)
        assert not (tmp_path / name).exists()
    (tmp_path / "out" / "a.nii.gz").mkdir(parents=True)  # a folder where a case's output goes: refused at once
    with pytest.raises(OutputError, match="a folder has this output's name"):
        plan_cases(folder, tmp_path / "out")


def test_case_names_that_differ_only_in_letter_case_clash(tmp_path):
    (tmp_path / "CASE2.NII.GZ").write_bytes(b"x")
    (tmp_path / "case2.nii.gz").write_bytes(b"x")  # one output on a case-insensitive disk (macOS, Windows)
    with pytest.raises(InputError, match="share the case name"):
        find_cases(tmp_path)


def test_plan_missing_input_and_empty_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        plan_cases(tmp_path / "nope.nii.gz", tmp_path / "o.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no NIfTI or DICOM"):
        plan_cases(tmp_path / "empty", tmp_path / "o")


def test_shards_split_cases_by_name_stably_and_cover_each_once():
    from vertrefine.cases import Shard

    names = [f"case_{i:03d}" for i in range(200)]
    parts = [[n for n in names if Shard(k, 4).holds(n)] for k in range(1, 5)]
    assert sorted(sum(parts, [])) == names  # every case in exactly one part
    assert all(30 <= len(p) <= 70 for p in parts)  # about a quarter each
    fewer = [n for n in names if n != "case_007"]  # removing a case moves no other
    assert [[n for n in fewer if Shard(k, 4).holds(n)] for k in range(1, 5)] == [
        [n for n in p if n != "case_007"] for p in parts
    ]
    assert Shard.parse("3/8") == Shard(3, 8) and str(Shard(3, 8)) == "3/8"
    for bad in ("0/4", "5/4", "3", "a/b", "1/0", "-1/4"):
        with pytest.raises(ValueError):
            Shard.parse(bad)


def test_n_shards_together_write_exactly_the_unsharded_outputs(tmp_path):
    import nibabel as nib
    import numpy as np
    from cli_helpers import invoke

    from vertrefine.io import write_label_map
    from vertrefine.synth import synth_spine

    cases = tmp_path / "cases"
    cases.mkdir()
    for seed in range(4):
        write_label_map(synth_spine(300 + seed, levels=("L3",)), cases / f"spine_{seed}.nii.gz")
    options = ("--model", "vae", "--fine-inputs", "refine")
    whole = invoke("refine", cases, "-o", tmp_path / "whole", *options)
    assert whole.exit_code == 0, whole.output
    counts = []
    for k in (1, 2, 3):  # a scheduler's three workers, one output folder
        part = invoke("refine", cases, "-o", tmp_path / "sharded", *options, "--shard", f"{k}/3")
        assert part.exit_code == 0, part.output
        counts.append(int(part.output.split(f"shard {k}/3: ")[1].split(" of ")[0]))
    assert sum(counts) == 4
    maps = sorted(p.name for p in (tmp_path / "whole").glob("*.nii.gz"))
    assert maps == sorted(p.name for p in (tmp_path / "sharded").glob("*.nii.gz")) and len(maps) == 4
    for name in maps:
        a, b = (np.asarray(nib.load(tmp_path / d / name).dataobj) for d in ("whole", "sharded"))
        np.testing.assert_array_equal(a, b)
    bad = invoke("refine", cases, "-o", tmp_path / "x", *options, "--shard", "4/3")
    assert bad.exit_code == 2 and "--shard" in bad.output
