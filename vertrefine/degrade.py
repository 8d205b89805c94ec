"""Thick-slice simulation: what a segmentation of a thick-slice MRI of an anatomy looks like.

Given a good label map (CT quality), :func:`degrade` returns a label map on the same grid with the errors
a segmentation made on a thick-slice MRI shows:

1. thin posterior structures under-segmented: an opening (radius ``posterior_loss_mm``) removes what is
   thinner than about twice that radius behind each vertebra's centre of mass, and process tips (spinous,
   left and right transverse) are randomly cut off (``truncation``);
2. slab partial volume: each label's occupancy is averaged over slabs ``slice_mm`` thick along the slice
   axis (and ``in_plane_mm`` in-plane), with a random slab phase, and thresholded at 0.5 plus a random
   per-case and per-vertebra shift (``threshold_jitter``), so bodies swell or erode and surfaces become
   staircases;
3. smooth boundary error: a smooth random field (``boundary_amplitude_mm``, correlation length
   ``boundary_sigma_mm``) is added to each label's signed distance before the final threshold, on the
   slab grid, so every slab stays constant along the slice axis (as the segmentation of one thick slice,
   resampled to the fine grid, would be);
4. spurious islands: a few small blobs near the spine carrying the nearest vertebra's label.

By default the boundary error and the posterior loss grow with the slice thickness (0.4 and 0.5 times
``slice_mm``): on the lumbar phantoms of :mod:`vertrefine.synth` the mean Dice per vertebra is then about
0.88 / 0.82 / 0.76 at 3 / 5 / 7 mm, whatever the slice orientation.

The slice axis is the array axis closest to the physical axis the name implies (sagittal = left-right,
coronal = anterior-posterior, axial = superior-inferior), read from the volume's direction matrix, so any
grid orientation works (on an oblique grid the slabs follow the nearest array axis). The simulation is
numpy/scipy only; :func:`check_options` and :func:`degrade_file` are what the ``degrade`` command runs per
run and per case (read, degrade with the case's seed, write beside the input's header).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import SettingsError
from .filetypes import output_format
from .volume import Geometry, Volume

AMPLITUDE_PER_SLICE_MM = 0.4
"""Default boundary error (standard deviation, mm) per mm of slice thickness."""
POSTERIOR_LOSS_PER_SLICE_MM = 0.5
"""Default radius of the posterior opening (mm) per mm of slice thickness."""

SLICE_AXES: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}
"""Slice orientation -> LPS axis of the slice normal (0 = x left-right, 1 = y, 2 = z)."""

OPTION_RANGES: dict[str, tuple[float, float]] = {
    "slice_mm": (0.5, 20.0),
    "in_plane_mm": (0.0, 10.0),
    "boundary_amplitude_mm": (0.0, 10.0),
    "boundary_sigma_mm": (0.1, 100.0),
    "threshold_jitter": (0.0, 0.45),
    "posterior_loss_mm": (0.0, 20.0),
    "truncation": (0.0, 1.0),
    "islands": (0.0, 100.0),
    "island_radius_mm": (0.5, 20.0),
}
"""Inclusive range of each knob of :func:`degrade` (``island_radius_mm``: of both radii). Wide around what an
acquisition and its segmentation can be: slices up to 20 mm (clinical MRI: 3-8 mm; a lumbar body is about
25 mm high), boundary errors and openings far beyond a vertebra's thinnest parts, up to 100 islands."""


CLEAN: dict[str, float] = {
    "boundary_amplitude_mm": 0.0,
    "threshold_jitter": 0.0,
    "posterior_loss_mm": 0.0,
    "truncation": 0.0,
    "islands": 0.0,
}
"""The noise knobs of :func:`degrade` and their values for a noise-free thick-slice simulation (``degrade
--clean``): slab partial volume alone, thresholded at exactly 0.5, no boundary error, no posterior loss, no
cut process tips, no islands. What a perfect segmentation of the thick slices would be."""


def clean_conflicts(given: Sequence[str]) -> str | None:
    """The one line refusing ``--clean`` together with noise options ``given`` (knob names, e.g.
    ``'islands'``) that it sets itself, or None. (Refused rather than letting either win: the command line
    would say two things.)"""
    named = [f"--{name.replace('_', '-')}" for name in given if name in CLEAN]
    if not named:
        return None
    return f"--clean sets every noise option to 0, so it cannot be combined with {', '.join(named)}; drop one"


