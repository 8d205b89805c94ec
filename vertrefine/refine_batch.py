"""Refine over a file or a folder: the two batch stages, the optional outputs and the JSON sidecar.

``RefineJob.prepare`` reads and encodes one case; ``RefineJob.complete`` samples a whole group of cases
at once, then decodes and writes each. Per case, the extras (sidecar, meshes, QC image, probability and
uncertainty maps) are written first and the label map last, each atomically: a case whose label map
exists is finished, which is what ``--skip-existing`` relies on to resume an interrupted batch.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .atomic import atomic_path
from .bundle import MANIFEST_NAME, sha256_file
from .cases import case_name
from .errors import OutputError
from .io import is_dicom_output, read_label_map, write_label_map
from .nifti import is_nifti_path, write_scalar_nifti
from .refine import PreparedCase, RefinedCase, RefineOptions, finish_case, prepare_case, sample_latents
from .runtime import BundleSessions

Status = Any  # batch.Status; kept loose to avoid importing rich here


@dataclass(frozen=True)
class ExtraOutputs:
    """Optional outputs. In batch mode each is a folder (one file, or sub-folder for meshes, per case)."""

    probability: Path | None = None
    uncertainty: Path | None = None
    mesh: Path | None = None
    qc: Path | None = None
    batch: bool = False

    def check(self) -> None:
        """Refuse file names that cannot be written (before any case runs)."""
        if self.batch:
            for folder in (self.probability, self.uncertainty, self.qc, self.mesh):
                if folder is not None and folder.exists() and not folder.is_dir():
                    raise OutputError(f"{folder}: the input is a folder, so this output must be a folder too")
            return
        for option, path in (("--save-prob", self.probability), ("--uncertainty", self.uncertainty)):
            if path is not None and not is_nifti_path(path):
                raise OutputError(f"{path}: {option} writes NIfTI; name it .nii.gz or .nii")
        if self.qc is not None and self.qc.suffix.lower() != ".png":
            raise OutputError(f"{self.qc}: --qc writes a PNG image; name it .png")

    def path(self, kind: str, case: str) -> Path | None:
        """Where ``kind`` (probability, uncertainty, qc, mesh) of ``case`` goes, creating folders."""
        base: Path | None = getattr(self, kind)
        if base is None:
            return None
        if kind == "mesh":
            folder = base / case if self.batch else base
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        if not self.batch:
            base.parent.mkdir(parents=True, exist_ok=True)
            return base
        base.mkdir(parents=True, exist_ok=True)
        return base / (f"{case}.png" if kind == "qc" else f"{case}.nii.gz")

    @property
    def wants_maps(self) -> bool:
        return self.probability is not None or self.uncertainty is not None


def sidecar_path(destination: Path) -> Path:
    """``case.json`` beside the output ``case.nii.gz`` / ``case.dcm``."""
    return destination.with_name(f"{case_name(destination)}.json")


def bundle_digests(sessions: BundleSessions) -> dict[str, Any]:
    bundle = sessions.bundle
    return {
        "kind": bundle.kind,
        "path": str(bundle.dir),
        "manifest_sha256": sha256_file(bundle.dir / MANIFEST_NAME),
        "files_sha256": {name: bundle.manifest["files"][name]["sha256"] for name in bundle.files},
    }


@dataclass
class _Case:
    index: int
    source: Path
    destination: Path
    prepared: PreparedCase


class RefineJob:
    """What one ``vertrefine refine`` run needs for every case: sessions, options, seed and extra outputs."""

    def __init__(
        self,
        sessions: BundleSessions,
        options: RefineOptions,
        extras: ExtraOutputs,
        *,
        seed: int = 0,
        series_uid: str | None = None,
        threads: int = 0,
    ) -> None:
        self.sessions = sessions
        self.options = options
        self.extras = extras
        self.seed = seed
        self.series_uid = series_uid
        self.threads = threads
        self.digests = bundle_digests(sessions)

    def prepare(self, index: int, source: Path, destination: Path, status: Status) -> _Case:
        start = time.perf_counter()
        status("read")
        volume = read_label_map(source, series_uid=self.series_uid)
        read_seconds = time.perf_counter() - start
        prepared = prepare_case(volume, self.sessions, self.options, status)
        prepared.seconds = {"read": read_seconds, **prepared.seconds}
        return _Case(index, source, destination, prepared)

    def complete(self, group: list[tuple[str, _Case]], status: Status) -> list[str | BaseException]:
        cases = [case for _, case in group]
        generators = [np.random.default_rng(self.seed + case.index) for case in cases]
        latents = sample_latents(self.sessions, [c.prepared for c in cases], self.options, generators, status)
        results: list[str | BaseException] = []
        for (name, case), z in zip(group, latents, strict=True):
            try:
                results.append(self._finish(name, case, z, status))
            except Exception as exc:  # noqa: BLE001 - one case's failure must not stop its group
                results.append(exc)
        return results

    def _finish(self, name: str, case: _Case, z: np.ndarray, status: Status) -> str:
        start = time.perf_counter()
        options = self.options
        if is_dicom_output(case.destination):  # a SEG stays on its source series' grid
            options = replace(options, spacing="input")
        refined = finish_case(case.prepared, z, self.sessions, options, status)
        status("write")
        write_start = time.perf_counter()
        self._write_extras(name, case, refined)
        refined.seconds["write_extras"] = time.perf_counter() - write_start
        refined.seconds["total"] = sum(case.prepared.seconds.values()) + time.perf_counter() - start
        self._write_sidecar(case, refined)
        write_label_map(refined.labels, case.destination, like=case.prepared.volume)
        n = len(refined.vertebrae)
        kept = sum(v.decision == "kept input" for v in refined.vertebrae)
        counted = f"{n - kept} of {n}" if kept else f"{n}"  # a vertebra kept as input was not refined
        message = f"{counted} vertebra{'e' if n != 1 else ''} refined{f', {kept} kept as input' if kept else ''}"
        message += f", seed {self.seed + case.index}"
        if not refined.labels.geometry.same_grid(case.prepared.volume.geometry, tol=1e-6):
            spacing = "x".join(f"{v:g}" for v in refined.labels.geometry.spacing)
            coarse = "x".join(f"{v:g}" for v in case.prepared.volume.geometry.spacing)
            message += f", written on a {spacing} mm grid (input {coarse} mm; --spacing input keeps it)"
        return "\n".join([message, *refined.warnings])

    def _write_extras(self, name: str, case: _Case, refined: RefinedCase) -> None:
        like = case.prepared.volume
        prob_path = self.extras.path("probability", name)
        if prob_path is not None and refined.probability is not None:
            write_scalar_nifti(refined.probability, prob_path, like=like)
        std_path = self.extras.path("uncertainty", name)
        if std_path is not None and refined.uncertainty is not None:
            write_scalar_nifti(refined.uncertainty, std_path, like=like)
        qc_path = self.extras.path("qc", name)
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
            write_qc_png(refined.working_before, refined.working_after, qc_path, title=name, vertebrae=shown)
        mesh_dir = self.extras.path("mesh", name)
        if mesh_dir is not None:
            from .mesh import stl_name, vertebra_mesh, write_stl

            for vertebra in refined.vertebrae:
                inside, part = vertebra.box.slices(refined.working_after.shape)
                owned = np.zeros(vertebra.probability.shape, dtype=bool)
                ids = refined.working_after[inside]
                owned[part] = (ids == 0) | (ids == vertebra.instance.instance_id)
                mesh = vertebra_mesh(vertebra.probability, owned, vertebra.box, refined.working, self.options.threshold)
                if mesh is not None:
                    write_stl(mesh, mesh_dir / stl_name(vertebra.name))

    def _write_sidecar(self, case: _Case, refined: RefinedCase) -> None:
        sampler = self.options.sampler
        volume = case.prepared.volume
        refined_labels = {v.instance.label for v in refined.vertebrae}
        record = {
            "vertrefine": __version__,
            "input": str(case.source),
            "output": str(case.destination),
            "model": self.digests,
            "device": self.sessions.device,
            "providers": self.sessions.providers,
            "threads": self.threads or "all",
            "seed": self.seed + case.index,
            "settings": {
                "samples": self.options.samples,
                "threshold": self.options.threshold,
                "min_agreement": self.options.min_agreement,
                "on_disagree": self.options.on_disagree,
                "sampler": None if sampler is None else asdict(sampler),
            },
            "input_grid": volume.geometry.describe(),
            "working_grid": refined.working.describe(),
            "output_grid": refined.labels.geometry.describe(),
            "pose_frames": self.options.pose,
            "passed_through_labels": sorted(set(volume.labels) - refined_labels),
            "seconds": {k: round(v, 3) for k, v in refined.seconds.items()},
            "vertebrae": refined.vertebra_rows(),
        }
        path = sidecar_path(case.destination)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(record, indent=2, default=_plain) + "\n", encoding="utf-8")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
