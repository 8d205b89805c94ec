"""The ``vertrefine`` command line: thin wrappers that parse options, show progress and set exit codes.

Exit codes: 0 success, 1 some cases of a batch failed, 2 bad input or usage.
Heavy modules are imported inside the commands so that ``vertrefine --help`` starts fast and no command
but ``train``/``export`` ever imports torch.
"""

from __future__ import annotations

import functools
import os
import shlex
import signal
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer 0.22+ carries its own copy of click; older typer uses click itself
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import UsageError
from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .conventions import DEVICES, MODEL_KINDS
from .errors import VertrefineError
from .labels import SCHEME_CHOICES
from .train.config import PRESET_NAMES

HELP_MIN_WIDTH = 120
"""Columns of ``--help`` when it is not shown on a terminal (a file, ``less``, a wiki page): wide enough that
rich's option table names every option in full (at 80 columns it cuts names such as ``--langevin-steps``)."""


def help_width(current: int | None, stream: Any = None) -> int | None:
    """The width of a ``--help`` page: ``current`` (typer's, from TERMINAL_WIDTH; None: the terminal's) on a
    terminal, else at least :data:`HELP_MIN_WIDTH` (a pipe has no width, and rich assumes 80)."""
    stream = sys.stdout if stream is None else stream
    if getattr(stream, "isatty", lambda: False)():
        return current
    columns = os.environ.get("COLUMNS", "")
    return max(current or (int(columns) if columns.isdigit() else 0), HELP_MIN_WIDTH)


def _usage_error_line(exc: UsageError) -> typer.Exit:
    """typer's usage errors (missing argument, a word where a number goes, an unknown option) as one line:
    what is wrong, and the --help to read; exit code 2 (as click's)."""
    ctx = exc.ctx
    where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    return fail(f"{exc.format_message()}{where}", exc.exit_code)


class _OneLineErrors:
    """Mixed into typer's command classes: usage errors in one line, --help never cut when piped."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)  # type: ignore[misc]
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # the help was shown: click's way
                raise
            raise _usage_error_line(exc) from None

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except UsageError as exc:  # a sub-command's, or a typer.BadParameter raised in a command
            if type(exc).__name__ == "NoArgsIsHelpError":
                raise
            raise _usage_error_line(exc) from None

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from typer import rich_utils

        previous = rich_utils.MAX_WIDTH
        rich_utils.MAX_WIDTH = help_width(previous)
        try:
            super().format_help(ctx, formatter)  # type: ignore[misc]
        finally:
            rich_utils.MAX_WIDTH = previous


class Group(_OneLineErrors, TyperGroup):
    """The ``vertrefine`` group (:class:`_OneLineErrors`)."""


class Command(_OneLineErrors, TyperCommand):
    """Every ``vertrefine`` command (:class:`_OneLineErrors`)."""


app = typer.Typer(
    name="vertrefine",
    cls=Group,
    help="CT-quality vertebra segmentations from thick-slice MRI with a latent diffusion energy-based prior.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one error line and return the Exit to raise."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's or container's stop), raised like Ctrl-C so that partial files are removed."""


RESUME_HINTS = {
    "refine": "rerun the same command with --skip-existing to resume (finished cases are kept)",
    "degrade": "rerun the same command with --skip-existing to resume (finished cases are kept)",
    "train": "rerun with --resume to continue from the last checkpoint",
}


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def friendly_errors(command: F) -> F:
    """Turn vertrefine's errors (and unexpected ones) into one line on stderr and exit code 2.

    SIGTERM is handled as SIGINT (Ctrl-C): the output being written is removed (atomic.py), and one line
    says how to resume; exit code 130 (SIGINT) or 143 (SIGTERM).
    """
    hint = RESUME_HINTS.get(command.__name__, "rerun the same command")

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        installed, previous = _install_sigterm()
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except VertrefineError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt as exc:
            what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            raise fail(f"{what}; {hint}", 143 if isinstance(exc, Terminated) else 130) from None
        except Exception as exc:  # noqa: BLE001 - last resort: never a bare traceback for users
            if os.environ.get("VERTREFINE_DEBUG"):
                raise
            raise fail(
                f"unexpected {type(exc).__name__}: {exc} (rerun with VERTREFINE_DEBUG=1 for the traceback)"
            ) from None
        finally:
            if installed:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    return wrapper  # type: ignore[return-value]


def _install_sigterm() -> tuple[bool, Any]:
    """Make SIGTERM raise :class:`Terminated`: ``(installed, previous handler)``."""
    try:
        return True, signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: signals stay as they are
        return False, None


