"""Score predicted label maps against ground truth per vertebra: pair files, compute metrics, tabulate.

Protocol (``region="patch"``, the paper's): both label maps go onto the 1 mm working grid (nearest
neighbour, identically), and each ground-truth vertebra is scored on the 128^3 patch centred on its
centre of mass, with 1 mm spacing. ``region="image"`` scores on the whole ground-truth grid at its native
spacing. SPEC, NMI and CK count true negatives, so they depend on the region; DSC, VS, SEN and the
surface distances do not (as long as the vertebra fits in the patch).

Which labels are scored (:func:`plan_labels`): the vertebrae of each file's label numbering
(:mod:`vertrefine.labels`; VerSe, TotalSegmentator ..., recognised from its ids, or a DICOM SEG's segment
codes), not sacrum or coccyx; ``--labels`` chooses others. A ground-truth vertebra is compared with the
prediction's label of the same level, so a TotalSegmentator prediction can be scored against a VerSe
truth. Other structures (organs, SPINEPS's discs at 100+, subregions) are not scored: they are listed
apart (``ignored_labels`` of the summary).

Rows: one per scored vertebra of the ground truth, plus one per vertebra found only in the prediction,
flagged ``"extra": True`` (scored on a patch centred on the predicted label: DSC 0, VS 0, NMI 0, CK 0,
SEN null since there are no true voxels to find, null distances). Extra rows are listed in the summary
but not averaged with the ground-truth vertebrae. A case whose prediction is missing is scored as an
empty prediction (DSC 0 for each of its vertebrae, rows flagged ``"prediction_missing": True``) and
listed in the summary's ``missing_predictions``: it stays in the means.
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
from .conventions import PATCH_SIZE, WORKING_SPACING_MM
from .errors import InputError, VertrefineError
from .labels import LEVELS, LabelScheme, LabelSelection, label_scheme_of
from .metrics import METRIC_KEYS, vertebra_metrics
from .volume import Geometry, Volume

REGIONS: tuple[str, ...] = ("patch", "image")
ROW_KEYS: tuple[str, ...] = ("case", "label", "level", *METRIC_KEYS, "extra", "prediction_missing")

Pair = tuple[str, Path | None, Path]
"""(case, prediction or None when it is missing, ground truth)."""


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
    name in any letter case (the file name without .nii.gz/.nii/.dcm, or the sub-folder name), named by the
    ground truth's. Pairs are sorted by name.
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
    by_key_pred, by_key_gt = _by_key(pred_cases), _by_key(gt_cases)
    pairs = [(c.name, by_key_pred[k].path, c.path) for k, c in sorted(by_key_gt.items()) if k in by_key_pred]
    unpaired_pred = [c.path for k, c in sorted(by_key_pred.items()) if k not in by_key_gt]
    unpaired_gt = [c.path for k, c in sorted(by_key_gt.items()) if k not in by_key_pred]
    return sorted(pairs), unpaired_pred, unpaired_gt


def _by_key(cases: Sequence[Case]) -> dict[str, Case]:
    """The cases of one side by case name in any letter case (``CASE.NII.GZ`` pairs with ``case.nii.gz``, as
    refine names their outputs; :func:`vertrefine.cases.find_cases` refuses names that differ only so)."""
    return {case.name.casefold(): case for case in cases}


def no_pairs_message(pred: Path, gt: Path, unpaired_pred: Sequence[Path], unpaired_gt: Sequence[Path]) -> str:
    """The one line for two folders of which no prediction's case name is a ground truth's: how pairs are
    matched (by case name: the file name without .nii.gz/.nii/.dcm in any letter case, or the sub-folder
    name) and up to three names on each side, so a prefix or suffix that differs shows at once."""

    def some(paths: Sequence[Path]) -> str:
        names = [case_name(p) for p in paths]
        return ", ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "") or "none"

    return (
        f"no prediction in {pred} has the case name of a ground truth in {gt}: pairs are matched by case name "
        "(the file name without .nii.gz/.nii/.dcm, or the DICOM folder's name, in any letter case); "
        f"predictions: {some(unpaired_pred)}; ground truths: {some(unpaired_gt)}. "
        "Rename one side so that the names match"
    )


def with_missing(pairs: Sequence[Pair], unpaired_gt: Sequence[Path]) -> list[Pair]:
    """Every ground truth to score, by name: ``pairs`` plus ``(name, None, gt)`` for each ground truth
    without its prediction, which :func:`score_pairs` scores as an empty prediction (DSC 0) and lists as
    missing."""
    missing = [(case_name(path), None, path) for path in unpaired_gt]
    return sorted([*pairs, *missing], key=lambda pair: pair[0])


# --------------------------------------------------------------------------------------------- one case


def _name(volume: Volume, fallback: str) -> str:
    return str(volume.source.path) if volume.source.path is not None else fallback


def _array_spacing(geometry: Geometry) -> tuple[float, float, float]:
    """Voxel size in array axis order ``(sz, sy, sx)`` (Geometry.spacing is ITK order ``(sx, sy, sz)``)."""
    sx, sy, sz = geometry.spacing
    return (sz, sy, sx)


@dataclass
class LabelPlan:
    """Which labels of one case are scored, and how the prediction's ids match the truth's."""

    pairs: list[tuple[int, int, str]]
    """(ground-truth id, prediction id, level or name) of every scored vertebra of the truth."""
    extra: list[tuple[int, str]]
    """(prediction id, level or name) of predicted vertebrae the truth does not have."""
    ignored: list[tuple[int, str]]
    """(ground-truth id, name) of the truth's labels that are not scored (not vertebrae, or not chosen)."""
    notes: list[str]
    """Which numbering each file was read in (one line each)."""


