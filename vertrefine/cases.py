"""Find the cases in an input folder and name them: NIfTI files, DICOM series folders, DICOM SEG files."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import InputError
from .filetypes import case_name, is_dicom_file
from .filetypes import is_nifti_name as is_nifti

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
        clash = ", ".join(c.path.name for c in cases if c.name == duplicates[0])
        raise InputError(
            folder,
            f"several inputs share the case name(s) {', '.join(duplicates)} ({clash}), so their outputs and "
            "sidecars would have one name",
            "keep one file per case name (rename or move the others)",
        )
    return cases