def progress_bar() -> Progress:
    """The progress display every command uses: description, bar, done/total, elapsed time."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
    )


def _run_batch(plan: Any, one_case: Any, **options: Any) -> int:
    """:func:`vertrefine.batch.run_batch` with the progress bar and the final report; returns the exit code."""
    from .batch import run_batch

    with progress_bar() as progress:
        task = progress.add_task(options["label"], total=len(plan))

        def on_event(kind: str, payload: dict[str, Any]) -> None:
            if kind == "status":
                progress.update(task, description=f"{options['label']} {payload['text']}")
            elif kind == "outcome":
                outcome = payload["outcome"]
                if outcome.status == "failed":
                    progress.console.print(
                        f"[red]failed[/] {outcome.case}: {outcome.detail}", highlight=False, soft_wrap=True
                    )
                progress.advance(task)

        outcomes = run_batch(plan, one_case, on_event=on_event, **options)
    return _report(outcomes)


def _note(line: str) -> None:
    err.print(f"[dim]note:[/] {line}", highlight=False, soft_wrap=True)


def _report(outcomes: list[Any]) -> int:
    """Print a batch's final line(s): the one case's summary and warnings, or tables of warnings and
    failures and the counts; return the exit code (:func:`vertrefine.batch.exit_code`)."""
    from .batch import exit_code

    counts = {status: sum(o.status == status for o in outcomes) for status in ("done", "skipped", "failed")}
    failed = [o for o in outcomes if o.status == "failed"]
    # a done case's detail is a summary line, then one line per warning (e.g. a vertebra kept as input)
    warned = [(o.case, line) for o in outcomes if o.status == "done" for line in o.detail.splitlines()[1:]]
    if len(outcomes) == 1 and not failed:
        only = outcomes[0]
        summary = only.detail.splitlines()[0] if only.detail else ""
        out.print(f"{only.case}: {only.status} ({summary}, {only.seconds:.1f} s)", highlight=False)
        for _, line in warned:
            out.print(f"[yellow]warning:[/] {line}", highlight=False)
    elif warned:
        table = Table(title="warnings")
        table.add_column("case")
        table.add_column("warning")
        for case, line in warned:
            table.add_row(case, line)
        out.print(table)
    if failed:
        table = Table(title="failed cases")
        table.add_column("case")
        table.add_column("reason")
        for outcome in failed:
            table.add_row(outcome.case, outcome.detail)
        out.print(table)
    if len(outcomes) > 1 or failed:
        with_warnings = len({case for case, _ in warned})
        extra = f" ({with_warnings} with warnings)" if with_warnings else ""
        out.print(f"{counts['done']} done{extra}, {counts['skipped']} skipped, {counts['failed']} failed")
    return exit_code(outcomes)


def _version_callback(value: bool) -> None:
    if value:
        out.print(f"vertrefine {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """CT-quality vertebra segmentations from thick-slice MRI with a latent diffusion energy-based prior."""


@app.command(cls=Command)
@friendly_errors
def info() -> None:
    """Package versions, the ONNX Runtime providers that work here, and the model bundles found."""
    from .info import collect_info

    report = collect_info()
    table = Table(title=f"vertrefine {__version__}", show_header=False)
    table.add_column("item", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")  # a long bundle path is folded, never cut
    table.add_row("python", f"{sys.version.split()[0]} ({sys.executable})")
    for name, version in report.packages.items():
        table.add_row(name, version or "[dim]not installed[/]")
    table.add_row("providers (working)", ", ".join(report.providers))
    table.add_row("CUDA", "usable" if report.cuda else "not usable here (CPU is used)")
    if report.bundles:
        for bundle in report.bundles:
            table.add_row("bundle", bundle)
    else:
        table.add_row("bundle", "[dim]none found[/] (searched: " + ", ".join(report.bundle_dirs) + ")")
    console = Console(width=help_width(None))
    if not console.is_terminal:  # a file or a pipe has no width: as wide as the table's longest line
        console.width = max(console.width, Measurement.get(console, console.options.update_width(10**5), table).maximum)
    console.print(table)


@app.command(cls=Command)
@friendly_errors
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the phantoms into (created if missing).")],
    cases: Annotated[int, typer.Option("--cases", "-n", min=1, help="Number of whole spines.")] = 1,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the first case; case i uses seed + i.")] = 0,
    patches: Annotated[
        bool,
        typer.Option("--patches", help="Write single-vertebra 128^3 1 mm patches (training data) instead."),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Rewrite files that already exist.")] = False,
) -> None:
    """Procedural lumbar spines (L1..L5, VerSe labels 20..24) at 1 mm, as NIfTI."""
    from .atomic import make_folder
    from .synth import write_synth_dataset

    make_folder(out_dir, "the phantoms")  # before the progress bar: a bad folder is one line
    with progress_bar() as progress:
        task = progress.add_task("synth", total=cases)
        written = write_synth_dataset(
            out_dir,
            cases,
            seed,
            patches=patches,
            overwrite=overwrite,
            on_case=lambda: progress.advance(task),
        )
    what = "per-vertebra patch files" if patches else "spines"
    out.print(f"wrote {len(written)} {what} (seeds {seed}..{seed + cases - 1}) to {out_dir}")


class Disagree(str, Enum):
    keep_input = "keep-input"
    write = "write"


class Consistency(str, Enum):
    project = "project"
    none = "none"


class FineInputs(str, Enum):
    keep = "keep"
    refine = "refine"


class SliceDetection(str, Enum):
    auto = "auto"
    off = "off"


def _choices(name: str, values: tuple[str, ...]) -> Any:
    """An Enum of option values for typer, from the one tuple that defines them ('lsd-ebm' -> .lsd_ebm)."""
    return Enum(name, {value.replace("-", "_"): value for value in values}, type=str)


ModelKind = _choices("ModelKind", MODEL_KINDS)
Device = _choices("Device", DEVICES)


LabelSchemeName = _choices("LabelSchemeName", SCHEME_CHOICES)
"""--label-scheme: auto, verse, totalsegmentator, ... (vertrefine.labels.SCHEMES)."""
LABEL_SCHEME_HELP = (
    "Numbering of the label ids: auto (recognised from the ids and said in one line), verse (1-7 C1-C7, "
    "8-19 T1-T12, 20-25 L1-L6, 28 T13), totalsegmentator (v2 'total', 117 classes), totalsegmentator-v1, "
    "totalsegmentator-vertebrae-mr. Only vertebrae are refined; every other structure passes through. "
    "A DICOM SEG's segment codes always decide."
)
LABELS_HELP = (
    "Labels to refine: ids of the file's own numbering and/or levels in any spelling, e.g. '20-24', "
    "'L1-L5,T12', 'vertebrae_L3' (default: every vertebra but sacrum and coccyx)."
)


def _parsed(text: str | None, parse: Callable[[str], Any], option: str) -> Any:
    """An option's text parsed by ``parse`` (None when not given); a ValueError is a usage error naming it."""
    if text is None:
        return None
    try:
        return parse(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _label_set(text: str | None) -> Any:
    """--labels as a :class:`vertrefine.labels.LabelSelection` (None when not given)."""
    from .labels import parse_label_selection

    return _parsed(text, parse_label_selection, "--labels")


SEED_HELP = "Seed; a case's seed comes from this and its name, not from its place in a folder."
ASSUME_ORIENTATION_HELP = (
    "Orientation of NIfTI inputs whose qform_code and sform_code are both 0 (refused without it): the "
    "patient directions the voxel axes i, j, k point to, e.g. RAS or LPS (nibabel's axis codes). Other "
    "inputs ignore it."
)


SHARD_HELP = (
    "Run only part K of N (from 1) of a folder, e.g. 3/8: cases are split by a stable hash of their name, "
    "so N workers (a SLURM array, xargs -P) with the same options cover the folder once."
)


def _shard(text: str | None) -> Any:
    """--shard K/N as a :class:`vertrefine.cases.Shard` (None when not given)."""
    from .cases import Shard

    return _parsed(text, Shard.parse, "--shard")


def _shard_part(part: Any, items: list[Any], name: Callable[[Any], str]) -> list[Any]:
    """The ``items`` (cases or pairs) shard ``part`` holds, with one note saying how many; when it holds none,
    the note says so, and for a single case which shard holds it (nothing to do here: the exit code is 0)."""
    chosen = part.select(items, name)
    if chosen:
        _note(f"shard {part}: {len(chosen)} of {len(items)} cases")
    elif len(items) == 1:
        owner = next(k for k in range(1, part.count + 1) if type(part)(k, part.count).holds(name(items[0])))
        _note(
            f"shard {part} does not hold the one case {name(items[0])} (cases are split by a hash of their "
            f"names; shard {owner}/{part.count} holds it): nothing to do"
        )
    else:
        _note(f"shard {part} holds none of the {len(items)} cases (split by a hash of their names): nothing to do")
    return chosen


def _orientation(text: str | None) -> str | None:
    """--assume-orientation: a valid three-letter code (upper-case) or None."""
    from .nifti import parse_orientation

    return _parsed(text, parse_orientation, "--assume-orientation")


@app.command(cls=Command)
@friendly_errors
def refine(
    ctx: typer.Context,
    input_path: Annotated[
        Path, typer.Argument(metavar="IN", help="Label map (NIfTI, DICOM series or SEG), or a folder of them.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output file, or folder when IN is a folder.")],
    model: Annotated[
        ModelKind | None,
        typer.Option(
            help="lsd-ebm (default): diffusion prior; vae: decode the encoder's mean. lebm is not supported "
            "here: its posterior sampling needs the decoder's gradient, which ONNX bundles do not carry "
            "(benchmarks/quality.py compares it)."
        ),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="Model bundle folder (default: the shipped bundle of --model).")
    ] = None,
    device: Annotated[Device, typer.Option(help="auto: CUDA when it really works here, else CPU.")] = Device.auto,
    threads: Annotated[int, typer.Option(min=0, help="CPU threads for ONNX Runtime (0: all cores).")] = 0,
    t_refine: Annotated[
        int | None, typer.Option(min=0, help="Diffusion step to noise the latent to (default: the bundle's, 6).")
    ] = None,
    langevin_steps: Annotated[
        int | None, typer.Option(min=0, help="Langevin steps per reverse step (default: the bundle's).")
    ] = None,
    step_size: Annotated[
        float | None, typer.Option(min=1e-8, help="Langevin step size lambda (default: the bundle's).")
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Weight of the data-consistency step that keeps the result faithful to the input's thick "
            "slices (0: none; default: the bundle's). Inputs finer than 1.5 mm are not guided.",
        ),
    ] = None,
    pose: Annotated[
        bool,
        typer.Option(help="Crop each vertebra along the local spine axis (tilted spines); --no-pose: axis-aligned."),
    ] = True,
    min_agreement: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="A vertebra whose result, seen on the input grid, has a DSC below this against the input is "
            "flagged (the true shape scores 0.7-0.9 against 5 mm slices).",
        ),
    ] = 0.6,
    min_fov_fraction: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="A vertebra with less than this fraction of its refined shape inside the image is written as "
            "the input shows it.",
        ),
    ] = 0.5,
    on_disagree: Annotated[
        Disagree,
        typer.Option(help="For a flagged vertebra, write the input's voxels (keep-input) or the result (write)."),
    ] = Disagree.keep_input,
    consistency: Annotated[
        Consistency,
        typer.Option(
            help="Thick inputs: project makes each refined vertebra hold exactly the input's slabs (the fewest "
            "voxels nearest its surface changed); none writes the model's result as it is."
        ),
    ] = Consistency.project,
    fine_inputs: Annotated[
        FineInputs,
        typer.Option(
            help="An input no coarser than 3 mm along any axis: keep writes its vertebrae as the input shows them, "
            "with a warning (refinement measured no better than such inputs), refine refines it anyway."
        ),
    ] = FineInputs.keep,
    slice_detection: Annotated[
        SliceDetection,
        typer.Option(
            help="auto: a thick-slice segmentation stored on a finer grid (labels that change only every few "
            "planes along an axis) is refined as the thick slices it holds, and written on its own grid; off: "
            "the header's spacing decides.",
        ),
    ] = SliceDetection.auto,
    spacing: Annotated[
        str,
        typer.Option(
            metavar="MM|input|auto",
            help="Output grid: auto = 1 mm isotropic when any input spacing is coarser than 1.5 mm (same "
            "orientation and extent), else the input's grid; 'input' keeps the input's grid; a number (0.25 to 5) "
            "sets the isotropic spacing in mm. A DICOM SEG on a finer grid gets its own plane positions and still "
            "references its source series.",
        ),
    ] = "auto",
    samples: Annotated[int, typer.Option(min=1, help="Chains per vertebra; the mean probability is kept.")] = 1,
    seed: Annotated[int, typer.Option(min=0, help=SEED_HELP)] = 0,
    threshold: Annotated[
        float | None,
        typer.Option(min=0.01, max=0.99, help="Probability threshold (default: the bundle's, 0.5 when shipped)."),
    ] = None,
    labels: Annotated[str | None, typer.Option(help=LABELS_HELP)] = None,
    label_scheme: Annotated[
        LabelSchemeName, typer.Option("--label-scheme", help=LABEL_SCHEME_HELP)
    ] = LabelSchemeName.auto,  # type: ignore[attr-defined]
    save_prob: Annotated[
        Path | None, typer.Option("--save-prob", help="Write the mean probability map (NIfTI; a folder in batch).")
    ] = None,
    uncertainty: Annotated[
        Path | None, typer.Option(help="Write the per-voxel std over --samples (NIfTI; a folder in batch).")
    ] = None,
    mesh: Annotated[Path | None, typer.Option(help="Folder for one STL per vertebra (LPS mm).")] = None,
    qc: Annotated[
        Path | None, typer.Option(help="Write a PNG with input and refined outlines (a folder in batch).")
    ] = None,
    group_size: Annotated[int, typer.Option(min=1, help="Cases of a folder whose vertebrae are sampled together.")] = 8,
    series_uid: Annotated[
        str | None, typer.Option(help="Which series to read when a DICOM folder holds several.")
    ] = None,
    skip_existing: Annotated[bool, typer.Option(help="In folder mode, skip cases whose output exists.")] = False,
    shard: Annotated[str | None, typer.Option(metavar="K/N", help=SHARD_HELP)] = None,
    source_series: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="The DICOM image series a DICOM SEG output (-o NAME.dcm) of a NIfTI input references; the "
            "NIfTI must hold its voxels (in any axis order, as dcm2niix writes them).",
        ),
    ] = None,
    assume_orientation: Annotated[str | None, typer.Option(metavar="CODE", help=ASSUME_ORIENTATION_HELP)] = None,
) -> None:
    """Refine vertebra segmentations with the shape prior (1 mm output for thick-slice inputs) plus a JSON sidecar."""
    from .batch import is_batch, plan_cases
    from .refine import Refiner
    from .refine_batch import ExtraOutputs, RefineJob, check_refine_outputs

    orientation = _orientation(assume_orientation)
    part = _shard(shard)
    extras = ExtraOutputs(probability=save_prob, uncertainty=uncertainty, mesh=mesh, qc=qc, batch=is_batch(input_path))
    extras.check(samples)
    plan = plan_cases(input_path, output, note=_note)  # every output is checked before the model is opened
    if part is not None:
        plan = _shard_part(part, plan, lambda planned: planned[0].name)
        if not plan:
            raise typer.Exit(0)
    check_refine_outputs(plan, source_series, assume_orientation=orientation)
    extras.check_cases([case.name for case, _ in plan])
    refiner = Refiner.from_bundle(
        weights,
        model=None if model is None else model.value,
        device=device.value,
        threads=threads,
        t_refine=t_refine,
        langevin_steps=langevin_steps,
        step_size=step_size,
        guidance=guidance,
        samples=samples,
        threshold=threshold,
        labels=_label_set(labels),
        label_scheme=label_scheme.value,
        keep_maps=extras.wants_maps,
        pose=pose,
        spacing=_output_spacing(spacing),
        min_agreement=min_agreement,
        min_fov_fraction=min_fov_fraction,
        on_disagree=on_disagree.value,
        fine_inputs=fine_inputs.value,
        consistency=consistency.value,
        slice_detection=slice_detection.value,
    )
    if refiner.note:
        err.print(f"[yellow]note:[/] {refiner.note}", highlight=False)
    job = RefineJob(
        refiner,
        extras,
        seed=seed,
        series_uid=series_uid,
        threads=threads,
        source_series=source_series,
        assume_orientation=orientation,
        command=_command_line(ctx),
        note=_note,
    )
    code = _run_batch(
        plan, job.prepare, label="refine", skip_existing=skip_existing, complete=job.complete, group_size=group_size
    )
    raise typer.Exit(code)


