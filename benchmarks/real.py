"""Refinement quality on real CT vertebra label maps, made into thick-slice segmentations by each corruption family.

    python -m benchmarks.real --data /work/shared/data/real-ct \\
        --json docs/results/real.json --markdown docs/results/real.md
    # the same with every default spelled out:
    python -m benchmarks.real --data /work/shared/data/real-ct \\
        --cases verse__sub-verse006 verse__sub-verse008 verse__sub-verse010 verse__sub-verse012 \\
        --families clean partial-volume in-plane warp processes islands slab-shift mri-like degrade \\
        --slice-mm 3 5 7 --axis sagittal axial --forms native fine \\
        --methods input sdf sdf2d vae vae-dc lsd-ebm-noguide lsd-ebm lsd-ebm-dc refine \\
        --weights weights/lsd-ebm --threads 2 --ceiling --pose \\
        --json docs/results/real.json --markdown docs/results/real.md
    # quick look, no model: python -m benchmarks.real --data DIR --families clean --methods input sdf sdf2d \\
    #     --slice-mm 5 --axis sagittal --forms native --no-ceiling --no-pose
    # add rows or conditions to an earlier run's JSON: --merge (same --json)

Cases are the validation individuals of the split in weights/README.md (``--cases``, file names without
.nii.gz in ``--data``; pass training individuals to choose settings, never tune on the validation ones). Each
ground truth is read, its labels outside the VerSe vertebra range 1..25 are dropped, and it is put on its 1 mm
LPS working grid (label-aware). A condition is a corruption family (:mod:`vertrefine.corruptions`: ``clean``,
the training families, the held-out ``mri-like`` and ``degrade``, ``mixed``) x slice thickness x slice axis x
input form. The thick segmentation is ``corrupt(gt, family, slice_mm=S, axis=A, seed=case_seed(case, S, A))``
on its own native grid (e.g. 0.7 x 0.7 x 5 mm), as a clinic's comes; the seed depends on the case name and
S, A only (never on the family or which other cases are listed), so every family of a case shares one grid
and ``degrade`` gets the seeds it had before this benchmark had families. Input forms: ``native`` (that grid)
and ``fine`` (the same resampled to the ground truth's 1 mm grid by nearest neighbour: a staircase on a fine
grid, as many pipelines store it). Rows, each a label map on the ground truth's 1 mm grid:

- ``input``: the input, nearest neighbour (always run: the changes below are measured from it);
- ``sdf``: shape-based interpolation with 3D per-label signed distances (``resample_labels``' default);
- ``sdf2d``: shape-based interpolation per slice (Raya and Udupa 1990; ``resample_labels(method="slice-sdf")``:
  2D signed distances in each slice across the input's coarsest axis, linear across slices). On the ``fine``
  form both interpolations see a 1 mm grid and return the input as it is (they read no thickness from it);
- ``vae``: the :class:`~vertrefine.refine.Refiner` decoding the encoder's mean (``sampler=None``,
  ``fine_inputs="refine"``);
- ``vae-dc``: the same, then projected onto the input's slabs (``consistency="project"``);
- ``lsd-ebm-noguide``: the bundle's sampler with data-consistency guidance 0, no projection;
- ``lsd-ebm``: the bundle's sampler defaults (the model: every vertebra written as refined), no projection;
- ``lsd-ebm-dc``: the same, then projected onto the input's slabs (refine's default ``--consistency project``);
- ``refine``: what ``vertrefine refine`` writes with its defaults, i.e. ``lsd-ebm-dc`` plus the agreement gate
  that keeps the input for a vertebra whose result disagrees with it (DSC below ``MIN_AGREEMENT`` on the
  input grid), and an input no coarser than ``FINE_INPUT_MAX_MM`` written as it is.

A model row is one line of :data:`MODEL_ROWS` (how its Refiner is made from the bundle's) plus its title.
The model rows use one bundle (``--weights``, default the shipped lsd-ebm), refine with the case seed, and
their 1 mm working-grid result goes to the ground-truth grid by nearest neighbour; the ``refine`` row's result
is the label map refine writes (on its output grid), which goes there by nearest neighbour too. Every ground-
truth vertebra is scored with ``score_case(region="patch")`` (the paper's 128^3 patch protocol): mean +- std
over vertebrae of DSC, VS, SEN, SPEC, NMI, CK, HD95 and ASSD, the signed volume error against the truth (% of
the truth's volume, the label's voxels on the 1 mm grid), and the per-vertebra change of DSC from the input
(mean, worst = minimum, count of vertebrae below their input).

``--ceiling``: every clean ground-truth vertebra encoded and its mean decoded (target: mean DSC >= 0.95,
mean HD95 <= 1.5 mm). ``--pose``: at 5 mm sagittal, the whole ground truth rotated by 30 degrees about each
LPS axis (only the grid moves in patient space; the array is not resampled), degraded with the same seed,
refined with the default method and rotated back; mean DSC against the upright run (target: within 0.01),
with the DSC of the ground truth's own nearest-neighbour round trip through the rotated working grid as
the floor that resampling alone costs.

The last stdout line is ``real: clean 5mm sagittal native  input DSC a  sdf b  sdf2d c  VAE d
LSD-EBM(no guidance) e  LSD-EBM f  refine g  worst change h`` (n/a: not run; the first condition run when
that one is not; h = the lowest per-vertebra DSC change from the input of the last of those rows that ran).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from benchmarks.quality import NAMES, _cell, paired_difference
from vertrefine.bundle import MANIFEST_NAME, sha256_file
from vertrefine.cases import find_cases
from vertrefine.corruptions import FAMILIES, HELD_OUT_FAMILIES, TRAINING_FAMILIES, corrupt
from vertrefine.degrade import SLICE_AXES, degrade
from vertrefine.errors import InputError
from vertrefine.info import PACKAGES, package_version
from vertrefine.io import read_label_map
from vertrefine.refine import Refiner
from vertrefine.score import _plain, score_case, summarize
from vertrefine.spatial import resample_labels, to_working_grid, working_geometry
from vertrefine.volume import Geometry, Volume

DEFAULT_CASES: tuple[str, ...] = (
    "verse__sub-verse006",
    "verse__sub-verse008",
    "verse__sub-verse010",
    "verse__sub-verse012",
)
"""The validation individuals of the split in weights/README.md."""
VERTEBRA_LABELS: tuple[int, ...] = tuple(range(1, 26))
"""VerSe C1..L6; every other label (sacrum, coccyx, T13, ...) is dropped from the ground truth."""
DEFAULT_FAMILIES: tuple[str, ...] = (*TRAINING_FAMILIES, *HELD_OUT_FAMILIES)
"""Every corruption family but ``mixed`` (a training draw; ``--families mixed`` runs it)."""
FORMS: tuple[str, ...] = ("native", "fine")
"""Input forms: the native thick grid, or the same resampled to the ground truth's 1 mm grid (nearest)."""
INTERPOLATIONS: dict[str, str] = {"input": "nearest", "sdf": "label-aware", "sdf2d": "slice-sdf"}
"""The rows made by resampling the input onto the ground truth's grid, and how."""
_WRITTEN = {"on_disagree": "write", "fine_inputs": "refine"}  # every vertebra written as refined
_MODEL_ONLY = {**_WRITTEN, "consistency": "none"}  # ... as the model left it (no projection onto the slabs)


