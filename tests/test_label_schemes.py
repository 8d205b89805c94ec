"""What is a vertebra: label numberings (VerSe, TotalSegmentator, DICOM SEG codes), --labels, binary masks.

A TotalSegmentator map or a SEG with organs refines only its vertebrae (keeping their ids and segment
descriptions) and keeps every other structure voxel for voxel.
"""

from __future__ import annotations

import json

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_helpers import make_series
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from scipy import ndimage
from typer.testing import CliRunner

from vertrefine import io
from vertrefine.cli import app
from vertrefine.errors import InputError
from vertrefine.labels import (
    BINARY_MASK,
    TOTALSEGMENTATOR,
    TOTALSEGMENTATOR_V1,
    TOTALSEGMENTATOR_VERTEBRAE_MR,
    UNKNOWN,
    VERSE,
    canonical_level,
    choose_scheme,
    label_scheme_of,
    level_order_problem,
    parse_label_selection,
    recognise_scheme,
)
from vertrefine.refine import Refiner
from vertrefine.synth import synth_spine
from vertrefine.volume import Geometry, Volume

runner = CliRunner()
SPLEEN, KIDNEY_RIGHT, LIVER = 1, 2, 5  # TotalSegmentator v2 'total'
TS_L3, TS_L4 = 29, 28


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def vae() -> Refiner:
    # the synthetic spines are 1 mm: refine them (by default refine writes inputs finer than 1.5 mm unchanged)
    return Refiner.from_bundle(model="vae", device="cpu", fine_inputs="refine")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _with_organs(spine: Volume, ids: dict[int, int], organs: dict[int, tuple[slice, slice]]) -> Volume:
    """``spine`` relabelled by ``ids``, widened along i by 40 voxels each side, with box 'organs' there."""
    pad = 40
    array = np.zeros((spine.array.shape[0], spine.array.shape[1], spine.array.shape[2] + 2 * pad), np.uint8)
    array[:, :, pad:-pad] = np.vectorize(lambda v: ids.get(int(v), int(v)), otypes=[np.uint8])(spine.array)
    for n, (label, (ks, js)) in enumerate(organs.items()):
        i_range = slice(5, 30) if n % 2 == 0 else slice(-30, -5)
        array[ks, js, i_range] = label
    origin = np.asarray(spine.geometry.origin) - np.array([pad, 0.0, 0.0]) * np.asarray(spine.geometry.spacing)
    return Volume(array, Geometry(array.shape, spine.geometry.spacing, tuple(origin)))


# --- the schemes as data ----------------------------------------------------------------------------


def test_totalsegmentator_numberings_are_the_published_ones():
    names = TOTALSEGMENTATOR.names
    assert len(names) == 117
    assert [names[i] for i in (1, 2, 3, 4, 5, 25, 26, 27, 31, 32, 43, 44, 50, 51, 117)] == [
        "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "sacrum", "vertebrae_S1", "vertebrae_L5",
        "vertebrae_L1", "vertebrae_T12", "vertebrae_T1", "vertebrae_C7", "vertebrae_C1", "heart",
        "costal_cartilages",
    ]  # fmt: skip
    assert TOTALSEGMENTATOR.level(TS_L3) == "L3" and TOTALSEGMENTATOR.level(LIVER) is None
    assert TOTALSEGMENTATOR.vertebrae(range(1, 118)) == frozenset(range(27, 51))  # not sacrum 25, S1 26
    v1 = TOTALSEGMENTATOR_V1
    assert len(v1.names) == 104 and (v1.level(18), v1.level(41), v1.names[92], v1.names[104]) == (
        "L5", "C1", "sacrum", "urinary_bladder",
    )  # fmt: skip
    assert TOTALSEGMENTATOR_VERTEBRAE_MR.level(1) == "sacrum" and TOTALSEGMENTATOR_VERTEBRAE_MR.level(25) == "C1"
    assert VERSE.vertebrae(range(1, 29)) == frozenset(range(1, 26)) | {28}  # sacrum 26, coccyx 27 pass through


def test_each_scheme_maps_its_ids_to_verse_levels_through_one_function():
    assert TOTALSEGMENTATOR.verse_label(TS_L3) == 22 and TOTALSEGMENTATOR.verse_label(50) == 1
    assert TOTALSEGMENTATOR.verse_label(26) == 26  # S1 -> VerSe's sacrum label
    assert TOTALSEGMENTATOR_V1.verse_label(20) == 22  # v1's L3
    assert VERSE.verse_label(28) == 28 and TOTALSEGMENTATOR.verse_label(SPLEEN) is None
    assert TOTALSEGMENTATOR.name(TS_L3) == "L3" and TOTALSEGMENTATOR.name(SPLEEN) == "spleen"