class Axis(str, Enum):
    sagittal = "sagittal"
    axial = "axial"
    coronal = "coronal"


class Region(str, Enum):
    patch = "patch"
    image = "image"


@app.command(cls=Command)
@friendly_errors
def degrade(
    ctx: typer.Context,
    input_path: Annotated[Path, typer.Argument(metavar="IN", help="Label map (NIfTI/DICOM) or a folder of them.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output file, or folder when IN is a folder.")],
    slice_mm: Annotated[float, typer.Option(help="Simulated slice thickness in mm (0.5-20).")] = 5.0,
    axis: Annotated[Axis, typer.Option(help="Slice direction of the simulated acquisition.")] = Axis.sagittal,
    seed: Annotated[int, typer.Option(min=0, help=SEED_HELP)] = 0,
    in_plane_mm: Annotated[float, typer.Option(help="Simulated in-plane resolution in mm (0-10).")] = 1.0,
    native: Annotated[
        bool,
        typer.Option(
            help="Write the result on the simulated acquisition's own grid (e.g. 1 x 1 x 5 mm, one voxel per "
            "slab), as a clinic's segmentation comes, instead of on the input's grid (NIfTI output only)."
        ),
    ] = False,
    boundary_amplitude_mm: Annotated[
        float | None,
        typer.Option(help="Std of the smooth boundary displacement, mm (0-10; default: 0.4 x slice-mm)."),
    ] = None,
    boundary_sigma_mm: Annotated[
        float, typer.Option(help="Correlation length of the boundary displacement, mm (0.1-100).")
    ] = 8.0,
    threshold_jitter: Annotated[
        float,
        typer.Option(help="Std of the partial-volume threshold shift (per case, plus half per vertebra; 0-0.45)."),
    ] = 0.1,
    posterior_loss_mm: Annotated[
        float | None,
        typer.Option(
            help="Radius of the opening that erodes thin posterior parts, mm (0-20; default: 0.5 x slice-mm)."
        ),
    ] = None,
    truncation: Annotated[float, typer.Option(help="Probability that each process tip is cut off (0-1).")] = 0.5,
    islands: Annotated[float, typer.Option(help="Mean number (Poisson) of spurious islands per case (0-100).")] = 4.0,
    island_radius_mm: Annotated[
        tuple[float, float], typer.Option(help="Smallest and largest island radius, mm (0.5-20).")
    ] = (
        1.5,
        4.0,
    ),
    clean: Annotated[
        bool,
        typer.Option(
            "--clean",
            help="Noise-free simulation: slab partial volume alone (boundary amplitude, threshold jitter, "
            "posterior loss, truncation and islands all 0); refused together with any of those options.",
        ),
    ] = False,
    series_uid: Annotated[
        str | None, typer.Option(help="Which series to read when a DICOM folder holds several.")
    ] = None,
    skip_existing: Annotated[bool, typer.Option(help="In folder mode, skip cases whose output exists.")] = False,
    assume_orientation: Annotated[str | None, typer.Option(metavar="CODE", help=ASSUME_ORIENTATION_HELP)] = None,
) -> None:
    """Simulate a thick-slice MRI segmentation of a label map, on the input's grid (or --native)."""
    from .batch import plan_cases
    from .cases import Case, case_seed
    from .degrade import CLEAN, check_options, clean_conflicts, degrade_file
    from .outputs import require_seg_sources

    orientation = _orientation(assume_orientation)
    knobs = dict(
        slice_mm=slice_mm,
        axis=axis.value,
        in_plane_mm=in_plane_mm,
        boundary_amplitude_mm=boundary_amplitude_mm,
        boundary_sigma_mm=boundary_sigma_mm,
        threshold_jitter=threshold_jitter,
        posterior_loss_mm=posterior_loss_mm,
        truncation=truncation,
        islands=islands,
        island_radius_mm=island_radius_mm,
        native=native,
    )
    if clean:
        given = [name for name in CLEAN if ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP")]
        if problem := clean_conflicts(given):
            raise fail(problem)
        knobs.update(CLEAN)
    check_options(output, **knobs)
    plan = plan_cases(input_path, output, note=_note)  # every output is checked before any case runs
    require_seg_sources(plan, None, None)

    def one_case(case: Case, destination: Path, _status: Callable[[str], None]) -> str:
        seed_of_case = case_seed(seed, case.name)
        lines = degrade_file(
            case.path, destination, seed=seed_of_case, series_uid=series_uid, assume_orientation=orientation, **knobs
        )
        return "\n".join(lines)

    code = _run_batch(plan, one_case, label="degrade", skip_existing=skip_existing)
    raise typer.Exit(code)


@app.command(cls=Command)
@friendly_errors
def score(
    pred: Annotated[Path, typer.Argument(help="Predicted label map, or a folder of them.")],
    gt: Annotated[Path, typer.Argument(help="Ground-truth label map, or a folder (paired by file name).")],
    region: Annotated[
        Region,
        typer.Option(help="patch: the paper's 128^3 1 mm patch around each true vertebra; image: the whole grid."),
    ] = Region.patch,
    csv: Annotated[Path | None, typer.Option("--csv", help="Write per-vertebra rows as CSV.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write rows and summary as JSON.")] = None,
    resample: Annotated[
        bool,
        typer.Option(help="Put predictions on the truth's grid when the grids differ (nearest neighbour)."),
    ] = False,
    per_case: Annotated[bool, typer.Option(help="Also print one row per case and vertebra.")] = False,
    assume_orientation: Annotated[str | None, typer.Option(metavar="CODE", help=ASSUME_ORIENTATION_HELP)] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            help="Labels to score: ids and/or levels, e.g. '20-24' or 'L1-L5' (default: every vertebra of the "
            "numbering but sacrum and coccyx; discs, organs and subregions are listed apart)."
        ),
    ] = None,
    label_scheme: Annotated[
        LabelSchemeName, typer.Option("--label-scheme", help=LABEL_SCHEME_HELP)
    ] = LabelSchemeName.auto,  # type: ignore[attr-defined]
    shard: Annotated[str | None, typer.Option(metavar="K/N", help=SHARD_HELP)] = None,
) -> None:
    """DSC, VS, SEN, SPEC, NMI, Cohen's kappa (paper appendix D), HD95 and ASSD per vertebra.

    A ground truth without its prediction is scored as an empty prediction (DSC 0), listed, and makes
    the exit code 1; two folders with no case name in common are refused (exit code 2).
    """
    from .score import no_pairs_message, pair_files, score_pairs, summarize, with_missing, write_csv, write_json

    selection = _label_set(labels)
    pairs, only_pred, only_gt = pair_files(pred, gt)
    if not pairs:  # one answer, before any per-case line: nothing pairs up
        raise fail(no_pairs_message(pred, gt, only_pred, only_gt))
    for path in only_pred:
        err.print(f"[yellow]unpaired prediction (no ground truth, not scored):[/] {path}", highlight=False)
    for path in only_gt:
        err.print(f"[red]missing prediction:[/] {path} has none; scored as an empty prediction", highlight=False)
    pairs = with_missing(pairs, only_gt)
    part = _shard(shard)
    if part is not None:
        pairs = _shard_part(part, pairs, lambda pair: pair[0])
        if not pairs:
            raise typer.Exit(0)

    with progress_bar() as progress:
        task = progress.add_task("score", total=len(pairs))
        result = score_pairs(
            pairs,
            region=region.value,
            resample=resample,
            label_scheme=label_scheme.value,
            labels=selection,
            on_case=lambda *_: progress.advance(task),
            assume_orientation=_orientation(assume_orientation),
        )
    for case, message in result.warnings:
        err.print(f"[yellow]warning:[/] {case}: {message}", highlight=False, soft_wrap=True)
    for note in result.notes:
        err.print(f"[dim]note:[/] {note}", highlight=False, soft_wrap=True)
    if result.ignored:
        names = sorted({f"{item['label']} ({item['name']})" for item in result.ignored})
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        err.print(
            f"[dim]note:[/] not scored (not vertebrae; --labels chooses): {shown}", highlight=False, soft_wrap=True
        )
    for case, message in result.errors:
        err.print(f"[red]failed[/] {case}: {message}", highlight=False, soft_wrap=True)

    summary = summarize(result.rows)
    if per_case and result.rows:
        out.print(_rows_table(result.rows))
    if summary["overall"]["n"]:
        out.print(_summary_table(summary, region.value))
    if csv:
        write_csv(result.rows, csv)
        out.print(f"rows written to {csv}")
    if json_path:
        write_json(result.rows, summary, json_path, ignored=result.ignored)
        out.print(f"rows and summary written to {json_path}")
    if result.missing:
        err.print(
            f"[red]{len(result.missing)} missing prediction{'s' if len(result.missing) > 1 else ''}[/] "
            f"(scored as empty, DSC 0): {', '.join(result.missing)}",
            highlight=False,
            soft_wrap=True,
        )
    if result.errors and len(pairs) == 1 and pred.is_file() and gt.is_file():
        raise typer.Exit(2)  # one pair of files is no batch: its bad input is a usage error, as for refine
    if result.errors or result.missing:
        raise typer.Exit(1)


