"""Find the cases in an input folder and name them: NIfTI files, DICOM series folders, DICOM SEG files."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import InputError
from .filetypes import case_name, is_dicom_file
from .filetypes import is_nifti_name as is_nifti
from .labels import SPINEPS_SUBREGION_NOTE, is_spineps_subregion_name

T = TypeVar("T")


@dataclass(frozen=True)
class Case:
    """An input found on disk: the first stage of a case (found -> prepared
    :class:`vertrefine.refine.PreparedCase` -> refined :class:`vertrefine.refine.RefinedCase` -> outcome
    :class:`vertrefine.batch.CaseOutcome`)."""

    name: str
    """File name without .nii.gz/.nii/.dcm (any case), or the DICOM folder's name."""
    path: Path
    """The NIfTI or DICOM SEG file, or the folder of a DICOM series."""


Plan = list[tuple[Case, Path]]
"""Every case of a run with its output path, in order (:func:`vertrefine.batch.plan_cases`)."""


def case_seed(seed: int, name: str) -> int:
    """The seed of case ``name`` in a run with ``--seed seed``: a stable 32-bit hash of both.

    It depends on the case's name only, not on its position in a folder, so adding or removing other
    files never changes a case's result, and a case gives the same result alone or in a folder.
    SHA-256 (not Python's ``hash()``, which is salted per process) makes it the same on every machine.
    """
    digest = hashlib.sha256(f"vertrefine-case-seed:{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


@dataclass(frozen=True)
class Shard:
    """Part ``index`` (1..``count``) of a run split over ``count`` workers (``--shard K/N``).

    A case belongs to the part given by a stable hash of its name (SHA-256), not by its position in the
    folder: every worker, wherever and whenever it lists the folder, takes the same cases, the parts
    together hold every case once, and adding a file moves no other case to another part. Parts hold about
    ``1/count`` of the cases each (a hash, so not exactly).
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise ValueError(f"a shard K/N needs 1 <= K <= N, got {self.index}/{self.count}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``'3/8'`` -> part 3 of 8. Raises ValueError for anything else."""
        parts = text.strip().split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"a shard is K/N (part K of N, from 1), e.g. 3/8; got {text!r}")
        return cls(int(parts[0]), int(parts[1]))

    def holds(self, name: str) -> bool:
        """Whether case ``name`` belongs to this part."""
        digest = hashlib.sha256(f"vertrefine-shard:{name}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index - 1

    def select(self, items: Sequence[T], name: Callable[[T], str]) -> list[T]:
        """The ``items`` (cases, pairs; in order) whose ``name(item)`` this part :meth:`holds`."""
        return [item for item in items if self.holds(name(item))]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _header(path: Path, tags: list[str] | None = None) -> Any:
    """The DICOM header of ``path`` (only ``tags`` when given; no pixels), or None when it cannot be read."""
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags, force=True)
    except (OSError, ValueError, TypeError, AttributeError, EOFError):
        return None


def is_dicom_seg(path: Path) -> bool:
    """True for a DICOM file whose Modality is SEG (reads the header only)."""
    return str(getattr(_header(path, ["Modality"]), "Modality", "")).upper() == "SEG"


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _visible(p) and is_dicom_file(p))


def holds_dicom(folder: Path) -> bool:
    """True when the folder directly contains at least one DICOM file."""
    return bool(_dicom_files(folder))


def is_one_dicom_case(folder: Path) -> bool:
    """True when the folder directly holds the slices of a DICOM image series and at most one SEG file: one
    case (the series, or the SEG with the images it segments), not a folder of cases."""
    segs = [is_dicom_seg(f) for f in _dicom_files(folder)]
    return not all(segs) and sum(segs) <= 1


def _references(seg_file: Path) -> set[str]:
    """The UIDs a SEG file points to: its referenced series' Series Instance UIDs and every Referenced SOP
    Instance UID in it (per-frame source images too: a SEG of a series with blanked UIDs has only those)."""
    header = _header(seg_file)
    if header is None:
        return set()
    items = header.get("ReferencedSeriesSequence") or []
    uids = {str(uid) for item in items if (uid := item.get("SeriesInstanceUID"))}
    uids |= {str(e.value) for e in header.iterall() if e.keyword == "ReferencedSOPInstanceUID" and e.value}
    return uids