def plan_labels(
    pred: Volume, gt: Volume, *, label_scheme: str = "auto", labels: LabelSelection | Sequence[int] | None = None
) -> LabelPlan:
    """The labels of a case to score (see the module docstring); each file is read in its own numbering
    (``label_scheme``: 'auto' or a key of :data:`vertrefine.labels.SCHEMES`, a SEG's codes always win)."""
    gt_scheme, gt_note = label_scheme_of(gt, label_scheme)
    pred_scheme, pred_note = label_scheme_of(pred, label_scheme) if pred.labels else (gt_scheme, "")
    selection = None if labels is None else LabelSelection.of(labels)

    def chosen(scheme: LabelScheme, present: Sequence[int]) -> list[int]:
        if selection is None:
            return sorted(scheme.vertebrae(present))
        return sorted(set(present) & selection.resolve(scheme))

    def key(scheme: LabelScheme, label: int) -> tuple[int, int]:  # head to feet, then id
        level = scheme.level(label)
        return (LEVELS.index(level) if level else len(LEVELS), label)

    by_level = bool(gt_scheme.levels) and bool(pred_scheme.levels) and pred_scheme is not gt_scheme
    pred_ids = chosen(pred_scheme, pred.labels)
    pairs = []
    for label in sorted(chosen(gt_scheme, gt.labels), key=lambda lab: key(gt_scheme, lab)):
        level = gt_scheme.level(label)
        match = label
        if by_level and level is not None:
            match = min(pred_scheme.ids_of_levels({level}), default=-1)
        pairs.append((label, match, gt_scheme.name(label)))
    matched = {match for _, match, _ in pairs}
    extra = [(label, pred_scheme.name(label)) for label in pred_ids if label not in matched]
    scored = {label for label, _, _ in pairs}
    ignored = [(label, gt_scheme.name(label)) for label in gt.labels if label not in scored]
    notes = [f"ground truth: {gt_note}"] + ([f"prediction: {pred_note}"] if pred_note else [])
    return LabelPlan(pairs, extra, ignored, notes)


def _row(case: str, label: int, level: str, metrics: dict[str, float | None], *, extra: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"case": case, "label": int(label), "level": level}
    row.update({key: metrics[key] for key in METRIC_KEYS})
    if extra:
        row["sen"] = None  # no true voxels: sensitivity is undefined
    row["extra"] = extra
    row["prediction_missing"] = False
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


