"""Refine over a file or a folder: refine's output checks, the two batch stages and the optional outputs.

``RefineJob.prepare`` reads and encodes one case; ``RefineJob.complete`` samples a whole group of cases
at once, then decodes and writes each. Per case, the extras (the sidecar, :class:`vertrefine.sidecar.Sidecar`;
meshes, QC image, probability and uncertainty maps) are written first and the label map last, each
atomically: a case whose label map exists is finished, which is what ``--skip-existing`` relies on to
resume an interrupted batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .batch import Status
from .cases import Case, Plan, case_name, case_seed
from .dicom_seg import seg_source_geometry
from .errors import InputError, OutputError, SettingsError
from .filetypes import NIFTI_SUFFIXES, SEG_SUFFIXES, is_nifti_name
from .io import is_dicom_output, read_label_map, write_label_map
from .labels import SPINEPS_SUBREGION_NOTE, SPINEPS_SUBREGIONS, is_spineps_subregion_name, label_scheme_of
from .nifti import read_nifti_geometry, write_scalar_nifti
from .outputs import check_writable_file, check_writable_folder, require_seg_sources
from .refine import PreparedCase, RefinedCase, Refiner
from .sidecar import Sidecar, bundle_digests, sidecar_path
from .volume import Volume

EXTRA_OPTIONS = {"probability": "--save-prob", "uncertainty": "--uncertainty", "mesh": "--mesh", "qc": "--qc"}
"""The command-line option of each extra output."""


@dataclass(frozen=True)
class ExtraOutputs:
    """Optional outputs. In batch mode each is a folder (one file, or sub-folder for meshes, per case)."""

    probability: Path | None = None
    uncertainty: Path | None = None
    mesh: Path | None = None
    qc: Path | None = None
    batch: bool = False

    def check(self, samples: int = 1) -> None:
        """Refuse outputs that cannot be written (before any case runs): names, folders, permissions; an
        uncertainty map of fewer than 2 ``samples`` (it is their spread)."""
        if self.uncertainty is not None and samples < 2:
            raise SettingsError("--uncertainty needs --samples 2 or more (it is the spread of the samples)")
        if self.batch:
            for kind, option in EXTRA_OPTIONS.items():
                folder = getattr(self, kind)
                if folder is not None and folder.exists() and not folder.is_dir():
                    raise OutputError(f"{folder}: the input is a folder, so {option} must be a folder too")
                if folder is not None:
                    check_writable_folder(folder, option)
            return
        for option, path in (("--save-prob", self.probability), ("--uncertainty", self.uncertainty)):
            if path is not None and not is_nifti_name(path):
                raise OutputError(f"{path}: {option} writes NIfTI; name it .nii.gz or .nii")
        if self.qc is not None and self.qc.suffix.lower() != ".png":
            raise OutputError(f"{self.qc}: --qc writes a PNG image; name it .png")
        for kind in ("probability", "uncertainty", "qc"):
            if getattr(self, kind) is not None:
                check_writable_file(getattr(self, kind), EXTRA_OPTIONS[kind])
        if self.mesh is not None:
            check_writable_folder(self.mesh, "--mesh")

    def target(self, kind: str, case: str) -> Path | None:
        """Where ``kind`` (probability, uncertainty, qc: a file; mesh: a folder) of ``case`` goes; None when
        not asked for. Creates nothing."""
        base: Path | None = getattr(self, kind)
        if base is None:
            return None
        if kind == "mesh":
            return base / case if self.batch else base
        if not self.batch:
            return base
        return base / (f"{case}.png" if kind == "qc" else f"{case}.nii.gz")

    def check_cases(self, names: Sequence[str]) -> None:
        """Refuse, before any case runs, a case's extra output file whose path is an existing folder, or a
        mesh folder whose path is a file (OutputError naming it and the option)."""
        for name in names:
            for kind, option in EXTRA_OPTIONS.items():
                path = self.target(kind, name)
                if path is None:
                    continue
                if kind == "mesh" and path.exists() and not path.is_dir():
                    raise OutputError(f"{path}: {option} needs a folder here and this is a file; move or rename it")
                if kind != "mesh" and path.is_dir():
                    raise OutputError(f"{path}: a folder has the name of this {option} output; move or rename it")

    def path(self, kind: str, case: str, created: list[Path] | None = None) -> Path | None:
        """Where ``kind`` (probability, uncertainty, qc, mesh) of ``case`` goes (:meth:`target`), creating
        folders. Every folder made here is appended to ``created`` (parents first)."""
        target = self.target(kind, case)
        if target is None:
            return None
        _make_folder(target if kind == "mesh" else target.parent, created)
        return target

    @property
    def wants_maps(self) -> bool:
        return self.probability is not None or self.uncertainty is not None


def _make_folder(folder: Path, created: list[Path] | None) -> None:
    missing = [folder, *folder.parents]
    missing = [f for f in missing if not f.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    if created is not None:
        created += missing


def check_sidecars(plan: Plan) -> None:
    """Refuse, before any case runs, an output whose sidecar would also be another output's.

    ``out.nii.gz`` and ``out.dcm`` in one folder would share ``out.json``: an existing output of the same
    case name in another format (or two outputs of one run) makes the run stop with one line naming both.
    A sidecar path that is an existing folder is refused too (it could never be written).
    """
    seen: dict[Path, Path] = {}
    for _, destination in plan:
        sidecar = sidecar_path(destination)
        if sidecar.is_dir():
            raise OutputError(
                f"{destination}: its sidecar {sidecar} is a folder; move or rename that folder, or name the "
                "output otherwise"
            )
        other = seen.get(sidecar)
        if other is None:
            name = case_name(destination)
            others = [
                destination.with_name(name + suffix)
                for suffix in NIFTI_SUFFIXES + SEG_SUFFIXES
                if (name + suffix).lower() != destination.name.lower()
            ]
            other = next((p for p in others if p.exists()), None)
        if other is not None:
            raise OutputError(
                f"{destination}: its sidecar {sidecar.name} would also be the sidecar of {other}; "
                "give this output another name (or folder), or remove the other"
            )
        seen[sidecar] = destination


def check_refine_outputs(
    plan: Plan, source_series: Path | None = None, *, assume_orientation: str | None = None
) -> None:
    """What can fail about refine's outputs, checked before any case runs (OutputError / InputError).

    Refused: two outputs sharing a sidecar (:func:`check_sidecars`); a DICOM SEG output of a NIfTI input
    without ``source_series`` (``--source-series``); ``source_series`` with a folder of cases or a NIfTI
    output; a series that a SEG cannot reference (:func:`vertrefine.dicom_seg.seg_source_geometry`); a
    NIfTI input whose grid (``assume_orientation`` as for reading) does not hold that series' voxels (the same
    grid with its axes flipped or permuted, as converters write it, is accepted).
    """
    check_sidecars(plan)
    require_seg_sources(plan, source_series, "--source-series")
    if source_series is None:
        return
    (case, destination), *more = plan
    if more or not is_dicom_output(destination):
        raise OutputError(
            f"{source_series}: --source-series names the images that a DICOM SEG output (-o NAME.dcm) of one "
            "input references; use it with a single input and a .dcm output"
        )
    series = seg_source_geometry(source_series)
    if not is_nifti_name(case.path):
        return
    grid = read_nifti_geometry(case.path, assume_orientation=assume_orientation)
    if not grid.same_voxels(series, tol=1e-3):  # the same voxels, in any axis order (dcm2niix flips rows)
        raise InputError(
            case.path,
            f"is not on the grid of the --source-series {source_series} ({grid.describe()}, the series "
            f"{series.describe()}), so a DICOM SEG of it cannot reference those images",
            "pass the series this label map was made on, or write NIfTI (.nii.gz)",
        )


def _rejected_ids(refined: RefinedCase, threshold: float) -> np.ndarray | None:
    """Instance ids [z, y, x] on the working grid of the refinements not written (vertebrae kept as input:
    :attr:`vertrefine.refine.RefinedVertebra.rejected` at ``threshold``); None when there is none."""
    kept = [v for v in refined.vertebrae if v.rejected is not None and (v.rejected >= threshold).any()]
    if not kept:
        return None
    ids = np.zeros(refined.working_after.shape, dtype=refined.working_after.dtype)
    for vertebra in kept:
        inside, part = vertebra.box.slices(ids.shape)
        ids[inside][vertebra.rejected[part] >= threshold] = vertebra.instance.instance_id
    return ids


def refuse_subregion_mask(path: Path, volume: Volume, label_scheme: str = "auto") -> None:
    """Refuse a SPINEPS subregion mask (InputError, one line): recognised by its name (``*_seg-spine_msk``)
    or, under ``--label-scheme auto``, by its ids (:func:`vertrefine.labels.looks_like_spineps_subregions`).
    Its ids are parts of every vertebra (arch, body, processes), so no id is one vertebra to refine."""
    if label_scheme != "auto":
        return
    scheme, _ = label_scheme_of(volume, label_scheme)
    if scheme is SPINEPS_SUBREGIONS or is_spineps_subregion_name(path):
        raise InputError(
            path,
            f"is {SPINEPS_SUBREGION_NOTE}",
            "pass the *_seg-vert_msk.nii.gz that SPINEPS wrote beside it (one label per vertebra)",
        )


class RefineJob:
    """What one ``vertrefine refine`` run needs for every case: the :class:`Refiner`, seed and extra outputs."""

    def __init__(
        self,
        refiner: Refiner,
        extras: ExtraOutputs,
        *,
        seed: int = 0,
        series_uid: str | None = None,
        threads: int = 0,
        source_series: Path | None = None,
        assume_orientation: str | None = None,
        command: str = "",
        note: Callable[[str], None] | None = None,
    ) -> None:
        """``note``: prints a line to the user (which label numbering was used: once per numbering; the slice
        thickness read from a case's labels when it is thicker than its header says)."""
        self.refiner = refiner
        self.sessions = refiner.sessions
        self.options = refiner.options
        self.extras = extras
        self.seed = seed
        self.series_uid = series_uid
        self.threads = threads
        self.source_series = source_series
        self.assume_orientation = assume_orientation
        self.command = command
        self.digests = bundle_digests(refiner.sessions)
        self.note = note
        self._schemes_said: set[str] = set()

    def prepare(self, case: Case, destination: Path, status: Status) -> PreparedCase:
        """Stage 1 of a case (:data:`vertrefine.batch.CaseFn`): read it and :meth:`Refiner.prepare` it.

        ``destination`` is not needed yet: :func:`vertrefine.batch.run_batch` hands it to :meth:`complete`.
        """
        start = time.perf_counter()
        status("read")
        volume = read_label_map(case.path, series_uid=self.series_uid, assume_orientation=self.assume_orientation)
        read_seconds = time.perf_counter() - start
        refuse_subregion_mask(case.path, volume, self.options.label_scheme)
        prepared = self.refiner.prepare(volume, status)
        prepared.seconds = {"read": read_seconds, **prepared.seconds}
        if self.note is not None and prepared.scheme.key not in self._schemes_said:
            self._schemes_said.add(prepared.scheme.key)
            self.note(f"{case.name}: {prepared.scheme_note}")
        if self.note is not None and prepared.thickness_note:
            self.note(f"{case.name}: {prepared.thickness_note}")
        return prepared

    def case_seed(self, case: Case) -> int:
        """The case's seed: from its name and ``--seed`` (:func:`vertrefine.cases.case_seed`)."""
        return case_seed(self.seed, case.name)

    def complete(self, group: list[tuple[Case, Path, PreparedCase]], status: Status) -> list[str | BaseException]:
        """Stage 2 of a group of cases (:data:`vertrefine.batch.CompleteFn`): one sampler run over all of
        them, then each case finished and written; per case its summary line(s) or the exception it failed
        with."""
        generators = [np.random.default_rng(self.case_seed(case)) for case, _, _ in group]
        latents = self.refiner.sample([prepared for _, _, prepared in group], generators, status)
        results: list[str | BaseException] = []
        for (case, destination, prepared), z in zip(group, latents, strict=True):
            try:
                results.append(self._finish(case, destination, prepared, z, status))
            except Exception as exc:  # noqa: BLE001 - one case's failure must not stop its group
                results.append(exc)
        return results

    def _finish(self, case: Case, destination: Path, prepared: PreparedCase, z: np.ndarray, status: Status) -> str:
        start = time.perf_counter()
        refined = self.refiner.finish(prepared, z, status)
        status("write")
        written: list[Path] = []
        folders_made: list[Path] = []
        try:  # a case that fails while writing leaves none of its files (no stale sidecar)
            write_start = time.perf_counter()
            extras = self._write_extras(case.name, prepared, refined, written, folders_made)
            refined.seconds["write_extras"] = time.perf_counter() - write_start
            refined.seconds["total"] = sum(prepared.seconds.values()) + time.perf_counter() - start
            sidecar = Sidecar.of(
                prepared,
                refined,
                refiner=self.refiner,
                source=case.path,
                destination=destination,
                model=self.digests,
                extra_outputs=extras,
                seed=self.seed,
                case_seed=self.case_seed(case),
                threads=self.threads,
                command=self.command,
                source_series=self.source_series,
            )
            written.append(sidecar_path(destination))
            sidecar.write(sidecar_path(destination))
            made = {v.instance.label for v in refined.vertebrae if v.decision != "kept input"}
            write_label_map(
                refined.labels,
                destination,
                like=prepared.volume,
                source_images=self.source_series,
                scheme=refined.scheme,
                refined=made,
            )
        except BaseException:
            for path in reversed(written):  # files, then the folders made for them (when left empty)
                with contextlib.suppress(OSError):
                    if path.is_dir():
                        if path in folders_made:  # never a folder that was there before
                            path.rmdir()
                    else:
                        path.unlink()
            raise
        message = f"{refined.summary}; seed {self.case_seed(case)}"
        if not refined.labels.geometry.same_grid(prepared.volume.geometry, tol=1e-6):
            spacing = "x".join(f"{v:g}" for v in refined.labels.geometry.spacing)
            coarse = "x".join(f"{v:g}" for v in prepared.volume.geometry.spacing)
            message += f"; written on a {spacing} mm grid (input {coarse} mm; --spacing input keeps it)"
        return "\n".join([message, *sidecar.warnings])

    def _extra_path(self, kind: str, name: str, written: list[Path], folders_made: list[Path]) -> Path | None:
        """:meth:`ExtraOutputs.path`, recording the folders it makes in ``written`` and ``folders_made``."""
        made: list[Path] = []
        path = self.extras.path(kind, name, made)
        written += made
        folders_made += made
        return path

    def _write_extras(
        self, name: str, prepared: PreparedCase, refined: RefinedCase, written: list[Path], folders_made: list[Path]
    ) -> dict[str, Any]:
        """Write the asked-for extra outputs; return their paths by kind.

        Each file, and each folder made for one, is appended to ``written`` before it is written; the folders
        made are also appended to ``folders_made`` (only those are removed again if the case fails).
        """
        paths: dict[str, Any] = {}
        like = prepared.volume
        prob_path = self._extra_path("probability", name, written, folders_made)
        if prob_path is not None and refined.probability is not None:
            written.append(prob_path)
            paths["probability"] = write_scalar_nifti(refined.probability, prob_path, like=like)
        std_path = self._extra_path("uncertainty", name, written, folders_made)
        if std_path is not None and refined.uncertainty is not None:
            written.append(std_path)
            paths["uncertainty"] = write_scalar_nifti(refined.uncertainty, std_path, like=like)
        qc_path = self._extra_path("qc", name, written, folders_made)
        if qc_path is not None:
            from .qc import QcVertebra, write_qc_png

            shown = [
                QcVertebra(v.instance.instance_id, v.name, v.instance.centroid, v.decision if v.reason else "")
                for v in refined.vertebrae
            ]
            shown += [
                QcVertebra(inst.instance_id, refined.name_of(inst), inst.centroid, "passed through")
                for inst, _ in refined.passed_through
            ]
            written.append(qc_path)
            write_qc_png(
                refined.working_before,
                refined.working_after,
                qc_path,
                title=name,
                vertebrae=shown,
                rejected=_rejected_ids(refined, self.options.threshold),
            )
            paths["qc"] = qc_path
        mesh_dir = self._extra_path("mesh", name, written, folders_made)
        if mesh_dir is not None:
            from .mesh import instance_mesh, stl_name, vertebra_mesh, write_stl

            meshes = []
            shapes = []  # (name, label id, mesh or None): every vertebra of the written label map
            for vertebra in refined.vertebrae:
                inside, part = vertebra.box.slices(refined.working_after.shape)
                owned = np.zeros(vertebra.probability.shape, dtype=bool)
                ids = refined.working_after[inside]
                owned[part] = (ids == 0) | (ids == vertebra.instance.instance_id)
                mesh = vertebra_mesh(vertebra.probability, owned, vertebra.box, refined.working, self.options.threshold)
                shapes.append((vertebra.name, vertebra.instance.label, mesh))
            for inst, _ in refined.passed_through:  # written as the input shows them: their input shape
                mesh = instance_mesh(refined.working_after, inst.instance_id, refined.working)
                shapes.append((refined.name_of(inst), inst.label, mesh))
            for vertebra_name, label, mesh in shapes:
                if mesh is not None:
                    stl = mesh_dir / stl_name(vertebra_name)
                    if stl in meshes:  # two structures of one name (SEG segments all labelled "Vertebra")
                        stl = mesh_dir / stl_name(f"{vertebra_name}_{label}")
                    written.append(stl)
                    write_stl(mesh, stl)
                    meshes.append(stl)
            paths["meshes"] = meshes
        return paths
