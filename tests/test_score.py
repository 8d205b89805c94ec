"""Scoring: regions, missing and extra labels, grids, file pairing, batches, summary and outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from vertrefine.errors import InputError
from vertrefine.labels import parse_label_selection
from vertrefine.metrics import METRIC_KEYS, confusion_counts, surface_distances
from vertrefine.score import (
    ROW_KEYS,
    ScoreResult,
    pair_files,
    plan_labels,
    score_case,
    score_pairs,
    summarize,
    write_csv,
    write_json,
)
from vertrefine.volume import Geometry, Source, Volume

SHAPE = (44, 52, 140)  # longer than a patch along x, so the image and the patch hold different backgrounds
PATCH_VOXELS = 128**3


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grids = np.indices(shape, dtype=float)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True)) <= 1.0


def _spine(shape=SHAPE, shift=(0, 0, 0), labels=(20, 21, 22)) -> np.ndarray:
    """Vertebra-like blobs side by side along x (kept simple: ellipsoids), optionally shifted."""
    array = np.zeros(shape, dtype=np.uint8)
    for n, label in enumerate(labels):
        centre = (shape[0] / 2 + shift[0], shape[1] / 2 + shift[1], 30 + 40 * n + shift[2])
        array[_ellipsoid(shape, centre, (12, 15, 16))] = label
    return array


def _volume(array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), path: str | None = None) -> Volume:
    geometry = Geometry(array.shape, spacing, origin)
    return Volume(array, geometry, Source(Path(path) if path else None, "nifti" if path else "memory"))


def _by_label(rows: list[dict]) -> dict[int, dict]:
    return {row["label"]: row for row in rows}


# ------------------------------------------------------------------------------------------ score_case


def test_patch_and_image_regions_share_tp_fp_fn_but_not_tn() -> None:
    gt_array = _spine()
    pred_array = _spine(shift=(1, -2, 1))
    gt, pred = _volume(gt_array), _volume(pred_array)
    patch = _by_label(score_case("c1", pred, gt, region="patch"))
    image = _by_label(score_case("c1", pred, gt, region="image"))
    assert sorted(patch) == sorted(image) == [20, 21, 22]
    n_image = gt_array.size
    for label in (20, 21, 22):
        tp, fp, fn, tn = confusion_counts(pred_array == label, gt_array == label)
        # Each vertebra (true and predicted) lies inside its 128^3 patch: only TN differs.
        tn_patch = PATCH_VOXELS - tp - fp - fn
        assert tn == n_image - tp - fp - fn
        for key in ("dsc", "vs", "sen", "hd95_mm", "assd_mm"):
            assert patch[label][key] == pytest.approx(image[label][key], abs=1e-12), key
        assert image[label]["spec"] == pytest.approx(tn / (tn + fp))
        assert patch[label]["spec"] == pytest.approx(tn_patch / (tn_patch + fp))
        assert patch[label]["spec"] != pytest.approx(image[label]["spec"], abs=1e-9)
        assert patch[label]["nmi"] != pytest.approx(image[label]["nmi"], abs=1e-6)
        assert 0.6 < patch[label]["dsc"] < 0.95
        assert patch[label]["level"] == {20: "L1", 21: "L2", 22: "L3"}[label]
        assert patch[label]["extra"] is False
        assert list(patch[label]) == list(ROW_KEYS)


def test_missing_and_extra_labels() -> None:
    gt = _volume(_spine(labels=(20, 21, 22)))
    pred_array = _spine(labels=(20, 21, 25))  # L3 missing, "L6" where L3 should be
    rows = score_case("c2", _volume(pred_array), gt, region="patch")
    by_label = _by_label(rows)
    assert [r["label"] for r in rows] == [20, 21, 22, 25]
    missing = by_label[22]
    assert (missing["dsc"], missing["vs"], missing["sen"]) == (0.0, 0.0, 0.0)
    assert (missing["hd95_mm"], missing["assd_mm"]) == (None, None)
    assert missing["extra"] is False
    extra = by_label[25]
    assert extra["extra"] is True and extra["level"] == "L6"
    assert (extra["dsc"], extra["sen"], extra["hd95_mm"], extra["assd_mm"]) == (0.0, None, None, None)
    assert by_label[20]["dsc"] == 1.0 and by_label[20]["hd95_mm"] == 0.0


def test_empty_prediction_gives_zero_dice_and_null_distances() -> None:
    gt = _volume(_spine(labels=(20,)))
    rows = score_case("c3", _volume(np.zeros(SHAPE, np.uint8)), gt, region="image")
    assert len(rows) == 1
    assert rows[0]["dsc"] == 0.0 and rows[0]["hd95_mm"] is None and rows[0]["assd_mm"] is None


def test_image_region_uses_native_spacing_in_array_order() -> None:
    spacing_ijk = (0.8, 0.8, 3.0)  # (sx, sy, sz): thick slices along k
    gt_array = np.zeros((20, 40, 40), np.uint8)
    gt_array[5:12, 10:30, 8:32] = 20
    pred_array = np.roll(gt_array, 1, axis=0)  # one slice up: 3 mm
    gt, pred = _volume(gt_array, spacing_ijk), _volume(pred_array, spacing_ijk)
    row = score_case("c4", pred, gt, region="image")[0]
    expected = surface_distances(pred_array == 20, gt_array == 20, (3.0, 0.8, 0.8))
    assert (row["hd95_mm"], row["assd_mm"]) == pytest.approx(expected)
    assert row["hd95_mm"] == pytest.approx(3.0)
    wrong_order = surface_distances(pred_array == 20, gt_array == 20, spacing_ijk)
    assert row["assd_mm"] != pytest.approx(wrong_order[1])


def test_patch_region_on_an_anisotropic_grid() -> None:
    gt_array = np.zeros((24, 50, 50), np.uint8)
    gt_array[8:16, 10:40, 12:38] = 21
    gt = _volume(gt_array, (0.7, 0.7, 2.5), origin=(-10.0, 5.0, 30.0))
    rows = score_case("c5", _volume(gt_array.copy(), (0.7, 0.7, 2.5), origin=(-10.0, 5.0, 30.0)), gt)
    assert rows[0]["dsc"] == 1.0 and rows[0]["hd95_mm"] == 0.0 and rows[0]["nmi"] == pytest.approx(1.0)
    shifted = _volume(np.roll(gt_array, 1, axis=0), (0.7, 0.7, 2.5), origin=(-10.0, 5.0, 30.0))
    row = score_case("c5", shifted, gt)[0]
    # On the 1 mm working grid a one-slice shift is 2-3 mm (nearest-neighbour voxel edges).
    assert 1.5 <= row["hd95_mm"] <= 3.5
    assert row["dsc"] == pytest.approx(7 / 8, abs=0.06)


def test_different_grids_need_resample() -> None:
    gt_array = _spine(labels=(20, 21))
    gt = _volume(gt_array, path="gt/case.nii.gz")
    coarse = gt_array[::2, ::2, ::2]  # the same anatomy on a 2 mm grid, voxel centres on the 1 mm lattice
    pred = _volume(coarse, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), path="pred/case.nii.gz")
    with pytest.raises(InputError) as caught:
        score_case("case", pred, gt)
    message = str(caught.value)
    assert "pred/case.nii.gz" in message and "gt/case.nii.gz" in message
    assert pred.geometry.describe() in message and gt.geometry.describe() in message
    assert "--resample" in message
    for region in ("patch", "image"):
        rows = score_case("case", pred, gt, region=region, resample=True)
        assert [r["label"] for r in rows] == [20, 21]
        assert all(r["dsc"] > 0.85 for r in rows)


def test_unknown_region() -> None:
    vol = _volume(_spine(labels=(20,)))
    with pytest.raises(ValueError, match="region"):
        score_case("c", vol, vol, region="slab")


# ------------------------------------------------------------------------------------------ pairing


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _dicom(path: Path, modality: str) -> Path:
    """A header-only DICOM file: a SEG object or one slice of an image series."""
    sop_class = "1.2.840.10008.5.1.4.1.1.66.4" if modality == "SEG" else "1.2.840.10008.5.1.4.1.1.4"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID, dataset.Modality = sop_class, meta.MediaStorageSOPInstanceUID, modality
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_pair_files_folders_with_unpaired_on_both_sides(tmp_path: Path) -> None:
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    _touch(pred / "a.nii.gz"), _touch(gt / "a.nii")
    _touch(pred / "b.nii.gz"), _dicom(gt / "b.dcm", "SEG")  # a DICOM SEG file is a case
    _touch(pred / "c" / "1.dcm"), _touch(gt / "c" / "slice1.dcm")  # DICOM folders: cases by folder name
    _touch(pred / "only_pred.nii.gz"), _touch(gt / "only_gt.nii.gz")
    _touch(pred / ".a.nii.gz.part.nii.gz"), _touch(gt / "notes.txt")  # ignored
    pairs, only_pred, only_gt = pair_files(pred, gt)
    assert pairs == [
        ("a", pred / "a.nii.gz", gt / "a.nii"),
        ("b", pred / "b.nii.gz", gt / "b.dcm"),
        ("c", pred / "c", gt / "c"),
    ]
    assert only_pred == [pred / "only_pred.nii.gz"]
    assert only_gt == [gt / "only_gt.nii.gz"]


def test_pair_files_folders_of_seg_files_and_series_folders(tmp_path: Path) -> None:
    segs, series = tmp_path / "segs", tmp_path / "series"
    _dicom(segs / "p1.dcm", "SEG"), _dicom(segs / "p2.dcm", "SEG")
    _dicom(series / "p1" / "IM0001", "MR"), _dicom(series / "p1" / "IM0002", "MR")  # no extension
    _dicom(series / "p3" / "IM0001", "MR")
    assert pair_files(segs, series) == ([("p1", segs / "p1.dcm", series / "p1")], [segs / "p2.dcm"], [series / "p3"])
    # A folder holding one series' slices is one label map, paired like a file.
    assert pair_files(series / "p1", series / "p3") == ([("p3", series / "p1", series / "p3")], [], [])
    _touch(segs / "p1.nii.gz")
    with pytest.raises(InputError, match="share the case name"):
        pair_files(segs, series)


def test_pair_files_single_files_and_bad_mixes(tmp_path: Path) -> None:
    p, g = _touch(tmp_path / "x" / "pred_seg.nii.gz"), _touch(tmp_path / "y" / "spine_7.nii.gz")
    assert pair_files(p, g) == ([("spine_7", p, g)], [], [])
    folder = tmp_path / "cases"
    _touch(folder / "spine_7.nii.gz")
    with pytest.raises(InputError, match="single label map .* folder of cases"):
        pair_files(p, folder)
    with pytest.raises(InputError, match="single label map .* folder of cases"):
        pair_files(folder, g)
    with pytest.raises(InputError, match="does not exist"):
        pair_files(tmp_path / "nope.nii.gz", g)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no"):
        pair_files(tmp_path / "empty", folder)


# ------------------------------------------------------------------------------------------ batches


def _write_nifti(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(_volume(array, spacing).to_sitk(), str(path))
    return path


def test_score_pairs_end_to_end_goes_on_past_a_bad_case(tmp_path: Path) -> None:
    shape = (40, 48, 96)
    truth = _spine(shape, labels=(20, 21))
    _write_nifti(truth, tmp_path / "gt" / "good.nii.gz")
    _write_nifti(np.roll(truth, 2, axis=2), tmp_path / "pred" / "good.nii.gz")
    _write_nifti(truth, tmp_path / "gt" / "empty.nii.gz")
    _write_nifti(np.zeros(shape, np.uint8), tmp_path / "pred" / "empty.nii.gz")
    _write_nifti(truth, tmp_path / "gt" / "broken.nii.gz")
    (tmp_path / "pred" / "broken.nii.gz").write_bytes(b"not a nifti file at all")
    _write_nifti(truth, tmp_path / "gt" / "coarse.nii.gz")
    _write_nifti(truth[:, :, ::2], tmp_path / "pred" / "coarse.nii.gz", spacing=(2.0, 1.0, 1.0))

    pairs, only_pred, only_gt = pair_files(tmp_path / "pred", tmp_path / "gt")
    assert [p[0] for p in pairs] == ["broken", "coarse", "empty", "good"] and not only_pred and not only_gt
    errors, seen = [], []
    result = score_pairs(
        pairs, region="patch", resample=False, on_error=lambda c, m: errors.append(c), on_case=seen.append
    )
    assert isinstance(result, ScoreResult)
    assert seen == ["broken", "coarse", "empty", "good"]
    assert [case for case, _ in result.errors] == errors == ["broken", "coarse"]
    assert "broken.nii.gz" in result.errors[0][1]
    assert "--resample" in result.errors[1][1]
    rows = {(r["case"], r["label"]): r for r in result.rows}
    assert set(rows) == {("empty", 20), ("empty", 21), ("good", 20), ("good", 21)}
    assert rows["empty", 20]["dsc"] == 0.0 and rows["empty", 20]["hd95_mm"] is None
    assert 0.7 < rows["good", 20]["dsc"] < 1.0

    resampled = score_pairs(pairs[1:2], region="image", resample=True)
    assert not resampled.errors and len(resampled.rows) == 2
    assert all(r["dsc"] > 0.9 for r in resampled.rows)


# ------------------------------------------------------------------------------------------ summary, outputs


def _row(case: str, label: int, dsc: float, hd: float | None, extra: bool = False) -> dict:
    row = {"case": case, "label": label, "level": f"L{label - 19}", **{k: 0.5 for k in METRIC_KEYS}}
    row.update({"dsc": dsc, "hd95_mm": hd, "assd_mm": hd, "extra": extra})
    return row


ROWS = [
    _row("a", 20, 0.8, 2.0),
    _row("a", 21, 0.6, None),
    _row("b", 20, 0.9, 4.0),
    _row("b", 21, 0.7, 3.0),
    _row("b", 25, 0.0, None, extra=True),
]


def test_summarize_means_stds_counts() -> None:
    summary = summarize(ROWS)
    assert summary["n_cases"] == 2 and summary["n_vertebrae"] == 4
    assert list(summary["per_level"]) == ["L1", "L2"]
    l1 = summary["per_level"]["L1"]
    assert l1["label"] == 20 and l1["n"] == 2
    assert l1["dsc"] == {"mean": pytest.approx(0.85), "std": pytest.approx(0.05), "n": 2}
    l2 = summary["per_level"]["L2"]
    assert l2["hd95_mm"] == {"mean": 3.0, "std": 0.0, "n": 1}  # the null is skipped
    overall = summary["overall"]
    assert overall["n"] == 4  # the extra row is listed, not averaged
    assert overall["dsc"]["mean"] == pytest.approx(0.75)
    assert overall["dsc"]["std"] == pytest.approx(np.std([0.8, 0.6, 0.9, 0.7]))
    assert overall["hd95_mm"]["n"] == 3 and overall["hd95_mm"]["mean"] == pytest.approx(3.0)
    assert summary["extra_labels"] == [{"case": "b", "label": 25, "level": "L6"}]
    assert summarize([])["overall"]["dsc"] == {"mean": None, "std": None, "n": 0}


def test_json_and_csv_shape(tmp_path: Path) -> None:
    summary = summarize(ROWS)
    write_json(ROWS, summary, tmp_path / "scores.json")
    document = json.loads((tmp_path / "scores.json").read_text())
    assert set(document) == {"cases", "summary"}
    assert len(document["cases"]) == 5
    first = document["cases"][1]
    assert list(first)[:11] == ["case", "label", "level", "dsc", "vs", "sen", "spec", "nmi", "ck", "hd95_mm", "assd_mm"]
    assert first["case"] == "a" and first["hd95_mm"] is None
    assert document["summary"]["overall"]["dsc"]["mean"] == pytest.approx(0.75)
    assert "null" in (tmp_path / "scores.json").read_text()

    write_csv(ROWS, tmp_path / "scores.csv")
    with (tmp_path / "scores.csv").open(newline="") as handle:
        records = list(csv.DictReader(handle))
    assert list(records[0]) == list(ROW_KEYS)
    assert records[1]["hd95_mm"] == "" and float(records[0]["dsc"]) == 0.8
    assert records[4]["extra"] == "True"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv", "scores.json"]  # no temp files left


def test_json_maps_nan_and_numpy_values_to_plain_json(tmp_path: Path) -> None:
    rows = [_row("a", 20, float("nan"), np.float64(1.5))]
    write_json(rows, summarize(rows), tmp_path / "s.json")
    document = json.loads((tmp_path / "s.json").read_text())
    assert document["cases"][0]["dsc"] is None and document["cases"][0]["hd95_mm"] == 1.5


# ------------------------------------------------------------------------------------------ which labels


def test_only_vertebrae_enter_the_means_discs_and_subregions_are_listed_apart(tmp_path: Path) -> None:
    truth = _spine(labels=(20, 21, 22))
    truth[:4, :4, :4] = 121  # a disc, as SPINEPS numbers them (100 + the vertebra above)
    truth[-4:, -4:, -4:] = 26  # sacrum: not a vertebra the means are about
    gt_path = _write_nifti(truth, tmp_path / "gt" / "c.nii.gz")
    pred_path = _write_nifti(truth, tmp_path / "pred" / "c.nii.gz")
    result = score_pairs([("c", pred_path, gt_path)], region="image")
    assert [row["label"] for row in result.rows] == [20, 21, 22]
    assert result.ignored == [
        {"case": "c", "label": 26, "name": "sacrum"},
        {"case": "c", "label": 121, "name": "label 121"},
    ]
    assert any("VerSe" in note for note in result.notes)
    chosen = score_pairs([("c", pred_path, gt_path)], region="image", labels=parse_label_selection("L2,sacrum"))
    assert [row["level"] for row in chosen.rows] == ["L2", "sacrum"]
    write_json(result.rows, summarize(result.rows), tmp_path / "s.json", ignored=result.ignored)
    assert json.loads((tmp_path / "s.json").read_text())["summary"]["ignored_labels"][1]["label"] == 121


def test_a_totalsegmentator_prediction_is_scored_against_a_verse_truth_by_level() -> None:
    gt = _volume(_spine(labels=(20, 21, 22)))  # VerSe L1-L3
    pred_array = _spine(labels=(31, 30, 29))  # TotalSegmentator v2 L1-L3 ...
    pred_array[:6, :6, :6] = 5  # ... with a liver
    rows = score_case("c", _volume(pred_array), gt, region="image")
    assert [(row["label"], row["level"], row["dsc"]) for row in rows] == [
        (20, "L1", 1.0),
        (21, "L2", 1.0),
        (22, "L3", 1.0),
    ]
    plan = plan_labels(_volume(pred_array), gt)
    assert plan.extra == [] and any("TotalSegmentator" in note for note in plan.notes)


def test_a_missing_prediction_is_scored_as_empty_and_listed(tmp_path: Path) -> None:
    truth = _spine(labels=(20, 21))
    gt_path = _write_nifti(truth, tmp_path / "gt" / "gone.nii.gz")
    result = score_pairs([("gone", None, gt_path)], region="image")
    assert result.missing == ["gone"] and not result.errors
    assert [(row["dsc"], row["prediction_missing"]) for row in result.rows] == [(0.0, True), (0.0, True)]
    summary = summarize(result.rows)
    assert summary["missing_predictions"] == ["gone"] and summary["overall"]["dsc"]["mean"] == 0.0
