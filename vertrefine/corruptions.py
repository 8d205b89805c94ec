"""Families of thick-slice segmentation errors, for training on and validating against (issue 19, item 3).

Each family takes a good label map (CT quality, about 1 mm) and returns what a segmentation of a thick-slice
acquisition of that anatomy looks like, **on the acquisition's own grid** (as ``degrade --native`` does): one
voxel per slab of ``slice_mm`` along the slice axis, an in-plane spacing drawn from 0.4 to 1.2 mm (or given),
the input's direction cosines, covering the input's field of view. Arrays are indexed ``[z, y, x]`` =
``[k, j, i]`` as :class:`vertrefine.volume.Volume` holds them; lengths are mm.

The acquisition (shared by every family, :func:`corrupt`):

1. the slabs are laid along the array axis nearest the slice normal (:func:`vertrefine.degrade.slice_array_axis`)
   with a random phase, as :func:`vertrefine.degrade.acquisition_geometry` lays them;
2. each label's occupancy is averaged over each slab (:func:`vertrefine.degrade.block_mean`) and sampled
   at the native in-plane voxel centres by linear interpolation (for a finer in-plane spacing than the
   input's this is an interpolation of the input's partial volume; at the input's own spacing it is exact);
3. a voxel takes the label whose slab fraction exceeds its threshold by the most (background if none):
   at threshold 0.5 this is the slab majority.

The families (errors of a segmentation, not of the scanner; per vertebra unless said):

- ``clean``: nothing more; threshold 0.5, no noise: what a good model on thick slices produces.
- ``partial-volume``: the threshold drawn per case from 0.3-0.7, plus a per-vertebra spread (sd 0.08),
  kept in 0.3-0.7: bodies swell or erode by up to about half a slab.
- ``in-plane``: over- or under-segmentation by 1 or 2 in-plane voxels in each slice (2D dilation into the
  background or 2D erosion), the sign and size drawn per vertebra.
- ``warp``: a smooth in-plane displacement field (sd 0.7-1.5 mm, correlation length 8-15 mm) moves where each
  native voxel samples the anatomy: boundaries bulge and dent without a net swelling.
- ``processes``: thin posterior parts opened away (radius 1-2.5 mm behind the centre of mass) and process tips
  (spinous, left and right transverse) cut with probability 0.6 each
  (:func:`vertrefine.degrade.lose_posterior`), before the slabs are made.
- ``islands``: spurious islands near the spine (Poisson mean 2-6, radius 1.5-4 mm; the nearest label,
  :func:`vertrefine.degrade.add_islands`) and holes in the vertebrae (Poisson mean 1-3, radius 1.5-3.5 mm).
- ``slab-shift``: whole slices shifted in-plane by 0.5-2 mm, as between breath-holds (blocks of 3-8
  consecutive slices) or interleaves (odd against even slices); applies to every label.
- ``mixed`` (training): each of the six error families above drawn with probability
  :data:`MIXED_PROBABILITY`, independently (so possibly none: a clean case).

Held out (never in :data:`TRAINING_FAMILIES`):

- ``mri-like``: errors of the kind an MRI segmentation has, made on the fine grid on each vertebra's signed
  distance before the (clean) slabs: (a) the cortical shell is missed: dark in every MRI weighting, it is
  left out by an erosion 0.2-0.6 mm deep, 0.2-0.8 mm deeper behind the centre of mass (the bright marrow of
  the body is segmented confidently, the cortical posterior elements are not), varying smoothly (sd 0.25 mm
  over 6 mm), so a part thinner than about twice that depth (laminae, process tips) is lost according to its
  own local thickness; (b) endplate blur: near each neighbouring vertebra (within 8 mm, i.e. across the
  disc) the surface moves by one amount per pair, from -1.5 (the disc taken in) to +1.5 mm (the endplate
  read as disc); (c) label swaps at contacts: with probability 0.5 per neighbouring pair, the part of one
  vertebra within 2-5 mm of its neighbour, around one point of contact (10 mm), takes the neighbour's label
  (facet joints and endplates where the two touch). None of these is made by a training family or
  by :func:`vertrefine.degrade.degrade` (which erodes by opening, swells by thresholds and an isotropic
  boundary noise, and never swaps labels).
- ``degrade``: :func:`vertrefine.degrade.degrade` with its defaults and ``native=True`` (the project's own
  simulator, its own grid: in-plane spacing that of the input).

Labels: the vertebrae (default VerSe 1-25, ``vertebrae``) get the per-vertebra errors; every other label
goes through the acquisition (slabs, ``warp``, ``slab-shift``) only. No label is renamed or merged away by
anything but the contact swaps of ``mri-like``. Everything is numpy/scipy; the same seed, input and settings
give the same output; the acquisition's draws (in-plane spacing, slab phase) depend on the seed only, so
every family of one seed shares one grid.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Sequence
from dataclasses import replace

import numpy as np
from scipy import ndimage

from .degrade import (
    acquisition_geometry,
    add_islands,
    block_mean,
    block_starts,
    bounding_box,
    degrade,
    lose_posterior,
    physical_axes,
    physical_coordinate,
    signed_distance,
    slab_index,
    slice_array_axis,
    smooth_noise,
)
from .labels import VERSE_MAX_ID
from .volume import Geometry, Volume

ERROR_FAMILIES: tuple[str, ...] = ("partial-volume", "in-plane", "warp", "processes", "islands", "slab-shift")
"""The training families that add an error to the clean acquisition."""
TRAINING_FAMILIES: tuple[str, ...] = ("clean", *ERROR_FAMILIES)
"""What a model may be trained on (``mixed`` draws combinations of them)."""
HELD_OUT_FAMILIES: tuple[str, ...] = ("mri-like", "degrade")
"""Families no training draw uses: validation of robustness to errors of another kind."""
FAMILIES: tuple[str, ...] = (*TRAINING_FAMILIES, "mixed", *HELD_OUT_FAMILIES)
"""Every name :func:`corrupt` accepts."""
MIXED_PROBABILITY = 0.35
"""Probability of each error family in a ``mixed`` draw (none at all: 0.65^6 = 7.5 %)."""
IN_PLANE_RANGE_MM: tuple[float, float] = (0.4, 1.2)
"""Range of the drawn in-plane spacing (mm)."""
_WARP_CELL_MM = 3.0  # the warp field is drawn on cells this size and interpolated (linear) at the voxels
_CONTEXT_MM = 25.0  # fine voxels kept around the labels (room for islands and swelling)


def corrupt(
    volume: Volume,
    family: str,
    *,
    slice_mm: float = 5.0,
    axis: str = "sagittal",
    seed: int = 0,
    in_plane_mm: float | None = None,
    vertebrae: Collection[int] | None = None,
) -> Volume:
    """A thick-slice segmentation of ``volume`` with the errors of ``family``, on its native thick grid.

    Args:
        volume: a good label map (any grid; about 1 mm is what the families are sized for), array ``[z, y, x]``.
        family: one of :data:`FAMILIES` (see the module docstring).
        slice_mm: slab thickness (mm) along the slice axis.
        axis: ``"sagittal"``, ``"coronal"`` or ``"axial"``: the slice orientation (the slabs follow the array
            axis nearest its normal).
        seed: non-negative; the same seed, input and settings give the same output.
        in_plane_mm: in-plane spacing (mm) of the native grid; None: drawn from :data:`IN_PLANE_RANGE_MM`.
            Ignored by ``degrade`` (its in-plane grid is the input's).
        vertebrae: the label ids that get the per-vertebra errors (default VerSe 1-25).

    Returns:
        A Volume on the native grid (``slice_mm`` along the slice axis's array axis, ``in_plane_mm`` along the
        other two), the input's dtype and source.

    Raises:
        ValueError: an unknown family or axis, a negative seed, a slice thickness or in-plane spacing <= 0.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown corruption family {family!r}; choose from {', '.join(FAMILIES)}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if not slice_mm > 0 or (in_plane_mm is not None and not in_plane_mm > 0):
        raise ValueError(f"slice_mm and in_plane_mm must be positive, got {slice_mm} and {in_plane_mm}")
    if family == "degrade":
        return degrade(volume, slice_mm=slice_mm, axis=axis, seed=seed, native=True)
    g = volume.geometry
    slab_axis = slice_array_axis(g, axis)
    grid_rng = np.random.default_rng([int(seed), 0xC022])
    drawn_in_plane = float(grid_rng.uniform(*IN_PLANE_RANGE_MM))
    phase = float(grid_rng.uniform(0.0, slice_mm))
    in_plane = drawn_in_plane if in_plane_mm is None else float(in_plane_mm)
    rng = np.random.default_rng([int(seed), 0xC023, zlib.crc32(family.encode())])
    errors = family_draw(family, rng)
    vertebra_ids = set(range(1, VERSE_MAX_ID + 1)) if vertebrae is None else {int(v) for v in vertebrae}
    return _acquire(volume, slab_axis, float(slice_mm), phase, in_plane, errors, vertebra_ids, rng)


def family_draw(family: str, rng: np.random.Generator) -> frozenset[str]:
    """The error families (of :data:`ERROR_FAMILIES`, plus ``"mri-like"``) one case of ``family`` gets.

    ``clean``: none; a single family: itself; ``mixed``: each error family with probability
    :data:`MIXED_PROBABILITY` (drawn from ``rng``).
    """
    if family == "mixed":
        return frozenset(f for f in ERROR_FAMILIES if rng.uniform() < MIXED_PROBABILITY)
    return frozenset() if family == "clean" else frozenset({family})


def native_geometry(
    geometry: Geometry, slab_axis: int, slice_mm: float, phase_mm: float, in_plane_mm: float
) -> Geometry:
    """The native thick grid over ``geometry``'s field of view: slabs along ``slab_axis`` (array axis,
    :func:`vertrefine.degrade.acquisition_geometry`), ``in_plane_mm`` voxels along the two others, laid
    edge to edge over the input's extent (as :func:`vertrefine.spatial.working_geometry` lays its voxels)."""
    spacing = np.asarray(geometry.spacing[::-1], float)
    block = spacing.copy()
    block[slab_axis] = slice_mm
    phases = [0.0, 0.0, 0.0]
    phases[slab_axis] = phase_mm
    thick, _ = acquisition_geometry(geometry, block, phases)
    return _respaced(thick, slab_axis, in_plane_mm)


# -------------------------------------------------------------------------------------------- the acquisition


def _respaced(thick: Geometry, slab_axis: int, in_plane_mm: float) -> Geometry:
    """``thick`` with its two in-plane axes resampled to ``in_plane_mm`` voxels over the same extent."""
    spacing = np.asarray(thick.spacing[::-1], float)
    shape = list(thick.shape)
    centre = np.zeros(3)
    new_spacing = spacing.copy()
    for a in range(3):
        if a == slab_axis:
            continue
        ratio = in_plane_mm / spacing[a]
        shape[a] = max(int(np.rint(thick.shape[a] / ratio)), 1)
        centre[a] = -0.5 + ratio / 2.0
        new_spacing[a] = in_plane_mm
    origin = thick.index_to_physical(centre[::-1])
    return replace(thick, shape=tuple(shape), spacing=tuple(float(s) for s in new_spacing[::-1]), origin=tuple(origin))


def _acquire(
    volume: Volume,
    slab_axis: int,
    slice_mm: float,
    phase: float,
    in_plane: float,
    errors: frozenset[str],
    vertebra_ids: set[int],
    rng: np.random.Generator,
) -> Volume:
    """The shared acquisition (module docstring, steps 1-3) with ``errors`` applied, on the native grid."""
    g = volume.geometry
    native = native_geometry(g, slab_axis, slice_mm, phase, in_plane)
    array = np.asarray(volume.array)
    out = np.zeros(native.shape, array.dtype)
    labels = [int(v) for v in np.unique(array) if v != 0]
    if not labels:
        return Volume(out, native, volume.source)
    spacing = np.asarray(g.spacing[::-1], float)
    vertebrae = [lab for lab in labels if lab in vertebra_ids]

    # the fine work region: the labels and some context, whole slabs along the slab axis
    margin = np.ceil((_CONTEXT_MM + slice_mm) / spacing).astype(int)
    nz = np.nonzero(array)
    lo = np.maximum([int(a.min()) for a in nz] - margin, 0)
    hi = np.minimum([int(a.max()) + 1 for a in nz] + margin, array.shape)
    all_starts = block_starts(0, array.shape[slab_axis], spacing[slab_axis], slice_mm, phase)
    lo[slab_axis] = all_starts[np.searchsorted(all_starts, lo[slab_axis], side="right") - 1]
    after = np.searchsorted(all_starts, hi[slab_axis] - 1, side="right")
    hi[slab_axis] = all_starts[after] if after < len(all_starts) else array.shape[slab_axis]
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    work = array[region]
    phys = physical_axes(g, lo, work.shape)

    # errors made on the fine grid, before the slabs
    masks = {lab: work == lab for lab in labels}
    if "processes" in errors:
        for lab in vertebrae:
            radius = float(rng.uniform(1.0, 2.5))
            masks[lab] = lose_posterior(masks[lab], phys, spacing, radius, 0.6, rng)
    if "mri-like" in errors:
        masks = _mri_like(masks, vertebrae, phys, spacing, rng)

    # slabs along the slab axis; from here on the arrays are slab-first: [slab, in-plane 1, in-plane 2]
    order = [slab_axis] + [a for a in range(3) if a != slab_axis]
    starts = block_starts(int(lo[slab_axis]), work.shape[slab_axis], spacing[slab_axis], slice_mm, phase)
    first_native_slab = int(slab_index(np.array([0]), spacing[slab_axis], slice_mm, phase)[0])
    slab0 = int(slab_index(np.array([lo[slab_axis]]), spacing[slab_axis], slice_mm, phase)[0]) - first_native_slab
    fine_spacing = spacing[order[1:]]
    native_spacing = np.array([slice_mm, in_plane, in_plane])
    native_shape = [native.shape[a] for a in order]
    ratio = in_plane / fine_spacing  # native in-plane voxels per fine voxel
    centre0 = -0.5 + ratio / 2.0  # fine (global) continuous index of native in-plane voxel 0
    shift = _slab_shifts(native_shape[0], slice_mm, rng) if "slab-shift" in errors else None
    warp = _WarpField(native_shape, native_spacing, rng) if "warp" in errors else None
    reach_mm = (2.0 if shift is not None else 0.0) + (warp.reach_mm if warp is not None else 0.0)
    reach = reach_mm / fine_spacing + 1.0  # fine voxels a sample may move
    # the native region the work region reaches
    u_lo = [max(int(np.floor((lo[a] - reach[n] - centre0[n]) / ratio[n])), 0) for n, a in enumerate(order[1:])]
    u_hi = [
        min(int(np.ceil((hi[a] + reach[n] - centre0[n]) / ratio[n])) + 1, native_shape[n + 1])
        for n, a in enumerate(order[1:])
    ]
    region_shape = (len(starts), u_hi[0] - u_lo[0], u_hi[1] - u_lo[1])
    owner = np.zeros(region_shape, array.dtype)
    best = np.full(region_shape, -np.inf, np.float32)
    thresholds = _thresholds(labels, vertebrae, "partial-volume" in errors, rng)
    counts = [np.diff(np.append(starts, work.shape[slab_axis])), None, None]
    for lab in labels:
        mask = np.transpose(masks[lab], order)
        if not mask.any():
            continue
        box = bounding_box(mask, 0)
        s0 = int(np.searchsorted(starts, box[0].start, side="right") - 1)
        s1 = int(np.searchsorted(starts, box[0].stop - 1, side="right"))
        f0 = int(starts[s0])
        f1 = int(starts[s1]) if s1 < len(starts) else mask.shape[0]
        sub = mask[f0:f1, box[1], box[2]]
        fraction = block_mean(
            sub,
            [starts[s0:s1] - f0, np.arange(sub.shape[1]), np.arange(sub.shape[2])],
            [counts[0][s0:s1], np.ones(sub.shape[1], int), np.ones(sub.shape[2], int)],
        )
        # native in-plane voxels whose samples can fall in this box
        box_lo = [int(lo[a]) + box[n + 1].start for n, a in enumerate(order[1:])]
        box_hi = [int(lo[a]) + box[n + 1].stop for n, a in enumerate(order[1:])]
        us = [
            np.arange(
                max(int(np.floor((box_lo[n] - 1 - reach[n] - centre0[n]) / ratio[n])), u_lo[n]),
                min(int(np.ceil((box_hi[n] + reach[n] - centre0[n]) / ratio[n])) + 1, u_hi[n]),
            )
            for n in range(2)
        ]
        if us[0].size == 0 or us[1].size == 0:
            continue
        q = np.arange(s0, s1)  # region slabs
        coords = np.empty((3, len(q), len(us[0]), len(us[1])), np.float64)
        coords[0] = (q - s0)[:, None, None]
        coords[1] = (centre0[0] + us[0] * ratio[0] - box_lo[0])[None, :, None]
        coords[2] = (centre0[1] + us[1] * ratio[1] - box_lo[1])[None, None, :]
        if shift is not None:
            coords[1] += (shift[slab0 + q, 0] / fine_spacing[0])[:, None, None]
            coords[2] += (shift[slab0 + q, 1] / fine_spacing[1])[:, None, None]
        if warp is not None:
            moved = warp.at(slab0 + q, us[0], us[1])
            coords[1] += moved[0] / fine_spacing[0]
            coords[2] += moved[1] / fine_spacing[1]
        sampled = ndimage.map_coordinates(fraction.astype(np.float64), coords, order=1, mode="constant", cval=0.0)
        score = (sampled - thresholds[lab]).astype(np.float32)
        target = (slice(s0, s1), slice(us[0][0] - u_lo[0], us[0][-1] + 1 - u_lo[0]),
                  slice(us[1][0] - u_lo[1], us[1][-1] + 1 - u_lo[1]))  # fmt: skip
        take = (score > 0) & (score > best[target])
        best[target] = np.where(take, score, best[target])
        owner[target] = np.where(take, lab, owner[target])

    # errors made on the native grid
    if "in-plane" in errors:
        _in_plane_error(owner, vertebrae, rng)
    if "islands" in errors:
        add_islands(owner, native_spacing, float(rng.uniform(2.0, 6.0)), (1.5, 4.0), rng)
        _punch_holes(owner, native_spacing, vertebrae, float(rng.uniform(1.0, 3.0)), (1.5, 3.5), rng)

    full = np.zeros(native_shape, array.dtype)
    n_slabs = min(region_shape[0], native_shape[0] - slab0)
    full[slab0 : slab0 + n_slabs, u_lo[0] : u_hi[0], u_lo[1] : u_hi[1]] = owner[:n_slabs]
    out[...] = np.transpose(full, np.argsort(order))
    return Volume(out, native, volume.source)


def _thresholds(
    labels: Sequence[int], vertebrae: Sequence[int], jitter: bool, rng: np.random.Generator
) -> dict[int, float]:
    """Slab-fraction threshold per label: 0.5; with ``jitter`` (partial-volume) the vertebrae's drawn from
    0.3-0.7 per case plus a per-vertebra spread (sd 0.08), kept in 0.3-0.7."""
    out = dict.fromkeys(labels, 0.5)
    if jitter:
        case = float(rng.uniform(0.3, 0.7))
        for lab in vertebrae:
            out[lab] = float(np.clip(case + rng.normal(0.0, 0.08), 0.3, 0.7))
    return out


def _slab_shifts(n_slabs: int, slice_mm: float, rng: np.random.Generator) -> np.ndarray:
    """In-plane shift (mm) [n_slabs, 2] of every native slab: interleaves (odd slices against even ones) or
    breath-hold blocks of 3-8 consecutive slices; each group but the first moved 0.5-2 mm in one direction."""
    if rng.uniform() < 0.5:
        group = np.arange(n_slabs) % 2
    else:
        lengths = rng.integers(3, 9, size=n_slabs)
        group = np.repeat(np.arange(n_slabs), lengths)[:n_slabs]
    shifts = np.zeros((int(group.max()) + 1, 2))
    for k in range(1, len(shifts)):
        angle = rng.uniform(0.0, 2 * np.pi)
        shifts[k] = rng.uniform(0.5, 2.0) * np.array([np.cos(angle), np.sin(angle)])
    return shifts[group]


class _WarpField:
    """A smooth random in-plane displacement (mm) over the native grid: white noise on 3 mm cells, Gaussian
    filtered (correlation length 8-15 mm), scaled to a standard deviation of 0.7-1.5 mm, interpolated linearly."""

    def __init__(self, native_shape: Sequence[int], native_spacing: np.ndarray, rng: np.random.Generator) -> None:
        self.native_spacing = np.asarray(native_spacing, float)
        amplitude = float(rng.uniform(0.7, 1.5))
        sigma = float(rng.uniform(8.0, 15.0))
        extent = np.asarray(native_shape) * self.native_spacing
        cells = tuple(int(np.ceil(e / _WARP_CELL_MM)) + 2 for e in extent)
        self.fields = [
            smooth_noise(cells, np.full(3, _WARP_CELL_MM), sigma, rng) * np.float32(amplitude) for _ in range(2)
        ]
        self.reach_mm = 4.0 * amplitude

    def at(self, slabs: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Displacement [2, len(slabs), len(u), len(v)] (mm, along in-plane axes 1 and 2), bounded by ``reach_mm``."""
        indices = (slabs, u, v)
        axes = [np.asarray(i, float) * s / _WARP_CELL_MM for i, s in zip(indices, self.native_spacing, strict=True)]
        grid = np.meshgrid(*axes, indexing="ij")
        moved = np.stack([ndimage.map_coordinates(f, grid, order=1, mode="nearest") for f in self.fields])
        return np.clip(moved, -self.reach_mm, self.reach_mm)


def _in_plane_error(owner: np.ndarray, vertebrae: Sequence[int], rng: np.random.Generator) -> None:
    """Per vertebra (random order) a 2D dilation into the background or erosion by 1-2 in-plane voxels,
    in every slice of the slab-first array ``owner`` (in place)."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    for lab in rng.permutation(np.asarray(vertebrae, dtype=np.int64)):
        steps = int(rng.integers(1, 3))
        grow = rng.uniform() < 0.5
        mask = owner == lab
        if not mask.any():
            continue
        box = bounding_box(mask, [0, steps + 1, steps + 1])
        sub, part = mask[box], owner[box]
        if grow:
            part[ndimage.binary_dilation(sub, structure, iterations=steps) & (part == 0)] = lab
        else:
            part[sub & ~ndimage.binary_erosion(sub, structure, iterations=steps)] = 0


def _punch_holes(
    owner: np.ndarray,
    spacing: np.ndarray,
    vertebrae: Sequence[int],
    mean_count: float,
    radius_mm: tuple[float, float],
    rng: np.random.Generator,
) -> None:
    """Small ellipsoidal holes (background) centred on voxels of the vertebrae (in place; Poisson count)."""
    present = [lab for lab in vertebrae if (owner == lab).any()]
    count = int(rng.poisson(mean_count)) if present else 0
    for _ in range(count):
        lab = present[int(rng.integers(len(present)))]
        inside = np.flatnonzero(owner.ravel() == lab)
        if inside.size == 0:
            continue
        centre = np.array(np.unravel_index(int(rng.choice(inside)), owner.shape))
        radii = float(rng.uniform(*radius_mm)) * rng.uniform(0.7, 1.3, 3)
        reach = np.ceil(radii / spacing).astype(int)
        box = tuple(slice(max(c - k, 0), min(c + k + 1, n)) for c, k, n in zip(centre, reach, owner.shape, strict=True))
        grids = np.ogrid[tuple(slice(b.start - c, b.stop - c) for b, c in zip(box, centre, strict=True))]
        blob = sum((gr * s / r) ** 2 for gr, s, r in zip(grids, spacing, radii, strict=True)) <= 1.0
        owner[box][blob & (owner[box] == lab)] = 0


def _mri_like(
    masks: dict[int, np.ndarray],
    vertebrae: Sequence[int],
    phys: list[list[np.ndarray]],
    spacing: np.ndarray,
    rng: np.random.Generator,
) -> dict[int, np.ndarray]:
    """The held-out ``mri-like`` errors on the fine masks (module docstring: cortical shell, endplate blur,
    contact swaps); returns new masks, one per label (every label keeps its mask's identity)."""
    pad = np.ceil(12.0 / spacing).astype(int) + 2
    fields: dict[int, tuple[tuple[slice, ...], np.ndarray]] = {}
    for lab, mask in masks.items():
        if not mask.any():
            continue
        box = bounding_box(mask, pad)
        phi = signed_distance(mask[box], spacing)
        if lab in vertebrae:
            y = np.broadcast_to(physical_coordinate(phys[1], box), phi.shape)
            y_c = float(y[mask[box]].mean())
            behind = np.clip((y - y_c) / 15.0 + 0.5, 0.0, 1.0)  # 0 in front of the centre, 1 from 7.5 mm behind
            depth = float(rng.uniform(0.2, 0.6)) + float(rng.uniform(0.2, 0.8)) * behind
            depth = depth + 0.25 * smooth_noise(phi.shape, spacing, 6.0, rng)
            phi = phi + depth.astype(np.float32)
        fields[lab] = (box, phi)
    present = [lab for lab in vertebrae if lab in fields]
    pairs = [(a, b) for a in present for b in present if a != b and masks[b][fields[a][0]].any()]
    offsets: dict[tuple[int, int], float] = {}
    for a, b in pairs:  # endplate blur: the surface near the neighbour moves by one amount per pair
        box, phi = fields[a]
        near = ndimage.distance_transform_edt(~masks[b][box], sampling=spacing)
        weight = np.clip(1.0 - near / 8.0, 0.0, 1.0).astype(np.float32)
        offset = offsets.setdefault((min(a, b), max(a, b)), float(rng.uniform(-1.5, 1.5)))
        phi += weight * np.float32(offset)
    shape = next(iter(masks.values())).shape
    owner = np.zeros(shape, np.int64)
    best = np.zeros(shape, np.float32)
    for lab, (box, phi) in fields.items():
        take = (phi < 0) & (phi < best[box])
        best[box] = np.where(take, phi, best[box])
        owner[box] = np.where(take, lab, owner[box])
    for a, b in pairs:  # label swaps at contacts
        if a > b or rng.uniform() >= 0.5:
            continue
        if rng.uniform() < 0.5:
            a, b = b, a
        box = fields[a][0]
        part = owner[box]
        near_b = ndimage.distance_transform_edt(part != b, sampling=spacing) <= rng.uniform(2.0, 5.0)
        contact = np.argwhere((part == a) & near_b)
        if contact.size == 0:
            continue
        centre = contact[int(rng.integers(len(contact)))]
        grids = np.ogrid[tuple(slice(-c, n - c) for c, n in zip(centre, part.shape, strict=True))]
        ball = sum((gr * s) ** 2 for gr, s in zip(grids, spacing, strict=True)) <= 10.0**2
        part[(part == a) & near_b & ball] = b
    return {lab: owner == lab for lab in masks}


__all__ = [
    "ERROR_FAMILIES",
    "FAMILIES",
    "HELD_OUT_FAMILIES",
    "IN_PLANE_RANGE_MM",
    "MIXED_PROBABILITY",
    "TRAINING_FAMILIES",
    "corrupt",
    "family_draw",
    "native_geometry",
]