def _sampled(refiner: Refiner, consistency: str = "none", **changes: Any) -> Refiner | None:
    """``refiner`` with every vertebra written as refined, the data-consistency projection ``consistency`` and
    its sampler settings changed (None: no sampler)."""
    sampler = refiner.options.sampler
    if sampler is None:
        return None
    return refiner.with_options(
        sampler=dataclasses.replace(sampler, **changes), **{**_WRITTEN, "consistency": consistency}
    )


MODEL_ROWS: dict[str, Callable[[Refiner], Refiner | None]] = {
    "vae": lambda r: r.with_options(sampler=None, **_MODEL_ONLY),
    "vae-dc": lambda r: r.with_options(sampler=None, **_WRITTEN, consistency="project"),
    "lsd-ebm-noguide": lambda r: _sampled(r, guidance=0.0),
    "lsd-ebm": lambda r: _sampled(r),
    "lsd-ebm-dc": lambda r: _sampled(r, consistency="project"),
    "refine": lambda r: r if r.options.sampler is not None else None,  # as `vertrefine refine` runs
}
"""Each model row: its Refiner made from the bundle's (as refine runs it); None where the bundle cannot run it.
A new row (e.g. LSD-EBM with a data-consistency projection) is one line here plus its entry in ``TITLES``."""
MODEL_METHODS: tuple[str, ...] = tuple(MODEL_ROWS)
METHODS: tuple[str, ...] = (*INTERPOLATIONS, *MODEL_METHODS)
TITLES: dict[str, str] = {
    **NAMES,
    "sdf": "SDF interpolation, 3D label-aware",
    "sdf2d": "SDF interpolation per slice (2D, Raya-Udupa)",
    "vae-dc": "VAE + consistency projection",
    "lsd-ebm-noguide": "LSD-EBM (no guidance, no projection)",
    "lsd-ebm": "LSD-EBM (no projection)",
    "lsd-ebm-dc": "LSD-EBM + consistency projection",
    "refine": "`vertrefine refine` (LSD-EBM + agreement gate; inputs up to 3 mm kept)",
}
LINE_NAMES: dict[str, str] = {
    "input": "input DSC",
    "sdf": "sdf",
    "sdf2d": "sdf2d",
    "vae": "VAE",
    "vae-dc": "VAE+DC",
    "lsd-ebm-noguide": "LSD-EBM(no guidance)",
    "lsd-ebm": "LSD-EBM",
    "lsd-ebm-dc": "LSD-EBM+DC",
    "refine": "refine",
}
"""How the last stdout line names each row (a row missing here is named by its key)."""
LINE_CONDITION = ("clean", 5.0, "sagittal", "native")
"""The condition the last stdout line reports (the first one run when it is not)."""