def option_problem(**knobs: float | tuple[float, float] | None) -> tuple[str, str] | None:
    """The first knob of :func:`degrade` outside :data:`OPTION_RANGES`, as (name, "must be ..., got ..."); None
    when every knob given is valid (a knob of None takes its default). NaN is outside every range."""
    for name, value in knobs.items():
        if value is None or name not in OPTION_RANGES:
            continue
        low, high = OPTION_RANGES[name]
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if not all(low <= float(v) <= high for v in values):
            shown = " ".join(f"{float(v):g}" for v in values)
            return name, f"must be in {low:g}..{high:g}, got {shown}"
        if len(values) == 2 and values[0] > values[1]:
            return name, f"takes the smallest radius first, got {values[0]:g} > {values[1]:g}"
    return None


def check_options(output: str | Path, *, native: bool = False, **knobs: float | tuple[float, float] | None) -> None:
    """Refuse, before any case runs, knobs outside :data:`OPTION_RANGES` and ``native`` with a DICOM SEG output.

    ``native`` writes on the simulated acquisition's own grid, which no source series defines, so its output
    must be NIfTI (a SEG references a series on its grid).

    Raises:
        SettingsError: naming the option as the command line spells it (``--slice-mm``) or the output.
    """
    if native and output_format(output) == "dicom-seg":
        raise SettingsError(f"{output}: --native writes NIfTI only (a DICOM SEG needs a source series on its grid)")
    problem = option_problem(**knobs)
    if problem is not None:
        name, message = problem
        raise SettingsError(f"--{name.replace('_', '-')} {message}")


def degrade_file(
    source: str | Path,
    destination: str | Path,
    *,
    seed: int,
    series_uid: str | None = None,
    assume_orientation: str | None = None,
    **knobs: object,
) -> list[str]:
    """Read one label map, :func:`degrade` it with ``seed`` and write it (atomically) to ``destination``.

    Args:
        source: NIfTI file, DICOM SEG or DICOM series folder/file (see :func:`vertrefine.io.read_label_map`).
        destination: output path; its suffix picks the format, and the input's header is kept (``like``).
        seed: this case's seed (the command uses :func:`vertrefine.cases.case_seed` of ``--seed`` and the name).
        series_uid, assume_orientation: as for :func:`vertrefine.io.read_label_map`.
        **knobs: the keyword arguments of :func:`degrade` but ``seed``.

    Returns:
        The lines to report for this case: its seed, then the reader's warnings.

    Raises:
        InputError: the source cannot be read as a label map. OutputError: the destination cannot be written.
    """
    from .io import read_label_map, write_label_map  # SimpleITK, pydicom: training imports degrade without them

    volume = read_label_map(source, series_uid=series_uid, assume_orientation=assume_orientation)
    degraded = degrade(volume, seed=seed, **knobs)  # type: ignore[arg-type]
    write_label_map(degraded, destination, like=volume)
    return [f"seed {seed}", *volume.source.warnings]


def slice_array_axis(geometry: Geometry, axis: str) -> int:
    """Array axis (0 = k, 1 = j, 2 = i) closest to the normal of ``axis`` slices on this grid."""
    if axis not in SLICE_AXES:
        raise ValueError(f"axis must be one of {', '.join(SLICE_AXES)}, got {axis!r}")
    column = int(np.argmax(np.abs(geometry.direction_matrix[SLICE_AXES[axis], :])))
    return 2 - column


