"""The JSON sidecar of a refined case (``<case>.json`` beside ``<case>.nii.gz`` / ``<case>.dcm``).

:class:`Sidecar` is the record, one field per top-level key in the order written; :class:`VertebraRecord`
is one row of its ``vertebrae`` list. :meth:`Sidecar.of` builds it from a case's refine result and the
run's settings, :meth:`Sidecar.write` writes it atomically. The README's sidecar table lists the same keys
(``tests/test_sidecar.py`` checks that they match).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

import numpy as np

from . import __version__
from .atomic import atomic_path
from .bundle import MANIFEST_NAME, sha256_file
from .cases import case_name
from .refine import PreparedCase, RefinedCase, RefinedVertebra, Refiner
from .runtime import BundleSessions
from .spatial import Instance
from .volume import Volume


def sidecar_path(destination: Path) -> Path:
    """``case.json`` beside the output ``case.nii.gz`` / ``case.dcm``."""
    return destination.with_name(f"{case_name(destination)}.json")


class _Omitted:
    """The value of a key that a record leaves out of its JSON (see :data:`OMITTED`)."""

    def __repr__(self) -> str:
        return "OMITTED"


OMITTED: Final = _Omitted()
"""A field holding this is not written: the key is absent from the JSON, not ``null``."""


@dataclass(frozen=True)
class VertebraRecord:
    """One row of the sidecar's ``vertebrae``: a refined vertebra (superior first), then each input structure
    passed through unchanged. Volumes are counted on the 1 mm working grid."""

    name: str
    """'L3' (the level in the input's numbering), 'vertebra_2' (a component of a binary mask, superior
    first) or the numbering's name / 'label N' for an id of unknown level."""
    label: int
    """The label id in the input (and output) map."""
    level: str | None
    """The vertebral level of ``label`` in the input's numbering ('L3'); None for a binary mask's component
    or an id the numbering gives no level."""
    instance: int
    """The instance id on the working grid (1, 2, ... superior first)."""
    centroid_lps_mm: list[float]
    """Centre of mass of the input structure in LPS mm (0.01 mm)."""
    volume_before_ml: float
    """Volume of the input structure, mL (0.001 mL)."""
    volume_after_ml: float
    """Volume of the result, mL (0.001 mL); that of the input for a structure passed through."""
    dice_after_vs_before: float | None
    """DSC of the result against the input on the working grid (1.0 passed through; None: both empty)."""
    agreement_dsc: float | None
    """DSC of the result against the input, both on the input grid (None: not measured)."""
    agreement_hd95_mm: float | None
    """HD95 of the result against the input on the input grid, mm (None: not measured, or a mask is empty)."""
    fov_fraction: float | None
    """Fraction (0-1) of the refined shape inside the input's field of view (None: not refined)."""
    pieces_ml: list[float] | None
    """Volumes of the refined shape's connected pieces, mL, largest first, after dropping specks (None:
    passed through)."""
    consistency_ml: list[float] | None
    """(added, removed) mL of the data-consistency projection onto the input's slabs (``--consistency
    project``); None: not projected (not refined, a fine input, or ``--consistency none``)."""
    decision: str
    """What was written: 'refined', 'kept input', 'refined, flagged' or 'passed through'."""
    reason: str
    """Why the structure was kept as input, flagged or passed through ('' when refined without a problem)."""
    mean_std_inside: float | None | _Omitted = OMITTED
    """With ``--samples`` 2 or more (refined vertebrae only): the mean per-voxel standard deviation of the
    samples' probability inside the result (probability >= 0.5); None when nothing is inside. The key is
    absent otherwise."""

    @classmethod
    def of_refined(cls, case: RefinedCase, vertebra: RefinedVertebra) -> VertebraRecord:
        """The row of a vertebra the model refined (whatever was written: refined, kept input, flagged)."""
        voxel_ml = _voxel_ml(case)
        inst = vertebra.instance
        before = case.working_before == inst.instance_id
        after = case.working_after == inst.instance_id
        overlap = int(np.count_nonzero(before & after))
        total = inst.voxels + vertebra.voxels_after
        spread: float | None | _Omitted = OMITTED
        if vertebra.std is not None:
            inside = vertebra.probability >= 0.5
            spread = round(float(vertebra.std[inside].mean()), 4) if inside.any() else None
        return cls(
            name=vertebra.name,
            label=inst.label,
            level=None if vertebra.from_binary_mask else case.scheme.level(inst.label),
            instance=inst.instance_id,
            centroid_lps_mm=[round(c, 2) for c in inst.centroid_lps],
            volume_before_ml=round(inst.voxels * voxel_ml, 3),
            volume_after_ml=round(vertebra.voxels_after * voxel_ml, 3),
            dice_after_vs_before=round(2 * overlap / total, 4) if total else None,
            agreement_dsc=_rounded(vertebra.agreement_dsc, 4),
            agreement_hd95_mm=_rounded(vertebra.agreement_hd95_mm, 2),
            fov_fraction=_rounded(vertebra.fov_fraction, 3),
            pieces_ml=vertebra.pieces_ml,
            consistency_ml=None if vertebra.consistency_ml is None else list(vertebra.consistency_ml),
            decision=vertebra.decision,
            reason=vertebra.reason,
            mean_std_inside=spread,
        )

    @classmethod
    def of_passed_through(cls, case: RefinedCase, instance: Instance, reason: str) -> VertebraRecord:
        """The row of an input structure written back unchanged (implausible as one vertebra: ``reason``)."""
        volume_ml = round(instance.voxels * _voxel_ml(case), 3)
        return cls(
            name=case.name_of(instance),
            label=instance.label,
            level=None if case.from_binary_mask else case.scheme.level(instance.label),
            instance=instance.instance_id,
            centroid_lps_mm=[round(c, 2) for c in instance.centroid_lps],
            volume_before_ml=volume_ml,
            volume_after_ml=volume_ml,
            dice_after_vs_before=1.0,
            agreement_dsc=None,
            agreement_hd95_mm=None,
            fov_fraction=None,
            pieces_ml=None,
            consistency_ml=None,
            decision="passed through",
            reason=reason,
        )

    def to_dict(self) -> dict[str, Any]:
        """The row as written: keys in field order, an :data:`OMITTED` field left out."""
        return _record_dict(self)