CEILING_TARGET = {"dsc_mean": 0.95, "hd95_mm_mean": 1.5}
POSE_SLICE_MM = 5.0
POSE_AXIS = "sagittal"
POSE_DEGREES = 30.0
POSE_TOLERANCE = 0.01
"""Largest acceptable |mean DSC rotated - mean DSC upright|."""
LPS_AXES: tuple[str, ...] = ("x (left-right)", "y (posterior-anterior)", "z (superior-inferior)")

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- cases


def case_seed(case: str, slice_mm: float, axis: str) -> int:
    """Degradation and sampling seed of ``case`` under one condition: crc32 of its name and the settings."""
    return zlib.crc32(f"{case}|{float(slice_mm):g}|{axis}".encode())


def condition_key(family: str, slice_mm: float, axis: str, form: str) -> str:
    """'clean 5mm sagittal native'."""
    return f"{family} {float(slice_mm):g}mm {axis} {form}"


def load_ground_truth(path: Path) -> Volume:
    """A real CT label map with only the vertebra labels 1..25 kept, on its 1 mm LPS working grid."""
    volume = read_label_map(path)
    kept = np.isin(volume.array, VERTEBRA_LABELS)
    if not kept.any():
        raise InputError(path, f"holds no vertebra labels 1..25 (labels: {volume.labels})", "pick another case")
    return to_working_grid(volume.with_array(np.where(kept, volume.array, 0).astype(volume.array.dtype)))


def find_case_paths(data: Path, cases: Sequence[str]) -> dict[str, Path]:
    """The file of each named case in ``data`` (names as ``vertrefine.cases`` gives them); all must exist."""
    available = {c.name: c.path for c in find_cases(data)}
    missing = [c for c in cases if c not in available]
    if missing:
        raise InputError(data, f"has no case named {', '.join(missing)}", "check --data and --cases")
    return {c: available[c] for c in cases}


# --------------------------------------------------------------------------------------------- methods


def method_refiners(refiner: Refiner) -> dict[str, Refiner]:
    """The model rows (:data:`MODEL_ROWS`) this bundle can run, each a Refiner over ``refiner``'s sessions (the
    lsd-ebm rows need an lsd-ebm bundle). ``refiner``: the bundle as ``vertrefine refine`` runs it."""
    made = {method: make(refiner) for method, make in MODEL_ROWS.items()}
    return {method: r for method, r in made.items() if r is not None}


class ModelRunner:
    """The model rows: one bundle's ONNX sessions (CPU) and a Refiner over them per model method."""

    def __init__(self, bundle_dir: Path | None, threads: int) -> None:
        """``bundle_dir`` None: the shipped lsd-ebm bundle."""
        refiner = Refiner.from_bundle(bundle_dir, device="cpu", threads=threads)
        self.bundle = refiner.bundle
        self.refiners = method_refiners(refiner)

    @property
    def default_method(self) -> str:
        """What `vertrefine refine` runs with this bundle."""
        return "lsd-ebm" if "lsd-ebm" in self.refiners else "vae"

    def refine(self, method: str, volume: Volume, seed: int) -> Volume:
        """``volume`` refined by ``method``: the label map on its 1 mm working grid; for ``refine``, the label
        map ``vertrefine refine`` writes (its output grid; vertebrae passed through are in it as the input)."""
        result = self.refiners[method](volume, seed=seed)
        return result.labels if method == "refine" else result.working_labels

    def describe(self) -> dict[str, Any]:
        """The bundle's folder, kind, checksums and sampler defaults, and each method's sampler settings."""
        files = self.bundle.manifest["files"]
        return {
            "dir": str(self.bundle.dir),
            "kind": self.bundle.kind,
            "latent_shape": list(self.bundle.latent_shape),
            "manifest_sha256": sha256_file(self.bundle.dir / MANIFEST_NAME),
            "files_sha256": {name: entry["sha256"] for name, entry in files.items()},
            "sampler_defaults": self.bundle.sampler,
            "methods": {
                m: None if r.options.sampler is None else dataclasses.asdict(r.options.sampler)
                for m, r in self.refiners.items()
            },
        }