def degrade(
    volume: Volume,
    *,
    slice_mm: float = 5.0,
    axis: str = "sagittal",
    seed: int = 0,
    in_plane_mm: float = 1.0,
    boundary_amplitude_mm: float | None = None,
    boundary_sigma_mm: float = 8.0,
    threshold_jitter: float = 0.1,
    posterior_loss_mm: float | None = None,
    truncation: float = 0.5,
    islands: float = 4.0,
    island_radius_mm: tuple[float, float] = (1.5, 4.0),
    native: bool = False,
) -> Volume:
    """Simulate a thick-slice MRI segmentation of ``volume``, on its own grid with its own labels.

    With ``native`` the result is returned on the simulated acquisition's own grid instead, as a clinic's
    segmentation comes: one voxel per slab (``slice_mm`` along the slice axis, ``in_plane_mm`` in-plane
    where that is coarser than the input), voxel centres at the slab centres, the input's direction
    cosines, covering the input's field of view (the outermost slabs may reach past it). The labels are the
    same as on the fine grid: resampling the native result onto the input grid (nearest neighbour) gives
    the fine result back inside the field of view.

    Args:
        volume: label map (any grid; every non-zero value is one structure).
        slice_mm: slice thickness of the simulated acquisition (mm).
        axis: slice orientation, ``"sagittal"``, ``"axial"`` or ``"coronal"``.
        seed: random seed; the same seed and input give the same output.
        in_plane_mm: in-plane resolution of the simulated acquisition (mm); no in-plane averaging where it
            is not coarser than the grid.
        boundary_amplitude_mm: standard deviation (mm) of the smooth boundary displacement; None:
            ``0.4 * slice_mm`` (2 mm at 5 mm slices: thicker slices, less certain boundaries).
        boundary_sigma_mm: correlation length (mm, Gaussian sigma) of that displacement.
        threshold_jitter: standard deviation of the random shift of the partial-volume threshold (0.5):
            one shift for the whole case plus half as much per vertebra; > 0 swells, < 0 erodes.
        posterior_loss_mm: radius (mm) of the opening applied behind each vertebra's centre of mass,
            which removes posterior structures thinner than about twice that (0 = none); None:
            ``0.5 * slice_mm`` (2.5 mm at 5 mm slices).
        truncation: probability that each process tip (spinous, left transverse, right transverse) is
            cut off, at 60-90 % of its reach from the centre of mass.
        islands: mean number (Poisson) of spurious islands per case.
        island_radius_mm: range of the islands' radii (mm).

    Raises:
        ValueError: a knob outside :data:`OPTION_RANGES` (named in the message), or an unknown ``axis``.
    """
    given = locals()
    problem = option_problem(**{name: given[name] for name in OPTION_RANGES})  # every knob, by its own name
    if problem is not None:
        raise ValueError(" ".join(problem))
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    g = volume.geometry
    slab_axis = slice_array_axis(g, axis)
    if boundary_amplitude_mm is None:
        boundary_amplitude_mm = AMPLITUDE_PER_SLICE_MM * slice_mm
    if posterior_loss_mm is None:
        posterior_loss_mm = POSTERIOR_LOSS_PER_SLICE_MM * slice_mm
    array = np.asarray(volume.array)
    labels = [int(v) for v in np.unique(array) if v != 0]
    out = np.zeros_like(array)
    if not labels:
        return volume.with_array(out)
    rng = np.random.default_rng([int(seed), 0xDE9])
    spacing = np.asarray(g.spacing[::-1], float)  # per array axis
    block_mm = np.full(3, float(in_plane_mm))
    block_mm[slab_axis] = float(slice_mm)

    # work on the box around all labels, with room for swelling and islands
    margin = np.ceil((3 * boundary_amplitude_mm + block_mm + 25.0) / spacing).astype(int)
    nz = np.nonzero(array)
    lo = np.maximum([int(a.min()) for a in nz] - margin, 0)
    hi = np.minimum([int(a.max()) + 1 for a in nz] + margin, array.shape)
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    work = array[region]
    phys = physical_axes(g, lo, work.shape)

    # 1. thin posterior structures and process tips
    masks = {lab: work == lab for lab in labels}
    for lab in labels:
        masks[lab] = lose_posterior(masks[lab], phys, spacing, posterior_loss_mm, truncation, rng)

    # 2. slab partial volume on the acquisition grid
    phases = [rng.uniform(0.0, block_mm[a]) if block_mm[a] > spacing[a] * 1.0001 else 0.0 for a in range(3)]
    starts = [block_starts(lo[a], work.shape[a], spacing[a], block_mm[a], phases[a]) for a in range(3)]
    counts = [np.diff(np.append(s, work.shape[a])) for a, s in enumerate(starts)]
    coarse_spacing = np.array([block_mm[a] if len(starts[a]) < work.shape[a] else spacing[a] for a in range(3)])
    case_shift = rng.normal(0.0, threshold_jitter)
    coarse_shape = tuple(len(s) for s in starts)
    noise = smooth_noise(coarse_shape, coarse_spacing, boundary_sigma_mm, rng) * np.float32(boundary_amplitude_mm)
    best = np.full(coarse_shape, np.inf, np.float32)
    owner = np.zeros(coarse_shape, array.dtype)
    pad = np.ceil((3 * boundary_amplitude_mm + 2 * coarse_spacing) / coarse_spacing).astype(int) + 1
    for lab in labels:
        fraction = block_mean(masks[lab], starts, counts)
        threshold = float(np.clip(0.5 + case_shift + rng.normal(0.0, threshold_jitter / 2), 0.15, 0.85))
        inside = fraction > threshold
        if not inside.any():
            continue
        # 3. smooth boundary error on each label's signed distance (mm)
        box = bounding_box(inside, pad)
        sdf = signed_distance(inside[box], coarse_spacing) + noise[box]
        take = (sdf < 0) & (sdf < best[box])
        best[box] = np.where(take, sdf, best[box])
        owner[box] = np.where(take, lab, owner[box])

    # 4. islands near the spine, on the acquisition grid too (so they are slab-shaped)
    add_islands(owner, coarse_spacing, islands, island_radius_mm, rng)

    if native:
        return _on_acquisition_grid(volume, owner, lo, spacing, block_mm, phases)
    fine = owner
    for a in range(3):
        fine = np.repeat(fine, counts[a], axis=a)
    out[region] = fine
    return volume.with_array(out)


