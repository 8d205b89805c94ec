"""Run one command over a file or a folder of cases: skip-existing, go on past failures, report events.

:func:`run_batch` shows nothing itself: it tells a display what happens through ``on_event(kind, payload)``
(the CLI draws the progress bar and the final tables from these), and returns every case's outcome.

- ``"start"`` {total, label}: before the first case
- ``"status"`` {text}: what the case or group being processed is doing now ("L3-L5 encode", "write")
- ``"outcome"`` {outcome}: a case is done, skipped or failed (:class:`CaseOutcome`)
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cases import Case, Plan, case_name, find_cases, find_cases_and_sources, is_nifti
from .errors import InputError, OutputError, VertrefineError
from .filetypes import UNSUPPORTED_OUTPUT, output_format
from .outputs import check_writable_file, check_writable_folder

Status = Callable[[str], None]
"""Shows what a case is doing now (e.g. "encode 5 vertebrae") next to the progress bar."""
CaseFn = Callable[[Case, Path, Status], Any]
"""(case found, its output path, status) -> a short note for the final table, or, with a ``complete``
function, the case's intermediate state (refine: its :class:`vertrefine.refine.PreparedCase`)."""
CompleteFn = Callable[[list[tuple[Case, Path, Any]], Status], list["str | BaseException"]]
"""(group of (case, output path, state), status) -> per case, in order, its note or the exception it
failed with."""


@dataclass
class CaseOutcome:
    """The last stage of a case (found :class:`vertrefine.cases.Case` -> prepared
    :class:`vertrefine.refine.PreparedCase` -> refined :class:`vertrefine.refine.RefinedCase` -> outcome):
    what the batch report shows for it."""

    case: str
    """The case's name."""
    status: str
    """'done', 'skipped' or 'failed'."""
    detail: str
    """done: the note (a summary line, then one line per warning); skipped or failed: the reason."""
    seconds: float
    """Wall-clock seconds the case took (its share of its group's)."""


EventFn = Callable[[str, dict[str, Any]], None]
"""``on_event(kind, payload)``: how :func:`run_batch` reports (see the module docstring)."""


def exit_code(outcomes: list[CaseOutcome]) -> int:
    """0 when every case is done or skipped, 1 when some failed."""
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def output_path_for(case: Case, out_dir: Path) -> Path:
    """NIfTI inputs keep their file name; DICOM inputs become ``<case>.dcm`` (DICOM SEG)."""
    if is_nifti(case.path):
        return out_dir / case.path.name
    return out_dir / f"{case.name}.dcm"