def predict(method: str, given: Volume, gt: Volume, seed: int, runner: ModelRunner | None) -> Volume:
    """The label map ``method`` makes of the input ``given`` (either form), on the ground truth's grid."""
    if method in INTERPOLATIONS:
        return resample_labels(given, gt.geometry, method=INTERPOLATIONS[method])
    if runner is None:
        raise ValueError(f"method {method!r} needs a model bundle")
    return resample_labels(runner.refine(method, given, seed), gt.geometry, method="nearest")


def thick_input(gt: Volume, family: str, slice_mm: float, axis: str, form: str, seed: int) -> Volume:
    """The thick-slice segmentation of ``gt`` under one condition: on its native grid, or (``fine``) that
    resampled to ``gt``'s grid by nearest neighbour."""
    native = corrupt(gt, family, slice_mm=slice_mm, axis=axis, seed=seed)
    return native if form == "native" else resample_labels(native, gt.geometry, method="nearest")


def add_volume_errors(rows: list[dict[str, Any]], pred: Volume, gt: Volume) -> None:
    """Each ground-truth row gets ``volume_error_pct``: 100 (|pred == label| - |gt == label|) / |gt == label|
    over the whole 1 mm grid (in place; the grids must match)."""
    labels = [r["label"] for r in rows if not r.get("extra")]
    truth = np.bincount(gt.array.ravel().astype(np.int64), minlength=max(labels, default=0) + 1)
    found = np.bincount(pred.array.ravel().astype(np.int64), minlength=len(truth))
    for row in rows:
        if not row.get("extra"):
            label = row["label"]
            row["volume_error_pct"] = 100.0 * (float(found[label]) - float(truth[label])) / float(truth[label])


def volume_error_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean, std, lowest and highest ``volume_error_pct`` over the ground-truth rows (%, signed)."""
    values = np.array([r["volume_error_pct"] for r in _truth(rows)], dtype=float)
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


# --------------------------------------------------------------------------------------------- statistics


def _truth(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if not r.get("extra")]


def dsc_change(rows: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-vertebra change of DSC from ``baseline`` (same case and label; prediction-only rows ignored).

    ``mean``, ``ci95``, ``wins``, ``n`` as ``benchmarks.quality.paired_difference``, plus ``worst`` (the
    lowest change), ``worst_vertebra``, ``below`` (how many vertebrae lost DSC) and ``per_vertebra``.
    """
    base = {(r["case"], r["label"]): r["dsc"] for r in _truth(baseline)}
    per_vertebra = [
        {
            "case": r["case"],
            "label": r["label"],
            "level": r["level"],
            "change": r["dsc"] - base[(r["case"], r["label"])],
        }
        for r in _truth(rows)
    ]
    worst = min(per_vertebra, key=lambda v: v["change"])
    return {
        **paired_difference(list(rows), list(baseline)),
        "worst": worst["change"],
        "worst_vertebra": f"{worst['case']} {worst['level']}",
        "below": sum(v["change"] < 0 for v in per_vertebra),
        "per_vertebra": per_vertebra,
    }


def _mean_dsc(rows: Sequence[dict[str, Any]]) -> float:
    return float(np.mean([r["dsc"] for r in _truth(rows)]))


# --------------------------------------------------------------------------------------------- conditions


def run_condition(
    gts: dict[str, Volume],
    family: str,
    slice_mm: float,
    axis: str,
    form: str,
    methods: Sequence[str],
    runner: ModelRunner | None,
    log: Log = _stderr,
) -> dict[str, Any]:
    """Every case made into a thick-slice segmentation by ``family`` at ``slice_mm`` / ``axis`` in ``form``,
    and each method's result scored against the ground truth."""
    key = condition_key(family, slice_mm, axis, form)
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    seconds = dict.fromkeys(methods, 0.0)
    seeds, input_spacing = {}, {}
    for n, (case, gt) in enumerate(gts.items(), start=1):
        seed = seeds[case] = case_seed(case, slice_mm, axis)
        given = thick_input(gt, family, slice_mm, axis, form, seed)
        input_spacing[case] = list(given.geometry.spacing)
        start_case = time.perf_counter()
        case_dsc = {}
        for method in methods:
            start = time.perf_counter()
            pred = predict(method, given, gt, seed, runner)
            seconds[method] += time.perf_counter() - start
            case_rows = score_case(case, pred, gt, region="patch")
            add_volume_errors(case_rows, pred, gt)
            rows[method] += case_rows
            case_dsc[method] = _mean_dsc(case_rows)
        dscs = "  ".join(f"{m} {d:.3f}" for m, d in case_dsc.items())
        log(f"{key} [{n}/{len(gts)}] {case}: DSC {dscs} ({time.perf_counter() - start_case:.0f} s)")
    results: dict[str, Any] = {}
    for method in methods:
        entry: dict[str, Any] = {
            "summary": summarize(rows[method]),
            "volume_error_pct": volume_error_summary(rows[method]),
            "seconds_per_case": seconds[method] / len(gts),
        }
        if method != "input":
            entry["dsc_change"] = dsc_change(rows[method], rows["input"])
        entry["rows"] = rows[method]
        results[method] = entry
    return {
        "family": family,
        "slice_mm": slice_mm,
        "axis": axis,
        "form": form,
        "seeds": seeds,
        "input_spacing_mm": input_spacing,
        "methods": results,
    }


