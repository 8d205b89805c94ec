"""The torch Dataset over a patch cache (:mod:`.patch_cache`), with its augmentation.

Dataset (:class:`PatchDataset`): items are the 64^3 occupancy of a patch (or one of its degraded variants)
as input and the clean occupancy as target, with the same random zoom, shift and left-right flip applied
to both (``torch.nn.functional.grid_sample``). The randomness of item ``i`` in epoch ``e`` comes from a
generator seeded with ``(seed, e, i)`` only, so a resumed run sees exactly the data of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .patch_cache import DOWNSAMPLE, PatchCache

# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augmentation:
    """Random deformation of a patch: what a shape model of real vertebrae needs to see.

    The defaults are a similarity transform (the paper's zoom and shift) plus rotations about every axis,
    anisotropic scaling, a smooth elastic deformation and left-right flips. The same deformation is
    applied to the input and the target of an item.
    """

    zoom: tuple[float, float] = (0.9, 1.1)
    """Isotropic scale factor range (> 1 enlarges the vertebra)."""
    shift_mm: float = 7.0
    """Maximum shift along each axis (mm; uniform in [-shift_mm, shift_mm])."""
    flip_prob: float = 0.5
    """Probability of a left-right flip (array axis 2 of the working grid)."""
    rotation_deg: float = 30.0
    """Maximum rotation about each of the three axes (degrees; uniform, composed z-y-x); 0 = none."""
    anisotropy: float = 0.1
    """Extra per-axis scale factor in [1 - anisotropy, 1 + anisotropy] on top of ``zoom``; 0 = none."""
    elastic_mm: float = 2.0
    """Standard deviation (mm) of a smooth displacement field (4^3 control points, trilinear); 0 = none."""


NO_AUGMENTATION = Augmentation(
    zoom=(1.0, 1.0), shift_mm=0.0, flip_prob=0.0, rotation_deg=0.0, anisotropy=0.0, elastic_mm=0.0
)
ELASTIC_CONTROL = 4
"""Control points per axis of the elastic displacement field."""


@dataclass(frozen=True)
class ItemDraw:
    """The random choices for one item in one epoch."""

    variant: int
    """Degraded variant used as input, or -1 for the clean patch."""
    zoom: float
    shift: tuple[float, float, float]
    """Shift in low-res voxels along array axes (k, j, i); positive moves the content to larger indices."""
    flip: bool
    rotation: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Rotation angles (degrees) about array axes (k, j, i)."""
    scales: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Per-axis scale factors along array axes (k, j, i), on top of ``zoom``."""
    elastic: tuple[float, ...] = ()
    """Displacement of each control point (mm), [3, c, c, c] flattened (k, j, i components); () = none."""


class PatchDataset(Dataset):
    """Items ``dict(x=[1,64,64,64] float32 input, target=[1,64,64,64] float32 clean occupancy, index=int)``.

    ``augment`` True uses the default :class:`Augmentation`, False none (x and target are the cached maps).
    With probability ``degraded_prob`` x is a random degraded variant of the patch (denoising training).
    ``indices`` may repeat a cache row (oversampling, e.g. of real CT against phantoms); the randomness of the
    n-th occurrence of cache row ``i`` in epoch ``e`` (see :meth:`set_epoch`) depends on ``(seed, e, i, n)`` only.
    """

    def __init__(
        self,
        cache: PatchCache,
        indices: Sequence[int],
        *,
        augment: bool | Augmentation,
        degraded_prob: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= degraded_prob <= 1.0:
            raise ValueError(f"degraded_prob must be in [0, 1], got {degraded_prob}")
        if degraded_prob > 0 and cache.n_variants == 0:
            raise ValueError("degraded_prob > 0 needs a patch cache built with degraded_variants > 0")
        self.cache = cache
        self.indices = [int(i) for i in indices]
        seen: dict[int, int] = {}
        self.occurrence = []
        for i in self.indices:
            self.occurrence.append(seen.get(i, 0))
            seen[i] = seen.get(i, 0) + 1
        self.augmentation = Augmentation() if augment is True else augment or None
        self.degraded_prob = float(degraded_prob)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws items get (call before iterating a DataLoader over it)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def draw(self, index: int, occurrence: int = 0) -> ItemDraw:
        """The random choices for the ``occurrence``-th copy of cache row ``index`` in the current epoch."""
        key = [self.seed, self.epoch, int(index)] + ([int(occurrence)] if occurrence else [])
        rng = np.random.default_rng(key)
        degraded = rng.random() < self.degraded_prob
        variant = int(rng.integers(self.cache.n_variants)) if self.cache.n_variants else 0
        aug = self.augmentation or NO_AUGMENTATION
        zoom = float(rng.uniform(*aug.zoom))
        shift = rng.uniform(-1.0, 1.0, 3) * aug.shift_mm / DOWNSAMPLE
        flip = bool(rng.random() < aug.flip_prob)
        rotation = rng.uniform(-1.0, 1.0, 3) * aug.rotation_deg
        scales = 1.0 + rng.uniform(-1.0, 1.0, 3) * aug.anisotropy
        elastic = rng.standard_normal(3 * ELASTIC_CONTROL**3) * aug.elastic_mm if aug.elastic_mm > 0 else ()
        if self.augmentation is None:
            return ItemDraw(variant if degraded else -1, 1.0, (0.0, 0.0, 0.0), False)
        return ItemDraw(
            variant if degraded else -1,
            zoom,
            tuple(float(v) for v in shift),
            flip,
            tuple(float(v) for v in rotation),
            tuple(float(v) for v in scales),
            tuple(float(v) for v in elastic),
        )

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.indices[position]
        draw = self.draw(index, self.occurrence[position])
        target = np.asarray(self.cache.lowres(index), dtype=np.float32)
        x = target if draw.variant < 0 else np.asarray(self.cache.degraded_lowres(index, draw.variant), np.float32)
        maps = torch.from_numpy(np.stack([x, target]))[None]  # [1, 2, 64, 64, 64]
        if self.augmentation is not None:
            maps = apply_draw(maps, draw)
        return {"x": maps[0, :1].clone(), "target": maps[0, 1:].clone(), "index": index}


def apply_draw(maps: torch.Tensor, draw: ItemDraw) -> torch.Tensor:
    """:func:`transform` of ``maps`` [B, C, 64, 64, 64] by the deformation of ``draw``."""
    elastic = np.reshape(draw.elastic, (3,) + (ELASTIC_CONTROL,) * 3) / DOWNSAMPLE if draw.elastic else None
    return transform(maps, draw.zoom, draw.shift, draw.flip, draw.rotation, draw.scales, elastic)


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """[3, 3] rotation R = R_k R_j R_i about array axes (k, j, i) by ``angles_deg`` (acting on (k, j, i) vectors)."""
    matrices = []
    for axis, angle in enumerate(angles_deg):
        c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
        a, b = [n for n in range(3) if n != axis]
        m = np.eye(3)
        m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
        matrices.append(m)
    return matrices[0] @ matrices[1] @ matrices[2]


def transform(
    maps: torch.Tensor,
    zoom: float,
    shift: Sequence[float],
    flip: bool,
    rotation: Sequence[float] = (0.0, 0.0, 0.0),
    scales: Sequence[float] = (1.0, 1.0, 1.0),
    elastic: np.ndarray | None = None,
) -> torch.Tensor:
    """Deform every channel of ``maps`` [B, C, D, H, W] the same way: trilinear, zeros outside, clamped to [0, 1].

    The content is scaled about the patch centre (``zoom`` x ``scales`` along (D, H, W)), rotated
    (``rotation``: degrees about (D, H, W), see :func:`rotation_matrix`), flipped left-right (axis W), then
    shifted by ``shift`` voxels along (D, H, W). ``elastic`` [3, c, c, c] displaces where each output voxel
    samples from (voxels along (D, H, W) at c^3 control points, trilinearly interpolated).
    """
    size = np.array(maps.shape[-3:], dtype=np.float64)  # (D, H, W)
    forward = rotation_matrix(rotation) @ np.diag(zoom * np.asarray(scales, dtype=np.float64))  # (k, j, i) vectors
    inverse = np.linalg.inv(forward)
    if flip:
        inverse = np.diag([1.0, 1.0, -1.0]) @ inverse
    # affine_grid works in normalised (x, y, z) = (W, H, D) order: reverse both axes of the matrix.
    matrix = inverse[::-1, ::-1].copy()
    offset = (np.asarray(shift, dtype=np.float64) * 2.0 / size)[::-1]
    theta = torch.zeros(1, 3, 4, dtype=torch.float64)
    theta[0, :, :3] = torch.from_numpy(matrix)
    theta[0, :, 3] = torch.from_numpy(-matrix @ offset)  # output q samples the input at M (q - offset)
    grid = F.affine_grid(theta.to(maps.dtype).expand(maps.shape[0], 3, 4), list(maps.shape), align_corners=False)
    if elastic is not None:
        field = torch.from_numpy(np.asarray(elastic, dtype=np.float64) * 2.0 / size[:, None, None, None])
        field = F.interpolate(field[None].to(maps.dtype), size=maps.shape[-3:], mode="trilinear", align_corners=True)
        grid = grid + field[0].flip(0).permute(1, 2, 3, 0)[None]  # [1, D, H, W, (x, y, z)]
    out = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.clamp_(0.0, 1.0)
