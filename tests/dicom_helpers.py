"""Small DICOM data made in tests: single-frame image series and a lumbar label layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def lumbar_bars(shape: tuple[int, int, int] = (8, 32, 32)) -> np.ndarray:
    """L1..L5 (20..24) as bars along j, each spanning slices 1..6 (so slices 0 and 7 are empty)."""
    array = np.zeros(shape, dtype=np.uint8)
    for n, label in enumerate(range(20, 25)):
        array[1:7, 2 + 6 * n : 6 + 6 * n, 4 + n : 26 - n] = label
    return array


def make_series(
    folder: Path,
    array: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (0.8, 0.7, 2.5),
    origin: tuple[float, float, float] = (-10.0, 20.0, 30.0),
    direction: np.ndarray | None = None,
    modality: str = "CT",
    sop_class: str = CT_IMAGE_STORAGE,
    description: str = "synthetic",
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
) -> tuple[str, list[str]]:
    """Write ``array`` ([slice, row, column]) as single-frame DICOM images; return series and SOP UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    study_uid, series_uid = study_uid or generate_uid(), generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    sop_uids = []
    for k in range(array.shape[0]):
        ds = Dataset()
        uid = generate_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "P1", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = (
            "20240101",
            "120000",
            "1",
            "",
            "",
        )
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = modality, 3, k + 1, description
        ds.ImageOrientationPatient = [float(v) for v in np.r_[d[:, 0], d[:, 1]]]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing[2] * d[:, 2]]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = array.shape[1], array.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(array[k].astype(np.uint16)).tobytes()
        # Reverse file names so that folder order differs from slice order.
        ds.save_as(folder / f"{series_uid[-6:]}_{array.shape[0] - k:03d}.dcm", enforce_file_format=True)
        sop_uids.append(uid)
    return series_uid, sop_uids