def ceiling_check(gts: dict[str, Volume], runner: ModelRunner, log: Log = _stderr) -> dict[str, Any]:
    """Each clean ground-truth vertebra encoded and its mean decoded: how well the autoencoder can do at best."""
    rows: list[dict[str, Any]] = []
    for n, (case, gt) in enumerate(gts.items(), start=1):
        pred = resample_labels(runner.refine("vae", gt, seed=0), gt.geometry, method="nearest")
        case_rows = score_case(case, pred, gt, region="patch")
        rows += case_rows
        log(f"ceiling [{n}/{len(gts)}] {case}: DSC {_mean_dsc(case_rows):.3f}")
    truth = _truth(rows)
    dsc = np.array([r["dsc"] for r in truth])
    hd95 = np.array([r["hd95_mm"] for r in truth if r["hd95_mm"] is not None])
    stats = {
        "n": len(truth),
        "dsc_mean": float(dsc.mean()),
        "dsc_min": float(dsc.min()),
        "hd95_mm_mean": float(hd95.mean()) if hd95.size else None,
        "hd95_mm_max": float(hd95.max()) if hd95.size else None,
        "hd95_n": int(hd95.size),
    }
    met = stats["dsc_mean"] >= CEILING_TARGET["dsc_mean"] and (
        stats["hd95_mm_mean"] is not None and stats["hd95_mm_mean"] <= CEILING_TARGET["hd95_mm_mean"]
    )
    return {**stats, "target": CEILING_TARGET, "met": bool(met), "summary": summarize(rows), "rows": rows}


# --------------------------------------------------------------------------------------------- pose


def axis_rotation(axis: int, degrees: float) -> np.ndarray:
    """Rotation matrix [3, 3] by ``degrees`` about LPS axis ``axis`` (0 = x, 1 = y, 2 = z), right-handed."""
    return Rotation.from_euler("xyz"[axis], degrees, degrees=True).as_matrix()


def grid_centre(geometry: Geometry) -> np.ndarray:
    """LPS position (mm) of the centre of the grid's voxel box."""
    return geometry.index_to_physical((np.asarray(geometry.size_ijk, dtype=float) - 1.0) / 2.0)


def rotate_geometry(geometry: Geometry, rotation: np.ndarray, centre: Sequence[float]) -> Geometry:
    """The grid moved rigidly in patient space: every voxel centre ``p`` goes to ``centre + R (p - centre)``.

    A volume keeping its array on the new grid is its anatomy rotated by ``R`` about ``centre``, with no
    resampling; ``rotate_geometry(rotate_geometry(g, R, c), R.T, c)`` is ``g`` again.
    """
    r = np.asarray(rotation, dtype=float)
    c = np.asarray(centre, dtype=float)
    direction = r @ geometry.direction_matrix
    origin = c + r @ (np.asarray(geometry.origin) - c)
    return dataclasses.replace(geometry, direction=tuple(direction.ravel()), origin=tuple(origin))


def rotate_volume(volume: Volume, rotation: np.ndarray, centre: Sequence[float]) -> Volume:
    """The same array on the rotated grid (see :func:`rotate_geometry`)."""
    return dataclasses.replace(volume, geometry=rotate_geometry(volume.geometry, rotation, centre))


def unrotate(volume: Volume, rotation: np.ndarray, centre: Sequence[float], target: Geometry) -> Volume:
    """A label map made in rotated space rotated back by ``rotation.T`` about ``centre``, on ``target`` (nearest)."""
    return resample_labels(rotate_volume(volume, np.asarray(rotation).T, centre), target, method="nearest")


