"""Effective slice thickness from the labels: a thick-slice segmentation stored on a finer grid.

Many pipelines write a segmentation made on 3-7 mm slices onto a fine grid (nearest-neighbour resampling,
or a 1 mm export): its header says 1 mm, but its labels only change between certain planes, spaced one
slab apart along the slice axis (a *staircase*). :func:`detect_slices` finds such a staircase along each
array axis from the labels alone, and :func:`coarse_volume` rebuilds the equivalent native thick-slice
label map (one voxel per slab), so refine treats the input as the thick-slice segmentation it is.

The algorithm, per array axis ``a`` (axes ``[z, y, x]`` = ``[k, j, i]``; steps 1-2 in one pass over the
foreground's bounding box):

1. For each pair of neighbouring planes ``n, n + 1`` along ``a``: ``changed[n]``, the voxels whose label
   differs between them, and ``foreground[n]``, the larger of the two planes' non-zero voxel counts.
2. The pair is a *step* when ``changed[n]`` exceeds ``NOISE_VOXELS``, ``NOISE_FRACTION * foreground[n]`` and
   ``RELATIVE_STEP`` times the 90th percentile of ``changed`` over the pairs holding foreground: small
   differences (an island, a few noisy voxels inside a slab) are not steps. A step lies on the boundary
   plane at continuous index ``n + 0.5`` (voxel-centre coordinates).
3. Fewer than :data:`MIN_STEPS` steps, or steps on more than :data:`MAX_STEP_DENSITY` of the pairs
   holding foreground (a smooth shape changes on nearly every plane): no staircase.
4. A first period from the gaps between steps: the most common gap ``g`` (at least 2 voxels), blended with
   ``g + 1`` or ``g - 1`` when that is common too (a period that is not a whole number of voxels, e.g. 5 mm
   slabs on 0.8 mm voxels give gaps of 6 and 7).
5. The lattice ``phase + m * period`` (m whole) that best holds the steps within :data:`TOLERANCE_VOXELS`
   (nearest-neighbour rounding moves a boundary by up to half a voxel; at most a quarter period; one step
   per boundary, the nearest: the others are noise; scored by the steps it holds times the fraction of its
   boundaries between the first and last step that hold one, so half the period scores half): periods within
   :data:`PERIOD_SEARCH` of the first one in steps of 0.002 voxel, each with its phase from the circular
   mean of the steps' positions, then a least-squares fit of phase and period to those inlier steps.
6. Accepted when the period is at least :data:`MIN_PERIOD` voxels, at least :data:`MIN_PRECISION` of the
   steps lie on the lattice (the others are noisy planes), at least :data:`MIN_STEPS` do, and at least
   :data:`MIN_RECALL` of the lattice's boundaries inside the foreground's extent hold a step (adjacent slabs
   may show the same labels, so not all of them). Otherwise no staircase.

The thresholds were chosen on the real CT label maps (``benchmarks/thickness_detection.py``, table in
docs/BENCHMARKS.md "Effective slice thickness"): every staircase made from them by slab majority or nearest
neighbour (2-7 mm, each axis, 1 mm and 0.6 / 0.8 mm grids, with and without islands) is found with its
thickness, and the native maps (1 mm, 0.3 x 0.3 x 1.25 mm, 2-5 mm native thick grids) give no staircase of
:data:`THICK_MM` or more. Cost: one pass over the foreground's box (0.35 s for 56 M voxels here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .volume import Geometry, Volume

NOISE_VOXELS = 2
"""A pair of planes differing in at most this many voxels is not a step (noise, the tip of an island)."""
NOISE_FRACTION = 0.002
"""... nor one differing in at most this fraction of the larger plane's foreground ..."""
RELATIVE_STEP = 0.05
"""... nor one differing in at most this fraction of the 90th percentile of the differences along the axis
(islands and noisy planes change a few voxels, a slab boundary through a spine hundreds)."""
MIN_STEPS = 4
"""Fewer steps on the lattice than this: no staircase (three points fit many lattices)."""
MAX_STEP_DENSITY = 0.7
"""Steps on more than this fraction of the plane pairs holding foreground: a smooth shape, no staircase."""
MIN_PERIOD = 1.8
"""The shortest period (voxels) reported. Below 2 voxels most planes are steps, as on a smooth shape, and
rounding jitter is as large as the gaps, so shorter periods are not told apart reliably (2 mm slabs on a
1.25 mm axis are not reported; on a 1 mm grid such a staircase is finer than :data:`THICK_MM`)."""
TOLERANCE_VOXELS = 0.6
"""A step within this distance (voxels) of a lattice boundary lies on it (rounding moves it up to 0.5)."""
PERIOD_SEARCH = 0.6
"""Periods searched around the gaps' estimate, +- voxels."""
MIN_PRECISION = 0.8
"""At least this fraction of the steps must lie on the lattice (the others are noisy planes)."""
MIN_RECALL = 0.5
"""At least this fraction of the lattice's boundaries inside the foreground must hold a step."""
THICK_MM = 1.6
"""A staircase at least this thick (mm) makes a label map a thick-slice one (:attr:`SliceThickness.thick`,
what refine acts on). Thinner ones are found too, but their labels are as fine as a CT's: automatic CT
segmentations made at 1.5 mm and written on the CT's finer grid are 1.5 mm staircases in-plane (two of the
real CT maps, docs/BENCHMARKS.md "Effective slice thickness")."""


