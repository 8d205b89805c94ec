"""Score predicted label maps against ground truth per vertebra: pair files, compute metrics, tabulate.

Protocol (``region="patch"``, the paper's): both label maps go onto the 1 mm working grid (nearest
neighbour, identically), and each ground-truth vertebra is scored on the 128^3 patch centred on its
centre of mass, with 1 mm spacing. ``region="image"`` scores on the whole ground-truth grid at its native
spacing. SPEC, NMI and CK count true negatives, so they depend on the region; DSC, VS, SEN and the
surface distances do not (as long as the vertebra fits in the patch).

Rows: one per vertebra label of the ground truth, plus one per label found only in the prediction,
flagged ``"extra": True`` (scored on a patch centred on the predicted label: DSC 0, VS 0, NMI 0, CK 0,
SEN null since there are no true voxels to find, null distances). Extra rows are listed in the summary
but not averaged with the ground-truth vertebrae.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from . import io as vio
from . import spatial
from .atomic import atomic_path
from .cases import Case, case_name, find_cases
from .errors import InputError, VertrefineError
from .labels import level_name
from .metrics import METRIC_KEYS, vertebra_metrics
from .volume import Geometry, Volume

REGIONS: tuple[str, ...] = ("patch", "image")
ROW_KEYS: tuple[str, ...] = ("case", "label", "level", *METRIC_KEYS, "extra")
PATCH_SIZE = spatial.PATCH_SIZE
WORKING_SPACING_MM = spatial.WORKING_SPACING_MM

Pair = tuple[str, Path, Path]


# --------------------------------------------------------------------------------------------- pairing


def _as_cases(path: Path) -> tuple[bool, list[Case]]:
    """``(single, cases)``: a file or a DICOM series folder is one case; any other folder holds cases."""
    if not path.exists():
        raise InputError(path, "does not exist", "check the path")
    if path.is_file():
        return True, [Case(case_name(path), path)]
    cases = find_cases(path)
    if len(cases) == 1 and cases[0].path == path:
        return True, cases
    if not cases:
        raise InputError(path, "holds no NIfTI or DICOM label maps", "point at a label map or a folder of them")
    return False, cases


def pair_files(pred: str | Path, gt: str | Path) -> tuple[list[Pair], list[Path], list[Path]]:
    """Pair predictions with ground truths: ``(pairs, unpaired_pred, unpaired_gt)``.

    ``pred`` and ``gt`` are both single label maps (a NIfTI or DICOM file, or a DICOM series/SEG folder),
    giving one pair named by the ground truth's case name, or both folders of cases, paired by case
    name (the file name without .nii.gz/.nii/.dcm, or the sub-folder name). Pairs are sorted by name.
    """
    pred, gt = Path(pred), Path(gt)
    pred_single, pred_cases = _as_cases(pred)
    gt_single, gt_cases = _as_cases(gt)
    if pred_single != gt_single:
        one, many = (pred, gt) if pred_single else (gt, pred)
        raise InputError(
            one,
            f"is a single label map but {many} is a folder of cases",
            "give two files (or DICOM folders) or two folders of cases",
        )
    if pred_single:
        return [(gt_cases[0].name, pred_cases[0].path, gt_cases[0].path)], [], []
    by_name_pred = {c.name: c.path for c in pred_cases}
    by_name_gt = {c.name: c.path for c in gt_cases}
    pairs = [(name, by_name_pred[name], by_name_gt[name]) for name in sorted(by_name_gt) if name in by_name_pred]
    unpaired_pred = [by_name_pred[n] for n in sorted(by_name_pred) if n not in by_name_gt]
    unpaired_gt = [by_name_gt[n] for n in sorted(by_name_gt) if n not in by_name_pred]
    return pairs, unpaired_pred, unpaired_gt


# --------------------------------------------------------------------------------------------- one case


def _name(volume: Volume, fallback: str) -> str:
    return str(volume.source.path) if volume.source.path is not None else fallback


def _array_spacing(geometry: Geometry) -> tuple[float, float, float]:
    """Voxel size in array axis order ``(sz, sy, sx)`` (Geometry.spacing is ITK order ``(sx, sy, sz)``)."""
    sx, sy, sz = geometry.spacing
    return (sz, sy, sx)


def _row(case: str, label: int, metrics: dict[str, float | None], *, extra: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"case": case, "label": int(label), "level": level_name(label)}
    row.update({key: metrics[key] for key in METRIC_KEYS})
    if extra:
        row["sen"] = None  # no true voxels: sensitivity is undefined
    row["extra"] = extra
    return row


def _centroids(array: np.ndarray, labels: Sequence[int]) -> dict[int, tuple[float, float, float] | None]:
    """Centre of mass ``(k, j, i)`` of each label in ``array`` (None when the label is absent)."""
    if not labels:
        return {}
    centres = ndimage.center_of_mass(array != 0, array, list(labels))
    return {
        int(lab): (None if any(math.isnan(c) for c in centre) else tuple(float(c) for c in centre))
        for lab, centre in zip(labels, centres, strict=True)
    }


def _native_centroid_on(volume: Volume, label: int, target: Geometry) -> tuple[float, float, float]:
    """Centre of mass of ``label`` in ``volume``, as continuous ``(k, j, i)`` indices of ``target``."""
    kji = ndimage.center_of_mass(volume.array == label)
    lps = volume.geometry.index_to_physical(np.asarray(kji[::-1]))
    i, j, k = target.physical_to_index(lps)
    return (float(k), float(j), float(i))


def _score_patches(
    case: str, pred: Volume, gt: Volume, gt_labels: list[int], extra_labels: list[int]
) -> list[dict[str, Any]]:
    gt_w = spatial.to_working_grid(gt, spacing=WORKING_SPACING_MM, method="nearest")
    # Same source grid, same target grid, same interpolator: the two maps are resampled identically.
    pred_w = spatial.resample_labels(pred, gt_w.geometry, method="nearest")
    spacing = (WORKING_SPACING_MM,) * 3
    rows = []
    for labels, source, work, extra in ((gt_labels, gt, gt_w, False), (extra_labels, pred, pred_w, True)):
        centres = _centroids(work.array, labels)
        for label in labels:
            # A label too small to survive resampling is still scored, around its native centre.
            centre = centres[label] or _native_centroid_on(source, label, gt_w.geometry)
            box = spatial.patch_box(centre, size=PATCH_SIZE)
            pred_patch = spatial.crop(pred_w.array, box) == label
            gt_patch = spatial.crop(gt_w.array, box) == label
            rows.append(_row(case, label, vertebra_metrics(pred_patch, gt_patch, spacing), extra=extra))
    return rows


def _score_image(
    case: str, pred: Volume, gt: Volume, gt_labels: list[int], extra_labels: list[int]
) -> list[dict[str, Any]]:
    spacing = _array_spacing(gt.geometry)
    rows = []
    for labels, extra in ((gt_labels, False), (extra_labels, True)):
        for label in labels:
            metrics = vertebra_metrics(pred.array == label, gt.array == label, spacing)
            rows.append(_row(case, label, metrics, extra=extra))
    return rows


def score_case(
    case: str, pred: Volume, gt: Volume, *, region: str = "patch", resample: bool = False
) -> list[dict[str, Any]]:
    """Per-vertebra metric rows of one prediction against its ground truth.

    Keys of each row: ``case, label, level, dsc, vs, sen, spec, nmi, ck, hd95_mm, assd_mm, extra``
    (distances in mm, None where undefined). Grids must match unless ``resample`` is set, in which case
    the prediction is put on the ground truth's grid by nearest neighbour.
    """
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    if not pred.geometry.same_grid(gt.geometry):
        if not resample:
            raise InputError(
                _name(pred, "prediction"),
                f"grid {pred.geometry.describe()} differs from the ground truth "
                f"{_name(gt, 'ground truth')} grid {gt.geometry.describe()}",
                "pass --resample to put the prediction on the ground truth's grid (nearest neighbour)",
            )
        pred = spatial.resample_labels(pred, gt.geometry, method="nearest")
    gt_labels = gt.labels
    extra_labels = [lab for lab in pred.labels if lab not in set(gt_labels)]
    if region == "patch":
        return _score_patches(case, pred, gt, gt_labels, extra_labels)
    return _score_image(case, pred, gt, gt_labels, extra_labels)


# --------------------------------------------------------------------------------------------- batches


@dataclass
class ScoreResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    """``(case, message)`` of every case that could not be scored."""
    warnings: list[tuple[str, str]] = field(default_factory=list)
    """``(case, message)`` of what reading an input had to decide (e.g. which of qform and sform is used)."""

    def summary(self) -> dict[str, Any]:
        return summarize(self.rows)


def score_pairs(
    pairs: Iterable[Pair],
    *,
    region: str = "patch",
    resample: bool = False,
    on_error: Callable[[str, str], None] | None = None,
    on_case: Callable[[str], None] | None = None,
    assume_orientation: str | None = None,
) -> ScoreResult:
    """Score every ``(case, pred_path, gt_path)``; a failing case is recorded and the others go on.

    ``on_error(case, message)`` is called when a case fails, ``on_case(case)`` after every case (for
    progress). Set ``VERTREFINE_DEBUG=1`` to let unexpected exceptions through with their traceback.
    ``assume_orientation`` is passed to :func:`vertrefine.io.read_label_map` for both files.
    """
    result = ScoreResult()
    for case, pred_path, gt_path in pairs:
        try:
            gt = vio.read_label_map(gt_path, assume_orientation=assume_orientation)
            pred = vio.read_label_map(pred_path, allow_empty=True, assume_orientation=assume_orientation)
            for path, volume in ((pred_path, pred), (gt_path, gt)):
                result.warnings += [(case, f"{path}: {line}") for line in volume.source.warnings]
            result.rows.extend(score_case(case, pred, gt, region=region, resample=resample))
        except Exception as exc:  # noqa: BLE001 - a batch goes on past any failed case
            if not isinstance(exc, VertrefineError) and os.environ.get("VERTREFINE_DEBUG"):
                raise
            message = str(exc) if isinstance(exc, VertrefineError) else f"{type(exc).__name__}: {exc}"
            result.errors.append((case, message))
            if on_error is not None:
                on_error(case, message)
        if on_case is not None:
            on_case(case)
    return result


def _stats(values: Iterable[float | None]) -> dict[str, Any]:
    present = np.array([v for v in values if v is not None], dtype=np.float64)
    if present.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(present.mean()), "std": float(present.std()), "n": int(present.size)}


def _block(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"n": len(rows), **{key: _stats(row.get(key) for row in rows) for key in METRIC_KEYS}}


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and population std (ddof 0) of each metric per level and over all ground-truth vertebrae.

    Shape: ``{"n_cases", "n_vertebrae", "overall": {"n", <metric>: {"mean", "std", "n"}, ...},
    "per_level": {level: {"label", "n", <metric>: {...}}}, "extra_labels": [{"case", "label", "level"}]}``.
    Nulls are skipped (each metric's ``n`` says how many values it averages); levels are ordered by label
    id; extra (prediction-only) rows are listed, not averaged.
    """
    truth_rows = [r for r in rows if not r.get("extra")]
    per_level: dict[str, Any] = {}
    for label in sorted({int(r["label"]) for r in truth_rows}):
        group = [r for r in truth_rows if int(r["label"]) == label]
        per_level[level_name(label)] = {"label": label, **_block(group)}
    return {
        "n_cases": len({r["case"] for r in rows}),
        "n_vertebrae": len(truth_rows),
        "overall": _block(truth_rows),
        "per_level": per_level,
        "extra_labels": [
            {"case": r["case"], "label": int(r["label"]), "level": level_name(int(r["label"]))}
            for r in rows
            if r.get("extra")
        ],
    }


# --------------------------------------------------------------------------------------------- outputs


def _plain(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to None, containers recursively."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """One line per row, columns ``ROW_KEYS``; None is an empty cell. Written atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ROW_KEYS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            plain = _plain(dict(row))
            writer.writerow({key: "" if plain.get(key) is None else plain[key] for key in ROW_KEYS})


def write_json(rows: Sequence[dict[str, Any]], summary: dict[str, Any], path: str | Path) -> None:
    """``{"cases": [row, ...], "summary": summary}`` with None as null. Written atomically."""
    document = {"cases": _plain([dict(r) for r in rows]), "summary": _plain(summary)}
    text = json.dumps(document, indent=2, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