Preset = _choices("Preset", PRESET_NAMES)


def _output_spacing(text: str) -> float | str:
    """--spacing: 'auto', 'input' or a number of mm (its range: :data:`vertrefine.refine.OUTPUT_SPACING_MM`)."""
    from .refine import OUTPUT_SPACING_MM

    if text in ("auto", "input"):
        return text
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    low, high = OUTPUT_SPACING_MM
    if not low <= value <= high:
        raise typer.BadParameter(
            f"--spacing takes a number of mm from {low:g} to {high:g}, 'input' or 'auto', got {text!r}"
        )
    return value


def _int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    """'8,1' -> (8, 1); None stays None; anything else is a usage error naming ``option``."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{option} takes whole numbers separated by commas, got {text!r}") from None


def _command_line(ctx: typer.Context) -> str:
    """The command as the user could retype it: the options they gave (sys.argv is not theirs under tests)."""
    words = ["vertrefine", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None:
            continue
        if isinstance(value, bool):  # a flag, or an --on/--off pair: the spelling of the value given
            if value == param.default:
                continue
            opts = param.opts if value else getattr(param, "secondary_opts", [])
            if opts:
                words.append(max(opts, key=len))
            continue
        items = value if isinstance(value, (list, tuple)) and (param.multiple or param.nargs != 1) else [value]
        for item in items:
            text = str(item.value if isinstance(item, Enum) else item)
            # a positional argument is its value alone; an option its flag and value
            words += [text] if param.param_type_name == "argument" else [max(param.opts, key=len), text]
    return shlex.join(words)


@app.command(cls=Command)
@friendly_errors
def train(
    ctx: typer.Context,
    run_folder: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder: config, log.csv, checkpoints/, bundle/.")
    ],
    data: Annotated[
        list[Path] | None,
        typer.Option(
            "--data",
            help="Folder of CT segmentations (NIfTI / DICOM SEG, any spacing, or a VerSe BIDS tree with "
            "*_seg-vert_msk.nii.gz), or one such file; repeat for several.",
        ),
    ] = None,
    data_repeat: Annotated[
        str | None,
        typer.Option(help="Copies per epoch of each --data folder's patches, comma-separated (e.g. 8,1)."),
    ] = None,
    drop_cut: Annotated[
        bool | None,
        typer.Option(
            "--drop-cut/--keep-cut",
            help="Leave out vertebrae touching the scan's edge (default), or keep them (tightly cropped files).",
        ),
    ] = None,
    val_groups: Annotated[
        str | None,
        typer.Option(help="Validation individuals, comma-separated case names or subjects (default: 10% by hash)."),
    ] = None,
    model: Annotated[
        ModelKind | None,
        typer.Option(help="Model kind (default: lsd-ebm). lebm bundles are for comparisons: refine cannot run them."),
    ] = None,
    preset: Annotated[
        Preset | None,
        typer.Option(
            help="tiny: 3 synthetic spines, a small model, minutes on a CPU (smoke test); "
            "paper: the paper's flat latent."
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs (in total, also with --resume).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Patches per step (per process).")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate of encoder and decoder.")] = None,
    energy_lr: Annotated[float | None, typer.Option(help="Adam learning rate of the energy (default: --lr).")] = None,
    latent: Annotated[
        int | None, typer.Option(min=1, help="Latent channels (spatial latent, default 8) or size (flat latent).")
    ] = None,
    latent_grid: Annotated[
        int | None, typer.Option(min=0, help="Side of the spatial latent grid (default 16); 0 = a flat latent.")
    ] = None,
    steps: Annotated[int | None, typer.Option(min=2, help="Diffusion steps T (default: 20).")] = None,
    langevin_steps: Annotated[int | None, typer.Option(min=0, help="Langevin steps per reverse step.")] = None,
    degraded_variants: Annotated[
        int | None, typer.Option(min=0, help="Thick-slice copies per patch kept in the cache (denoising training).")
    ] = None,
    clean_variants: Annotated[
        int | None,
        typer.Option(min=0, help="How many of the thick-slice copies are clean slabs (partial volume only)."),
    ] = None,
    variant_errors: Annotated[
        str | None,
        typer.Option(
            help="Errors of the other thick-slice copies: degrade (the simulator's) or families (a random draw of "
            "the training corruption families; mri-like and degrade stay held out)."
        ),
    ] = None,
    degraded_prob: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Probability that a training input is a thick-slice copy."),
    ] = None,
    cache: Annotated[Path | None, typer.Option("--cache", help="Patch cache folder (default: OUT/cache).")] = None,
    kl_weight: Annotated[
        float | None, typer.Option(min=0.0, help="Weight of the ELBO's KL term (default 1; lower keeps more detail).")
    ] = None,
    conditioned: Annotated[
        bool | None,
        typer.Option(
            "--conditioned/--unconditioned",
            help="The decoder also sees the input patch: it keeps what a thick-slice input shows (spatial latent).",
        ),
    ] = None,
    decoder_input_dropout: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=0.95, help="Conditioned decoder: probability that a training item's decoder sees no input."
        ),
    ] = None,
    init_from: Annotated[
        Path | None,
        typer.Option(help="Start from this run's (or checkpoint's) weights, same architecture: fine-tuning."),
    ] = None,
    device: Annotated[Device | None, typer.Option(help="auto, cpu or cuda.")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed of data order, augmentation and sampling.")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(min=1, help="Keep a checkpoint every N epochs.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out.")] = False,
) -> None:
    """Learn the shape prior from CT segmentations and export it as an ONNX bundle (OUT/bundle)."""
    from .train.config import TrainConfig

    options = dict(
        data_dir=data or None,
        data_repeat=_int_list(data_repeat, "--data-repeat"),
        drop_cut=drop_cut,
        val_groups=tuple(g.strip() for g in val_groups.split(",") if g.strip()) if val_groups else None,
        cache_dir=cache,
        kl_weight=kl_weight,
        conditioned=conditioned,
        decoder_input_dropout=decoder_input_dropout,
        init_from=init_from,
        model=model and model.value,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        energy_lr=energy_lr,
        latent=latent,
        latent_grid=latent_grid,
        timesteps=steps,
        langevin_steps=langevin_steps,
        degraded_variants=degraded_variants,
        clean_variants=clean_variants,
        variant_errors=variant_errors,
        degraded_prob=degraded_prob,
        device=device and device.value,
        seed=seed,
        checkpoint_every=checkpoint_every,
        command=_command_line(ctx),
    )
    config = TrainConfig.from_options(preset and preset.value, out=run_folder, resume=resume, **options)
    from .train.loop import train as run_training  # torch is imported only now

    with progress_bar() as progress:
        reporter = TrainingProgress(progress)
        run_dir = run_training(config, on_event=reporter)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, the first process reports the run
    out_line = f"run folder {run_dir}"
    if reporter.best_dice is not None:
        out_line += f"; best validation Dice {reporter.best_dice:.3f}"
    if reporter.bundle:
        out_line += f"; bundle {reporter.bundle}"
    out.print(out_line, highlight=False)


class TrainingProgress:
    """Turns the training loop's events into rich progress bars and one line per epoch."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: Any = None
        self.best_dice: float | None = None
        self.bundle: str | None = None

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        progress = self.progress
        if kind in ("synth_start", "cache_start"):
            label = "synth spines" if kind == "synth_start" else "patch cache"
            self.task = progress.add_task(label, total=payload.get("cases"))
        elif kind in ("synth", "cache") and self.task is not None:
            progress.update(self.task, completed=payload["done"], total=payload["total"])
            if payload.get("status") == "skipped":
                progress.console.print(f"[yellow]skipped[/] {payload['case']}: {payload['message']}", highlight=False)
        elif kind == "epoch_start":
            self.task = progress.add_task(f"epoch {payload['epoch']}/{payload['epochs']}", total=payload["steps"])
        elif kind == "step" and self.task is not None:
            logs = payload["logs"]
            progress.update(
                self.task, completed=payload["step"], description=f"epoch {payload['epoch']} loss {logs['loss']:.4f}"
            )
        elif kind == "epoch_end":
            losses = "  ".join(f"{k} {v:.4g}" for k, v in payload["losses"].items())
            self.best_dice = payload.get("best_val_dice")
            progress.console.print(
                f"epoch {payload['epoch']}/{payload['epochs']}  {losses}  val Dice {payload['val_dice']:.4f}"
                f"  ({payload['seconds']:.0f} s)",
                highlight=False,
            )
            if self.task is not None:
                progress.remove_task(self.task)
                self.task = None
        elif kind == "warning":
            progress.console.print(f"[yellow]warning:[/] {payload['message']}", highlight=False)
        elif kind == "export_end":
            self.bundle = payload["path"]


