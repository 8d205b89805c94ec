"""Data consistency: keep the refined shape faithful to what the thick-slice input shows (numpy only).

Thick-slice forward model (DESIGN.md section 3, data consistency). Every voxel ``p`` of a vertebra's 128^3
patch (1 mm, in its pose frame) lies in one voxel ``k`` of the input grid, its *slab* (for a 0.6 x 0.6 x 5 mm
input, a 5 mm slab along the coarse axis). The forward model ``A`` averages a decoded probability patch
``x`` over each slab, ``(A x)_k``; the input shows, for slab ``k``, the label ``y_k`` in {0, 1} of its
input voxel (this vertebra or not), read from the input voxel itself: every slab inside the input's field
of view is observed, none outside it.

Gradient-free guidance (DESIGN.md: "A gradient-free form needs only the encoder"): with ``P_y`` the
smallest shift of each observed slab's voxels that makes its average agree with the label it shows
(at least 1/2 + ``margin`` inside, at most 1/2 - ``margin`` outside, clipped to [0, 1]; slabs that already
agree, and voxels outside the input's field of view, are left alone),

    z <- z + gamma (Enc(P_y(D(z))) - Enc(D(z)))

moves the latent by the encoder's reading of the correction. The prior decides what the slabs cannot show
(anything inside a slab whose average already agrees); the step never moves a shape away from agreement.
The measured comparison with the likelihood gradient J_D^T A^T r is in docs/TRAINING.md.

Hard data consistency (:func:`project_labels`, as MRI reconstruction ends with a data-consistency
projection): after the result is thresholded, every observed slab whose majority disagrees with the label
the input shows gets the fewest voxel changes that make it agree, taking first the voxels the result is
least sure of (nearest its surface by Euclidean distance). Measured on held-out real CT (issue 19): clean
5 mm slabs DSC 0.907 -> 0.935 (input 0.933), clean 7 mm 0.889 -> 0.914.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .volume import Geometry


@dataclass(frozen=True)
class SlabObservation:
    """What the input shows of one vertebra, per slab of its patch."""

    slab: np.ndarray
    """int32 [P, P, P]: slab number of each patch voxel (0..S-1), -1 outside the input's field of view."""
    counts: np.ndarray
    """float32 [S]: patch voxels per slab."""
    inside: np.ndarray
    """bool [S]: the slab shows this vertebra (observed inside)."""
    outside: np.ndarray
    """bool [S]: the slab shows no part of it (observed outside)."""

    @property
    def slabs(self) -> int:
        return int(self.counts.size)


