"""NIfTI label maps through nibabel, keeping the input's header for an exact round trip.

Orientation: a NIfTI affine maps voxel indices ``(i, j, k)`` to RAS mm and nibabel returns arrays
indexed ``[i, j, k]``. vertrefine works in LPS mm with arrays indexed ``[k, j, i]`` (see volume.py):
reading negates the affine's x and y rows and transposes the array; writing undoes both.
Use :func:`vertrefine.io.read_label_map` / :func:`vertrefine.io.write_label_map` rather than this module.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from .atomic import atomic_path
from .errors import InputError
from .volume import Geometry, Source, Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
# What nibabel, gzip and zlib raise on damaged files (gzip.BadGzipFile is an OSError).
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)


def is_nifti_path(path: str | Path) -> bool:
    """True for ``.nii`` and ``.nii.gz`` names (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def geometry_from_affine(affine: np.ndarray, shape_ijk: tuple[int, int, int]) -> Geometry:
    """LPS :class:`Geometry` of a RAS voxel-to-mm affine for an array of nibabel shape ``(ni, nj, nk)``."""
    affine = np.asarray(affine, dtype=float)
    linear = _LPS_FROM_RAS @ affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if not np.all(np.isfinite(linear)) or np.any(spacing <= 0):
        raise ValueError("the affine is degenerate (zero or non-finite voxel size)")
    ni, nj, nk = shape_ijk
    return Geometry((nk, nj, ni), spacing, _LPS_FROM_RAS @ affine[:3, 3], linear / spacing)


def affine_from_geometry(geometry: Geometry) -> np.ndarray:
    """RAS voxel-to-mm affine (NIfTI sform/qform) of an LPS :class:`Geometry`."""
    affine = np.eye(4)
    affine[:3, :3] = _LPS_FROM_RAS @ (geometry.direction_matrix * np.asarray(geometry.spacing)[None, :])
    affine[:3, 3] = _LPS_FROM_RAS @ np.asarray(geometry.origin)
    return affine


def read_nifti(path: Path) -> Volume:
    """Read a NIfTI file as a (not yet validated) Volume; ``source.meta`` keeps the header.

    ``meta``: ``header`` (a copy of the nibabel header), ``image_class``, ``shape`` (the file's array
    shape, e.g. ``(x, y, z, 1)``), ``dtype`` (the on-disk dtype) and ``geometry``.
    """
    try:
        image = nib.load(str(path))
    except _READ_ERRORS as exc:
        raise InputError(path, f"cannot read this NIfTI file ({_reason(exc)})", _REMEDY_UNREADABLE) from exc
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"is a {type(image).__name__}, not a NIfTI image", "save it as .nii or .nii.gz")
    shape = tuple(int(n) for n in image.shape)
    if len(shape) < 3:
        raise InputError(path, f"is a 2D image (shape {shape})", "pass a 3D label map")
    if len(shape) > 3 and any(n != 1 for n in shape[3:]):
        raise InputError(
            path,
            f"is {len(shape)}D (shape {shape}), a series of volumes, not one label map",
            "split it and pass one 3D volume",
        )
    try:
        data = np.asanyarray(image.dataobj)
    except _READ_ERRORS as exc:
        raise InputError(
            path, f"cannot read the voxel data: truncated or corrupt ({_reason(exc)})", _REMEDY_UNREADABLE
        ) from exc
    if data.dtype.fields is not None:
        raise InputError(path, f"holds {data.dtype} (RGB) voxels, not a label map", "pass a label map")
    data = data.reshape(shape[:3])
    try:
        geometry = geometry_from_affine(image.affine, shape[:3])
    except ValueError as exc:
        raise InputError(path, f"has an unusable affine: {exc}", "fix the file's sform/qform") from exc
    meta: dict[str, Any] = {
        "header": image.header.copy(),
        "image_class": type(image),
        "shape": shape,
        "dtype": image.get_data_dtype(),
        "geometry": geometry,
    }
    return Volume(np.ascontiguousarray(data.transpose(2, 1, 0)), geometry, Source(Path(path), "nifti", meta))