def _score_patches(case: str, pred: Volume, gt: Volume, plan: LabelPlan) -> list[dict[str, Any]]:
    gt_w = spatial.to_working_grid(gt, spacing=WORKING_SPACING_MM, method="nearest")
    # Same source grid, same target grid, same interpolator: the two maps are resampled identically.
    pred_w = spatial.resample_labels(pred, gt_w.geometry, method="nearest")
    spacing = (WORKING_SPACING_MM,) * 3
    rows = []
    truth = [(gt_id, pred_id, name) for gt_id, pred_id, name in plan.pairs]
    extra = [(-1, pred_id, name) for pred_id, name in plan.extra]
    for items, source, work, is_extra in ((truth, gt, gt_w, False), (extra, pred, pred_w, True)):
        centred = [pred_id if is_extra else gt_id for gt_id, pred_id, _ in items]
        centres = _centroids(work.array, centred)
        for (gt_id, pred_id, name), label in zip(items, centred, strict=True):
            # A label too small to survive resampling is still scored, around its native centre.
            centre = centres[label] or _native_centroid_on(source, label, gt_w.geometry)
            box = spatial.patch_box(centre, size=PATCH_SIZE)
            pred_patch = spatial.crop(pred_w.array, box) == pred_id
            gt_patch = spatial.crop(gt_w.array, box) == gt_id
            metrics = vertebra_metrics(pred_patch, gt_patch, spacing)
            rows.append(_row(case, label, name, metrics, extra=is_extra))
    return rows


def _score_image(case: str, pred: Volume, gt: Volume, plan: LabelPlan) -> list[dict[str, Any]]:
    spacing = _array_spacing(gt.geometry)
    rows = []
    for gt_id, pred_id, name in plan.pairs:
        metrics = vertebra_metrics(pred.array == pred_id, gt.array == gt_id, spacing)
        rows.append(_row(case, gt_id, name, metrics, extra=False))
    for pred_id, name in plan.extra:
        metrics = vertebra_metrics(pred.array == pred_id, np.zeros(gt.array.shape, bool), spacing)
        rows.append(_row(case, pred_id, name, metrics, extra=True))
    return rows