def pose_check(gts: dict[str, Volume], runner: ModelRunner, log: Log = _stderr) -> dict[str, Any]:
    """The default method at 5 mm sagittal on each spine upright and rotated 30 degrees about each LPS axis."""
    method = runner.default_method
    poses = {"upright": np.eye(3)}
    poses.update({name: axis_rotation(a, POSE_DEGREES) for a, name in enumerate(LPS_AXES)})
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {p: {"input": [], method: [], "floor": []} for p in poses}
    for n, (case, gt) in enumerate(gts.items(), start=1):
        seed = case_seed(case, POSE_SLICE_MM, POSE_AXIS)
        centre = grid_centre(gt.geometry)
        line = []
        for pose, r in poses.items():
            rotated = rotate_volume(gt, r, centre)
            native = degrade(rotated, slice_mm=POSE_SLICE_MM, axis=POSE_AXIS, seed=seed, native=True)
            # what nearest-neighbour resampling through the rotated working grid alone costs
            on_working = resample_labels(rotated, working_geometry(rotated.geometry), method="nearest")
            rows[pose]["floor"] += score_case(case, unrotate(on_working, r, centre, gt.geometry), gt)
            rows[pose]["input"] += score_case(case, unrotate(native, r, centre, gt.geometry), gt)
            refined = runner.refine(method, native, seed)
            case_rows = score_case(case, unrotate(refined, r, centre, gt.geometry), gt)
            rows[pose][method] += case_rows
            line.append(f"{pose.split()[0]} {_mean_dsc(case_rows):.3f}")
        log(f"pose [{n}/{len(gts)}] {case}: {method} DSC " + "  ".join(line))
    results = {}
    for pose, by_row in rows.items():
        entry: dict[str, Any] = {name: {"dsc_mean": _mean_dsc(r), "rows": r} for name, r in by_row.items()}
        if pose != "upright":
            change = paired_difference(by_row[method], rows["upright"][method])
            entry["dsc_minus_upright"] = change
            entry["within_tolerance"] = bool(abs(change["mean"]) <= POSE_TOLERANCE)
        results[pose] = entry
    return {
        "method": method,
        "slice_mm": POSE_SLICE_MM,
        "axis": POSE_AXIS,
        "degrees": POSE_DEGREES,
        "tolerance": POSE_TOLERANCE,
        "poses": results,
    }


# --------------------------------------------------------------------------------------------- the run


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, Python and the versions of the packages ``vertrefine info`` lists."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "packages": {name: version for name in PACKAGES if (version := package_version(name))},
    }


