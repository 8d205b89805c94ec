"""Find the cases in an input folder and name them: NIfTI files, DICOM series folders, DICOM SEG files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass(frozen=True)
class Case:
    name: str
    """File name without .nii.gz/.nii/.dcm, or the DICOM folder's name."""
    path: Path


def case_name(path: str | Path) -> str:
    """'spine_001' for spine_001.nii.gz, spine_001.nii, spine_001.dcm or a folder spine_001/."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES + DICOM_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_nifti(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def is_dicom_file(path: str | Path) -> bool:
    """A .dcm/.dicom file, or any file with the DICOM preamble ('DICM' at byte 128)."""
    path = Path(path)
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def is_dicom_seg(path: Path) -> bool:
    """True for a DICOM file whose Modality is SEG (reads the header only)."""
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"], force=True)
    except (OSError, ValueError, TypeError, AttributeError, EOFError):
        return False
    return str(getattr(header, "Modality", "")).upper() == "SEG"


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _visible(p) and is_dicom_file(p))


def holds_dicom(folder: Path) -> bool:
    """True when the folder directly contains at least one DICOM file."""
    return bool(_dicom_files(folder))


def is_series_folder(folder: Path) -> bool:
    """True when the folder directly holds the slices of a DICOM image series (not only SEG files)."""
    files = _dicom_files(folder)
    return bool(files) and not is_dicom_seg(files[0])


def find_cases(folder: str | Path) -> list[Case]:
    """Cases directly inside ``folder``, sorted by name.

    A case is a NIfTI file, a DICOM SEG file, or a sub-folder holding DICOM files (a series or a SEG).
    A folder that itself holds the slices of a DICOM series is one case, not a folder of cases. Hidden
    files (such as the ``.name.part`` files of an interrupted write) are skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "is not a folder")
    if is_series_folder(folder):
        return [Case(case_name(folder), folder)]
    cases = []
    for entry in sorted(folder.iterdir()):
        if not _visible(entry):
            continue
        is_case_file = entry.is_file() and (is_nifti(entry) or is_dicom_file(entry))
        if is_case_file or (entry.is_dir() and holds_dicom(entry)):
            cases.append(Case(case_name(entry), entry))
    names = [c.name for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(
            folder, f"several inputs share the case name(s) {', '.join(duplicates)}", "keep one file per case"
        )
    return cases
