"""NIfTI label maps through nibabel, keeping the input's header for an exact round trip.

Orientation: a NIfTI affine maps voxel indices ``(i, j, k)`` to RAS mm and nibabel returns arrays
indexed ``[i, j, k]``. vertrefine works in LPS mm with arrays indexed ``[k, j, i]`` (see volume.py):
reading negates the affine's x and y rows and transposes the array; writing undoes both.
Use :func:`vertrefine.io.read_label_map` / :func:`vertrefine.io.write_label_map` rather than this module.
"""

from __future__ import annotations

import logging

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from .atomic import atomic_path
from .errors import InputError
from .filetypes import is_nifti_name as is_nifti_path
from .volume import Geometry, Source, Volume, grid_problem

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
# What nibabel, gzip and zlib raise on damaged files (gzip.BadGzipFile is an OSError).
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)
XFORM_CODES = {0: "unknown", 1: "scanner", 2: "aligned", 3: "Talairach", 4: "MNI", 5: "template"}
"""NIfTI-1 qform_code / sform_code values (NIFTI_XFORM_*)."""
DISAGREE_MM = 1.0
DISAGREE_DEGREES = 1.0
"""qform and sform further apart than this (at any corner of the image, or in rotation) are reported."""
_SHEAR_TOL = 1e-4


def parse_orientation(code: str) -> str:
    """Validate a stated orientation: three letters, one of L/R, one of A/P, one of S/I, in any order.

    Each letter is the patient direction that the voxel index ``i``, ``j``, ``k`` (the file's first,
    second, third array axis) increases towards, as nibabel's axis codes (``aff2axcodes``) and
    ``mri_info`` write it: 'RAS' means i towards the patient's right, j anterior, k superior.
    (ITK-SNAP's and ITK's 'RAI'-style codes name where the axes come *from*: ITK 'LPI' is 'RAS' here.)
    Returns the upper-case code; raises ValueError naming what is wrong.
    """
    text = str(code).strip().upper()
    pairs = ("LR", "AP", "SI")
    used = [next((i for i, pair in enumerate(pairs) if letter in pair), None) for letter in text]
    if len(text) != 3 or None in used or sorted(used) != [0, 1, 2]:  # type: ignore[type-var]
        raise ValueError(
            f"orientation {code!r} is not three letters with one of L/R, one of A/P and one of S/I (e.g. RAS, LPS)"
        )
    return text


def orientation_affine(code: str, zooms: Sequence[float]) -> np.ndarray:
    """RAS voxel-to-mm affine of a stated orientation (:func:`parse_orientation`) and voxel sizes (mm).

    Voxel ``(0, 0, 0)`` lies at the origin, as in NIfTI's method 1 for files without qform and sform.
    """
    ornt = nib.orientations.axcodes2ornt(tuple(parse_orientation(code)))
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for axis, (ras_axis, flip) in enumerate(ornt):
        affine[int(ras_axis), axis] = flip * float(zooms[axis])
    return affine


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


def read_nifti(path: Path, *, assume_orientation: str | None = None) -> Volume:
    """Read a NIfTI file as a (not yet validated) Volume; ``source.meta`` keeps the header.

    The voxel-to-mm transform comes from :func:`header_geometry` (``assume_orientation`` is used only
    for a file whose qform_code and sform_code are both 0; its outputs then carry that orientation).
    ``meta``: ``header`` (a copy of the nibabel header), ``image_class``, ``shape`` (the file's array
    shape, e.g. ``(x, y, z, 1)``), ``dtype`` (the on-disk dtype) and ``geometry``. Header warnings
    (qform and sform disagreeing, an orientation assumed) are in ``source.warnings``.
    Raises InputError (one line naming the file) for unreadable, non-3D, RGB or unoriented files.
    """
    image, shape = _load(path)
    geometry, warnings, header = header_geometry(image, path, assume_orientation=assume_orientation)
    try:
        data = np.asanyarray(image.dataobj)
    except _READ_ERRORS as exc:
        raise InputError(
            path, f"cannot read the voxel data: truncated or corrupt ({_reason(exc)})", _REMEDY_UNREADABLE
        ) from exc
    if data.dtype.fields is not None:
        raise InputError(path, f"holds {data.dtype} (RGB) voxels, not a label map", "pass a label map")
    data = data.reshape(shape[:3])
    meta: dict[str, Any] = {
        "header": header,
        "image_class": type(image),
        "shape": shape,
        "dtype": image.get_data_dtype(),
        "geometry": geometry,
    }
    source = Source(Path(path), "nifti", meta, warnings=tuple(warnings))
    return Volume(np.ascontiguousarray(data.transpose(2, 1, 0)), geometry, source)