def score_case(
    case: str,
    pred: Volume,
    gt: Volume,
    *,
    region: str = "patch",
    resample: bool = False,
    label_scheme: str = "auto",
    labels: LabelSelection | Sequence[int] | None = None,
    plan: LabelPlan | None = None,
) -> list[dict[str, Any]]:
    """Per-vertebra metric rows of one prediction against its ground truth.

    Keys of each row: ``case, label, level, dsc, vs, sen, spec, nmi, ck, hd95_mm, assd_mm, extra,
    prediction_missing`` (distances in mm, None where undefined; ``label`` is the truth's id, or the
    prediction's for an extra row). Which labels: ``plan`` (default :func:`plan_labels` with
    ``label_scheme`` and ``labels``). Grids must match unless ``resample`` is set, in which case the
    prediction is put on the ground truth's grid by nearest neighbour.
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
    if plan is None:
        plan = plan_labels(pred, gt, label_scheme=label_scheme, labels=labels)
    if region == "patch":
        return _score_patches(case, pred, gt, plan)
    return _score_image(case, pred, gt, plan)


# --------------------------------------------------------------------------------------------- batches


@dataclass
class ScoreResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    """``(case, message)`` of every case that could not be scored."""
    warnings: list[tuple[str, str]] = field(default_factory=list)
    """``(case, message)`` of what reading an input had to decide (e.g. which of qform and sform is used)."""
    missing: list[str] = field(default_factory=list)
    """Cases whose prediction is missing (scored as empty predictions)."""
    ignored: list[dict[str, Any]] = field(default_factory=list)
    """``{"case", "label", "name"}`` of ground-truth labels not scored (not vertebrae, or not chosen)."""
    notes: list[str] = field(default_factory=list)
    """The distinct lines saying which numbering the files were read in."""

    def summary(self) -> dict[str, Any]:
        return summarize(self.rows)


def score_pairs(
    pairs: Iterable[Pair],
    *,
    region: str = "patch",
    resample: bool = False,
    label_scheme: str = "auto",
    labels: LabelSelection | Sequence[int] | None = None,
    on_error: Callable[[str, str], None] | None = None,
    on_case: Callable[[str], None] | None = None,
    assume_orientation: str | None = None,
) -> ScoreResult:
    """Score every ``(case, pred_path, gt_path)``; a failing case is recorded and the others go on.

    A ``pred_path`` of None is a missing prediction: the case is scored as an empty prediction, its rows
    are flagged ``prediction_missing`` and it is listed in ``ScoreResult.missing``. ``label_scheme`` and
    ``labels`` choose the labels scored (:func:`plan_labels`). ``on_error(case, message)`` is called when
    a case fails, ``on_case(case)`` after every case (for progress). Set ``VERTREFINE_DEBUG=1`` to let
    unexpected exceptions through with their traceback. ``assume_orientation`` is passed to
    :func:`vertrefine.io.read_label_map` for both files.
    """
    result = ScoreResult()
    for case, pred_path, gt_path in pairs:
        try:
            gt = vio.read_label_map(gt_path, assume_orientation=assume_orientation)
            if pred_path is None:
                pred = Volume(np.zeros_like(gt.array), gt.geometry)
            else:
                pred = vio.read_label_map(pred_path, allow_empty=True, assume_orientation=assume_orientation)
            for path, volume in ((pred_path, pred), (gt_path, gt)):
                result.warnings += [(case, f"{path}: {line}") for line in volume.source.warnings]
            plan = plan_labels(pred, gt, label_scheme=label_scheme, labels=labels)
            rows = score_case(case, pred, gt, region=region, resample=resample, plan=plan)
            if pred_path is None:
                result.missing.append(case)
                for row in rows:
                    row["prediction_missing"] = True
            result.rows.extend(rows)
            result.ignored += [{"case": case, "label": label, "name": name} for label, name in plan.ignored]
            result.notes += [note for note in plan.notes if note not in result.notes]
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
    "per_level": {level: {"label", "n", <metric>: {...}}}, "extra_labels": [{"case", "label", "level"}],
    "missing_predictions": [case, ...]}``. Nulls are skipped (each metric's ``n`` says how many values it
    averages); levels are ordered from the head down (names that are no level after them), ``label`` is the
    first truth id seen for the level; extra (prediction-only) rows are listed, not averaged; rows of
    missing predictions are averaged (as empty predictions) and their cases listed.
    """
    truth_rows = [r for r in rows if not r.get("extra")]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in truth_rows:
        groups.setdefault(str(row["level"]), []).append(row)

    def order(level: str) -> tuple[int, int]:
        return (LEVELS.index(level) if level in LEVELS else len(LEVELS), int(groups[level][0]["label"]))

    per_level = {
        level: {"label": int(groups[level][0]["label"]), **_block(groups[level])} for level in sorted(groups, key=order)
    }
    return {
        "n_cases": len({r["case"] for r in rows}),
        "n_vertebrae": len(truth_rows),
        "overall": _block(truth_rows),
        "per_level": per_level,
        "extra_labels": [
            {"case": r["case"], "label": int(r["label"]), "level": r["level"]} for r in rows if r.get("extra")
        ],
        "missing_predictions": sorted({r["case"] for r in rows if r.get("prediction_missing")}),
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


def write_json(
    rows: Sequence[dict[str, Any]],
    summary: dict[str, Any],
    path: str | Path,
    *,
    ignored: Sequence[dict[str, Any]] = (),
) -> None:
    """``{"cases": [row, ...], "summary": summary}`` with None as null. Written atomically.

    ``ignored`` (:attr:`ScoreResult.ignored`, the truth's labels not scored) goes into the summary as
    ``ignored_labels``.
    """
    summary = {**summary, "ignored_labels": list(ignored)}
    document = {"cases": _plain([dict(r) for r in rows]), "summary": _plain(summary)}
    text = json.dumps(document, indent=2, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