def write_nifti(volume: Volume, path: str | Path, *, like: Volume | None = None) -> Path:
    """Write ``volume`` as NIfTI (``.nii`` or ``.nii.gz``) atomically; return the path.

    When ``like`` (default: ``volume.source``) was read from NIfTI and ``volume`` lies on its grid, the
    output carries the input's header unchanged (qform/sform and codes, pixdim, units, intent, descrip,
    extensions); only the voxels change, stored in the input's dtype when it holds every label. On another
    grid (e.g. the 1 mm grid refine writes for a thick-slice input) the input's header is kept with the new
    shape, spacing and affine, under the input's qform and sform codes. Without a NIfTI ``like`` a header
    is built from the geometry: qform = sform, both with code 1 (scanner), mm units.
    """
    return _write(volume, path, like, lambda preferred: _storage_dtype(volume.array, preferred))


def write_scalar_nifti(volume: Volume, path: str | Path, *, like: Volume | None = None) -> Path:
    """Write a float map (probability, uncertainty) as float32 NIfTI, atomically, on ``like``'s header if any.

    When ``like`` was read from NIfTI and the map lies on its grid, the input's header is reused (only
    dtype and scaling change), so viewers overlay the map exactly on the input.
    """
    return _write(volume, path, like, lambda _: np.dtype(np.float32), reset_scaling=True)


def _write(
    volume: Volume,
    path: str | Path,
    like: Volume | None,
    stored_dtype: Callable[[np.dtype | None], np.dtype],
    *,
    reset_scaling: bool = False,
) -> Path:
    """Write ``volume`` on the input's header when it lies on the input's NIfTI grid, else on a new one.

    ``stored_dtype(preferred)`` picks the on-disk dtype; ``preferred`` is the input's dtype, or None when
    a new header is built.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise ValueError(f"{path}: a NIfTI output needs a .nii or .nii.gz name")
    source = like.source if like is not None else volume.source
    meta = source.meta if source.kind == "nifti" else {}
    data = volume.array.transpose(2, 1, 0)
    if meta and volume.geometry.same_grid(meta["geometry"]):
        header = meta["header"].copy()
        dtype = stored_dtype(np.dtype(meta["dtype"]))
        header.set_data_dtype(dtype)
        if reset_scaling:
            header.set_slope_inter(1.0, 0.0)
        image = meta["image_class"](data.astype(dtype).reshape(meta["shape"]), None, header)
    elif meta:  # another grid in the input's space (e.g. 1 mm from a thick-slice input): its header and codes
        affine = affine_from_geometry(volume.geometry)
        header = meta["header"].copy()
        dtype = stored_dtype(np.dtype(meta["dtype"]))
        header.set_data_dtype(dtype)
        header.set_slope_inter(1.0, 0.0)
        qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
        image = meta["image_class"](data.astype(dtype), affine, header)
        image.set_qform(affine, code=qform_code or (0 if sform_code else 1))
        image.set_sform(affine, code=sform_code or (0 if qform_code else 1))
        image.header.set_zooms(volume.geometry.spacing)
    else:
        affine = affine_from_geometry(volume.geometry)
        image = nib.Nifti1Image(data.astype(stored_dtype(None)), affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return path


def _storage_dtype(array: np.ndarray, preferred: np.dtype | None) -> np.dtype:
    """``preferred`` when it holds every value of ``array`` exactly, else the smallest fitting integer type."""
    low = int(array.min()) if array.size else 0
    high = int(array.max()) if array.size else 0
    if preferred is not None:
        if np.issubdtype(preferred, np.integer):
            info = np.iinfo(preferred)
            if info.min <= low and high <= info.max:
                return preferred
        elif np.issubdtype(preferred, np.floating) and max(-low, high) < 2 ** (np.finfo(preferred).nmant + 1):
            return preferred
    for candidate in (np.uint8, np.uint16, np.int32) if low >= 0 else (np.int16, np.int32):
        info = np.iinfo(candidate)
        if info.min <= low and high <= info.max:
            return np.dtype(candidate)
    return np.dtype(np.int64)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_REMEDY_UNREADABLE = "check that the file is complete (re-copy or re-export it)"