@dataclass(frozen=True)
class Staircase:
    """Labels that change only between planes spaced ``period`` voxels apart along one array axis.

    Slab ``m`` covers the continuous voxel-centre indices ``[phase + m * period, phase + (m + 1) * period)``
    along ``axis``; its centre is at ``phase + (m + 0.5) * period``. ``phase`` is in ``[-0.5, period - 0.5)``,
    so slab -1 reaches into the array unless ``phase`` is -0.5.
    """

    axis: int
    """Array axis: 0 = k (z), 1 = j (y), 2 = i (x)."""
    period: float
    """Slab thickness in voxels of the array (not necessarily a whole number)."""
    phase: float
    """Continuous index (voxel-centre coordinates) of the first slab boundary at or after the array's start
    (-0.5): the boundary that starts slab 0."""
    thickness_mm: float
    """``period`` times the grid's spacing along ``axis``: the effective slice thickness."""
    steps: int
    """Steps on the lattice (boundaries where the labels change)."""
    precision: float
    """Fraction of all steps that lie on the lattice."""
    recall: float
    """Fraction of the lattice's boundaries within the foreground that hold a step."""

    def centres(self, size: int) -> np.ndarray:
        """Continuous indices (float, [n_slabs]) of the centres of the slabs whose centre lies inside an axis
        of ``size`` voxels (index -0.5 to size - 0.5): the voxels of the equivalent thick-slice grid."""
        first = int(np.ceil((-0.5 - self.phase) / self.period - 0.5))
        last = int(np.floor((size - 0.5 - self.phase) / self.period - 0.5))
        return self.phase + (np.arange(first, last + 1) + 0.5) * self.period


