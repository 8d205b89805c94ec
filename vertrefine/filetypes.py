"""What kind of file a path names: the one definition that every reader, writer and folder scan uses.

File names are matched case-insensitively: ``scan.NII.GZ``, ``Seg.DCM`` and ``IM0001.IMA`` are what
scanners, PACS exports and Windows tools write. A DICOM file may also carry no suffix at all (or a
numeric one, ``CT.1.2.840...``); it is then recognised by its preamble ('DICM' at byte 128).

* NIfTI: ``.nii``, ``.nii.gz``.
* DICOM files (inputs): ``.dcm``, ``.dicom``, ``.ima``, or the preamble.
* DICOM SEG outputs: ``.dcm``, ``.dicom``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".ima")
SEG_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
_COMPOUND: tuple[str, ...] = (".nii.gz", ".tar.gz")

OutputFormat = Literal["nifti", "dicom-seg"]
UNSUPPORTED_OUTPUT = "unsupported output type; name it .nii.gz or .nii (NIfTI) or .dcm (DICOM SEG)"


def compound_suffix(path: str | Path) -> str:
    """The file's type suffix, lower-case: '.nii.gz' for 'a.NII.GZ', '.dcm' for 'b.DCM', '' for 'c'."""
    name = Path(path).name.lower()
    for suffix in _COMPOUND:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return Path(name).suffix


def is_nifti_name(path: str | Path) -> bool:
    """True for names ending in ``.nii`` or ``.nii.gz``, in any case."""
    return compound_suffix(path) in NIFTI_SUFFIXES


def is_dicom_name(path: str | Path) -> bool:
    """True for names ending in ``.dcm``, ``.dicom`` or ``.ima``, in any case."""
    return compound_suffix(path) in DICOM_SUFFIXES


def has_dicom_preamble(path: str | Path) -> bool:
    """True when ``path`` is a readable file with 'DICM' at byte 128 (the DICOM file preamble)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_file(path: str | Path) -> bool:
    """A file named like DICOM (:func:`is_dicom_name`) or carrying the DICOM preamble, whatever its name."""
    return is_dicom_name(path) or has_dicom_preamble(path)


def output_format(path: str | Path) -> OutputFormat | None:
    """The format an output file's name asks for: 'nifti', 'dicom-seg', or None (no known suffix)."""
    suffix = compound_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in SEG_SUFFIXES:
        return "dicom-seg"
    return None


def case_name(path: str | Path) -> str:
    """'spine_001' for spine_001.nii.gz, spine_001.NII, spine_001.dcm or a folder spine_001/.

    Only the suffixes of :data:`NIFTI_SUFFIXES` and :data:`DICOM_SUFFIXES` are removed (in any case).
    """
    name = Path(path).name
    suffix = compound_suffix(name)
    if suffix in NIFTI_SUFFIXES + DICOM_SUFFIXES:
        return name[: -len(suffix)]
    return name
