"""Check, before any case runs, that an output can be written where it is asked for.

A run that would fail only when writing its first result (a missing or read-only folder, a file where a
folder should be) is refused at once with one line naming the output and the option that set it, and
leaves nothing behind: these checks create no file and no folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from .cases import Plan
from .errors import OutputError
from .filetypes import is_nifti_name, output_format


def check_writable_folder(folder: Path, option: str, *, output: Path | None = None) -> None:
    """Refuse a folder that neither exists as a writable folder nor can be created (a file on its way).

    ``option`` (e.g. ``-o``, ``--qc``) names the option in the message, which starts with ``output`` (the
    file to be written in ``folder``) when given, else with the folder. Raises OutputError.
    """
    folder = Path(folder)
    subject = folder if output is None else output
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(
            f"{subject}: cannot be written ({option}): {existing} is a file, not a folder; choose another place"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{subject}: cannot be written ({option}): {existing} is not writable; choose another place")


def check_writable_file(path: Path, option: str) -> None:
    """Refuse a file output that is an existing folder or whose folder cannot be written or created."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: {option} names a folder; name the output file")
    check_writable_folder(path.parent, option, output=path)


def require_seg_sources(plan: Plan, source_series: Path | None, option: str | None) -> None:
    """Refuse, before any case runs, a DICOM SEG output of a case that is not DICOM without a source series.

    A SEG references the images it segments; a DICOM input names them, a NIfTI input does not.
    ``option`` is the command's option naming the series (None when it has none).
    """
    for case, destination in plan:
        if output_format(destination) != "dicom-seg" or not is_nifti_name(case.path) or source_series is not None:
            continue
        remedy = "write NIfTI (.nii.gz)"
        if option:
            remedy = f"pass that image series with {option} DIR, or {remedy}"
        raise OutputError(
            f"{destination}: a DICOM SEG must reference the DICOM images it segments, and {case.path} is NIfTI; "
            + remedy
        )