@pytest.mark.parametrize(
    "labels, scheme",
    [
        ({20, 21, 22}, VERSE),
        ({1, 2, 3, 5, 28, 29, 30, 52, 63}, TOTALSEGMENTATOR),  # organs, L4-L2, aorta, vena cava
        ({26, 27, 28}, UNKNOWN),  # TS S1, L5, L4 alone: VerSe ids, but T13 (28) without T12 or L1: named by hand
        ({19, 20, 28}, VERSE),  # a real T13 between T12 and L1
        ({19, 20, 21, 119, 120, 121, 219}, VERSE),  # SPINEPS: vertebrae + discs 100+ and endplates 200+
        ({1}, BINARY_MASK),
        ({255}, BINARY_MASK),
        ({300, 301}, UNKNOWN),
        ({20, 150, 60}, UNKNOWN),
    ],
)
def test_auto_recognises_the_scheme_from_the_label_set(labels, scheme):
    assert recognise_scheme(labels)[0] is scheme


def test_an_explicit_scheme_or_a_seg_s_codes_decide():
    assert choose_scheme("totalsegmentator-v1", {20, 21})[0] is TOTALSEGMENTATOR_V1
    assert choose_scheme("verse", {1})[0] is BINARY_MASK  # a single 1 or 255 is a mask, as ever
    assert choose_scheme("totalsegmentator", {1})[0] is TOTALSEGMENTATOR  # ... unless the ids are TS's
    scheme, note = choose_scheme("auto", {1, 2, 29})
    assert scheme is TOTALSEGMENTATOR and "TotalSegmentator" in note and "--label-scheme" in note
    with pytest.raises(ValueError, match="label scheme"):
        choose_scheme("nnunet", {1})


# --- --labels ---------------------------------------------------------------------------------------


def test_labels_accepts_ids_and_levels_in_any_scheme_spelling():
    selection = parse_label_selection("L2-L4,vertebrae_T12")
    assert selection.resolve(VERSE) == frozenset({19, 21, 22, 23})
    assert selection.resolve(TOTALSEGMENTATOR) == frozenset({28, 29, 30, 32})
    assert parse_label_selection("T12-L1").resolve(VERSE) == frozenset({19, 20, 28})  # T13 lies between
    assert parse_label_selection("20-22, 26").resolve(TOTALSEGMENTATOR) == frozenset({20, 21, 22, 26})
    names = ("l3", "L3 vertebra", "vertebrae_S1", "Sacrum", "liver", "Vertebra L4", "vertebra  t12", "Lumbar spine")
    assert [canonical_level(n) for n in names] == ["L3", "L3", "S1", "sacrum", None, "L4", "T12", None]
    for bad, words in (("L5-L1", "backwards"), ("20-L5", "mixes"), ("liver", "neither"), ("0", "background")):
        with pytest.raises(ValueError, match=words):
            parse_label_selection(bad)


def test_levels_that_run_against_the_anatomy_are_caught():
    # TotalSegmentator 'vertebrae_mr' numbers L5=2 .. L1=6 from the feet up; read as VerSe that is C2..C6
    # with C2 lowest: the order tells the numbering is not VerSe's.
    placed = [(2, -40.0), (3, -10.0), (4, 20.0), (5, 50.0), (6, 80.0)]
    problem = level_order_problem(VERSE, placed)
    assert problem is not None and "C2" in problem and "head" in problem
    assert level_order_problem(TOTALSEGMENTATOR_VERTEBRAE_MR, placed) is None
    assert level_order_problem(VERSE, [(22, 0.0)]) is None  # one vertebra says nothing


# --- refine: TotalSegmentator maps ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ts_map():
    """L2 (30) and L3 (29) of TotalSegmentator v2 among a spleen, a kidney and a liver."""
    spine = synth_spine(11, levels=("L2", "L3"))
    organs = {SPLEEN: (slice(60, 90), slice(20, 50)), KIDNEY_RIGHT: (slice(20, 50), slice(40, 70)),
              LIVER: (slice(70, 110), slice(60, 110))}  # fmt: skip
    return _with_organs(spine, {21: 30, 22: TS_L3}, organs)