def vertebra_records(case: RefinedCase) -> list[VertebraRecord]:
    """The sidecar's ``vertebrae`` rows of a refine result: its refined vertebrae (superior first), then the
    structures it passed through."""
    rows = [VertebraRecord.of_refined(case, v) for v in case.vertebrae]
    return rows + [VertebraRecord.of_passed_through(case, inst, reason) for inst, reason in case.passed_through]


@dataclass(frozen=True)
class Sidecar:
    """What made one refined output and what refine found, as written to ``<case>.json``.

    Grids (``input_grid``, ``working_grid``, ``output_grid``) are :meth:`vertrefine.volume.Geometry.to_record`
    dicts: ``size_ijk`` (voxels), ``spacing_ijk_mm``, ``origin_lps_mm``, ``direction_lps``, in ITK's axis
    order (i, j, k).
    """

    vertrefine: str
    """The vertrefine version that wrote it."""
    command: str
    """The command line, as it can be typed again."""
    created_utc: str
    """When it was written, ISO 8601 UTC to the second ('2025-01-31T12:00:00Z')."""
    input: str
    """The input label map: a NIfTI or DICOM SEG file, or a DICOM series' folder."""
    input_sha256: dict[str, Any]
    """``{"sha256", "files"}``: the input file's SHA-256 (a DICOM series: of its files' ``sha256sum``
    listing; :func:`input_sha256`) and how many files it covers."""
    output: str
    """The refined label map written (NIfTI or DICOM SEG)."""
    extra_outputs: dict[str, Any]
    """Paths of the extra outputs written, by kind: ``probability``, ``uncertainty``, ``qc`` (one path each),
    ``meshes`` (a list of STL paths); a kind not asked for is absent."""
    source_series: str | None
    """The image series a DICOM SEG output of a NIfTI input references (``--source-series``), else None."""
    model: dict[str, Any]
    """The bundle: ``kind``, ``path``, ``manifest_sha256`` and ``files_sha256`` (:func:`bundle_digests`)."""
    device: str
    """Where ONNX Runtime ran: 'cpu' or 'cuda'."""
    providers: list[str]
    """ONNX Runtime's execution providers, in the order tried."""
    threads: int | str
    """``--threads``; 'all' when 0 (ONNX Runtime's default)."""
    seed: int
    """``--seed``."""
    case_seed: int
    """The case's own seed: a SHA-256 hash of ``seed`` and the case's name (:func:`vertrefine.cases.case_seed`)."""
    settings: dict[str, Any]
    """``samples`` (chains per vertebra), ``threshold`` (on the mean probability, 0-1), ``min_agreement``
    (DSC), ``on_disagree`` and ``sampler`` (the sampler settings; None: the VAE decodes the encoder's mean)."""
    input_grid: dict[str, Any]
    """The input's grid."""
    effective_spacing_mm: list[float]
    """Spacing (mm) along index axes (i, j, k) of the grid the input's labels were drawn on: a thick-slice
    segmentation stored on a finer grid has the slab thickness read from its labels along the slice axis
    (:mod:`vertrefine.thickness`), every other axis the header's spacing."""
    effective_spacing_detected: list[bool]
    """Per index axis (i, j, k): whether ``effective_spacing_mm`` comes from the labels (a staircase, refined
    as thick slices) rather than the header."""
    working_grid: dict[str, Any]
    """The working grid (1 mm, axis-aligned in LPS) the vertebrae were refined on."""
    output_grid: dict[str, Any]
    """The grid the output was written on (``--spacing``)."""
    pose_frames: bool
    """Whether vertebrae were cropped in their pose frames (``--pose``)."""
    label_scheme: str
    """The numbering the input's label ids were read in ('verse', 'totalsegmentator', ...)."""
    passed_through_labels: list[int]
    """Label ids of the input written back unchanged (not refined: organs, discs, implausible structures)."""
    warnings: list[str]
    """Every warning: the input's (reading its header), then the result's (vertebrae passed through, kept as
    input or flagged)."""
    seconds: dict[str, float]
    """Wall-clock seconds per stage ('read', 'working_grid', ..., 'write_extras') and 'total' (0.001 s)."""
    vertebrae: list[VertebraRecord]
    """One row per vertebra (:class:`VertebraRecord`)."""

    @classmethod
    def of(
        cls,
        prepared: PreparedCase,
        refined: RefinedCase,
        *,
        refiner: Refiner,
        source: Path,
        destination: Path,
        model: Mapping[str, Any],
        extra_outputs: Mapping[str, Path | Sequence[Path]],
        seed: int,
        case_seed: int,
        threads: int = 0,
        command: str = "",
        source_series: Path | None = None,
        created_utc: str | None = None,
    ) -> Sidecar:
        """The sidecar of one case: ``prepared`` and ``refined`` are its stages of the pipeline
        (:meth:`Refiner.prepare`, :meth:`Refiner.finish`), the rest the run's settings. ``model`` is
        :func:`bundle_digests` of the refiner's sessions (computed once per run); ``created_utc`` defaults to
        now."""
        options = refiner.options
        volume = prepared.volume
        refined_labels = {v.instance.label for v in refined.vertebrae}
        return cls(
            vertrefine=__version__,
            command=command,
            created_utc=created_utc or datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            input=str(source),
            input_sha256=input_sha256(volume),
            output=str(destination),
            extra_outputs={kind: _path_text(value) for kind, value in extra_outputs.items()},
            source_series=None if source_series is None else str(source_series),
            model=dict(model),
            device=refiner.sessions.device,
            providers=list(refiner.sessions.providers),
            threads=threads or "all",
            seed=seed,
            case_seed=case_seed,
            settings={
                "samples": options.samples,
                "threshold": options.threshold,
                "min_agreement": options.min_agreement,
                "on_disagree": options.on_disagree,
                "sampler": None if options.sampler is None else asdict(options.sampler),
            },
            input_grid=volume.geometry.to_record(),
            effective_spacing_mm=[round(v, 4) for v in prepared.effective_spacing_ijk_mm],
            effective_spacing_detected=list(prepared.thickness_detected_ijk),
            working_grid=refined.working.to_record(),
            output_grid=refined.labels.geometry.to_record(),
            pose_frames=options.pose,
            label_scheme=refined.scheme.key,
            passed_through_labels=sorted(set(volume.labels) - refined_labels),
            warnings=[*volume.source.warnings, *refined.warnings],
            seconds={k: round(v, 3) for k, v in refined.seconds.items()},
            vertebrae=vertebra_records(refined),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: keys in field order, ``vertebrae`` as dicts."""
        return _record_dict(self)

    def to_json(self) -> str:
        """The file's text: the object indented by 2, one trailing newline."""
        return json.dumps(self.to_dict(), indent=2, default=_plain) + "\n"

    def write(self, path: Path) -> None:
        """Write :meth:`to_json` to ``path`` atomically (:func:`vertrefine.atomic.atomic_path`)."""
        with atomic_path(path) as tmp:
            tmp.write_text(self.to_json(), encoding="utf-8")


def input_sha256(volume: Volume) -> dict[str, Any]:
    """SHA-256 of the files a label map was read from: ``{"sha256": hex, "files": n}``.

    A NIfTI or SEG file: its own digest. A DICOM image series: the digest of the text ``sha256sum``
    prints for its files ('<hex>  <name>' lines sorted by name, names relative to the series' folder),
    i.e. ``sha256sum * | sha256sum`` in a folder that holds only that series.
    """
    source = volume.source
    if source.kind == "dicom-series":
        files = [Path(f) for f in source.meta["series"].files]
        root = Path(os.path.commonpath([f.parent for f in files]))
        lines = sorted((f.relative_to(root).as_posix(), sha256_file(f)) for f in files)
        text = "".join(f"{digest}  {name}\n" for name, digest in lines)
        return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "files": len(files)}
    if source.path is None or not Path(source.path).is_file():
        return {"sha256": None, "files": 0}
    return {"sha256": sha256_file(Path(source.path)), "files": 1}


