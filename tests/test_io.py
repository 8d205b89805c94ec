"""Tests for vertrefine.io: NIfTI, DICOM series and DICOM SEG round trips, geometry and bad inputs."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_helpers import CT_IMAGE_STORAGE, SECONDARY_CAPTURE, lumbar_bars, make_series
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from vertrefine import io
from vertrefine.dicom_series import scan_folder
from vertrefine.errors import InputError, OutputError, VertrefineError
from vertrefine.volume import Geometry, Source, Volume


def _rotation(ax: float, az: float) -> np.ndarray:
    cx, sx, cz, sz = np.cos(ax), np.sin(ax), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx


# RAS affines: identity, flipped (negative diagonal) and oblique, all with anisotropic spacing.
AFFINES = {
    "identity": np.diag([0.8, 1.1, 2.5, 1.0]),
    "flipped": np.diag([-0.8, -1.1, -2.5, 1.0]),
    "oblique": None,
}
_oblique = np.eye(4)
_oblique[:3, :3] = _rotation(0.3, 0.5) @ np.diag([0.8, 1.1, 2.5])
_oblique[:3, 3] = [12.5, -40.0, 7.25]
AFFINES["oblique"] = _oblique
AFFINES["flipped"][:3, 3] = [30.0, 20.0, -10.0]


def _save_nifti(path: Path, data_ijk: np.ndarray, affine: np.ndarray, *, sform_code: int = 2) -> Path:
    image = nib.Nifti1Image(data_ijk, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=sform_code)
    image.header.set_xyzt_units("mm", "sec")
    image.header["descrip"] = b"vertebra labels"
    image.header["intent_name"] = b"labels"
    nib.save(image, str(path))
    return path


def _geometry_of_series(array, spacing=(0.8, 0.7, 2.5), origin=(-10.0, 20.0, 30.0), direction=None) -> Geometry:
    return Geometry(array.shape, spacing, origin, np.eye(3) if direction is None else direction)


@pytest.fixture(scope="module")
def ct_case(tmp_path_factory) -> dict:
    """A CT series (oblique, anisotropic) and a SEG of L1..L5 written from it."""
    root = tmp_path_factory.mktemp("ct_case")
    direction = _rotation(0.2, 0.4)
    ct = np.random.default_rng(0).integers(0, 1500, size=(8, 32, 32))
    series_uid, sop_uids = make_series(root / "ct", ct, direction=direction)
    labels = lumbar_bars()
    volume = Volume(labels, _geometry_of_series(labels, direction=direction))
    (root / "seg").mkdir()
    seg_path = io.write_dicom_seg(volume, root / "seg" / "labels.dcm", source_images=root / "ct")
    return {"root": root, "series_uid": series_uid, "sop_uids": sop_uids, "volume": volume, "seg": seg_path}


# --- NIfTI -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(AFFINES))
def test_nifti_round_trip_keeps_header_and_geometry(tmp_path, kind):
    affine = AFFINES[kind]
    data = lumbar_bars().transpose(2, 1, 0).astype(np.int16)
    source = _save_nifti(tmp_path / "in.nii.gz", data, affine)
    volume = io.read_label_map(source)
    assert volume.array.dtype == np.uint8 and volume.source.kind == "nifti"
    np.testing.assert_array_equal(volume.array, lumbar_bars())

    out = io.write_label_map(volume, tmp_path / "out.nii.gz")
    original, written = nib.load(str(source)), nib.load(str(out))
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), data)
    assert written.get_data_dtype() == np.int16  # the input's dtype holds the labels, so it is kept
    assert written.header.binaryblock == original.header.binaryblock
    for field in ("qform_code", "sform_code", "pixdim", "xyzt_units", "descrip", "intent_name"):
        np.testing.assert_array_equal(written.header[field], original.header[field])
    np.testing.assert_array_equal(written.header.get_sform(), original.header.get_sform())
    np.testing.assert_array_equal(written.header.get_qform(), original.header.get_qform())
    assert io.read_label_map(out).geometry == volume.geometry


@pytest.mark.parametrize("kind", ["flipped", "oblique"])
def test_nifti_geometry_matches_simpleitk(tmp_path, kind):
    path = _save_nifti(tmp_path / "in.nii", lumbar_bars().transpose(2, 1, 0), AFFINES[kind], sform_code=1)
    geometry = io.read_label_map(path).geometry
    image = sitk.ReadImage(str(path))
    np.testing.assert_allclose(geometry.origin, image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(geometry.spacing, image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(geometry.direction, image.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(io.read_label_map(path).array, sitk.GetArrayFromImage(image))


def test_nifti_float_labels_are_cast_and_written_back_as_float(tmp_path):
    path = _save_nifti(tmp_path / "f.nii.gz", lumbar_bars().transpose(2, 1, 0).astype(np.float32), AFFINES["oblique"])
    volume = io.read_label_map(path)
    assert volume.array.dtype == np.uint8 and volume.labels == [20, 21, 22, 23, 24]
    out = io.write_label_map(volume, tmp_path / "out.nii")
    assert nib.load(str(out)).get_data_dtype() == np.float32


def test_nifti_trailing_singleton_dimension_is_kept(tmp_path):
    data = lumbar_bars().transpose(2, 1, 0)[..., None]
    path = _save_nifti(tmp_path / "t.nii.gz", data, AFFINES["identity"])
    volume = io.read_label_map(path)
    assert volume.array.shape == (8, 32, 32)
    assert nib.load(str(io.write_label_map(volume, tmp_path / "o.nii.gz"))).shape == (32, 32, 8, 1)


def test_nifti_labels_beyond_input_dtype_widen_it(tmp_path):
    path = _save_nifti(tmp_path / "u8.nii.gz", lumbar_bars().transpose(2, 1, 0), AFFINES["identity"])
    volume = io.read_label_map(path)
    wide = volume.with_array(np.where(volume.array == 20, 300, volume.array.astype(np.uint16)))
    written = nib.load(str(io.write_label_map(wide, tmp_path / "o.nii.gz")))
    assert written.get_data_dtype() == np.uint16 and np.asanyarray(written.dataobj).max() == 300
    assert io.read_label_map(tmp_path / "o.nii.gz").array.dtype == np.uint16


@pytest.mark.parametrize("kind", ["flipped", "oblique"])
def test_nifti_from_memory_gets_scanner_header(tmp_path, kind):
    geometry = Geometry((8, 32, 32), (0.8, 1.1, 2.5), (5.0, -7.0, 11.0), _rotation(0.3, -0.2))
    if kind == "flipped":
        geometry = Geometry((8, 32, 32), (0.8, 1.1, 2.5), (5.0, -7.0, 11.0), np.diag([-1.0, 1.0, -1.0]))
    out = io.write_label_map(Volume(lumbar_bars(), geometry), tmp_path / "mem.nii.gz")
    header = nib.load(str(out)).header
    assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
    np.testing.assert_allclose(header.get_qform(), header.get_sform(), atol=1e-5)
    back = io.read_label_map(out)
    assert back.geometry.same_grid(geometry)
    np.testing.assert_array_equal(back.array, lumbar_bars())
    image = sitk.ReadImage(str(out))
    np.testing.assert_allclose(image.GetDirection(), geometry.direction, atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), geometry.origin, atol=1e-4)


def test_nifti_like_on_another_grid_gets_a_header_from_the_geometry(tmp_path):
    like = io.read_label_map(_save_nifti(tmp_path / "in.nii.gz", lumbar_bars().transpose(2, 1, 0), AFFINES["oblique"]))
    other = Volume(lumbar_bars()[:, :, :30], Geometry((8, 32, 30), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0)))
    out = io.write_nifti(other, tmp_path / "o.nii.gz", like=like)
    assert io.read_label_map(out).geometry.same_grid(other.geometry)


# --- DICOM series ----------------------------------------------------------------------------------


def test_dicom_label_series_reads_with_its_geometry(tmp_path):
    labels = lumbar_bars()
    direction = _rotation(0.25, -0.6)
    make_series(tmp_path / "lab", labels, direction=direction, modality="OT", sop_class=SECONDARY_CAPTURE)
    volume = io.read_label_map(tmp_path / "lab")
    np.testing.assert_array_equal(volume.array, labels)
    expected = _geometry_of_series(labels, direction=direction)
    assert volume.geometry.same_grid(expected, tol=1e-6)
    assert volume.source.kind == "dicom-series"
    assert [ds.InstanceNumber for ds in volume.source.meta["series"].datasets] == list(range(1, 9))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "lab")))
    image = reader.Execute()
    np.testing.assert_allclose(image.GetOrigin(), volume.geometry.origin, atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), volume.geometry.spacing, atol=1e-5)
    np.testing.assert_allclose(image.GetDirection(), volume.geometry.direction, atol=1e-5)
    # A single file of the series stands for the whole series.
    single = io.read_label_map(next((tmp_path / "lab").iterdir()))
    np.testing.assert_array_equal(single.array, labels)


def test_seg_from_dicom_series_input_references_it(tmp_path):
    labels = lumbar_bars()
    series_uid, sop_uids = make_series(tmp_path / "lab", labels, modality="OT", sop_class=SECONDARY_CAPTURE)
    volume = io.read_label_map(tmp_path / "lab")
    out = io.write_label_map(volume, tmp_path / "out.dcm")
    seg = pydicom.dcmread(out)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    refs = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == set(sop_uids)
    back = io.read_label_map(out)
    np.testing.assert_array_equal(back.array, labels)
    assert back.geometry.same_grid(volume.geometry)


# --- DICOM SEG -------------------------------------------------------------------------------------


def test_seg_references_source_series_and_names_levels(ct_case):
    seg = pydicom.dcmread(ct_case["seg"])
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_case["series_uid"]
    refs = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == set(ct_case["sop_uids"])
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["L1", "L2", "L3", "L4", "L5"]
    types = [item.SegmentedPropertyTypeCodeSequence[0] for item in seg.SegmentSequence]
    assert [(t.CodingSchemeDesignator, t.CodeValue) for t in types] == [
        ("SCT", "66794005"),
        ("SCT", "14293000"),
        ("SCT", "36470004"),
        ("SCT", "11994002"),
        ("SCT", "49668003"),
    ]
    for item in seg.SegmentSequence:
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "vertrefine"
    frame_refs = {
        frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    assert frame_refs == set(ct_case["sop_uids"][1:7])  # the frames of slices 1..6


def test_seg_reads_back_labels_and_geometry(ct_case):
    volume = io.read_label_map(ct_case["seg"])
    assert volume.source.kind == "dicom-seg"
    # The CT was found beside the SEG, so the labels sit on its full 8-slice grid.
    assert volume.source.meta["source_series"].uid == ct_case["series_uid"]
    assert volume.geometry.same_grid(ct_case["volume"].geometry, tol=1e-6)
    np.testing.assert_array_equal(volume.array, ct_case["volume"].array)
    assert volume.labels == [20, 21, 22, 23, 24]


def test_seg_alone_reads_on_its_own_frames(ct_case, tmp_path):
    lone = shutil.copy(ct_case["seg"], tmp_path / "lone.dcm")
    volume = io.read_label_map(lone)
    assert volume.source.meta["source_series"] is None
    assert volume.geometry.shape == (6, 32, 32)  # slices 1..6 hold labels; empty frames are not stored
    expected = ct_case["volume"].geometry.index_to_physical(np.array([0.0, 0.0, 1.0]))
    np.testing.assert_allclose(volume.geometry.origin, expected, atol=1e-4)
    np.testing.assert_array_equal(volume.array, ct_case["volume"].array[1:7])


@pytest.mark.parametrize("with_source", [True, False], ids=["source-found", "seg-alone"])
def test_seg_to_seg_keeps_the_referenced_series(ct_case, tmp_path, with_source):
    original = pydicom.dcmread(ct_case["seg"])
    path = ct_case["seg"] if with_source else Path(shutil.copy(ct_case["seg"], tmp_path / "in.dcm"))
    volume = io.read_label_map(path)
    refined = volume.with_array(np.where(volume.array == 22, 0, volume.array))  # drop L3
    out = io.write_label_map(refined, tmp_path / "out.dcm")
    seg = pydicom.dcmread(out)
    assert seg.SeriesInstanceUID != original.SeriesInstanceUID
    assert seg.StudyInstanceUID == original.StudyInstanceUID
    assert seg.FrameOfReferenceUID == original.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_case["series_uid"]
    refs = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == set(ct_case["sop_uids"])
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["L1", "L2", "L4", "L5"]

    def per_frame_refs(dataset):
        return {
            tuple(np.round(np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, dtype=float), 3)): (
                f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            )
            for f in dataset.PerFrameFunctionalGroupsSequence
        }

    assert per_frame_refs(seg) == per_frame_refs(original)
    back = io.read_label_map(out)
    np.testing.assert_array_equal(back.array[back.array > 0], refined.array[refined.array > 0])
    assert back.labels == [20, 21, 23, 24]


def test_seg_segments_map_to_levels_and_keep_other_numbers(ct_case, tmp_path):
    ct = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted((ct_case["root"] / "ct").iterdir())]
    ct.sort(key=lambda ds: int(ds.InstanceNumber))
    array = np.zeros((8, 32, 32), dtype=np.uint8)
    for number in range(1, 5):
        array[2:5, 4 * number : 4 * number + 3, 5:20] = number
    algorithm = hd.AlgorithmIdentificationSequence(
        name="test", family=codes.cid7162.ArtificialIntelligence, version="1"
    )

    def describe(number, label, code):
        return hd.seg.SegmentDescription(
            number, label, codes.SCT.AnatomicalStructure, code, "AUTOMATIC", algorithm_identification=algorithm
        )

    descriptions = [
        describe(1, "C2", codes.SCT.Vertebra),  # a level by name -> 2
        describe(2, "kidney", codes.SCT.Kidney),  # no level; 2 is taken -> 3
        describe(3, "blob", codes.SCT.L2Vertebra),  # a level by code -> 21
        describe(4, "T12 vertebra", codes.SCT.Vertebra),  # -> 19
    ]
    seg = hd.seg.Segmentation(
        ct, array, "BINARY", descriptions, generate_uid(), 9, generate_uid(), 1, "x", "x", "1", "1"
    )
    seg.save_as(tmp_path / "mixed.dcm")
    volume = io.read_label_map(tmp_path / "mixed.dcm")
    assert volume.source.meta["segment_labels"] == {1: 2, 2: 3, 3: 21, 4: 19}
    expected = np.select([array == 1, array == 2, array == 3, array == 4], [2, 3, 21, 19], 0)
    np.testing.assert_array_equal(volume.array, expected[2:5])  # the CT is not next to this SEG


def test_seg_from_nifti_needs_source_series(ct_case, tmp_path):
    path = _save_nifti(tmp_path / "in.nii.gz", lumbar_bars().transpose(2, 1, 0), AFFINES["identity"])
    volume = io.read_label_map(path)
    with pytest.raises(InputError, match="source"):
        io.write_label_map(volume, tmp_path / "out.dcm")
    assert not (tmp_path / "out.dcm").exists()
    # With the source series named explicitly it works (on the CT's grid).
    on_ct = Volume(ct_case["volume"].array, ct_case["volume"].geometry, volume.source)
    io.write_label_map(on_ct, tmp_path / "out.dcm", source_images=ct_case["root"] / "ct")
    assert pydicom.dcmread(tmp_path / "out.dcm").ReferencedSeriesSequence[0].SeriesInstanceUID == ct_case["series_uid"]


# --- de-identified series (empty UIDs) and folders with other files -------------------------------


def _blank_uids(folder: Path, *, frame_of_reference: bool = False) -> list[str]:
    """Empty the series' Study/Series/SOP UIDs and PatientID like a de-identifier that blanks them, and
    rename its files 'CT.<MediaStorageSOPInstanceUID>' (no DICOM suffix); return the file-meta UIDs."""
    uids = []
    for file in sorted(folder.iterdir()):
        ds = pydicom.dcmread(file)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "PatientID"):
            setattr(ds, keyword, "")
        if frame_of_reference:
            ds.FrameOfReferenceUID = ""
        uid = ds.file_meta.MediaStorageSOPInstanceUID
        ds.save_as(folder / f"CT.{uid}", enforce_file_format=True)
        file.unlink()
        assert pydicom.dcmread(folder / f"CT.{uid}").file_meta.MediaStorageSOPInstanceUID == uid
        uids.append(str(uid))
    return uids


def _slice_coded_labels(shape: tuple[int, int, int] = (8, 24, 24)) -> np.ndarray:
    """Labels that differ from slice to slice (20 + k % 5, shifted boxes), so a wrong slice order shows."""
    array = np.zeros(shape, dtype=np.uint8)
    for k in range(shape[0]):
        array[k, 2 + k : 9 + k, 3 + 2 * k : 7 + 2 * k] = 20 + k % 5
    return array


@pytest.fixture(scope="module")
def blank_ct(tmp_path_factory) -> dict:
    """A CT series (oblique) whose Study/Series/SOP UIDs are empty, files named like 'CT.1.2.826...'."""
    root = tmp_path_factory.mktemp("blank_ct")
    direction = _rotation(-0.15, 0.3)
    ct = np.random.default_rng(3).integers(0, 1500, size=(8, 24, 24))
    make_series(root / "ct", ct, direction=direction, origin=(-40.0, -120.0, -700.5))
    return {"root": root, "folder": root / "ct", "uids": set(_blank_uids(root / "ct")), "direction": direction}


def test_series_without_uids_is_read_as_one_series_and_ct_is_refused(blank_ct):
    folder = blank_ct["folder"]
    series = scan_folder(folder)
    assert [s.uid for s in series] == [io.NO_SERIES_UID] and len(series[0].files) == 8
    one_file = sorted(folder.iterdir())[2]
    assert io.is_supported_input(one_file)  # 'CT.1.2.826...' : a numeric "suffix", but the DICM preamble
    for path in (folder, one_file):
        with pytest.raises(InputError) as info:
            io.read_label_map(path)
        message = str(info.value)
        assert message.startswith(f"{path}: is a CT image series ('synthetic', 8 files) that holds")
        assert "intensity image" in message and "segment it first" in message and "\n" not in message
    geometry = io.dicom_series_geometry(folder)
    expected = Geometry((8, 24, 24), (0.8, 0.7, 2.5), (-40.0, -120.0, -700.5), blank_ct["direction"])
    assert geometry.same_grid(expected, tol=1e-6)
    assert io.dicom_series_geometry(one_file) == geometry


def test_seg_of_series_without_uids_references_its_instances_and_reads_back(blank_ct, tmp_path):
    geometry = io.dicom_series_geometry(blank_ct["folder"])
    labels = _slice_coded_labels()
    labels[0] = labels[-1] = 0  # empty end slices: frames not stored, instances still referenced
    volume = Volume(labels, geometry)
    (tmp_path / "seg").mkdir()
    out = io.write_dicom_seg(volume, tmp_path / "seg" / "out.dcm", source_images=blank_ct["folder"])
    seg = pydicom.dcmread(out)
    ct = pydicom.dcmread(next(blank_ct["folder"].iterdir()), stop_before_pixels=True)
    # Real instance UIDs (from the file meta); no empty or invented series; a study UID of its own.
    assert {item.ReferencedSOPInstanceUID for item in seg.SourceImageSequence} == blank_ct["uids"]
    assert {item.ReferencedSOPClassUID for item in seg.SourceImageSequence} == {CT_IMAGE_STORAGE}
    frame_refs = [f.DerivationImageSequence[0].SourceImageSequence[0] for f in seg.PerFrameFunctionalGroupsSequence]
    assert {item.ReferencedSOPInstanceUID for item in frame_refs} <= blank_ct["uids"] and len(frame_refs) >= 6
    assert "ReferencedSeriesSequence" not in seg
    assert seg.StudyInstanceUID and seg.SeriesInstanceUID and seg.SOPInstanceUID
    assert seg.FrameOfReferenceUID == ct.FrameOfReferenceUID
    # Alone, the SEG reads on its own frames (slices 1..6) ...
    alone = io.read_label_map(out)
    assert alone.source.meta["source_series"] is None and alone.geometry.shape == (6, 24, 24)
    np.testing.assert_array_equal(alone.array, labels[1:7])
    # ... and with the series beside it (a sibling folder, or the same folder) on the series' full grid.
    shutil.copytree(blank_ct["folder"], tmp_path / "ct")
    for path in (out, Path(shutil.copy(out, tmp_path / "ct" / "seg.dcm")).parent):
        back = io.read_label_map(path)
        assert back.source.kind == "dicom-seg" and back.source.meta["source_series"].uid == io.NO_SERIES_UID
        assert back.geometry.same_grid(geometry, tol=1e-6)
        np.testing.assert_array_equal(back.array, labels)
    # A SEG written from that SEG keeps the references and lands in the same (derived) study.
    refined = back.with_array(np.where(back.array == 22, 0, back.array))
    again = pydicom.dcmread(io.write_label_map(refined, tmp_path / "seg" / "refined.dcm"))
    assert again.StudyInstanceUID == seg.StudyInstanceUID and "ReferencedSeriesSequence" not in again
    assert {item.ReferencedSOPInstanceUID for item in again.SourceImageSequence} == blank_ct["uids"]
    np.testing.assert_array_equal(io.read_label_map(tmp_path / "seg" / "refined.dcm").array, refined.array)


def test_seg_of_series_without_frame_of_reference_is_refused(tmp_path):
    make_series(tmp_path / "ct", np.zeros((4, 16, 16), dtype=np.uint16))
    _blank_uids(tmp_path / "ct", frame_of_reference=True)
    labels = np.zeros((4, 16, 16), dtype=np.uint8)
    labels[1:3, 4:9, 4:9] = 20
    volume = Volume(labels, _geometry_of_series(labels))
    with pytest.raises(InputError) as info:
        io.write_dicom_seg(volume, tmp_path / "out.dcm", source_images=tmp_path / "ct")
    message = str(info.value)
    assert str(tmp_path / "ct") in message and "no FrameOfReferenceUID" in message and "NIfTI" in message
    assert "\n" not in message and not (tmp_path / "out.dcm").exists()


def test_label_series_without_uids_round_trips_and_leaves_its_headers_untouched(tmp_path):
    labels = _slice_coded_labels()
    make_series(tmp_path / "lab", labels, modality="OT", sop_class=SECONDARY_CAPTURE)
    uids = set(_blank_uids(tmp_path / "lab"))
    volume = io.read_label_map(tmp_path / "lab")
    np.testing.assert_array_equal(volume.array, labels)
    datasets = volume.source.meta["series"].datasets
    seg = pydicom.dcmread(io.write_label_map(volume, tmp_path / "out.dcm"))
    assert {item.ReferencedSOPInstanceUID for item in seg.SourceImageSequence} == uids
    assert all(ds.SOPInstanceUID == "" and ds.StudyInstanceUID == "" for ds in datasets)  # copies were changed


def test_series_without_uids_split_by_frame_of_reference(tmp_path):
    folder = tmp_path / "two"
    make_series(folder / "a", lumbar_bars(), modality="OT", sop_class=SECONDARY_CAPTURE, description="labels")
    make_series(folder / "b", lumbar_bars() // 2, modality="OT", sop_class=SECONDARY_CAPTURE, description="labels")
    for sub in ("a", "b"):
        _blank_uids(folder / sub)
        for file in (folder / sub).iterdir():
            file.rename(folder / f"{sub}{file.name}")
    with pytest.raises(
        InputError, match=r"holds 2 DICOM series: \(no SeriesInstanceUID\) #1 \(OT, 'labels', 8 files\)"
    ):
        io.read_label_map(folder)
    first = io.read_label_map(folder, series_uid=f"{io.NO_SERIES_UID} #1")
    second = io.read_label_map(folder, series_uid=f"{io.NO_SERIES_UID} #2")
    assert sorted([first.labels, second.labels]) == [[10, 11, 12], [20, 21, 22, 23, 24]]


def test_label_series_beside_other_files_reads_in_slice_order(tmp_path):
    labels = _slice_coded_labels()
    folder = tmp_path / "mixed"
    make_series(folder, labels, modality="OT", sop_class=SECONDARY_CAPTURE, direction=_rotation(0.1, 2.5))
    (folder / "readme.txt").write_text("labels exported by hand")
    (folder / "params.json").write_text("{}")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    _save_nifti(folder / "labels.nii.gz", labels.transpose(2, 1, 0), np.eye(4))
    other = Dataset()  # a DICOM object without a series and without pixels (like a DICOMDIR)
    other.file_meta = FileMetaDataset()
    other.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    other.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    other.FileSetID = "SET"
    other.save_as(folder / "DICOMDIR", enforce_file_format=True)
    volume = io.read_label_map(folder)
    np.testing.assert_array_equal(volume.array, labels)
    # The files went to GDCM sorted along the slice normal (InstanceNumber = slice index + 1 here).
    assert [ds.InstanceNumber for ds in volume.source.meta["series"].datasets] == list(range(1, 9))


# --- bad inputs ------------------------------------------------------------------------------------


def _bad_float(tmp_path):
    rng = np.random.default_rng(1)
    return _save_nifti(tmp_path / "mr.nii.gz", rng.normal(300, 50, (16, 16, 8)).astype(np.float32), np.eye(4))


def _bad_many_values(tmp_path):
    data = np.arange(16 * 16 * 8, dtype=np.int16).reshape(16, 16, 8)
    return _save_nifti(tmp_path / "ct.nii.gz", data, np.eye(4))


def _bad_negative(tmp_path):
    data = np.zeros((16, 16, 8), dtype=np.int16)
    data[3, 3, 3] = -1000
    data[4, 4, 4] = 3
    return _save_nifti(tmp_path / "neg.nii.gz", data, np.eye(4))


def _bad_4d(tmp_path):
    return _save_nifti(tmp_path / "4d.nii.gz", np.ones((8, 8, 8, 3), dtype=np.uint8), np.eye(4))


def _bad_2d(tmp_path):
    return _save_nifti(tmp_path / "2d.nii.gz", np.ones((8, 8, 1), dtype=np.uint8), np.eye(4))


def _bad_empty(tmp_path):
    return _save_nifti(tmp_path / "empty.nii.gz", np.zeros((8, 8, 8), dtype=np.uint8), np.eye(4))


def _bad_truncated(tmp_path):
    data = np.random.default_rng(2).integers(0, 25, (32, 32, 32)).astype(np.uint8)
    path = _save_nifti(tmp_path / "trunc.nii.gz", data, np.eye(4))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _bad_gzip_garbage(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(gzip.compress(b"this is not a nifti header" * 3))
    return path


def _bad_garbage_nii(tmp_path):
    path = tmp_path / "garbage.nii"
    path.write_bytes(b"\x00garbage" * 100)
    return path


def _bad_garbage_dcm(tmp_path):
    path = tmp_path / "garbage.dcm"
    path.write_bytes(b"not dicom at all" * 50)
    return path


def _bad_sheared(tmp_path):
    affine = np.array([[1.0, 0.4, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    image = nib.Nifti1Image(lumbar_bars().transpose(2, 1, 0), affine)
    image.set_sform(affine, code=1)
    image.set_qform(None, code=0)
    path = tmp_path / "sheared.nii.gz"
    nib.save(image, str(path))
    return path


def _bad_two_series(tmp_path):
    folder = tmp_path / "two"
    make_series(folder, lumbar_bars(), modality="OT", sop_class=SECONDARY_CAPTURE, description="labels A")
    make_series(folder, lumbar_bars(), modality="OT", sop_class=SECONDARY_CAPTURE, description="labels B")
    return folder


def _bad_no_dicom(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    return folder


def _bad_missing(tmp_path):
    return tmp_path / "nowhere.nii.gz"


def _bad_suffix(tmp_path):
    path = tmp_path / "labels.png"
    path.write_bytes(b"\x89PNG")
    return path


def _bad_irregular_series(tmp_path):
    folder = tmp_path / "gap"
    make_series(folder, lumbar_bars(), modality="OT", sop_class=SECONDARY_CAPTURE)
    sorted(folder.iterdir())[3].unlink()
    return folder


BAD_INPUTS = {
    "float intensity": (_bad_float, "intensity image"),
    "many values": (_bad_many_values, "distinct values"),
    "negative": (_bad_negative, "negative"),
    "4D": (_bad_4d, "4D"),
    "2D": (_bad_2d, "2D"),
    "empty": (_bad_empty, "empty"),
    "truncated gz": (_bad_truncated, "truncated"),
    "gzip garbage": (_bad_gzip_garbage, "cannot read"),
    "garbage nii": (_bad_garbage_nii, "cannot read"),
    "garbage dcm": (_bad_garbage_dcm, "not a readable DICOM"),
    "sheared": (_bad_sheared, "non-orthonormal"),
    "two series": (_bad_two_series, "2 DICOM series"),
    "no dicom": (_bad_no_dicom, "no DICOM files"),
    "missing": (_bad_missing, "does not exist"),
    "suffix": (_bad_suffix, "unsupported"),
    "irregular series": (_bad_irregular_series, "irregularly spaced"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_naming_the_file(tmp_path, case):
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        io.read_label_map(path)
    message = str(info.value)
    assert str(path) in message and expected in message
    assert "\n" not in message and info.value.remedy


def test_two_series_message_lists_each_and_series_uid_chooses(tmp_path):
    folder = _bad_two_series(tmp_path)
    with pytest.raises(InputError) as info:
        io.read_label_map(folder)
    uids = {pydicom.dcmread(f).SeriesInstanceUID for f in folder.iterdir()}
    assert all(uid in str(info.value) for uid in uids)
    assert "labels A" in str(info.value) and "8 files" in str(info.value) and "series UID" in str(info.value)
    volume = io.read_label_map(folder, series_uid=sorted(uids)[0])
    np.testing.assert_array_equal(volume.array, lumbar_bars())


def test_empty_map_allowed_on_request(tmp_path):
    volume = io.read_label_map(_bad_empty(tmp_path), allow_empty=True)
    assert volume.labels == [] and volume.array.dtype == np.uint8


def test_validate_picks_compact_dtypes(tmp_path):
    geometry = Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    for high, dtype in ((255, np.uint8), (256, np.uint16), (70000, np.int32)):
        array = np.zeros((4, 4, 4), dtype=np.int64)
        array[1, 1, 1] = high
        assert io.validate_label_map(Volume(array, geometry), tmp_path).array.dtype == dtype
    boolean = np.zeros((4, 4, 4), dtype=bool)
    boolean[0, 0, 0] = True
    assert io.validate_label_map(Volume(boolean, geometry), tmp_path).array.dtype == np.uint8


# --- writing ---------------------------------------------------------------------------------------


def test_failed_nifti_write_leaves_no_partial_file(tmp_path, monkeypatch):
    volume = io.read_label_map(_save_nifti(tmp_path / "in.nii.gz", lumbar_bars().transpose(2, 1, 0), np.eye(4)))
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def broken_save(image, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("vertrefine.nifti.nib.save", broken_save)
    with pytest.raises(OSError):
        io.write_label_map(volume, out_dir / "out.nii.gz")
    assert list(out_dir.iterdir()) == []


def test_failed_seg_write_leaves_no_partial_file(ct_case, tmp_path, monkeypatch):
    volume = io.read_label_map(ct_case["seg"])

    def broken_save(self, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(hd.seg.Segmentation, "save_as", broken_save)
    with pytest.raises(OSError):
        io.write_label_map(volume, tmp_path / "out.dcm")
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_no_labels_and_unknown_suffix(tmp_path):
    geometry = Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    empty = Volume(np.zeros((4, 4, 4), dtype=np.uint8), geometry, Source(None))
    with pytest.raises(OutputError, match="no labelled voxel"):
        io.write_dicom_seg(empty, tmp_path / "x.dcm", source_images=[Dataset()])
    with pytest.raises(OutputError, match="unsupported output"):
        io.write_label_map(empty, tmp_path / "x.mha")
    assert issubclass(OutputError, VertrefineError) and list(tmp_path.iterdir()) == []


def test_path_helpers():
    assert io.is_nifti_path("a/b.NII.GZ") and io.is_nifti_path("x.nii") and not io.is_nifti_path("x.dcm")
    assert io.is_dicom_output("seg.dcm") and not io.is_dicom_output("x.nii.gz")