def test_a_totalsegmentator_map_refines_only_its_vertebrae_keeping_ids_and_organs(ts_map, tmp_path):
    source = tmp_path / "ts.nii.gz"
    io.write_label_map(ts_map, source)
    result = invoke("refine", source, "-o", tmp_path / "out.nii.gz", "--model", "vae", "--fine-inputs", "refine")
    assert result.exit_code == 0, result.output
    assert "TotalSegmentator v2" in result.output  # auto says which numbering it read, in one line
    out = io.read_label_map(tmp_path / "out.nii.gz")
    for organ in (SPLEEN, KIDNEY_RIGHT, LIVER):  # voxel for voxel
        np.testing.assert_array_equal(out.array == organ, ts_map.array == organ)
    assert set(out.labels) == {SPLEEN, KIDNEY_RIGHT, LIVER, 30, TS_L3}
    for label in (30, TS_L3):
        assert _dice(out.array == label, ts_map.array == label) > 0.8
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert sidecar["label_scheme"] == "totalsegmentator"
    assert [(v["label"], v["level"], v["name"]) for v in sidecar["vertebrae"]] == [(30, "L2", "L2"), (29, "L3", "L3")]
    assert sidecar["passed_through_labels"] == [SPLEEN, KIDNEY_RIGHT, LIVER]


def test_labels_naming_an_organ_of_the_numbering_are_refused_in_one_line(ts_map, tmp_path):
    # --labels 20-24 is VerSe's lumbar spine, but in TotalSegmentator's numbering 5 is the liver: never reshape it
    source = tmp_path / "ts.nii.gz"
    io.write_label_map(ts_map, source)
    result = invoke("refine", source, "-o", tmp_path / "o.nii.gz", "--model", "vae", "--labels", f"{LIVER},30")
    (line,) = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert result.exit_code == 2 and "liver" in line and "not a vertebra" in line and "Traceback" not in result.output
    assert not (tmp_path / "o.nii.gz").exists()


def test_labels_by_level_choose_in_the_map_s_own_numbering(ts_map, vae):
    result = vae.with_options(labels=parse_label_selection("vertebrae_L3"))(ts_map)
    assert [v.instance.label for v in result.vertebrae] == [TS_L3]
    np.testing.assert_array_equal(result.labels.array == 30, ts_map.array == 30)  # L2 not chosen: unchanged
    read_as_verse = vae.with_options(labels=frozenset({30}), label_scheme="verse")(ts_map)
    assert [v.name for v in read_as_verse.vertebrae] == ["label 30"]


def test_a_map_numbered_from_the_feet_up_is_refused_under_auto_and_read_when_named(vae):
    spine = synth_spine(5, levels=("L3", "L4", "L5"))
    mr = spine.with_array(
        np.select([spine.array == 22, spine.array == 23, spine.array == 24], [4, 3, 2], 0).astype(np.uint8)
    )
    with pytest.raises(InputError, match="--label-scheme"):
        vae.prepare(mr)
    result = vae.with_options(label_scheme="totalsegmentator-vertebrae-mr")(mr)
    assert [(v.instance.label, v.name) for v in result.vertebrae] == [(4, "L3"), (3, "L4"), (2, "L5")]


def test_a_file_without_vertebrae_in_its_numbering_says_what_to_do(ts_map, vae):
    organs_only = ts_map.with_array(np.where(ts_map.array >= 29, 0, ts_map.array).astype(np.uint8))
    with pytest.raises(InputError, match="no vertebra to refine.*--label-scheme"):
        vae.with_options(label_scheme="totalsegmentator").prepare(organs_only)


# --- one label, one vertebra; components only for binary masks --------------------------------------


def test_a_vertebra_split_by_a_pedicle_break_is_refined_as_one(vae):
    spine = synth_spine(23, levels=("L3",))
    broken = spine.array.copy()
    broken[:, 40:44, :] = 0  # cuts the pedicles: two large pieces of label 22
    assert ndimage.label(broken > 0, np.ones((3, 3, 3)))[1] == 2
    result = vae(spine.with_array(broken))
    assert [(v.instance.instance_id, v.name) for v in result.vertebrae] == [(22, "L3")]
    assert not result.from_binary_mask and result.labels.labels == [22]


def test_a_binary_component_too_large_for_one_vertebra_passes_through_with_label_each_vertebra(vae):
    spine = synth_spine(11, levels=("L1", "L2", "L3", "L4", "L5"))
    touching = ndimage.binary_dilation(spine.array > 0, iterations=2)  # thick slices make vertebrae touch
    mask = spine.with_array(touching.astype(np.uint8))
    result = vae(mask)
    assert result.vertebrae == []
    ((instance, reason),) = result.passed_through
    assert "too large" in reason and "label each vertebra" in reason
    np.testing.assert_array_equal(result.labels.array, mask.array)  # voxel for voxel
    assert any("label each vertebra" in line for line in result.warnings)