def read_nifti_geometry(path: Path, *, assume_orientation: str | None = None) -> Geometry:
    """The grid of a NIfTI file from its header alone (as :func:`read_nifti` would give it)."""
    image, _ = _load(path)
    return header_geometry(image, path, assume_orientation=assume_orientation)[0]


def _load(path: Path) -> tuple[nib.Nifti1Image | nib.Nifti2Image, tuple[int, ...]]:
    """The nibabel image (voxels not yet read) and its shape; refuse what is not one 3D NIfTI volume."""
    quiet = logging.getLogger("nibabel.global")  # its own fixes of a header are said here, in one line
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        image = nib.load(str(path))
    except _READ_ERRORS as exc:
        raise InputError(path, f"cannot read this NIfTI file ({_reason(exc)})", _REMEDY_UNREADABLE) from exc
    finally:
        quiet.setLevel(level)
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
    if problem := _size_problem(image, path, shape):  # before a byte of voxels is read or allocated
        raise InputError(path, *problem)
    return image, shape


def _size_problem(
    image: nib.Nifti1Image | nib.Nifti2Image, path: Path, shape: tuple[int, ...]
) -> tuple[str, str] | None:
    """(problem, remedy) when the header's array cannot be what the file holds, else None: more voxels than a
    label map of a body can have (:data:`vertrefine.volume.MAX_VOXELS`); a voxel size of 0 in pixdim used by
    the qform (nibabel silently reads it as 1 mm); for an uncompressed .nii, fewer bytes on disk than the
    header's array needs (a truncated file)."""
    from .volume import MAX_VOXELS

    voxels = int(np.prod(shape, dtype=np.float64))
    if voxels > MAX_VOXELS:
        dims = " x ".join(str(n) for n in shape)
        return f"has an implausible array size in its header ({dims} = {voxels:.3g} voxels, more than {MAX_VOXELS:.3g})", _REMEDY_HEADER
    pixdim = _stored_pixdim(image, path)
    if pixdim is not None and np.any(pixdim == 0) and int(image.header["sform_code"]) == 0:
        return "has a voxel size of 0 mm in its header (pixdim), which no scanner writes", _REMEDY_HEADER
    if path.name.lower().endswith(".nii"):
        needed = int(image.header.get("vox_offset", 0)) + voxels * image.get_data_dtype().itemsize
        if path.stat().st_size < needed:
            return (
                f"is truncated: its header describes {needed} bytes, the file holds {path.stat().st_size}",
                _REMEDY_UNREADABLE,
            )
    return None


