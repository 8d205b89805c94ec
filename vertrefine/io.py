"""Read and write label maps: NIfTI, DICOM image series and DICOM SEG, all as one :class:`Volume`.

Orientation convention (the one of volume.py): physical coordinates are LPS mm (+x patient left,
+y posterior, +z superior) and arrays are indexed ``[k, j, i]`` (= ``[z, y, x]``). NIfTI's RAS affine
is converted to LPS on reading and back on writing (nibabel's ``[i, j, k]`` arrays are transposed);
DICOM is LPS already, and a series or SEG becomes ``[slice, row, column]``.

Every reader records in ``volume.source`` what a writer needs to reproduce the input's format: the
NIfTI header, the DICOM series' sorted files and headers, or the SEG dataset and the series it
references. :func:`write_label_map` chooses the format by the destination's name and reuses them.
Bad input raises :class:`~vertrefine.errors.InputError` with one line naming the file and what to do.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from .dicom_seg import read_dicom_file, read_dicom_folder, write_dicom_seg
from .dicom_series import NO_SERIES_UID, dicom_series_geometry
from .errors import InputError, OutputError
from .filetypes import UNSUPPORTED_OUTPUT, compound_suffix, is_dicom_file, output_format
from .labels import LabelScheme
from .nifti import is_nifti_path, read_nifti, write_nifti
from .volume import Volume, grid_problem

__all__ = [
    "MAX_LABELS",
    "NO_SERIES_UID",
    "dicom_series_geometry",
    "is_dicom_output",
    "is_nifti_path",
    "is_supported_input",
    "read_label_map",
    "validate_label_map",
    "write_dicom_seg",
    "write_label_map",
    "write_nifti",
]

MAX_LABELS = 100
"""More distinct non-zero values than this, varying from voxel to voxel, make an intensity image."""
MIN_REGION_FRACTION = 0.5
"""A map with more than MAX_LABELS values is a label map when at least this fraction of neighbouring
labelled voxel pairs share their value (labels form regions; intensities vary voxel to voxel)."""
INTEGER_TOLERANCE = 1e-3
"""Float voxels this close to an integer are that integer (scl_slope 1.0000001 makes 22 into 22.0000022)."""
_SEGMENT_FIRST = "segment it first: vertrefine takes a vertebra label map (one integer id per vertebra)"


def is_dicom_output(path: str | Path) -> bool:
    """True when ``path`` names a DICOM SEG output (``.dcm``/``.dicom``, any case)."""
    return output_format(path) == "dicom-seg"


def is_supported_input(path: str | Path) -> bool:
    """True for the inputs :func:`read_label_map` accepts: NIfTI, DICOM files (by name or preamble), folders."""
    path = Path(path)
    return path.is_dir() or is_nifti_path(path) or _is_dicom_file_path(path)


def _is_dicom_file_path(path: Path) -> bool:
    """A DICOM name, none, or the DICOM preamble: names like 'CT.1.2.840...' have a numeric 'suffix'."""
    return compound_suffix(path) == "" or is_dicom_file(path)


def read_label_map(
    path: str | Path,
    *,
    series_uid: str | None = None,
    allow_empty: bool = False,
    assume_orientation: str | None = None,
) -> Volume:
    """Read and validate a label map.

    ``path`` is a ``.nii``/``.nii.gz`` file, a DICOM SEG file (``.dcm``, no suffix, or any name with
    the DICOM preamble), or a folder of DICOM files holding either a SEG or an image series whose pixel
    values are label ids (a single DICOM image file stands for its series). ``series_uid`` picks one
    series of a folder holding several (:data:`NO_SERIES_UID` names one whose files have no
    SeriesInstanceUID). An image series of intensities (CT, MR) is refused: "segment it first".
    ``allow_empty`` accepts a label map without any labelled voxel (e.g. a prediction being
    scored). Segments of a SEG become label ids: a segment naming or coding a vertebra level ('L1',
    'T12', 'L1 vertebra', SCT 66794005) gets its VerSe id, any other keeps its segment number; which
    segments are vertebrae is recorded from their codes in ``source.meta["label_scheme"]``.
    ``assume_orientation`` ('RAS', 'LPS', ...) is used only for a NIfTI file whose qform_code and
    sform_code are both 0, which is refused without it (see :func:`vertrefine.nifti.header_geometry`).
    What the reader decided (qform or sform, an assumed orientation) is in ``volume.source.warnings``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist", "check the path")
    if path.is_dir():
        volume = read_dicom_folder(path, series_uid=series_uid)
    elif is_nifti_path(path):
        volume = read_nifti(path, assume_orientation=assume_orientation)
    elif _is_dicom_file_path(path):
        volume = read_dicom_file(path, series_uid=series_uid)
    else:
        raise InputError(
            path,
            f"unsupported file type '{compound_suffix(path)}'",
            "pass a .nii/.nii.gz file, a DICOM SEG (.dcm) file or a DICOM series folder",
        )
    try:
        return validate_label_map(volume, path, allow_empty=allow_empty)
    except InputError as exc:
        if volume.source.kind != "dicom-series" or exc.remedy != _SEGMENT_FIRST:
            raise
        first = volume.source.meta["series"].first
        modality = str(first.get("Modality") or "DICOM")
        description = str(first.get("SeriesDescription") or "no description")
        count = len(volume.source.meta["series"].files)
        raise InputError(
            path, f"is a {modality} image series ('{description}', {count} files) that {exc.problem}", exc.remedy
        ) from exc


