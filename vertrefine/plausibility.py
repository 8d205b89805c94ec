"""Is this a vertebra, and is its refinement believable? Checks on volume, extent and change (numpy only).

Before refinement each vertebra of the input is checked against what one vertebra of its level can be (its
volume on the 1 mm working grid and the longest side of its bounding box); one that cannot be (a single
voxel, specks, a fragment cut by the field of view, a liver-sized blob) is not refined: it passes through
unchanged and the case reports it, and so does one much larger and taller than its neighbours (two vertebrae
under one label, :func:`merged_problem`). After refinement the result is checked against the input: empty,
halved or doubled volume means the model has gone wrong, and the input is kept for that vertebra.

Volume ranges per region are generous bounds around what was measured on whole vertebrae (body and posterior
elements) at 1 mm: the real CT masks of the training data (31 thoracic T2-T12: 17-52 mL; 31 lumbar L1-L5:
40-76 mL) and the phantoms of ``vertrefine synth`` (L1-L5: 53-74 mL). Cervical vertebrae (none measured here)
get a wide range below the thoracic one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .labels import LabelScheme, level_name


@dataclass(frozen=True)
class VolumeRange:
    """Plausible volume of one vertebra (mL)."""

    min_ml: float
    max_ml: float


CERVICAL = VolumeRange(2.0, 45.0)
THORACIC = VolumeRange(5.0, 110.0)
LUMBAR = VolumeRange(15.0, 180.0)
ANY_LEVEL = VolumeRange(2.0, 180.0)
"""For a vertebra of unknown level (a component of a binary mask, a label outside VerSe's vertebrae)."""
MAX_EXTENT_MM = 150.0
"""The longest side of one vertebra's bounding box (a lumbar vertebra with its processes: about 90 mm)."""
MERGED_VOLUME_RATIO = 1.9
MERGED_VOLUME_RATIO_TALL = 1.5
MERGED_HEIGHT_RATIO = 1.4
"""A vertebra with more than 1.9 times the mean volume of its two neighbours, or more than 1.5 times the volume
and 1.4 times the superior-inferior height of its neighbours (one or two), looks like two vertebrae under one
label. Chosen on the real CT of the training individuals (clean, and made 5 mm sagittal and 7 mm axial with
``degrade --native``; the largest single vertebra there has 1.76 times its neighbours' volume): 1 of 213
single vertebrae is flagged, and 159 of 183 pairs of adjacent vertebrae merged under one label are. On the
validation individuals: 0 of 51 and 30 of 36. A lordotic spine's tilted vertebrae are tall on the grid,
which hides some pairs from the height ratio; the volume ratio alone catches most of those, but only against
two neighbours (a single neighbour may have lost much of its volume to a thick slice)."""
MAX_SOLIDITY = 0.85
"""A vertebra is far from convex: its arch, processes and canal leave most of its convex hull empty. Its
solidity (volume / convex hull volume, on the 1 mm working grid) measured 0.30-0.41 on the phantoms of
``vertrefine synth``, 0.29-0.42 on real CT vertebrae (VerSe sub-gl003 T1-T5 and sub-verse006 L4-L5, a
Sawbones lumbar spine L1-L5), and 0.20-0.55 after ``degrade --native`` at 5 mm sagittal and 7 mm axial.
A block, ball or blob is near 1 (a 40 mm cube: 1.0; a vertebral body segmented alone about 0.95, passed
through as such: the model draws whole vertebrae)."""
MIN_CHANGE, MAX_CHANGE = 0.5, 2.0
"""A result with less than half or more than twice the input's volume is implausible."""


def volume_range(label: int | None) -> VolumeRange:
    """The plausible volume of the vertebra with VerSe id ``label`` (None or another id: any level)."""
    name = level_name(label) if label is not None else ""
    if name[:1] == "C" and name[1:].isdigit():
        return CERVICAL
    if name[:1] == "T" and name[1:].isdigit():
        return THORACIC
    if name[:1] == "L" and name[1:].isdigit():
        return LUMBAR
    return ANY_LEVEL


def input_problem(
    label: int | None,
    voxels: int,
    voxel_ml: float,
    extent_mm: float,
    touches_border: bool,
    mask: np.ndarray | None = None,
) -> str | None:
    """Why an input vertebra is not one to refine, or None when it is plausible.

    ``voxels`` and ``voxel_ml`` give its volume, ``extent_mm`` the longest side of its bounding box,
    ``touches_border`` whether it reaches the edge of the field of view; ``label`` its VerSe id (None: a
    component of a binary mask, whose level is unknown). ``mask`` (its voxels [z, y, x] on an isotropic
    grid, cropped to its bounding box; optional) adds the shape test :func:`shape_problem` for a vertebra
    not cut by the field of view.
    """
    volume = voxels * voxel_ml
    bounds = volume_range(label)
    if volume < bounds.min_ml:
        where = " and cut by the field of view" if touches_border else ""
        return f"too small for one vertebra ({volume:.1f} mL < {bounds.min_ml:g} mL{where})"
    if volume > bounds.max_ml:
        hint = ""
        if bounds is CERVICAL and volume <= LUMBAR.max_ml:
            hint = (
                "; it is sized like a thoracic or lumbar vertebra: if the file numbers vertebrae otherwise than "
                "VerSe (e.g. 1-5 for L1-L5), renumber them to VerSe's ids (T1-T12: 8-19, L1-L5: 20-24)"
            )
        return f"too large for one vertebra ({volume:.0f} mL > {bounds.max_ml:g} mL){hint}"
    if extent_mm > MAX_EXTENT_MM:
        return f"too long for one vertebra ({extent_mm:.0f} mm > {MAX_EXTENT_MM:g} mm)"
    if mask is not None and not touches_border:
        return shape_problem(mask)
    return None


ORGAN_SIZE_FACTOR = 2.0
"""A label with more than twice the largest volume of its level is organ-sized, not a swollen vertebra."""


def numbering_problem(scheme: LabelScheme, sized: Sequence[tuple[int, float]]) -> str | None:
    """Why ids read as VerSe (``--label-scheme auto``, every id within 1-28) are a TotalSegmentator v2 map's,
    or None.

    ``sized``: (label id, volume in mL) of every label of the map. A TotalSegmentator ``--roi_subset`` run
    can write only ids up to 28 (kidneys 2 and 3, liver 5, L5 27, L4 28), which VerSe reads as C2, C3, C5,
    coccyx and T13. The anatomy decides: some labels are organ-sized for their VerSe level
    (:data:`ORGAN_SIZE_FACTOR` times its largest volume), TotalSegmentator v2 names each of those as an organ,
    and reads at least one other label as a vertebra of a plausible volume.
    """
    from .labels import TOTALSEGMENTATOR, VERSE

    if scheme is not VERSE:
        return None
    organs = [
        (label, ml)
        for label, ml in sized
        if scheme.is_vertebra(label) and ml > ORGAN_SIZE_FACTOR * volume_range(scheme.verse_label(label)).max_ml
    ]
    total = TOTALSEGMENTATOR
    if not organs or any(total.is_vertebra(label) for label, _ in organs):
        return None
    vertebrae = [
        label
        for label, ml in sized
        if total.is_vertebra(label)
        and volume_range(total.verse_label(label)).min_ml <= ml <= volume_range(total.verse_label(label)).max_ml
    ]
    if not vertebrae:
        return None
    organs.sort()
    as_verse = ", ".join(f"{label} ({scheme.name(label)}, {ml:.0f} mL)" for label, ml in organs)
    as_total = ", ".join(f"{label} {total.name(label)}" for label, _ in organs)
    levels = ", ".join(f"{label} {total.names.get(label, total.name(label))}" for label in sorted(vertebrae))
    return (
        f"its ids read as VerSe make organ-sized vertebrae ({as_verse}); as TotalSegmentator v2 (a --roi_subset "
        f"run writes ids up to 28 too) they are {as_total}, beside the vertebrae {levels}"
    )


def solidity(mask: np.ndarray) -> float:
    """Volume of ``mask`` (a 3D boolean array, isotropic voxels) over the volume of its convex hull.

    The hull is the one of the voxels' corners (scipy's Qhull), so a filled box has solidity 1.0.
    """
    from scipy import ndimage
    from scipy.spatial import ConvexHull

    mask = np.asarray(mask, dtype=bool)
    surface = np.argwhere(mask & ~ndimage.binary_erosion(mask))
    offsets = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    corners = np.unique((surface[:, None, :] + offsets[None]).reshape(-1, 3), axis=0)
    return float(np.count_nonzero(mask) / ConvexHull(corners).volume)


def shape_problem(mask: np.ndarray) -> str | None:
    """Why ``mask`` (one input vertebra's voxels [z, y, x] on an isotropic grid) is not shaped like a
    vertebra, or None: a solidity above :data:`MAX_SOLIDITY` (convex like a block or blob, no arch or canal)."""
    if np.count_nonzero(mask) < 8 or min(mask.shape) < 2:
        return None
    value = solidity(mask)
    if value > MAX_SOLIDITY:
        return (
            f"not shaped like a vertebra (convex like a block: solidity {value:.2f} > {MAX_SOLIDITY:g}; a vertebra's "
            "arch and canal leave most of its convex hull empty)"
        )
    return None


def merged_problem(volume_ml: float, height_mm: float, neighbours: Sequence[tuple[float, float]]) -> str | None:
    """Why an input vertebra looks like two vertebrae under one label, or None.

    Args:
        volume_ml: its volume (mL).
        height_mm: its extent along the superior-inferior axis (mm).
        neighbours: (volume mL, height mm) of the adjacent vertebrae above and below it that are whole
            (plausible, not cut by the field of view); with none, nothing is judged.

    Returns:
        A reason naming both ratios when the volume ratio exceeds :data:`MERGED_VOLUME_RATIO` (against two
        neighbours: one alone may have lost volume to a thick slice), or :data:`MERGED_VOLUME_RATIO_TALL` with
        the height ratio above :data:`MERGED_HEIGHT_RATIO`; else None.
    """
    if not neighbours:
        return None
    volume_ratio = volume_ml / (sum(v for v, _ in neighbours) / len(neighbours))
    height_ratio = height_mm / (sum(h for _, h in neighbours) / len(neighbours))
    tall = volume_ratio > MERGED_VOLUME_RATIO_TALL and height_ratio > MERGED_HEIGHT_RATIO
    if (volume_ratio > MERGED_VOLUME_RATIO and len(neighbours) >= 2) or tall:
        return (
            f"looks like two vertebrae under one label ({volume_ml:.0f} mL and {height_mm:.0f} mm high: "
            f"{volume_ratio:.1f} and {height_ratio:.1f} times its neighbours)"
        )
    return None


def result_problem(voxels_before: int, voxels_after: int) -> str | None:
    """Why a refined vertebra is not believable against its input (empty, halved, doubled), or None."""
    if voxels_after == 0:
        return "empty result"
    ratio = voxels_after / max(voxels_before, 1)
    if ratio < MIN_CHANGE:
        return f"result {ratio:.2f} x the input's volume"
    if ratio > MAX_CHANGE:
        return f"result {ratio:.1f} x the input's volume"
    return None


def extent_mm(box: tuple[slice, ...], spacing_mm: float) -> float:
    """Longest side (mm) of a bounding box on an isotropic grid."""
    return float(max(s.stop - s.start for s in box) * spacing_mm)


def touches(box: tuple[slice, ...], shape: tuple[int, ...]) -> bool:
    """Whether a bounding box reaches the first or last voxel along any axis of an array of ``shape``."""
    return any(s.start <= 0 or s.stop >= n for s, n in zip(box, shape, strict=True))


__all__ = [
    "ANY_LEVEL",
    "CERVICAL",
    "LUMBAR",
    "MAX_EXTENT_MM",
    "MERGED_HEIGHT_RATIO",
    "MERGED_VOLUME_RATIO",
    "MERGED_VOLUME_RATIO_TALL",
    "MAX_SOLIDITY",
    "THORACIC",
    "VolumeRange",
    "extent_mm",
    "input_problem",
    "merged_problem",
    "numbering_problem",
    "result_problem",
    "shape_problem",
    "solidity",
    "touches",
    "volume_range",
]
