"""Errors that the command line reports as one clear line instead of a traceback."""

from __future__ import annotations

from pathlib import Path


class VertrefineError(Exception):
    """Base class: the message is shown to the user as it is."""


class InputError(VertrefineError):
    """An input file or folder cannot be used; the message names it and says what to do."""

    def __init__(self, path: str | Path | None, problem: str, remedy: str = "") -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        self.remedy = remedy
        where = f"{self.path}: " if self.path else ""
        tail = f"; {remedy}" if remedy else ""
        super().__init__(f"{where}{problem}{tail}")


class OutputError(VertrefineError):
    """An output cannot be written where asked (it would overwrite an input, folder missing, ...)."""


class SettingsError(VertrefineError):
    """An option or setting cannot be used as given (out of range, or not for this model); the message names it."""