def validate_label_map(volume: Volume, path: str | Path, *, allow_empty: bool = False) -> Volume:
    """Refuse what is not a usable 3D label map; return it with a compact unsigned integer array.

    Refused: a grid no scanner writes (:func:`vertrefine.volume.grid_problem`), single-slice (2D) data,
    a sheared (non-orthonormal) direction matrix, non-numeric voxels, an intensity image (really fractional
    or negative values, or more than :data:`MAX_LABELS` values that vary from voxel to voxel) and, unless
    ``allow_empty``, a map without any labelled voxel. Float voxels within :data:`INTEGER_TOLERANCE` of an
    integer (NIfTI scl_slope/scl_inter or DICOM rescale rounding) are rounded. Many labels are fine when they
    form regions (a TotalSegmentator map has 117); a map whose labels do not form regions (fewer than
    :data:`MIN_REGION_FRACTION` of neighbouring labelled voxels share their label, e.g. random ids per voxel)
    is refused as no segmentation. The array becomes uint8 (max < 256), uint16 (max < 65536) or int32.
    """
    array, geometry = volume.array, volume.geometry
    if problem := grid_problem(geometry):
        raise InputError(path, f"has {problem}", "fix the file's spatial header (spacing, position, orientation)")
    if min(geometry.shape) < 2:
        raise InputError(path, f"is 2D (a single slice, array shape {geometry.shape})", "pass a 3D label map")
    if not geometry.is_orthonormal():
        raise InputError(
            path,
            "has a non-orthonormal (sheared) direction matrix",
            "resample it onto an orthogonal grid first (e.g. SimpleITK or 3D Slicer)",
        )
    if array.dtype == np.bool_:
        array = array.view(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(path, f"holds {array.dtype} voxels, not a label map", "pass an integer label map")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise InputError(path, "holds NaN or infinite values: looks like an intensity image", _SEGMENT_FIRST)
        rounded = np.round(array)
        off = float(np.max(np.abs(array - rounded))) if array.size else 0.0
        if off > INTEGER_TOLERANCE:
            raise InputError(
                path,
                f"holds fractional values (up to {off:.3g} from an integer): looks like an intensity image or a "
                "probability map, not a label map",
                _SEGMENT_FIRST,
            )
        array = rounded
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if low < 0:
        raise InputError(
            path, f"holds negative values (min {low:g}): looks like an intensity image, not a label map", _SEGMENT_FIRST
        )
    if high >= 2**31:
        raise InputError(path, f"holds values up to {high:g}: looks like an intensity image", _SEGMENT_FIRST)
    fraction = None
    if high > MAX_LABELS:  # only then can there be more than MAX_LABELS distinct labels
        count = int(np.count_nonzero(np.unique(array)))
        if count > MAX_LABELS:
            fraction = region_fraction(_sample_slabs(array))
            if fraction < MIN_REGION_FRACTION:
                raise InputError(
                    path,
                    f"holds {count} distinct values that vary from voxel to voxel (only {fraction:.0%} of "
                    "neighbouring labelled voxels share their value): looks like an intensity image, not a label map",
                    _SEGMENT_FIRST,
                )
    if high > 0 and fraction is None:
        same, pairs = pair_counts(_sample_slabs(array))
        if pairs >= MIN_JUDGED_PAIRS and (fraction := same / pairs) < MIN_REGION_FRACTION:
            raise InputError(
                path,
                f"is not a segmentation: its labels change from voxel to voxel (only {fraction:.0%} of "
                "neighbouring labelled voxels share their label; a segmentation's labels form regions, these "
                "are scattered in thousands of one- or two-voxel pieces, like random ids or a corrupted file)",
                "pass the vertebra label map itself (one integer id per vertebra)",
            )
        if fraction is None or fraction >= MIN_REGION_FRACTION:
            edge, touching = edge_counts(_sample_slabs(array))
            if touching >= MIN_JUDGED_PAIRS and edge / touching > MAX_EDGE_FRACTION:
                raise InputError(
                    path,
                    f"is not a segmentation: its labelled voxels are scattered ({edge / touching:.0%} of the "
                    "neighbour pairs touching a labelled voxel cross to the background, against 8-28% for real "
                    "CT and thick-slice segmentations: noise, like a random mask or a corrupted file)",
                    "pass the vertebra label map itself (one integer id per vertebra)",
                )
    if high == 0 and not allow_empty:
        raise InputError(
            path, "is an empty mask (no labelled voxel)", "check that the segmentation worked, or pass another file"
        )
    dtype = np.uint8 if high < 256 else np.uint16 if high < 65536 else np.int32
    if array.dtype != dtype:
        array = array.astype(dtype)
    return volume.with_array(array) if array is not volume.array else volume


MAX_EDGE_FRACTION = 0.5
"""A label map whose face-neighbour pairs touching a labelled voxel cross to the background more often than
this is noise, not a segmentation: 0.08-0.28 on the real CT maps of the development data and their 3-7 mm
thick-slice simulations at 0.4 mm in-plane (every corruption family), 0.67 for a random half-filled mask,
0.95 for a random tenth-filled one."""
MIN_JUDGED_PAIRS = 1000
"""Fewer face-neighbouring labelled voxel pairs than this (a handful of tiny labels) are not judged."""
SAMPLED_VOXELS = 1 << 24
"""A map larger than this is judged on evenly spaced slabs of 4 slices holding about this many voxels."""


def _sample_slabs(array: np.ndarray) -> np.ndarray:
    """``array`` itself, or for a large map evenly spaced 4-slice slabs along its first axis (about
    :data:`SAMPLED_VOXELS` voxels; neighbours stay neighbours within a slab, so :func:`region_fraction`
    means the same on it, at a bounded cost)."""
    if array.size <= SAMPLED_VOXELS or array.shape[0] < 16:
        return array
    slabs = max(1, SAMPLED_VOXELS // (4 * array[0].size))
    starts = np.linspace(0, array.shape[0] - 4, slabs).astype(int)
    return np.concatenate([np.pad(array[s : s + 4], ((0, 1), (0, 0), (0, 0))) for s in starts])


def pair_counts(array: np.ndarray) -> tuple[int, int]:
    """``(same, pairs)``: face-neighbouring voxel pairs both non-zero, and of those the ones holding the same
    value, over every axis of ``array`` (3D, any axis order)."""
    same = pairs = 0
    for axis in range(array.ndim):
        a = np.moveaxis(array, axis, 0)
        first, second = a[1:], a[:-1]
        both = (first != 0) & (second != 0)
        pairs += int(np.count_nonzero(both))
        same += int(np.count_nonzero(both & (first == second)))
    return same, pairs


def edge_counts(array: np.ndarray) -> tuple[int, int]:
    """``(edge, touching)``: face-neighbouring voxel pairs with at least one non-zero voxel, and of those the
    ones with exactly one (a boundary to the background), over every axis of ``array`` (3D)."""
    edge = touching = 0
    for axis in range(array.ndim):
        a = np.moveaxis(array, axis, 0) != 0
        first, second = a[1:], a[:-1]
        touching += int(np.count_nonzero(first | second))
        edge += int(np.count_nonzero(first ^ second))
    return edge, touching


def region_fraction(array: np.ndarray) -> float:
    """Fraction of face-neighbouring voxel pairs, both non-zero, that hold the same value (1.0 if none).

    Near 1 for a label map (values form regions and differ only where two structures touch); low for an
    intensity image, whose values change from voxel to voxel. ``array`` is 3D, any axis order.
    """
    same, pairs = pair_counts(array)
    return same / pairs if pairs else 1.0


def write_label_map(
    volume: Volume,
    path: str | Path,
    *,
    like: Volume | None = None,
    source_images: str | Path | Sequence[Dataset | str | Path] | None = None,
    scheme: LabelScheme | None = None,
    refined: Collection[int] | None = None,
) -> Path:
    """Write ``volume`` in the format its destination names, atomically; return the path.

    ``.nii``/``.nii.gz`` -> NIfTI (:func:`write_nifti`), ``.dcm``/``.dicom`` -> DICOM SEG
    (:func:`write_dicom_seg`), in any case (:func:`vertrefine.filetypes.output_format`).
    ``like`` is the input this output corresponds to (default: ``volume.source``); its NIfTI header or
    DICOM references are reused. ``source_images`` (a series folder, files or datasets) names the
    series a SEG references when ``like`` did not come from DICOM; NIfTI output ignores it.
    ``scheme`` (the numbering of the label ids) and ``refined`` (the labels vertrefine refined) name and
    code a SEG's segments (:func:`write_dicom_seg`); NIfTI keeps ids only.
    """
    path = Path(path)
    kind = output_format(path)
    if kind == "nifti":
        return write_nifti(volume, path, like=like)
    if kind == "dicom-seg":
        return write_dicom_seg(volume, path, like=like, source_images=source_images, scheme=scheme, refined=refined)
    raise OutputError(f"{path}: {UNSUPPORTED_OUTPUT}")