# --- DICOM SEG: segments are what their codes say --------------------------------------------------


def _description(number: int, label: str, code, algorithm) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        number, label, codes.SCT.BodyStructure, code, "AUTOMATIC", algorithm_identification=algorithm
    )


@pytest.fixture(scope="module")
def ts_seg(tmp_path_factory):
    """A TotalSegmentator-style SEG: spleen, kidney_right, vertebrae_L3, vertebrae_L4 numbered 1-4."""
    root = tmp_path_factory.mktemp("ts_seg")
    spine = synth_spine(13, levels=("L3", "L4"))
    organs = {1: (slice(10, 40), slice(20, 50)), 2: (slice(50, 80), slice(40, 70))}
    volume = _with_organs(spine, {22: 3, 23: 4}, organs)
    make_series(root / "ct", np.full(volume.array.shape, 100, np.uint16), spacing=(1.0, 1.0, 1.0),
                origin=volume.geometry.origin)  # fmt: skip
    ct = sorted((pydicom.dcmread(f) for f in (root / "ct").iterdir()), key=lambda ds: float(ds.ImagePositionPatient[2]))
    algorithm = hd.AlgorithmIdentificationSequence(
        name="TotalSegmentator", family=codes.cid7162.ArtificialIntelligence, version="2.4"
    )
    descriptions = [
        _description(1, "spleen", codes.SCT.Spleen, algorithm),
        _description(2, "kidney_right", codes.SCT.Kidney, algorithm),
        _description(3, "vertebrae_L3", codes.SCT.L3Vertebra, algorithm),
        _description(4, "vertebrae_L4", codes.SCT.L4Vertebra, algorithm),
    ]
    seg = hd.seg.Segmentation(
        ct, volume.array, "BINARY", descriptions, generate_uid(), 7, generate_uid(), 1, "TS", "TS", "2.4", "1"
    )
    (root / "seg").mkdir()
    seg.save_as(root / "seg" / "ts.dcm")
    return root / "seg" / "ts.dcm"


def test_a_seg_s_vertebrae_come_from_codes_and_labels_not_segment_numbers(ts_seg):
    volume = io.read_label_map(ts_seg)
    scheme, note = label_scheme_of(volume, "verse")  # a SEG's codes win over any numbering asked for
    assert "segment codes" in note
    assert volume.source.meta["segment_labels"] == {1: 1, 2: 2, 3: 22, 4: 23}
    assert scheme.vertebrae(volume.labels) == frozenset({22, 23})
    assert (scheme.name(1), scheme.name(2), scheme.level(22)) == ("spleen", "kidney_right", "L3")


def test_a_totalsegmentator_seg_with_organs_refines_only_its_vertebrae(ts_seg):
    out = ts_seg.parent.parent / "refined" / "refined.dcm"  # beside the CT folder, so it is read on its grid
    out.parent.mkdir()
    result = invoke("refine", ts_seg, "-o", out, "--model", "vae", "--fine-inputs", "refine")
    assert result.exit_code == 0, result.output
    assert "segment codes" in result.output
    before, after = pydicom.dcmread(ts_seg), pydicom.dcmread(out)
    segments = {int(s.SegmentNumber): s for s in after.SegmentSequence}
    assert sorted(segments) == [1, 2, 3, 4]
    original = {int(s.SegmentNumber): s for s in before.SegmentSequence}
    for number in (1, 2):  # pass-through segments keep number, label, codes and algorithm
        assert segments[number] == original[number]
    for number, level, code in ((3, "L3", codes.SCT.L3Vertebra), (4, "L4", codes.SCT.L4Vertebra)):
        assert segments[number].SegmentLabel == level
        assert segments[number].SegmentedPropertyTypeCodeSequence[0].CodeValue == code.value
        assert segments[number].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "vertrefine"
    source, refined = io.read_label_map(ts_seg), io.read_label_map(out)
    for organ in (1, 2):  # voxel for voxel
        np.testing.assert_array_equal(refined.array == organ, source.array == organ)
    for label in (22, 23):
        assert _dice(refined.array == label, source.array == label) > 0.8


