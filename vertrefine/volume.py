"""The Volume type: a label array plus its spatial geometry, understood by every module.

Conventions (the one internal convention of vertrefine):

* Physical coordinates are LPS millimetres (DICOM / ITK): +x = patient left, +y = posterior,
  +z = superior. NIfTI's RAS is converted on reading and back on writing.
* Arrays are indexed ``[k, j, i]`` (= ``[z, y, x]``), as ``SimpleITK.GetArrayFromImage`` returns them.
* Index tuples handed to :class:`Geometry` methods are in ITK order ``(i, j, k)``.
* ``direction`` is the 3x3 matrix whose column ``c`` is the LPS unit vector of index axis ``c``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # SimpleITK is imported where it is used: the training path runs without it
    import SimpleITK as sitk

SourceKind = Literal["nifti", "dicom-series", "dicom-seg", "memory"]


PLAUSIBLE_SPACING_MM = (0.01, 20.0)
"""Voxel sizes (mm, inclusive) a label map of a spine can have. The finest: micro-CT of excised vertebrae
(about 10 micrometres; clinical CT and MRI are no finer than 0.2 mm). The coarsest: no CT or MRI protocol
acquires slices thicker than about 10 mm, even with a slice gap (spacing = thickness + gap: 6 + 6 mm at
most in practice); at 20 mm a vertebra (25-40 mm tall) spans one or two voxels and nothing of its shape
is left. Outside these bounds the header is wrong (units, a lost scale, a corrupt pixdim): refine would
resample to a 1 mm grid of terabytes (100 mm voxels) or of a few voxels (0.0001 mm voxels)."""
MAX_FIELD_OF_VIEW_MM = 3000.0
"""The longest side of a label map (mm): a whole-body CT is about 2000 mm long."""
MAX_VOXELS = 2**31 - 1
"""The most voxels a label map may hold: 2 GB at one byte a voxel, 16 times a 0.3 mm lumbar CT map (131 M);
more is a corrupt header (and more than NIfTI-1 tools index)."""
MAX_COORDINATE_MM = 1.0e6
"""An origin further from the scanner's isocentre than 1 km is a corrupt header, not a position."""


def grid_problem(geometry: Geometry) -> str | None:
    """Why a file's grid cannot be a scan of a patient (what no scanner writes), or None.

    Checked on the header alone, before any voxel is read or resampled: a non-finite (NaN, infinite)
    origin, direction or spacing; a voxel size outside :data:`PLAUSIBLE_SPACING_MM`; a side longer than
    :data:`MAX_FIELD_OF_VIEW_MM`; an origin beyond :data:`MAX_COORDINATE_MM`. Spacing is in ITK order
    ``(i, j, k)``, mm; origin LPS mm.
    """
    spacing = np.asarray(geometry.spacing, dtype=float)
    origin = np.asarray(geometry.origin, dtype=float)
    direction = np.asarray(geometry.direction, dtype=float)
    if not np.all(np.isfinite(origin)):
        return f"an implausible affine: its translation (origin) is not finite ({_values(origin)} mm)"
    if not np.all(np.isfinite(direction)) or not np.all(np.isfinite(spacing)):
        return "an implausible affine: its rotation or voxel sizes are not finite (NaN or infinite)"
    low, high = PLAUSIBLE_SPACING_MM
    if spacing.min() < low or spacing.max() > high:
        return (
            f"an implausible voxel size ({_values(spacing)} mm; a scan's voxels are {low:g} to {high:g} mm): "
            "the header's spacing or units are wrong"
        )
    extent = spacing * np.asarray(geometry.size_ijk, dtype=float)
    if extent.max() > MAX_FIELD_OF_VIEW_MM:
        return (
            f"an implausible field of view ({_values(extent)} mm; no scan is longer than "
            f"{MAX_FIELD_OF_VIEW_MM:g} mm): the header's spacing or units are wrong"
        )
    if np.abs(origin).max() > MAX_COORDINATE_MM:
        return f"an implausible affine: its origin ({_values(origin)} mm) lies kilometres from the scanner"
    return None


def _values(values: np.ndarray) -> str:
    return " x ".join(f"{v:.4g}" for v in values)