@dataclass(frozen=True)
class SliceThickness:
    """What :func:`detect_slices` found: per array axis a :class:`Staircase` or None."""

    geometry: Geometry
    """The grid the labels are on."""
    staircases: tuple[Staircase | None, Staircase | None, Staircase | None]
    """Per array axis (k, j, i) the staircase, or None where the labels are as fine as the grid."""

    @property
    def thick(self) -> tuple[Staircase | None, Staircase | None, Staircase | None]:
        """:attr:`staircases` at least :data:`THICK_MM` thick (the others None): the axes on which the map is
        a thick-slice segmentation."""
        kept = [s if s is not None and s.thickness_mm >= THICK_MM else None for s in self.staircases]
        return (kept[0], kept[1], kept[2])

    @property
    def detected(self) -> bool:
        """True when any axis is a thick staircase (:attr:`thick`)."""
        return any(s is not None for s in self.thick)

    @property
    def detected_ijk(self) -> tuple[bool, bool, bool]:
        """Per index axis (i, j, k): whether it is a thick staircase (:attr:`thick`)."""
        found = [s is not None for s in self.thick]
        return (found[2], found[1], found[0])

    @property
    def spacing_ijk_mm(self) -> tuple[float, float, float]:
        """The effective spacing (mm) along index axes (i, j, k): the slab thickness where an axis is a thick
        staircase (:attr:`thick`), the grid's spacing elsewhere (the order of
        :attr:`vertrefine.volume.Geometry.spacing`)."""
        spacing = list(self.geometry.spacing)
        for s in self.thick:
            if s is not None:
                spacing[2 - s.axis] = s.thickness_mm
        return (spacing[0], spacing[1], spacing[2])

    def describe(self) -> str:
        """One line: 'labels change only every 5 mm along array axis k (z) (5 voxels of 1 mm)' for the thick
        staircases (:attr:`thick`)."""
        names = ("k (z)", "j (y)", "i (x)")
        parts = [
            f"every {s.thickness_mm:.3g} mm along array axis {names[s.axis]} "
            f"({s.period:.3g} voxels of {self.geometry.spacing[2 - s.axis]:g} mm)"
            for s in self.thick
            if s is not None
        ]
        if not parts:
            return f"no staircase of {THICK_MM:g} mm or more in the labels"
        return "labels change only " + "; ".join(parts)