def benchmark(
    data: Path,
    cases: Sequence[str] = DEFAULT_CASES,
    *,
    families: Sequence[str] = DEFAULT_FAMILIES,
    slice_mm: Sequence[float] = (3.0, 5.0, 7.0),
    axes: Sequence[str] = ("sagittal", "axial"),
    forms: Sequence[str] = FORMS,
    methods: Sequence[str] = METHODS,
    weights: Path | None = None,
    threads: int = 2,
    ceiling: bool = True,
    pose: bool = True,
    log: Log = _stderr,
) -> dict[str, Any]:
    """The whole benchmark; returns the JSON document (settings, bundle, machine, every number and row).

    ``input`` is always run. A model bundle is opened only when a model row, the ceiling or the pose check
    needs it (``weights``: its folder, default the shipped lsd-ebm).
    """
    choices = (("methods", methods, METHODS), ("families", families, FAMILIES), ("forms", forms, FORMS))
    for name, given, known in choices:
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"unknown {name} {unknown}; choose from {known}")
    chosen = [m for m in METHODS if m in methods or m == "input"]
    start = time.perf_counter()
    paths = find_case_paths(Path(data), cases)
    runner = None
    if ceiling or pose or any(m in MODEL_METHODS for m in chosen):
        runner = ModelRunner(Path(weights) if weights else None, threads)
        lacking = [m for m in chosen if m in MODEL_METHODS and m not in runner.refiners]
        if lacking:
            raise ValueError(f"the {runner.bundle.kind} bundle at {runner.bundle.dir} cannot run {lacking}")
    gts = {}
    for case, path in paths.items():
        gts[case] = load_ground_truth(path)
        log(f"{case}: vertebrae {gts[case].labels}, 1 mm grid {gts[case].geometry.shape}")
    conditions = {
        condition_key(family, mm, axis, form): run_condition(gts, family, mm, axis, form, chosen, runner, log)
        for family in families
        for form in forms
        for axis in axes
        for mm in slice_mm
    }
    settings = {
        "data": str(data),
        "cases": list(cases),
        "families": list(families),
        "slice_mm": list(slice_mm),
        "axes": list(axes),
        "forms": list(forms),
        "methods": chosen,
        "threads": threads,
        "ceiling": ceiling,
        "pose": pose,
        "region": "patch",
    }
    return {
        "settings": settings,
        "bundle": runner.describe() if runner else None,
        "machine": machine_info(),
        "conditions": conditions,
        "ceiling": ceiling_check(gts, runner, log) if ceiling and runner else None,
        "pose": pose_check(gts, runner, log) if pose and runner else None,
        "seconds": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------------------------- reports


def _f(value: float | None, digits: int = 3, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def condition_markdown(key: str, block: dict[str, Any]) -> str:
    """One condition's table: a row per method, mean +- std per vertebra of DSC, HD95, ASSD and the signed
    volume error, and the change of DSC from the input (mean / worst, vertebrae below the input)."""
    methods = block["methods"]
    n = methods["input"]["summary"]["n_vertebrae"]
    lines = [
        f"### {key} ({len(block['seeds'])} cases, {n} vertebrae)",
        "",
        "| method | DSC | HD95 (mm) | ASSD (mm) | volume error % | ΔDSC vs input mean / worst | below input |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, entry in methods.items():
        cells = " | ".join(_cell(entry["summary"]["overall"][m]) for m in ("dsc", "hd95_mm", "assd_mm"))
        volume = entry.get("volume_error_pct")
        vol = f"{volume['mean']:+.1f} ± {volume['std']:.1f}" if volume else "n/a"
        change = entry.get("dsc_change")
        delta = f"{_f(change['mean'], 4, True)} / {_f(change['worst'], 4, True)}" if change else "—"
        below = f"{change['below']} / {change['n']}" if change else "—"
        lines.append(f"| {TITLES.get(method, method)} | {cells} | {vol} | {delta} | {below} |")
    return "\n".join(lines) + "\n"


def overview_markdown(doc: dict[str, Any]) -> str:
    """One table per slice axis and input form: a row per family and thickness, per method the mean DSC and,
    beside every row but the input, the worst per-vertebra change from the input."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for block in doc["conditions"].values():
        groups.setdefault((block["axis"], block["form"]), []).append(block)
    parts = []
    for (axis, form), blocks in groups.items():
        methods = [m for m in METHODS if any(m in b["methods"] for b in blocks)]
        heads = [TITLES.get(m, m) for m in methods]
        lines = [
            f"### Mean DSC, {axis}, {form} input (worst per-vertebra ΔDSC from the input in brackets)",
            "",
            "| family | slice (mm) | " + " | ".join(heads) + " |",
            "|---|---|" + "---|" * len(methods),
        ]
        for b in blocks:
            cells = []
            for m in methods:
                entry = b["methods"].get(m)
                if entry is None:
                    cells.append("")
                    continue
                cell = f"{entry['summary']['overall']['dsc']['mean']:.3f}"
                if "dsc_change" in entry:
                    cell += f" ({entry['dsc_change']['worst']:+.3f})"
                cells.append(cell)
            lines.append(f"| {b['family']} | {b['slice_mm']:g} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def ceiling_markdown(ceiling: dict[str, Any]) -> str:
    """The autoencoder ceiling's table."""
    target = ceiling["target"]
    met = "yes" if ceiling["met"] else "no"
    return "\n".join(
        [
            "### Autoencoder ceiling (clean validation vertebrae, encode -> decode the mean)",
            "",
            "| vertebrae | DSC mean | DSC min | HD95 mean (mm) | HD95 max (mm) | target met |",
            "|---|---|---|---|---|---|",
            f"| {ceiling['n']} | {_f(ceiling['dsc_mean'])} | {_f(ceiling['dsc_min'])} | "
            f"{_f(ceiling['hd95_mm_mean'], 2)} | {_f(ceiling['hd95_mm_max'], 2)} | {met} |",
            "",
            f"Target: mean DSC >= {target['dsc_mean']}, mean HD95 <= {target['hd95_mm_mean']} mm.",
            "",
        ]
    )


def pose_markdown(pose: dict[str, Any]) -> str:
    """The pose check's table: mean DSC per pose, the change from upright and the resampling floor."""
    method = pose["method"]
    lines = [
        f"### Pose (degrade {pose['slice_mm']:g}mm {pose['axis']}, {TITLES.get(method, method)}, "
        f"spine rotated {pose['degrees']:g}° about each LPS axis)",
        "",
        "| pose | input DSC | refined DSC | refined − upright | within ±"
        f"{pose['tolerance']:g} | GT nearest round trip DSC |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in pose["poses"].items():
        change = entry.get("dsc_minus_upright")
        delta = f"{_f(change['mean'], 4, True)} ± {_f(change['ci95'], 4)}" if change else "—"
        within = ("yes" if entry["within_tolerance"] else "no") if change else "—"
        lines.append(
            f"| {name} | {_f(entry['input']['dsc_mean'])} | {_f(entry[method]['dsc_mean'])} | {delta} | {within} "
            f"| {_f(entry['floor']['dsc_mean'])} |"
        )
    return "\n".join(lines) + "\n"


def markdown_report(doc: dict[str, Any]) -> str:
    """Every table of a benchmark document as markdown."""
    settings = doc["settings"]
    cases = set(settings["cases"])
    which = "validation " if cases <= set(DEFAULT_CASES) else "" if cases & set(DEFAULT_CASES) else "training "
    parts = [f"## Real CT: {len(cases)} {which}cases ({', '.join(settings['cases'])})\n"]
    parts.append(overview_markdown(doc))
    parts += [condition_markdown(key, block) for key, block in doc["conditions"].items()]
    if doc.get("ceiling"):
        parts.append(ceiling_markdown(doc["ceiling"]))
    if doc.get("pose"):
        parts.append(pose_markdown(doc["pose"]))
    return "\n".join(parts)


def summary_line(doc: dict[str, Any]) -> str:
    """The last stdout line: ``real: clean 5mm sagittal native  input DSC a  sdf b ... refine g  worst change h``

    (n/a: not run)."""
    key = condition_key(*LINE_CONDITION)
    if key not in doc["conditions"]:
        key = next(iter(doc["conditions"]))
    methods = doc["conditions"][key]["methods"]
    cells = [
        f"{LINE_NAMES.get(m, m)} {methods[m]['summary']['overall']['dsc']['mean']:.4f}"
        if m in methods
        else f"{LINE_NAMES.get(m, m)} n/a"
        for m in METHODS
    ]
    last = [m for m in METHODS[1:] if m in methods]
    worst = f"{methods[last[-1]]['dsc_change']['worst']:+.4f}" if last else "n/a"
    return f"real: {key}  " + "  ".join(cells) + f"  worst change {worst}"


def merge_runs(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """``earlier``'s document with ``later``'s conditions added (a condition in both gets ``later``'s rows beside
    its own, ``later``'s winning for a method in both); the ceiling, pose and bundle of the later run where it
    has them. Both must be on the same cases (the changes from the input pair vertebra by vertebra).

    Raises:
        ValueError: the runs are on different cases.
    """
    if earlier["settings"]["cases"] != later["settings"]["cases"]:
        cases = f"{earlier['settings']['cases']} and {later['settings']['cases']}"
        raise ValueError(f"cannot merge runs on different cases: {cases}")
    merged = dict(earlier)
    conditions = {key: dict(block, methods=dict(block["methods"])) for key, block in earlier["conditions"].items()}
    for key, block in later["conditions"].items():
        if key in conditions:
            conditions[key]["methods"].update(block["methods"])
        else:
            conditions[key] = block
    merged["conditions"] = conditions
    merged["runs"] = [*earlier.get("runs", [earlier["settings"]]), later["settings"]]
    for part in ("ceiling", "pose", "bundle"):
        if later.get(part):
            merged[part] = later[part]
    merged["seconds"] = earlier["seconds"] + later["seconds"]
    return merged


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder of real CT label maps (VerSe numbering)")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=list(DEFAULT_CASES),
        help="case names (default: the validation individuals; pass training ones to choose settings)",
    )
    parser.add_argument("--families", nargs="+", default=list(DEFAULT_FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--slice-mm", type=float, nargs="+", default=[3.0, 5.0, 7.0])
    parser.add_argument("--axis", nargs="+", default=["sagittal", "axial"], choices=list(SLICE_AXES))
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--weights", type=Path, help="model bundle folder (default: the shipped lsd-ebm)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    parser.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--pose", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", type=Path, help="write every number, row and setting here")
    parser.add_argument("--markdown", type=Path, help="write the tables as markdown here")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add this run's conditions and rows to the --json file of an earlier run (same cases) and report both",
    )
    args = parser.parse_args(argv)
    if args.merge and not (args.json and args.json.is_file()):
        parser.error("--merge needs --json naming an earlier run's file")
    doc = benchmark(
        args.data,
        args.cases,
        families=args.families,
        slice_mm=args.slice_mm,
        axes=args.axis,
        forms=args.forms,
        methods=args.methods,
        weights=args.weights,
        threads=args.threads,
        ceiling=args.ceiling,
        pose=args.pose,
    )
    if args.merge:
        doc = merge_runs(json.loads(args.json.read_text(encoding="utf-8")), _plain(doc))
    report = markdown_report(doc)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_plain(doc), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report, encoding="utf-8")
    print(report)
    print(f"{doc['seconds']:.0f} s in all")
    print(summary_line(doc))


if __name__ == "__main__":
    main()