@dataclass(frozen=True)
class Geometry:
    """Where an array's voxels lie in patient space."""

    shape: tuple[int, int, int]
    """Array shape ``(nz, ny, nx)``."""
    spacing: tuple[float, float, float]
    """Voxel size in mm along index axes ``(i, j, k)``."""
    origin: tuple[float, float, float]
    """LPS position (mm) of the centre of voxel ``(0, 0, 0)``."""
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    """Row-major 3x3 direction cosines; column ``c`` is the LPS direction of index axis ``c``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", tuple(float(d) for d in np.ravel(self.direction)))
        if len(self.shape) != 3 or len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError("Geometry needs a 3D shape, spacing, origin and a 3x3 direction")

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        """Size in ITK order ``(nx, ny, nz)``."""
        return (self.shape[2], self.shape[1], self.shape[0])

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def index_to_physical_matrix(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous ITK indices ``(i, j, k, 1)`` to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix * np.asarray(self.spacing)[None, :]
        m[:3, 3] = self.origin
        return m

    def index_to_physical(self, ijk: np.ndarray) -> np.ndarray:
        """LPS mm of continuous ITK indices; ``ijk`` is ``(3,)`` or ``(N, 3)``."""
        ijk = np.asarray(ijk, dtype=float)
        m = self.index_to_physical_matrix()
        return ijk @ m[:3, :3].T + m[:3, 3]

    def physical_to_index(self, lps: np.ndarray) -> np.ndarray:
        """Continuous ITK indices of LPS points; ``lps`` is ``(3,)`` or ``(N, 3)``."""
        lps = np.asarray(lps, dtype=float)
        m = self.index_to_physical_matrix()
        return (lps - m[:3, 3]) @ np.linalg.inv(m[:3, :3]).T

    def is_orthonormal(self, tol: float = 1e-4) -> bool:
        d = self.direction_matrix
        return bool(np.allclose(d.T @ d, np.eye(3), atol=tol)) and abs(abs(np.linalg.det(d)) - 1) < tol

    def same_grid(self, other: Geometry, tol: float = 1e-4) -> bool:
        """True when both describe the same voxels (shape, spacing, origin, direction within ``tol``)."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol * max(1.0, *np.abs(self.origin)))
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def same_voxels(self, other: Geometry, tol: float = 1e-3) -> bool:
        """True when both grids hold the same voxel centres, whatever the order and direction of their array
        axes (a grid and its copy with axes flipped or permuted, as dcm2niix writes a DICOM series' grid).

        Each index axis' step (direction times spacing, mm) must be plus or minus a step of the other grid with
        the same number of voxels (within ``tol`` mm), and the eight corner voxel centres must coincide (within
        a tenth of the smallest spacing: float noise of a header passes, a grid shifted by half a voxel not).
        """
        steps = self.direction_matrix * np.asarray(self.spacing)[None, :]
        other_steps = other.direction_matrix * np.asarray(other.spacing)[None, :]
        free = [0, 1, 2]
        for axis in range(3):
            match = next(
                (
                    b
                    for b in free
                    if self.size_ijk[axis] == other.size_ijk[b]
                    and min(
                        np.abs(steps[:, axis] - other_steps[:, b]).max(),
                        np.abs(steps[:, axis] + other_steps[:, b]).max(),
                    )
                    <= tol
                ),
                None,
            )
            if match is None:
                return False
            free.remove(match)

        def corners(g: Geometry) -> np.ndarray:
            n = np.asarray(g.size_ijk) - 1
            return g.index_to_physical(np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])]))

        mine, theirs = corners(self), corners(other)
        near = 0.1 * min(min(self.spacing), min(other.spacing))  # far below the half voxel of a shifted grid
        return all(np.abs(theirs - point).max(axis=1).min() <= near for point in mine)

    def describe(self) -> str:
        """One line, every per-axis value in ITK order ``(i, j, k)``: size, spacing (mm), LPS origin (mm)."""
        return (
            f"size (i, j, k) {self.size_ijk} spacing (i, j, k) {tuple(round(s, 4) for s in self.spacing)} mm "
            f"origin LPS {tuple(round(o, 3) for o in self.origin)} mm"
        )

    def to_record(self) -> dict[str, Any]:
        """The grid as a JSON-ready dict with explicit keys, every per-axis list in ITK order ``(i, j, k)``.

        ``size_ijk`` (voxels), ``spacing_ijk_mm``, ``origin_lps_mm`` (centre of voxel (0, 0, 0)) and
        ``direction_lps`` (row-major 3x3; column c is the LPS direction of index axis c), as DICOM and ITK
        give them. (Arrays are indexed ``[k, j, i]``: ``array.shape`` is ``size_ijk`` reversed.)
        """
        return {
            "size_ijk": list(self.size_ijk),
            "spacing_ijk_mm": [round(s, 6) for s in self.spacing],
            "origin_lps_mm": [round(o, 4) for o in self.origin],
            "direction_lps": [round(d, 6) for d in self.direction],
        }

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Geometry:
        nx, ny, nz = image.GetSize()
        return cls((nz, ny, nx), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set this geometry's spacing, origin and direction on ``image`` (in place) and return it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def reference_image(self, pixel_id: int | None = None) -> sitk.Image:
        """An empty SimpleITK image (default uint8) on this grid, for use as a resampling reference."""
        import SimpleITK as sitk

        return self.apply_to(sitk.Image(list(self.size_ijk), sitk.sitkUInt8 if pixel_id is None else pixel_id))


@dataclass(frozen=True)
class Source:
    """Where a Volume came from, with what a writer needs to reproduce the input's format."""

    path: Path | None
    kind: SourceKind = "memory"
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Format-specific: e.g. the NIfTI header, or the DICOM datasets / references of a series."""
    warnings: tuple[str, ...] = field(default=(), compare=False, hash=False)
    """What the reader had to decide about this input (e.g. which of a NIfTI's qform and sform is used)."""


@dataclass
class Volume:
    """A label map (or any scalar array) on a known grid."""

    array: np.ndarray
    geometry: Geometry
    source: Source = field(default_factory=lambda: Source(None))

    def __post_init__(self) -> None:
        if tuple(self.array.shape) != self.geometry.shape:
            raise ValueError(f"array shape {self.array.shape} does not match geometry {self.geometry.shape}")

    @property
    def labels(self) -> list[int]:
        """Sorted non-zero label values present in the array."""
        values = np.unique(self.array)
        return [int(v) for v in values if v != 0]

    def reoriented(self, target: Geometry) -> Volume:
        """This volume on ``target``, a grid holding the same voxel centres in another axis order or direction
        (:meth:`Geometry.same_voxels`): the array's axes permuted and flipped, no value changed.

        Raises ValueError when ``target`` does not hold the same voxels.
        """
        g = self.geometry
        if not g.same_voxels(target):
            raise ValueError("reoriented needs a grid holding the same voxels")
        # where this grid's first voxel and its index steps (i, j, k) fall in target's (i, j, k) indices
        first = np.rint(target.physical_to_index(g.index_to_physical([0, 0, 0]))).astype(int)
        steps = np.rint(target.physical_to_index(g.index_to_physical(np.eye(3))) - first).astype(int)  # rows: i, j, k
        array = self.array  # [k, j, i]
        order = [2 - int(np.flatnonzero(steps[2 - a])[0]) for a in range(3)]  # target array axis of each own axis
        moved = np.moveaxis(array, [0, 1, 2], order)
        flips = [a for a in range(3) if steps[2 - a].sum() < 0]
        flipped = np.flip(moved, axis=[order[a] for a in flips]) if flips else moved
        return replace(self, array=np.ascontiguousarray(flipped), geometry=target)

    def with_array(self, array: np.ndarray) -> Volume:
        """Same grid and source, other voxels."""
        return replace(self, array=array)

    def to_sitk(self) -> sitk.Image:
        import SimpleITK as sitk

        return self.geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(self.array)))

    @classmethod
    def from_sitk(cls, image: sitk.Image, source: Source | None = None) -> Volume:
        import SimpleITK as sitk

        return cls(sitk.GetArrayFromImage(image), Geometry.from_sitk(image), source or Source(None))
