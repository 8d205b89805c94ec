"""DICOM image series whose pixel values are label ids: finding series in folders and reading them.

Orientation: DICOM patient coordinates are LPS mm, as everywhere in vertrefine (see volume.py). A series
becomes an array ``[k, j, i]`` = ``[slice, row, column]``: ``i`` runs along the first
ImageOrientationPatient triplet (along a row), ``j`` along the second (down a column), ``k`` across the
slices, which are ordered by their position along the normal row x column, so ``k`` points along that
normal. DICOM SEG lives in :mod:`vertrefine.dicom_seg`; use :mod:`vertrefine.io` rather than either.

De-identified series whose StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID were emptied: image
files without a SeriesInstanceUID are grouped into one series named :data:`NO_SERIES_UID` (split by
modality, series number and description, frame of reference, orientation and image size when these
differ), and an empty SOPInstanceUID / SOPClassUID is read from the file meta (MediaStorage...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from .errors import InputError
from .volume import Geometry, Source, Volume

NO_SERIES_UID = "(no SeriesInstanceUID)"
"""Stands for the SeriesInstanceUID of image files that have none (emptied by de-identification)."""
SEG_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})


# --- reading DICOM folders -------------------------------------------------------------------------


@dataclass
class DicomSeries:
    """The files of one series in a folder and their headers (no pixel data), in folder order."""

    uid: str
    files: list[Path]
    datasets: list[Dataset]

    @property
    def first(self) -> Dataset:
        return self.datasets[0]

    @property
    def is_seg(self) -> bool:
        return self.first.get("Modality") == "SEG" or self.first.get("SOPClassUID") in SEG_SOP_CLASSES

    def summary(self) -> str:
        description = str(self.first.get("SeriesDescription", "") or "no description")
        modality = self.first.get("Modality", "?")
        return f"{self.uid} ({modality}, '{description}', {len(self.files)} files)"


def is_no_series_uid(uid: str) -> bool:
    """True for the stand-in name of a series whose files have no SeriesInstanceUID."""
    return uid.startswith(NO_SERIES_UID)


def instance_uid_of(dataset: Dataset) -> str:
    """The dataset's SOPInstanceUID, or its file meta's MediaStorageSOPInstanceUID when that is empty."""
    uid = dataset.get("SOPInstanceUID")
    if not uid:
        uid = getattr(getattr(dataset, "file_meta", None), "MediaStorageSOPInstanceUID", "")
    return str(uid or "")


def class_uid_of(dataset: Dataset) -> str:
    """The dataset's SOPClassUID, or its file meta's MediaStorageSOPClassUID when that is empty."""
    uid = dataset.get("SOPClassUID")
    if not uid:
        uid = getattr(getattr(dataset, "file_meta", None), "MediaStorageSOPClassUID", "")
    return str(uid or "")


def _no_uid_key(dataset: Dataset) -> tuple:
    """What tells apart series without a SeriesInstanceUID that share a folder."""
    orientation = tuple(round(float(v), 4) + 0.0 for v in dataset.get("ImageOrientationPatient") or ())
    return (
        str(dataset.get("Modality") or ""),
        str(dataset.get("SeriesNumber") or ""),
        str(dataset.get("SeriesDescription") or ""),
        str(dataset.get("FrameOfReferenceUID") or ""),
        orientation,
        (int(dataset.get("Rows") or 0), int(dataset.get("Columns") or 0)),
    )


def scan_folder(folder: Path, *, uid: str | None = None, budget: list[int] | None = None) -> list[DicomSeries]:
    """DICOM series among the files directly in ``folder`` (non-DICOM files are skipped).

    Image files without a SeriesInstanceUID form series named :data:`NO_SERIES_UID` (numbered
    ``"(no SeriesInstanceUID) #1"``, ``#2``... when they split, see the module docstring); DICOM objects
    without a series that are not images (DICOMDIR) are skipped. With ``uid`` only that series is kept
    (other files are read up to SeriesInstanceUID only); a stand-in ``uid`` keeps every series without
    a SeriesInstanceUID. ``budget`` is a one-item list of files still allowed to be read; it is decremented.
    """
    groups: dict[object, DicomSeries] = {}
    wanted = None if uid is None else "" if is_no_series_uid(uid) else uid
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if budget is not None:
            if budget[0] <= 0:
                break
            budget[0] -= 1
        try:
            if wanted is not None:
                head = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                if str(head.get("SeriesInstanceUID") or "") != wanted:
                    continue
            dataset = pydicom.dcmread(file, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
            continue
        series_uid = str(dataset.get("SeriesInstanceUID") or "")
        if series_uid:
            key: object = series_uid
        elif "Rows" in dataset and "Columns" in dataset:
            key = _no_uid_key(dataset)
        else:
            continue  # DICOMDIR and other non-image objects without a series
        series = groups.setdefault(key, DicomSeries(series_uid, [], []))
        series.files.append(file)
        series.datasets.append(dataset)
    unnamed = [series for series in groups.values() if not series.uid]
    for number, series in enumerate(unnamed, start=1):
        series.uid = NO_SERIES_UID if len(unnamed) == 1 else f"{NO_SERIES_UID} #{number}"
    return list(groups.values())


def choose_series(folder: Path, series: list[DicomSeries], series_uid: str | None) -> DicomSeries:
    """The series to read from a folder: ``series_uid`` if given, else its only SEG or only series."""
    if not series:
        raise InputError(folder, "holds no DICOM files", "point at the folder holding the series' files, or at a file")
    if series_uid is not None:
        for item in series:
            if item.uid == series_uid:
                return item
        unnamed = [item for item in series if is_no_series_uid(item.uid)]
        if series_uid == NO_SERIES_UID and len(unnamed) == 1:
            return unnamed[0]
        listing = "; ".join(s.summary() for s in series)
        raise InputError(folder, f"holds no series {series_uid} (it holds: {listing})", "check the series UID")
    segs = [s for s in series if s.is_seg]
    candidates = segs or series
    if len(candidates) > 1:
        kind = "DICOM SEG series" if segs else "DICOM series"
        listing = "; ".join(s.summary() for s in candidates)
        raise InputError(
            folder,
            f"holds {len(candidates)} {kind}: {listing}",
            "point at a folder holding one series, or choose one by its series UID (series_uid / --series-uid)",
        )
    return candidates[0]


def dicom_series_geometry(path: str | Path, *, series_uid: str | None = None) -> Geometry:
    """Geometry of the image series in a folder, or of the one a file belongs to, from its headers only.

    The grid on which a SEG's frames reference that series' instances one by one
    (:func:`vertrefine.dicom_seg.write_dicom_seg`).
    """
    path = Path(path)
    if path.is_dir():
        series = choose_series(path, [s for s in scan_folder(path) if not s.is_seg], series_uid)
    else:
        series = series_of_file(path, read_header(path), series_uid)
    return series_geometry(series, path)[0]


def read_header(file: Path) -> Dataset:
    """A DICOM file's header (no pixel data); :class:`InputError` when it is not a readable DICOM file."""
    try:
        return pydicom.dcmread(file, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise InputError(
            file, f"is not a readable DICOM file ({type(exc).__name__})", "pass a DICOM SEG file or series folder"
        ) from exc


def series_of_file(file: Path, dataset: Dataset, series_uid: str | None) -> DicomSeries:
    """The series (``series_uid``, else the file's own) that an image file stands for in its folder."""
    uid = series_uid or str(dataset.get("SeriesInstanceUID") or "")
    if uid:
        return choose_series(file.parent, scan_folder(file.parent, uid=uid), uid)
    if "Rows" not in dataset or "Columns" not in dataset:
        raise InputError(file, "is a DICOM object without a series", "pass a DICOM SEG file or series folder")
    series = scan_folder(file.parent, uid=NO_SERIES_UID)
    return choose_series(file.parent, [s for s in series if file.name in {f.name for f in s.files}], None)


# --- image series ----------------------------------------------------------------------------------


def series_geometry(series: DicomSeries, path: Path) -> tuple[Geometry, list[int]]:
    """Geometry of a single-frame image series and the order of its files along the slice normal."""
    datasets = series.datasets
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise InputError(path, "holds multi-frame images", "export the label map as single-frame images or SEG")
    required = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
    missing = [kw for kw in required if any(kw not in ds or ds.get(kw) is None for ds in datasets)]
    if missing:
        raise InputError(path, f"images lack {', '.join(missing)}: not a 3D series", "pass a 3D series or NIfTI file")
    orientation = np.array([ds.ImageOrientationPatient for ds in datasets], dtype=float)
    if not np.allclose(orientation, orientation[0], atol=1e-4):
        raise InputError(path, "its images have different orientations", "pass one 3D series")
    if len({(int(ds.Rows), int(ds.Columns)) for ds in datasets}) > 1:
        raise InputError(path, "its images have different sizes", "pass one 3D series")
    row, col = orientation[0, :3], orientation[0, 3:]
    normal = np.cross(row, col)
    positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=float)
    along = positions @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    first = datasets[order[0]]
    spacing_z = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    if len(order) > 1:
        gaps = np.diff(along[order])
        if np.any(gaps < 1e-3):
            raise InputError(path, "several images share one slice position", "pass one 3D series")
        spacing_z = float(gaps.mean())
        if np.max(np.abs(gaps - spacing_z)) > 0.01 * spacing_z + 1e-3:
            raise InputError(
                path,
                f"slices are irregularly spaced (gaps {gaps.min():.3g} to {gaps.max():.3g} mm): missing slices?",
                "pass a complete series with even slice spacing",
            )
        stack = positions[order[-1]] - positions[order[0]]
        if abs(float(stack @ normal)) < (1 - 1e-3) * float(np.linalg.norm(stack)):
            raise InputError(
                path,
                "slices are stacked obliquely to their planes (gantry tilt): a sheared, non-orthonormal grid",
                "resample the series onto an orthogonal grid first",
            )
    pixel_spacing = [float(v) for v in first.PixelSpacing]
    geometry = Geometry(
        (len(order), int(first.Rows), int(first.Columns)),
        (pixel_spacing[1], pixel_spacing[0], spacing_z),
        positions[order[0]],
        np.column_stack([row, col, normal]),
    )
    return geometry, order


def read_series(series: DicomSeries, path: Path) -> Volume:
    """Read a label map stored as a DICOM image series (pixel values = label ids)."""
    geometry, order = series_geometry(series, path)
    files = [series.files[i] for i in order]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(path, "cannot read the series' pixel data", "check that its files are complete") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, "holds colour (RGB) images, not a label map", "pass a label map series")
    array = sitk.GetArrayFromImage(image)
    if array.shape != geometry.shape:
        raise InputError(path, f"pixel data of shape {array.shape} does not match its headers", "re-export it")
    if not np.allclose(image.GetOrigin(), geometry.origin, atol=1e-3 * max(1.0, *np.abs(geometry.origin))):
        # GDCM keeps the order it is given; this guards the slice order the array is read in.
        raise InputError(path, "its pixel data were read in another slice order than its headers", "re-export it")
    sorted_series = DicomSeries(series.uid, files, [series.datasets[i] for i in order])
    meta: dict[str, Any] = {"series": sorted_series, "geometry": geometry}
    return Volume(array, geometry, Source(Path(path), "dicom-series", meta))