def _stored_pixdim(image: nib.Nifti1Image | nib.Nifti2Image, path: Path) -> np.ndarray | None:
    """pixdim[1:4] as stored in the file (nibabel's loaded header has zeros already replaced by 1), or None."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as handle:
            raw = type(image.header).from_fileobj(handle, check=False)
    except _READ_ERRORS:
        return None
    return np.asarray(raw["pixdim"][1:4], dtype=float)



def header_geometry(
    image: nib.Nifti1Image | nib.Nifti2Image, path: Path, *, assume_orientation: str | None = None
) -> tuple[Geometry, list[str], Any]:
    """``(geometry, warnings, header)``: the file's grid, decided once for every reader.

    * sform_code > 0: the sform, as nibabel and ITK (SimpleITK, 3D Slicer, ANTs) read it; unless the
      sform is sheared and a qform exists, then the qform (as ITK does; a sheared grid is refused later).
    * else qform_code > 0: the qform.
    * both 0: the orientation is unknown and nibabel and ITK would guess differently (nibabel: 'LAS'
      centred on the image; ITK: 'LPS' from the origin), so it is refused with one line, unless
      ``assume_orientation`` states it (:func:`parse_orientation`): voxel sizes from pixdim, voxel
      (0, 0, 0) at the origin. The returned header copy then carries that orientation in its qform and
      sform (code 1), so outputs written on it are no longer ambiguous.

    When both forms are set and their voxel centres at the image's corners differ by more than
    :data:`DISAGREE_MM` or their rotations by more than :data:`DISAGREE_DEGREES`, a warning says which is
    used. Raises InputError for an unoriented file without ``assume_orientation``, for a degenerate
    transform and for a grid no scanner writes (:func:`vertrefine.volume.grid_problem`: NaN in the affine,
    voxels of 100 mm or 0.0001 mm).
    """
    header = image.header.copy()
    shape = tuple(int(n) for n in image.shape[:3])
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    warnings: list[str] = []
    if qcode == 0 and scode == 0:
        if assume_orientation is None:
            raise InputError(
                path,
                "has no orientation (qform_code and sform_code are both 0): left/right, anterior/posterior "
                "and superior/inferior are unknown, and tools guess them differently",
                "fix the header (e.g. convert the DICOM again with dcm2niix), or state the voxel axes' "
                "directions with --assume-orientation (e.g. RAS)",
            )
        code = parse_orientation(assume_orientation)
        affine = orientation_affine(code, header.get_zooms()[:3])
        header.set_qform(affine, code=1)
        header.set_sform(affine, code=1)
        warnings.append(f"orientation assumed {code} as stated (the file's qform_code and sform_code are 0)")
    elif scode > 0 and (qcode == 0 or not _is_sheared(header.get_sform())):
        affine = header.get_sform()
        if qcode > 0:
            warnings += _disagreement(header.get_qform(), affine, shape, f"sform (code {_code(scode)})")
    else:
        affine = header.get_qform()
        if scode > 0:
            warnings.append(
                f"the sform (code {_code(scode)}) is sheared; the qform (code {_code(qcode)}) is used, as ITK does"
            )
    for name, fields, code, form in (
        ("sform", "srow_x/y/z", scode, header.get_sform),
        ("qform", "qoffset_x/y/z, quatern_b/c/d, pixdim", qcode, header.get_qform),
    ):
        matrix = np.asarray(form(), dtype=float) if code > 0 else np.eye(4)
        if not np.all(np.isfinite(matrix)):  # no scanner writes NaN or inf; one form of two is not trusted either
            rows = "; ".join(", ".join(f"{v:g}" for v in row) for row in matrix[:3])
            raise InputError(
                path, f"has an implausible affine: its {name} ({fields}) holds NaN or infinite values ({rows})",
                _REMEDY_HEADER,
            )
    try:
        geometry = geometry_from_affine(affine, shape)
    except ValueError as exc:
        raise InputError(path, f"has an unusable affine: {exc}", "fix the file's sform/qform") from exc
    if problem := grid_problem(geometry):  # before any voxel is read or resampled
        raise InputError(path, f"has {problem}", _REMEDY_HEADER)
    return geometry, warnings, header


def _code(code: int) -> str:
    return f"{code}, {XFORM_CODES.get(code, 'non-standard')}"


def _is_sheared(affine: np.ndarray) -> bool:
    """True when the affine's columns are not orthogonal (a shear, not a rotation with voxel sizes)."""
    linear = np.asarray(affine, dtype=float)[:3, :3]
    norms = np.linalg.norm(linear, axis=0)
    if np.any(norms <= 0) or not np.all(np.isfinite(linear)):
        return False  # degenerate: refused as such by geometry_from_affine
    unit = linear / norms
    return not np.allclose(unit.T @ unit, np.eye(3), atol=_SHEAR_TOL)


def _disagreement(qform: np.ndarray, sform: np.ndarray, shape: tuple[int, int, int], used: str) -> list[str]:
    """One warning when qform and sform place the image differently (corner distance, rotation angle)."""
    ends = [(0, n - 1) for n in shape]
    corners = np.array([[i, j, k, 1.0] for i in ends[0] for j in ends[1] for k in ends[2]])
    distance = float(np.max(np.linalg.norm((corners @ qform.T - corners @ sform.T)[:, :3], axis=1)))
    rotations = [m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0) for m in (qform, sform)]
    cosine = (np.trace(rotations[0].T @ rotations[1]) - 1.0) / 2.0
    angle = float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))
    if distance <= DISAGREE_MM and angle <= DISAGREE_DEGREES:
        return []
    return [
        f"the qform and sform disagree (up to {distance:.1f} mm apart, {angle:.1f} degrees); the {used} is used, "
        "as nibabel and ITK do"
    ]


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


_REMEDY_HEADER = "fix the header's sform/qform and pixdim (e.g. convert the DICOM again with dcm2niix)"
_REMEDY_UNREADABLE = "check that the file is complete (re-copy or re-export it)"