def patch_to_input_index(
    working: Geometry, box_start: Sequence[int], rotation: np.ndarray, size: int, source: Geometry
) -> np.ndarray:
    """4x4 affine from patch voxel (k, j, i) to the continuous array index (k, j, i) of the ``source`` grid.

    The patch voxel ``p`` lies at working index ``start + size // 2 + R (p - size // 2)`` (see
    :func:`vertrefine.spatial.crop_in_frame`).
    """
    centre = np.asarray(box_start, dtype=float) + size // 2
    pc = np.full(3, size // 2, dtype=float)
    to_working = np.eye(4)
    to_working[:3, :3] = rotation
    to_working[:3, 3] = centre - rotation @ pc
    flip = np.eye(4)[[2, 1, 0, 3]]  # (k, j, i, 1) <-> (i, j, k, 1)
    working_to_lps = working.index_to_physical_matrix() @ flip
    lps_to_source = flip @ np.linalg.inv(source.index_to_physical_matrix())
    return lps_to_source @ working_to_lps @ to_working


def _source_voxels(affine: np.ndarray, source_shape: Sequence[int], size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(source array index (k, j, i) of each patch voxel's centre, three int32 [P, P, P]; inside the source)."""
    axes = np.arange(size, dtype=np.float32)
    m, b = affine[:3, :3].astype(np.float32), affine[:3, 3].astype(np.float32)
    # index = m @ (k, j, i) + b, built from three broadcast outer sums (no [3, P^3] coordinate array)
    index = [
        np.rint(
            (m[r, 0] * axes)[:, None, None] + (m[r, 1] * axes)[None, :, None] + (m[r, 2] * axes)[None, None, :] + b[r]
        ).astype(np.int32)
        for r in range(3)
    ]
    valid = np.ones((size,) * 3, dtype=bool)
    for r in range(3):
        valid &= (index[r] >= 0) & (index[r] < int(source_shape[r]))
    return index, valid


def field_of_view(affine: np.ndarray, source_shape: Sequence[int], size: int) -> np.ndarray:
    """bool [P, P, P]: the patch voxels whose centre lies in a voxel of the input grid (its field of view)."""
    return _source_voxels(affine, source_shape, size)[1]


def observe(affine: np.ndarray, source_labels: np.ndarray, value: int, size: int) -> SlabObservation:
    """The slabs of a [size]^3 patch and what the input shows in each: whether its voxel is ``value``.

    ``affine`` maps patch voxels to array indices of the input grid (:func:`patch_to_input_index`); a patch
    voxel's slab is the input voxel its centre falls in, and the slab shows this vertebra when that input
    voxel holds ``value`` in ``source_labels`` (the input's labels, or its vertebra instances, on its own
    grid: never an interpolation of them, which would blur exactly the boundary slabs). Patch voxels outside
    the input's field of view get slab -1.
    """
    index, valid = _source_voxels(affine, source_labels.shape, size)
    if not valid.any():
        empty = np.zeros(0, np.float32)
        return SlabObservation(np.full((size,) * 3, -1, np.int32), empty, empty.astype(bool), empty.astype(bool))
    lo = [int(index[r][valid].min()) for r in range(3)]
    extent = [int(index[r][valid].max()) - lo[r] + 1 for r in range(3)]
    flat = ((index[0] - lo[0]) * extent[1] + (index[1] - lo[1])) * extent[2] + (index[2] - lo[2])
    cells = extent[0] * extent[1] * extent[2]
    if cells <= valid.size:  # thick slabs: count voxels per input voxel of the box
        flat = np.where(valid, flat, cells)  # one spare bin for outside
        full = np.bincount(flat.ravel(), minlength=cells + 1)[:-1]
        used = np.flatnonzero(full)
        counts = full[used]
        lut = np.full(cells + 1, -1, dtype=np.int32)
        lut[used] = np.arange(used.size, dtype=np.int32)
        ids = lut[flat]
    else:  # an input finer than the patch: its box holds more input voxels than the patch has voxels
        used, inverse, counts = np.unique(flat[valid], return_inverse=True, return_counts=True)
        ids = np.full(flat.shape, -1, dtype=np.int32)
        ids[valid] = inverse
    # each used cell is one input voxel: read its label once
    local = np.unravel_index(used, extent)
    shows = source_labels[tuple(local[r] + lo[r] for r in range(3))] == value
    return SlabObservation(
        slab=ids.reshape((size,) * 3), counts=counts.astype(np.float32), inside=shows, outside=~shows
    )


def slab_means(x: np.ndarray, observation: SlabObservation) -> np.ndarray:
    """(A x)_k: the mean of ``x`` [P, P, P] over each slab [S]."""
    valid = observation.slab >= 0
    sums = np.bincount(observation.slab[valid], weights=x[valid], minlength=observation.slabs)
    return (sums / np.maximum(observation.counts, 1)).astype(np.float32)


def project(x: np.ndarray, observation: SlabObservation, margin: float = 0.1) -> np.ndarray:
    """P_y(x): ``x`` [P, P, P] in [0, 1] with each disagreeing observed slab shifted towards its label.

    Observed-inside slabs whose mean is below 1/2 + ``margin`` are raised by the difference, observed-outside
    slabs above 1/2 - ``margin`` lowered (clipped to [0, 1]); every other voxel keeps its value.
    """
    means = slab_means(x, observation)
    shift = np.zeros(observation.slabs + 1, dtype=np.float32)  # last entry: voxels outside the field of view
    shift[:-1] = np.where(observation.inside, np.maximum(0.5 + margin - means, 0.0), 0.0)
    shift[:-1] += np.where(observation.outside, np.minimum(0.5 - margin - means, 0.0), 0.0)
    return np.clip(x + shift[observation.slab], 0.0, 1.0)


def agreement(x: np.ndarray, observation: SlabObservation, threshold: float = 0.5) -> float:
    """Fraction of observed slabs whose mean of ``x`` falls on the side of ``threshold`` the input shows."""
    means = slab_means(x, observation)
    observed = observation.inside | observation.outside
    if not observed.any():
        return 1.0
    right = np.where(observation.inside, means >= threshold, means < threshold)
    return float(right[observed].mean())


def project_labels(
    member: np.ndarray, free: np.ndarray, slab: np.ndarray, inside: np.ndarray, outside: np.ndarray
) -> np.ndarray:
    """The smallest change of a binary result that makes every observed slab's majority what the input shows.

    ``member`` (bool [a, b, c]) is the result (one vertebra) on part of the working grid, ``slab`` (int32,
    same shape) each voxel's slab (:class:`SlabObservation.slab`; -1: not observed), ``inside`` / ``outside``
    (bool [S]) what the input shows per slab. A slab holds the result when at least half of its voxels (of
    this array) do (the forward model of :func:`agreement`). An observed-inside slab that does not hold it
    gains the ``ceil(n / 2) - c`` voxels of ``free`` (bool, same shape: voxels that may join, e.g. the
    background) nearest the result; an observed-outside slab that holds it loses the ``c - ceil(n / 2) + 1``
    voxels nearest the result's surface (least deep inside). Distances are Euclidean in voxels
    (``scipy.ndimage.distance_transform_edt``; the working grid is isotropic), computed only on the box of the
    slabs that change. Slabs with too few free voxels gain what they can. Returns the new bool mask (a copy).
    """
    member = np.asarray(member, dtype=bool)
    out = member.copy()
    observed = slab >= 0
    labels = slab[observed]
    n_slabs = inside.size
    if not labels.size or not n_slabs:
        return out
    counts = np.bincount(labels, minlength=n_slabs)
    held = np.bincount(labels[member[observed]], minlength=n_slabs)
    half = (counts + 1) // 2  # the slab holds the result from ceil(n / 2) voxels on
    gain = np.where(inside & (held < half) & (counts > 0), half - held, 0)
    loss = np.where(outside & (held >= half) & (counts > 0), held - half + 1, 0)
    change = (gain > 0) | (loss > 0)
    if not change.any():
        return out
    wanted = np.zeros(n_slabs + 1, dtype=bool)
    wanted[:-1] = change
    in_changed = wanted[np.where(observed, slab, n_slabs)]
    box = tuple(
        slice(max(int(idx.min()) - 1, 0), int(idx.max()) + 2) for idx in np.nonzero(in_changed | member)
    )
    local_member, local_slab = member[box], np.where(observed[box], slab[box], n_slabs)
    region = out[box]  # a view: changes reach ``out``
    for need, candidates, distance_from, value in (
        (gain, free[box] & ~local_member, ~local_member, True),
        (loss, local_member, local_member, False),
    ):
        need_full = np.append(need, 0)
        pick = candidates & (need_full[local_slab] > 0)
        if not pick.any():
            continue
        where = np.flatnonzero(pick)
        slabs_of = local_slab.ravel()[where]
        key = ndimage.distance_transform_edt(distance_from).ravel()[where]
        order = np.lexsort((key, slabs_of))  # by slab, then nearest the surface first
        where, slabs_of = where[order], slabs_of[order]
        rank = np.arange(where.size) - np.searchsorted(slabs_of, slabs_of, side="left")
        chosen = where[rank < need_full[slabs_of]]
        region[np.unravel_index(chosen, region.shape)] = value
    return out


Encode = Callable[[np.ndarray], np.ndarray]
"""Binary or soft patches [B, P, P, P] -> encoder means [B, *Z]."""
DecodeChunks = Callable[[np.ndarray, Sequence[int]], Iterator[tuple[int, np.ndarray]]]
"""(latents [B, *Z], the rows of the guided batch they are) -> (start row, probabilities [b, P, P, P]) a chunk
at a time (the rows let an input-conditioned decoder take each row's input patch)."""


class DataConsistency:
    """The guidance step ``z <- z + gamma (Enc(P_y(D(z))) - Enc(D(z)))`` for rows of latents.

    ``observations[r]`` is row ``r``'s :class:`SlabObservation` (None: the row is not guided, e.g. an input
    on a grid as fine as the working grid, where every slab is one voxel and the input is the answer).
    """

    def __init__(
        self,
        encode: Encode,
        decode_chunks: DecodeChunks,
        observations: Sequence[SlabObservation | None],
        margin: float = 0.1,
    ) -> None:
        self.encode = encode
        self.decode_chunks = decode_chunks
        self.observations = list(observations)
        self.margin = float(margin)

    def __call__(self, z: np.ndarray, weight: float) -> np.ndarray:
        """One guidance step on ``z`` [B, *Z] (B = len(observations)) with weight ``gamma`` = ``weight``."""
        if len(z) != len(self.observations):
            raise ValueError(f"{len(z)} latents for {len(self.observations)} observations")
        # rows without an observation are not guided, nor are diverged chains (NaN rows, vertrefine.sampler)
        rows = [r for r, o in enumerate(self.observations) if o is not None and np.isfinite(z[r]).all()]
        if not rows or weight == 0:
            return z
        out = z.copy()
        for start, probability in self.decode_chunks(z[rows], rows):
            chunk = rows[start : start + len(probability)]
            projected = np.stack(
                [project(p, self.observations[r], self.margin) for p, r in zip(probability, chunk, strict=True)]
            )
            mu = self.encode(np.concatenate([projected, probability]))
            out[chunk] += np.float32(weight) * (mu[: len(chunk)] - mu[len(chunk) :])
        return out