def bundle_digests(sessions: BundleSessions) -> dict[str, Any]:
    """The bundle that ran: ``kind``, ``path``, the SHA-256 of its manifest and of each file (from the
    manifest, which :func:`vertrefine.bundle.load_bundle` checked the files against)."""
    bundle = sessions.bundle
    return {
        "kind": bundle.kind,
        "path": str(bundle.dir),
        "manifest_sha256": sha256_file(bundle.dir / MANIFEST_NAME),
        "files_sha256": {name: bundle.manifest["files"][name]["sha256"] for name in bundle.files},
    }


def _voxel_ml(case: RefinedCase) -> float:
    """The volume of one working-grid voxel in mL."""
    return float(np.prod(case.working.spacing)) / 1000.0


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _path_text(value: Path | Sequence[Path]) -> str | list[str]:
    return str(value) if isinstance(value, (str, Path)) else [str(p) for p in value]


def _record_dict(record: Any) -> dict[str, Any]:
    """A record dataclass as a dict in field order: nested records and lists of them as dicts, an
    :data:`OMITTED` field left out (not deep-copied: the values are the record's own)."""
    result = {}
    for f in fields(record):
        value = getattr(record, f.name)
        if value is OMITTED:
            continue
        if isinstance(value, list):
            value = [v.to_dict() if isinstance(v, VertebraRecord) else v for v in value]
        result[f.name] = value
    return result


def _plain(value: Any) -> Any:
    """JSON for what ``json`` does not write itself: numpy scalars and paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