def test_a_segment_coded_vertebra_without_a_level_is_a_vertebra_of_unknown_level(ts_seg, tmp_path):
    root = ts_seg.parent.parent
    ct = sorted((pydicom.dcmread(f) for f in (root / "ct").iterdir()), key=lambda ds: float(ds.ImagePositionPatient[2]))
    array = io.read_label_map(ts_seg).array
    labels = np.select([array == 22, array == 1], [1, 2], 0).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(name="x", family=codes.cid7162.ArtificialIntelligence, version="1")
    descriptions = [
        _description(1, "bone 1", codes.SCT.Vertebra, algorithm),
        _description(2, "C3", codes.SCT.Spleen, algorithm),  # the label names a level: it wins
    ]
    seg = hd.seg.Segmentation(
        ct, labels, "BINARY", descriptions, generate_uid(), 8, generate_uid(), 1, "x", "x", "1", "1"
    )
    seg.save_as(tmp_path / "generic.dcm")
    volume = io.read_label_map(tmp_path / "generic.dcm")
    scheme, _ = label_scheme_of(volume)
    assert volume.source.meta["segment_labels"] == {1: 1, 2: 3}
    assert scheme.unlevelled == frozenset({1}) and scheme.level(3) == "C3"
    assert scheme.vertebrae(volume.labels) == frozenset({1, 3}) and scheme.name(1) == "bone 1"


def test_a_seg_written_from_a_totalsegmentator_nifti_names_organs_and_codes_vertebrae(ts_seg, ts_map, tmp_path):
    root = ts_seg.parent.parent
    grid = io.dicom_series_geometry(root / "ct")
    volume = Volume(np.zeros(grid.shape, np.uint8), grid)
    array = volume.array
    array[10:40, 20:50, 5:30] = SPLEEN
    array[40:80, 30:90, 60:120] = TS_L3
    io.write_label_map(volume, tmp_path / "out.dcm", source_images=root / "ct")
    seg = pydicom.dcmread(tmp_path / "out.dcm")
    described = [(s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in seg.SegmentSequence]
    assert described == [("spleen", codes.SCT.AnatomicalStructure.value), ("L3", codes.SCT.L3Vertebra.value)]


def test_an_empty_segment_of_a_seg_keeps_its_place_so_later_segments_keep_their_numbers(tmp_path):
    make_series(tmp_path / "ct", np.zeros((4, 16, 16), np.uint16))
    ct = sorted(
        (pydicom.dcmread(f) for f in (tmp_path / "ct").iterdir()), key=lambda ds: float(ds.ImagePositionPatient[2])
    )
    algorithm = hd.AlgorithmIdentificationSequence(name="x", family=codes.cid7162.ArtificialIntelligence, version="1")
    descriptions = [
        _description(1, "spleen", codes.SCT.Spleen, algorithm),
        _description(2, "liver", codes.SCT.Liver, algorithm),  # empty in this SEG
        _description(3, "kidney", codes.SCT.Kidney, algorithm),
    ]
    array = np.zeros((4, 16, 16), np.uint8)
    array[1, 2:5, 2:5], array[2, 6:9, 6:9] = 1, 3
    seg = hd.seg.Segmentation(
        ct, array, "BINARY", descriptions, generate_uid(), 9, generate_uid(), 1, "x", "x", "1", "1"
    )
    (tmp_path / "seg").mkdir()
    seg.save_as(tmp_path / "seg" / "in.dcm")
    volume = io.read_label_map(tmp_path / "seg" / "in.dcm")
    assert volume.labels == [1, 3]
    io.write_label_map(volume, tmp_path / "seg" / "out.dcm")
    written = pydicom.dcmread(tmp_path / "seg" / "out.dcm")
    assert [(int(s.SegmentNumber), s.SegmentLabel) for s in written.SegmentSequence] == [
        (1, "spleen"), (2, "liver"), (3, "kidney"),
    ]  # fmt: skip
    np.testing.assert_array_equal(io.read_label_map(tmp_path / "seg" / "out.dcm").array, volume.array)


def test_a_seg_with_two_segments_of_one_level_is_refused_not_merged(ts_seg, tmp_path):
    # segment 4 (the real L4) mislabelled L3: reading it as one L3 would lose a segment and refine two bones as one
    seg = pydicom.dcmread(ts_seg)
    item = next(s for s in seg.SegmentSequence if int(s.SegmentNumber) == 4)
    item.SegmentLabel = "vertebrae_L3"
    item.SegmentedPropertyTypeCodeSequence[0].CodeValue = codes.SCT.L3Vertebra.value
    item.SegmentedPropertyTypeCodeSequence[0].CodeMeaning = codes.SCT.L3Vertebra.meaning
    twin = tmp_path / "twin.dcm"
    seg.save_as(twin)
    with pytest.raises(InputError, match="segments 3 and 4 both name L3"):
        io.read_label_map(twin)