@app.command(cls=Command)
@friendly_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A training run folder (or a .pt checkpoint).")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Bundle folder to write (replaced if a bundle; parents created).")
    ],
    as_kind: Annotated[
        ModelKind | None,
        typer.Option("--as", help="Export an lsd-ebm/lebm run's autoencoder alone as a vae bundle."),
    ] = None,
    t_refine: Annotated[int | None, typer.Option(min=0, help="Bundle default of refine's --t-refine.")] = None,
    langevin_steps: Annotated[
        int | None, typer.Option(min=0, help="Bundle default of refine's --langevin-steps.")
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Bundle default of refine's --guidance.")
    ] = None,
    guidance_steps: Annotated[
        int | None, typer.Option(min=0, help="How many of the last reverse steps are guided (default: all).")
    ] = None,
) -> None:
    """Export a run's last checkpoint as a model bundle: single-file ONNX models + manifest.json."""
    from .train.export import export_run

    overrides = {
        "t_refine": t_refine,
        "langevin_steps": langevin_steps,
        "guidance": guidance,
        "guidance_steps": guidance_steps,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    from .bundle import read_manifest
    from .train.export import LEBM_NOTE

    bundle = export_run(run_dir, output, as_kind=as_kind and as_kind.value, sampler_overrides=overrides)
    out.print(f"bundle written to {bundle}", highlight=False)
    if read_manifest(bundle)["kind"] == "lebm":
        err.print(f"[yellow]warning:[/] {LEBM_NOTE}", highlight=False, soft_wrap=True)


METRIC_COLUMNS = (
    ("dsc", "DSC"),
    ("vs", "VS"),
    ("sen", "SEN"),
    ("spec", "SPEC"),
    ("nmi", "NMI"),
    ("ck", "CK"),
    ("hd95_mm", "HD95 mm"),
    ("assd_mm", "ASSD mm"),
)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _rows_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="per case and vertebra")
    table.add_column("case")
    table.add_column("level")
    for _, title in METRIC_COLUMNS:
        table.add_column(title, justify="right")
    for row in rows:
        table.add_row(row["case"], row["level"], *(_fmt(row.get(key)) for key, _ in METRIC_COLUMNS))
    return table


def _summary_table(summary: dict[str, Any], region: str) -> Table:
    """Mean per level and overall, with a dim row of standard deviations under each (n > 1)."""
    table = Table(title=f"per-vertebra metrics, mean (std below), {region} region")
    table.add_column("level")
    table.add_column("n", justify="right")
    for _, title in METRIC_COLUMNS:
        table.add_column(title, justify="right")

    def add(name: str, stats: dict[str, Any]) -> None:
        entries = [stats.get(key) or {} for key, _ in METRIC_COLUMNS]
        table.add_row(name, str(stats["n"]), *(_fmt(e.get("mean")) for e in entries))
        if stats["n"] > 1:
            table.add_row("", "", *(f"[dim]{_fmt(e.get('std'))}[/]" for e in entries), end_section=True)

    for level, stats in summary["per_level"].items():
        add(level, stats)
    table.add_section()
    add("[bold]all[/]", summary["overall"])
    return table


if __name__ == "__main__":  # pragma: no cover
    app()