def _series_uids(folder: Path) -> set[str]:
    """The Series Instance UID and the first file's SOP Instance UID (or, blanked, its file meta's Media
    Storage SOP Instance UID) of a series folder."""
    files = _dicom_files(folder)
    header = _header(files[0], ["SeriesInstanceUID", "SOPInstanceUID"]) if files else None
    meta = getattr(header, "file_meta", None)
    values = [getattr(header, key, None) for key in ("SeriesInstanceUID", "SOPInstanceUID")]
    values.append(getattr(meta, "MediaStorageSOPInstanceUID", None))
    return {str(v) for v in values if v}


def _seg_files(entry: Path) -> list[Path]:
    """The SEG files a case entry stands for: the file itself, or the SEG files of a folder whose first DICOM
    file is a SEG (only that file's header is read for a folder of image slices)."""
    if entry.is_file():
        return [entry] if is_dicom_seg(entry) else []
    files = _dicom_files(entry)
    if not files or not is_dicom_seg(files[0]):
        return []
    return [f for f in files if is_dicom_seg(f)]


def find_cases_and_sources(
    folder: str | Path, left_out: list[tuple[Path, str]] | None = None
) -> tuple[list[Case], list[tuple[Path, Path]]]:
    """:func:`find_cases`, plus the image series left out because a SEG case segments them.

    ``left_out`` (when given) receives ``(path, why)`` for every other file left out: SPINEPS subregion
    masks (``*_seg-spine_msk.nii.gz``, :func:`vertrefine.labels.is_spineps_subregion_name`).

    Returns:
        ``(cases, sources)``: ``sources`` pairs each left-out series folder with a SEG file referencing it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "is not a folder")
    if is_one_dicom_case(folder):
        return [Case(case_name(folder), folder)], []
    cases = []
    for entry in sorted(folder.iterdir()):
        if not _visible(entry):
            continue
        if entry.is_file() and is_dicom_file(entry) and not is_dicom_seg(entry):
            continue  # an image slice beside SEG files: the images a SEG segments (read_seg finds them)
        is_case_file = entry.is_file() and (is_nifti(entry) or is_dicom_file(entry))
        if is_case_file and is_spineps_subregion_name(entry):
            if left_out is not None:
                left_out.append((entry, SPINEPS_SUBREGION_NOTE))
            continue
        if is_case_file or (entry.is_dir() and holds_dicom(entry)):
            cases.append(Case(case_name(entry), entry))
    referenced = {uid: seg for case in cases for seg in _seg_files(case.path) for uid in _references(seg)}
    sources = []
    if referenced:
        for case in list(cases):
            uids = _series_uids(case.path) if case.path.is_dir() and not _seg_files(case.path) else set()
            seg = next((referenced[uid] for uid in sorted(uids) if uid in referenced), None)
            if seg is not None:
                cases.remove(case)
                sources.append((case.path, seg))
    return _unique_names(folder, cases), sources


def find_cases(folder: str | Path) -> list[Case]:
    """Cases directly inside ``folder``, sorted by name.

    A case is a NIfTI file, a DICOM SEG file, or a sub-folder holding DICOM files (a series or a SEG).
    A folder that itself holds the slices of a DICOM series, with at most one SEG, is one case, not a
    folder of cases. The images a SEG of the folder segments are not cases: image slices lying beside
    several SEG files, and a sub-folder holding the series a SEG references (as a study exported from PACS
    holds the MR series and its SEG). Hidden files (such as the ``.name.part`` files of an interrupted
    write) are skipped.

    Raises:
        InputError: ``folder`` is not a folder, or two inputs share a case name.
    """
    return find_cases_and_sources(folder)[0]


def _unique_names(folder: Path, cases: list[Case]) -> list[Case]:
    """``cases``, unless two share a case name in any letter case (one output on a case-insensitive disk)."""
    names = [c.name.lower() for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        clash = ", ".join(c.path.name for c in cases if c.name.lower() == duplicates[0])
        raise InputError(
            folder,
            f"several inputs share the case name(s) {', '.join(duplicates)} ({clash}), so their outputs and "
            "sidecars would have one name",
            "keep one file per case name (rename or move the others)",
        )
    return cases