def plane_changes(array: np.ndarray, chunk: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per array axis ``a`` of a 3D label array: ``(changed, foreground)``, int64 arrays [n_a - 1].

    ``changed[n]``: voxels whose label differs between planes ``n`` and ``n + 1`` along ``a``;
    ``foreground[n]``: the larger of the two planes' non-zero voxel counts. Computed on the foreground's
    bounding box (plus one plane each side), ``chunk`` planes of axis 0 at a time (memory stays small).
    """
    if array.ndim != 3:
        raise ValueError(f"plane_changes needs a 3D array, got shape {array.shape}")
    shape = array.shape
    changed = [np.zeros(max(n - 1, 0), np.int64) for n in shape]
    planes = [np.zeros(n, np.int64) for n in shape]
    nonzero = [np.flatnonzero(np.any(array, axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
    if any(len(n) == 0 for n in nonzero):
        return [(c, np.zeros_like(c)) for c in changed]
    lo = [max(int(n[0]) - 1, 0) for n in nonzero]
    hi = [min(int(n[-1]) + 2, s) for n, s in zip(nonzero, shape, strict=True)]
    box = array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    for start in range(0, box.shape[0], chunk):
        part = box[start : start + chunk + 1]  # one plane of overlap for axis 0's differences
        own = part[: chunk] if start + chunk < box.shape[0] else part
        fg = own != 0
        planes[0][lo[0] + start : lo[0] + start + len(own)] += fg.sum(axis=(1, 2))
        planes[1][lo[1] : hi[1]] += fg.sum(axis=(0, 2))
        planes[2][lo[2] : hi[2]] += fg.sum(axis=(0, 1))
        if len(part) > 1:
            n0 = lo[0] + start
            changed[0][n0 : n0 + len(part) - 1] += (part[1:] != part[:-1]).sum(axis=(1, 2))
        changed[1][lo[1] : hi[1] - 1] += (own[:, 1:] != own[:, :-1]).sum(axis=(0, 2))
        changed[2][lo[2] : hi[2] - 1] += (own[:, :, 1:] != own[:, :, :-1]).sum(axis=(0, 1))
    return [(c, np.maximum(p[:-1], p[1:])) for c, p in zip(changed, planes, strict=True)]


def staircase_of(changed: np.ndarray, foreground: np.ndarray, axis: int, spacing_mm: float) -> Staircase | None:
    """The staircase along one axis from its plane changes (:func:`plane_changes`), or None (module
    docstring, steps 2-6). ``spacing_mm``: the grid's spacing along that axis."""
    holding = foreground > 0
    if not holding.any():
        return None
    typical = float(np.percentile(changed[holding], 90))
    threshold = np.maximum(max(NOISE_VOXELS, RELATIVE_STEP * typical), NOISE_FRACTION * foreground)
    steps = np.flatnonzero(holding & (changed > threshold)) + 0.5  # boundary between planes n and n + 1
    if len(steps) < MIN_STEPS or len(steps) > MAX_STEP_DENSITY * np.count_nonzero(holding):
        return None
    first = _gap_period(np.diff(steps))
    if first is None:
        return None
    period, phase, inliers = _fit_lattice(steps, first)
    if period < MIN_PERIOD or inliers.sum() < MIN_STEPS or inliers.mean() < MIN_PRECISION:
        return None
    held = np.flatnonzero(holding)
    lo, hi = held[0] + 0.5, held[-1] + 0.5  # boundaries between planes that both may hold foreground
    expected = phase + period * np.arange(np.ceil((lo - phase) / period), np.floor((hi - phase) / period) + 1)
    if len(expected) == 0:
        return None
    hit = np.abs(expected[:, None] - steps[None, :]).min(axis=1) <= _tolerance(period)
    recall = float(hit.mean())
    if recall < MIN_RECALL:
        return None
    phase = float(phase - np.floor((phase + 0.5) / period) * period)  # into [-0.5, period - 0.5)
    return Staircase(
        axis=axis,
        period=float(period),
        phase=phase,
        thickness_mm=float(period * spacing_mm),
        steps=int(inliers.sum()),
        precision=float(inliers.mean()),
        recall=recall,
    )


def _gap_period(gaps: np.ndarray) -> float | None:
    """A first period (voxels) from the gaps between steps: the most common gap of at least 2 voxels, blended
    with a neighbouring gap length that is at least a quarter as common; None without such a gap."""
    counts = np.bincount(np.rint(gaps).astype(int))
    counts[:2] = 0
    if counts.sum() == 0:
        return None
    top = int(np.argmax(counts))
    lengths, weights = [top], [counts[top]]
    for other in (top - 1, top + 1):
        if 0 <= other < len(counts) and counts[other] >= 0.25 * counts[top]:
            lengths.append(other)
            weights.append(counts[other])
    return float(np.average(lengths, weights=weights))


def _fit_lattice(steps: np.ndarray, first: float) -> tuple[float, float, np.ndarray]:
    """(period, phase, inlier mask) of the lattice ``phase + m * period`` that best holds ``steps`` (within
    :func:`_tolerance`; the count held times the fraction of its boundaries held), for periods within
    :data:`PERIOD_SEARCH` of ``first`` (ties: the period nearest ``first``); refined by least squares on the
    inliers."""
    best: tuple[float, float, float, float] = (-1.0, np.inf, first, 0.0)
    span = float(steps[-1] - steps[0])
    for period in np.arange(max(first - PERIOD_SEARCH, 1.0), first + PERIOD_SEARCH, 0.002):
        phase = _circular_phase(steps, period)
        count = int(np.count_nonzero(_on_lattice(steps, period, phase)))
        score = count * count / (span / period + 1.0)  # steps on it times the fraction of its boundaries held
        if (score, -abs(period - first)) > (best[0], -best[1]):
            best = (score, abs(period - first), float(period), phase)
    _, _, period, phase = best
    for _ in range(3):
        inliers = _on_lattice(steps, period, phase)
        if inliers.sum() < 2:
            break
        m = np.rint((steps[inliers] - phase) / period)
        if np.ptp(m) == 0:
            break
        period, phase = (float(v) for v in np.polyfit(m, steps[inliers], 1))
    return period, phase, _on_lattice(steps, period, phase)


def _tolerance(period: float) -> float:
    """How far (voxels) a step may lie from a lattice boundary: :data:`TOLERANCE_VOXELS`, at most a quarter
    period (a wider band would hold steps of other periods)."""
    return min(TOLERANCE_VOXELS, 0.25 * period)


def _circular_phase(steps: np.ndarray, period: float) -> float:
    """The phase (voxels, in [0, period)) of the circular mean of ``steps`` modulo ``period``."""
    angle = np.angle(np.exp(2j * np.pi * steps / period).mean())
    return float((angle / (2 * np.pi) * period) % period)


def _residual(steps: np.ndarray, period: float, phase: float) -> np.ndarray:
    """Distance (voxels) of each step from the nearest boundary ``phase + m * period``."""
    offset = (steps - phase) / period
    return np.abs(offset - np.rint(offset)) * period


def _on_lattice(steps: np.ndarray, period: float, phase: float) -> np.ndarray:
    """bool [len(steps)]: the steps on the lattice: within :func:`_tolerance` of a boundary, and of the steps
    near one boundary only the nearest (a band wider than a voxel may hold two)."""
    residual = _residual(steps, period, phase)
    near = residual <= _tolerance(period)
    boundary = np.rint((steps - phase) / period)
    order = np.lexsort((residual, boundary))  # by boundary, nearest first
    first = np.ones(len(steps), bool)
    first[order[1:]] = boundary[order[1:]] != boundary[order[:-1]]
    return near & first


def detect_slices(volume: Volume) -> SliceThickness:
    """The effective slice thickness of a label map along each array axis (module docstring).

    ``volume.array`` is indexed ``[k, j, i]`` (= ``[z, y, x]``) on ``volume.geometry``; any integer or bool
    dtype. Costs one pass over the foreground's bounding box (about 1 s per 100 M voxels).
    """
    found = []
    for axis, (changed, foreground) in enumerate(plane_changes(volume.array)):
        found.append(staircase_of(changed, foreground, axis, volume.geometry.spacing[2 - axis]))
    return SliceThickness(volume.geometry, (found[0], found[1], found[2]))


def coarse_volume(volume: Volume, thickness: SliceThickness) -> Volume:
    """The equivalent native thick-slice label map: along each thick staircase axis (:attr:`SliceThickness.thick`)
    one voxel per slab whose centre
    lies inside the array (:meth:`Staircase.centres`), its label sampled at the voxel nearest the slab's centre;
    other axes as they are.

    The grid keeps ``volume``'s direction; its spacing along a staircase axis is the slab thickness and its
    voxel centres are the slab centres, so each slab's label sits where the thick slice lay (to within half
    a fine voxel: a boundary stored on the fine grid lies on a voxel face, wherever the slab's edge was).
    Slabs whose centre lies outside the array (a partial slab at an edge) are left out. ``source`` is kept.
    Returns ``volume`` itself when no axis is a thick staircase.
    """
    if not thickness.detected:
        return volume
    shape = volume.array.shape
    index: list[np.ndarray] = []
    first_centre = [0.0, 0.0, 0.0]  # continuous array index (k, j, i) of the new voxel (0, 0, 0)
    spacing = list(volume.geometry.spacing)
    for axis, stair in enumerate(thickness.thick):
        if stair is None:
            index.append(np.arange(shape[axis]))
            continue
        centres = stair.centres(shape[axis])
        index.append(np.clip(np.rint(centres).astype(int), 0, shape[axis] - 1))
        first_centre[axis] = float(centres[0])
        spacing[2 - axis] = stair.thickness_mm
    array = volume.array[np.ix_(*index)]
    origin = volume.geometry.index_to_physical(np.asarray(first_centre[::-1]))
    geometry = Geometry(array.shape, tuple(spacing), tuple(origin), volume.geometry.direction)
    return Volume(np.ascontiguousarray(array), geometry, volume.source)
