"""Atomic output: write to a temporary file in the destination folder, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError
from .filetypes import compound_suffix


def current_umask() -> int:
    """The process umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(destination: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; rename it over ``destination`` on success.

    On any exception the temporary file is removed, so a failed write leaves no partial output.
    The temporary name keeps the destination's extension, lower-cased (``.part.nii.gz`` for
    ``out.NII.GZ``), so that writers choosing a format by suffix (SimpleITK, nibabel) still work.
    """
    destination = Path(destination)
    folder = destination.parent if str(destination.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{destination}: folder {folder} does not exist; create it first")
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=f".part{compound_suffix(destination)}", dir=folder
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def make_folder(folder: str | Path, what: str = "the output") -> Path:
    """Create ``folder`` and its parents if missing (an existing folder is fine); a path that is a file, or
    a folder that cannot be created, is refused in one line naming ``what`` goes there."""
    folder = Path(folder)
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise OutputError(f"{folder}: {blocking} is a file, not a folder; choose a folder for {what}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the folder for {what} ({exc.strerror or exc})") from None
    return folder