def slab_index(index: np.ndarray, spacing: float, block_mm: float, phase: float) -> np.ndarray:
    """Slab number of global voxel indices along one array axis (the voxel itself when not coarser)."""
    if block_mm <= spacing * 1.0001:
        return np.asarray(index, dtype=np.int64)
    return np.floor((np.asarray(index) * spacing - phase) / block_mm).astype(np.int64)


def acquisition_geometry(
    geometry: Geometry, block_mm: Sequence[float], phases: Sequence[float]
) -> tuple[Geometry, list[int]]:
    """The grid of a thick-slice acquisition covering ``geometry``'s field of view, and its first slabs.

    Along each array axis ``a`` (``[k, j, i]``) with ``block_mm[a]`` coarser than the voxel spacing, blocks
    ``block_mm[a]`` thick are laid on the global index axis from ``phases[a]`` mm (see :func:`slab_index`);
    the acquisition has one voxel per block that holds a voxel of ``geometry``, centred on the block's centre
    (the outermost blocks may reach past the field of view). Other axes keep their voxels. Direction cosines
    are ``geometry``'s.

    Returns:
        (the acquisition's Geometry, the global block number of its first voxel along each array axis; for an
        axis that is not coarser, 0).
    """
    from dataclasses import replace

    spacing = np.asarray(geometry.spacing[::-1], float)  # per array axis
    first, shape, centre = [], [], np.zeros(3)
    for a in range(3):
        slabs = slab_index(np.array([0, geometry.shape[a] - 1]), spacing[a], block_mm[a], phases[a])
        first.append(int(slabs[0]))
        shape.append(int(slabs[1] - slabs[0] + 1))
        coarse = block_mm[a] > spacing[a] * 1.0001
        # continuous index (along array axis a) of the centre of the first slab
        centre[a] = (phases[a] + (slabs[0] + 0.5) * block_mm[a]) / spacing[a] if coarse else 0.0
    new_spacing = [float(block_mm[a]) if block_mm[a] > spacing[a] * 1.0001 else float(spacing[a]) for a in range(3)]
    origin = geometry.index_to_physical(centre[::-1])  # ITK order (i, j, k)
    out = replace(geometry, shape=tuple(shape), spacing=tuple(new_spacing[::-1]), origin=tuple(origin))
    return out, first


def _on_acquisition_grid(
    volume: Volume,
    owner: np.ndarray,
    lo: np.ndarray,
    spacing: np.ndarray,
    block_mm: np.ndarray,
    phases: list[float],
) -> Volume:
    """The slab labels ``owner`` (of the work region starting at ``lo``) on the acquisition grid of the whole FOV."""
    geometry, first = acquisition_geometry(volume.geometry, block_mm, phases)
    offset = [int(slab_index(np.array([lo[a]]), spacing[a], block_mm[a], phases[a])[0]) - first[a] for a in range(3)]
    out = np.zeros(geometry.shape, owner.dtype)
    region = tuple(slice(offset[a], offset[a] + owner.shape[a]) for a in range(3))
    out[region] = owner
    return Volume(out, geometry, volume.source)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def physical_axes(g: Geometry, lo: Sequence[int], shape: Sequence[int]) -> list[list[np.ndarray]]:
    """For LPS coordinate c (0 = x, 1 = y), the three broadcastable per-array-axis terms of its value."""
    m = g.index_to_physical_matrix()
    terms = []
    for c in range(2):
        per_axis = []
        for a in range(3):
            idx = np.arange(lo[a], lo[a] + shape[a], dtype=np.float32)
            view = [1, 1, 1]
            view[a] = -1
            per_axis.append((idx * np.float32(m[c, 2 - a])).reshape(view))
        per_axis[0] = per_axis[0] + np.float32(m[c, 3])
        terms.append(per_axis)
    return terms