def _same_path(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def is_batch(input_path: Path) -> bool:
    """True when ``input_path`` is a folder of cases (not a file, nor a folder holding one DICOM series)."""
    if not input_path.is_dir():
        return False
    cases = find_cases(input_path)
    return not (len(cases) == 1 and cases[0].path == input_path)


def plan_cases(input_path: Path, output: Path, *, note: Callable[[str], None] | None = None) -> Plan:
    """Pair every input case with its output path, checking the outputs before any case runs.

    ``note`` receives one line per image series of the folder left out because a SEG case segments it,
    and one per other file left out (a SPINEPS subregion mask; :func:`vertrefine.cases.find_cases`).

    Refused (OutputError, one line): an output that would overwrite an input; a single output whose name
    is no known format (:func:`vertrefine.filetypes.output_format`) or that is a folder; a file given as
    ``-o`` for a folder of cases; an output folder that cannot be created or written; a case's output path
    that is an existing folder. Nothing is created
    here: :func:`run_batch` creates the output folders once every check has passed.
    """
    if not input_path.exists():
        raise InputError(input_path, "does not exist", "check the path")
    if input_path.is_dir():
        left_out: list[tuple[Path, str]] = []
        cases, sources = find_cases_and_sources(input_path, left_out)
        if note is not None:
            for series, seg in sources:
                note(f"{series}: not a case: the image series that {seg.name} segments")
            for path, why in left_out:
                note(f"{path.name}: not a case: {why}")
        if not cases and left_out:
            raise InputError(
                input_path,
                f"holds no case: {', '.join(p.name for p, _ in left_out[:3])} is {left_out[0][1]}",
                "point at the vertebra label maps",
            )
        if not cases:
            raise InputError(input_path, "holds no NIfTI or DICOM files", "point at a label map or a folder of them")
        single = len(cases) == 1 and cases[0].path == input_path  # a DICOM folder is one case
    else:
        cases, single = [Case(case_name(input_path), input_path)], True
    if single:
        destination = output_path_for(cases[0], output) if output.is_dir() else output
        if _same_path(input_path, destination):
            raise OutputError(f"{output}: -o is the input; choose another name so the input is kept")
        if output_format(destination) is None:
            if input_path.is_dir():  # a DICOM folder that is one case: -o names a file
                raise OutputError(
                    f"{destination}: {input_path} holds one DICOM series (or one SEG with its images), a single "
                    f"case, so -o names its output file: {UNSUPPORTED_OUTPUT}"
                )
            raise OutputError(f"{destination}: {UNSUPPORTED_OUTPUT}")
        check_writable_file(destination, "-o")
        return [(cases[0], destination)]
    if (output.exists() and not output.is_dir()) or (not output.exists() and output_format(output) is not None):
        raise OutputError(f"{output}: the input is a folder, so -o must be a folder too (not a file name)")
    if _same_path(input_path, output):
        raise OutputError(f"{output}: -o is the input folder; choose another folder so inputs are kept")
    check_writable_folder(output, "-o")
    plan = [(case, output_path_for(case, output)) for case in cases]
    for _, destination in plan:
        if destination.is_dir():
            raise OutputError(f"{destination}: a folder has this output's name; move or rename that folder")
    return plan


def run_batch(
    plan: Plan,
    one_case: CaseFn,
    *,
    label: str,
    skip_existing: bool,
    on_event: EventFn,
    complete: CompleteFn | None = None,
    group_size: int = 1,
) -> list[CaseOutcome]:
    """Run ``one_case`` over every case, reporting to ``on_event``; return every case's outcome, in order.

    With ``complete``, a case runs in two stages: ``one_case`` returns a state, and once ``group_size``
    states are ready (or the cases run out) ``complete`` finishes the group together (refine samples the
    latents of a whole group at once). A single input is not a batch: its error propagates (one line,
    exit code 2, from the CLI). ``plan`` comes from :func:`plan_cases`; the output folders are created now,
    and those of them still empty are removed again when the run is interrupted (Ctrl-C, SIGTERM) or its
    single case fails.
    """
    made = make_output_folders(plan)
    try:
        return _run_plan(plan, one_case, label, skip_existing, on_event, complete, group_size)
    except BaseException:  # Ctrl-C, SIGTERM, a single case's error: no empty folder of this run is left
        remove_empty_folders(made)
        raise


def make_output_folders(plan: Plan) -> list[Path]:
    """Create the folders of every output of ``plan``; return those that did not exist, parents first."""
    made: list[Path] = []
    for _, destination in plan:
        missing = [f for f in [destination.parent, *destination.parent.parents] if not f.exists()][::-1]
        destination.parent.mkdir(parents=True, exist_ok=True)
        made += [f for f in missing if f not in made]
    return made


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove those of ``folders`` (made by this run, parents first) that are empty, children first."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only an empty folder goes


def _run_plan(
    plan: Plan,
    one_case: CaseFn,
    label: str,
    skip_existing: bool,
    on_event: EventFn,
    complete: CompleteFn | None,
    group_size: int,
) -> list[CaseOutcome]:
    """:func:`run_batch` once the output folders exist."""
    single = len(plan) == 1
    outcomes: list[CaseOutcome] = []
    pending: list[tuple[Case, Path, Any, float]] = []  # (case, output, state, seconds so far)

    def record(outcome: CaseOutcome) -> None:
        outcomes.append(outcome)
        on_event("outcome", {"outcome": outcome})

    def failed(case: str, exc: BaseException, seconds: float) -> None:
        if single or os.environ.get("VERTREFINE_DEBUG"):
            raise exc
        reason = str(exc) if isinstance(exc, VertrefineError) else f"{type(exc).__name__}: {exc}"
        record(CaseOutcome(case, "failed", reason, seconds))

    def flush() -> None:
        if not pending:
            return
        names = ", ".join(case.name for case, _, _, _ in pending)
        start = time.perf_counter()

        def status(text: str) -> None:
            on_event("status", {"text": f"{names}: {text}"})

        try:
            group = [(case, destination, state) for case, destination, state, _ in pending]
            results: list[str | BaseException] = complete(group, status)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - the whole group failed; the batch goes on
            results = [exc] * len(pending)
        share = (time.perf_counter() - start) / len(pending)
        for (case, _, _, seconds), result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                failed(case.name, result, seconds + share)
            else:
                record(CaseOutcome(case.name, "done", result, seconds + share))
        pending.clear()

    on_event("start", {"total": len(plan), "label": label})
    for case, destination in plan:
        on_event("status", {"text": case.name})

        def status(text: str, name: str = case.name) -> None:
            on_event("status", {"text": f"{name}: {text}"})

        start = time.perf_counter()
        if skip_existing and destination.exists():
            record(CaseOutcome(case.name, "skipped", "output exists", 0.0))
            continue
        try:
            result = one_case(case, destination, status)
        except Exception as exc:  # noqa: BLE001 - a batch goes on past any failed case
            failed(case.name, exc, time.perf_counter() - start)
            continue
        if complete is None:
            record(CaseOutcome(case.name, "done", result, time.perf_counter() - start))
        else:
            pending.append((case, destination, result, time.perf_counter() - start))
            if len(pending) >= max(1, group_size):
                flush()
    flush()
    return outcomes