def physical_coordinate(terms: list[np.ndarray], box: tuple[slice, ...]) -> np.ndarray:
    """One LPS coordinate (mm) over ``box`` of the region, from its :func:`physical_axes` terms (broadcast)."""
    t0, t1, t2 = terms
    return t0[box[0], :, :] + t1[:, box[1], :] + t2[:, :, box[2]]


def bounding_box(mask: np.ndarray, pad: Sequence[int] | int) -> tuple[slice, ...]:
    """Slices of the box around a non-empty mask's voxels, ``pad`` voxels wider (per axis), clipped to the array."""
    pad = np.broadcast_to(np.asarray(pad, int), (3,))
    idx = np.nonzero(mask)
    return tuple(
        slice(max(int(i.min()) - int(p), 0), min(int(i.max()) + 1 + int(p), n))
        for i, p, n in zip(idx, pad, mask.shape, strict=True)
    )


def _opening(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Morphological opening with a ball of ``radius_mm`` (spacing-aware, via distance transforms)."""
    eroded = ndimage.distance_transform_edt(mask, sampling=spacing) > radius_mm
    if not eroded.any():
        return eroded
    return ndimage.distance_transform_edt(~eroded, sampling=spacing) <= radius_mm


def lose_posterior(
    mask: np.ndarray,
    phys: list[list[np.ndarray]],
    spacing: np.ndarray,
    radius_mm: float,
    truncation: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Open the part behind the centre of mass and cut process tips at random; returns a new mask."""
    if not mask.any():
        return mask
    pad = np.ceil(radius_mm / spacing).astype(int) + 2
    box = bounding_box(mask, pad)
    sub = mask[box]
    x = physical_coordinate(phys[0], box)
    y = physical_coordinate(phys[1], box)
    inside = np.nonzero(sub)
    xs = np.broadcast_to(x, sub.shape)[inside]
    ys = np.broadcast_to(y, sub.shape)[inside]
    x_c, y_c = float(xs.mean()), float(ys.mean())
    behind = np.broadcast_to(y > y_c, sub.shape)
    kept = sub.copy()
    back = sub & behind
    if radius_mm > 0 and back.any():
        near = bounding_box(back, pad)  # open only around the part behind the centre of mass
        kept[near] = np.where(behind[near], _opening(sub[near], radius_mm, spacing), sub[near])
    # process tips: posterior (spinous), left and right (transverse) reach from the centre of mass
    draws = rng.uniform(size=3)
    cuts = rng.uniform(0.6, 0.9, size=3)
    reach_post = float(ys.max()) - y_c
    reach_left = float(xs.max()) - x_c
    reach_right = x_c - float(xs.min())
    if draws[0] < truncation:
        kept &= ~(y > y_c + cuts[0] * reach_post)
    if draws[1] < truncation:
        kept &= ~((x > x_c + cuts[1] * reach_left) & _not_in_front(y, y_c))
    if draws[2] < truncation:
        kept &= ~((x < x_c - cuts[2] * reach_right) & _not_in_front(y, y_c))
    out = mask.copy()
    out[box] = kept
    return out


def _not_in_front(y: np.ndarray, y_c: float, slack_mm: float = 15.0) -> np.ndarray:
    """Points not far in front of the centre of mass (transverse processes lie at or behind it)."""
    return y > y_c - slack_mm


def block_starts(first: int, n: int, spacing: float, block_mm: float, phase: float) -> np.ndarray:
    """Start indices (within a run of ``n`` voxels from global index ``first``) of blocks ``block_mm`` thick.

    Blocks are laid on the global index axis with the given phase (mm); no blocks (every voxel its own) when
    ``block_mm`` is not coarser than ``spacing``.
    """
    if block_mm <= spacing * 1.0001:
        return np.arange(n)
    block = slab_index(first + np.arange(n), spacing, block_mm, phase)
    return np.flatnonzero(np.diff(block, prepend=block[0] - 1))


def block_mean(mask: np.ndarray, starts: list[np.ndarray], counts: list[np.ndarray]) -> np.ndarray:
    """Mean of ``mask`` over the blocks (one value per block)."""
    out = mask.astype(np.float32)
    for a in range(3):
        if len(starts[a]) == mask.shape[a]:
            continue
        out = np.add.reduceat(out, starts[a], axis=a)
        shape = [1, 1, 1]
        shape[a] = -1
        out /= counts[a].reshape(shape).astype(np.float32)
    return out


def signed_distance(inside: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Signed distance (mm), negative inside, crossing zero half-way between in- and outside voxels."""
    half = 0.5 * float(spacing.min())
    outside_d = ndimage.distance_transform_edt(~inside, sampling=spacing)
    inside_d = ndimage.distance_transform_edt(inside, sampling=spacing)
    return np.where(inside, half - inside_d, outside_d - half).astype(np.float32)


def smooth_noise(shape: Sequence[int], spacing: np.ndarray, sigma_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation."""
    field = rng.standard_normal(shape).astype(np.float32)
    field = ndimage.gaussian_filter(field, sigma=np.maximum(sigma_mm / spacing, 1e-3), mode="reflect")
    std = float(field.std())
    return field / std if std > 0 else field


def add_islands(
    owner: np.ndarray,
    spacing: np.ndarray,
    mean_count: float,
    radius_mm: tuple[float, float],
    rng: np.random.Generator,
) -> None:
    """Paint small blobs up to ~20 mm from the labels, touching nothing, with the nearest label (in place)."""
    count = int(rng.poisson(mean_count)) if mean_count > 0 else 0
    if count == 0 or not owner.any():
        return
    dist, nearest = ndimage.distance_transform_edt(owner == 0, sampling=spacing, return_indices=True)
    labels_at = owner[tuple(nearest)]
    clearance = dist.copy()  # distance to anything painted, islands included; dist: to the vertebrae
    touch = float(np.linalg.norm(spacing))  # farther than this from a label, a cell cannot neighbour it
    lo_r, hi_r = radius_mm
    for _ in range(count):
        r = float(rng.uniform(lo_r, hi_r))
        clear = r + touch + 1.0
        candidates = np.flatnonzero((clearance.ravel() > clear) & (dist.ravel() < clear + 15.0))
        if candidates.size == 0:
            return
        centre = np.array(np.unravel_index(int(rng.choice(candidates)), owner.shape))
        label = labels_at[tuple(centre)]
        radii = r * rng.uniform(0.7, 1.3, 3)
        reach = np.ceil(radii / spacing).astype(int)
        box = tuple(slice(max(c - k, 0), min(c + k + 1, n)) for c, k, n in zip(centre, reach, owner.shape, strict=True))
        grids = np.ogrid[tuple(slice(b.start - c, b.stop - c) for b, c in zip(box, centre, strict=True))]
        blob = sum((gr * s / rr) ** 2 for gr, s, rr in zip(grids, spacing, radii, strict=True)) <= 1.0
        blob &= clearance[box] > touch
        owner[box][blob & (owner[box] == 0)] = label
        # later islands keep clear of this one: update the distances around it
        around = tuple(
            slice(max(b.start - k, 0), min(b.stop + k, n))
            for b, k, n in zip(box, np.ceil(40.0 / spacing).astype(int), owner.shape, strict=True)
        )
        local = ndimage.distance_transform_edt(owner[around] != label, sampling=spacing)
        clearance[around] = np.minimum(clearance[around], local)


__all__ = [
    "AMPLITUDE_PER_SLICE_MM",
    "OPTION_RANGES",
    "POSTERIOR_LOSS_PER_SLICE_MM",
    "SLICE_AXES",
    "acquisition_geometry",
    "add_islands",
    "block_mean",
    "block_starts",
    "bounding_box",
    "degrade",
    "lose_posterior",
    "physical_axes",
    "physical_coordinate",
    "signed_distance",
    "slab_index",
    "smooth_noise",
    "option_problem",
    "slice_array_axis",
]
