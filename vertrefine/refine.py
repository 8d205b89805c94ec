"""The refine pipeline: read -> 1 mm -> vertebrae -> patches -> encode -> sample -> decode -> stitch -> input grid.

A case goes through three stages so that a batch can share the sampler: ``prepare_case`` (resample, find
the vertebrae, crop and encode them), ``sample_latents`` (the numpy LSD-EBM chain over the latents of every
vertebra of every case of a group, one energy call per Langevin step) and ``finish_case`` (decode, average
the samples, stitch, back onto the input grid). Each case draws its noise from its own generator, so its
output does not depend on which other cases share its group.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .conventions import DEVICES, SPACING_TOLERANCE_MM, is_whole_number
from .errors import InputError, SettingsError
from .guidance import (
    DataConsistency,
    SlabObservation,
    observe,
    patch_to_input_index,
    project_labels,
    slab_means,
)
from .labels import (
    SCHEME_CHOICES,
    VERSE,
    LabelScheme,
    LabelSelection,
    label_scheme_of,
    level_order_problem,
    parse_label_selection,
)
from .metrics import surface_distances
from .plausibility import (
    extent_mm,
    input_problem,
    merged_problem,
    numbering_problem,
    result_problem,
    touches,
    volume_range,
)
from .runtime import BundleSessions, open_sessions
from .sampler import SamplerSettings, refine_latents
from .spatial import (
    COARSE_SPACING_MM,
    Instance,
    PatchBox,
    crop,
    crop_in_frame,
    find_instances,
    output_geometry,
    pose_rotations,
    resample_labels,
    resample_scalar,
    restore_labels,
    stitch,
    sub_geometry,
    target_region,
    uncrop_from_frame,
    working_geometry,
)
from .thickness import SliceThickness, coarse_volume, detect_slices
from .volume import Geometry, Volume

OUTPUT_SPACING_MM = (0.25, 5.0)
"""The isotropic output spacings refine writes (mm, inclusive): finer than 0.25 mm a lumbar spine's grid holds
billions of voxels, coarser than 5 mm it is coarser than the thick-slice inputs it refines."""
FINE_INPUT_MAX_MM = 3.0
"""Inputs whose coarsest spacing is at most this (mm) are written as the input by default
(``RefineOptions.fine_inputs="keep"``). Chosen on the training individuals of the real CT (7 individuals,
their label maps made thick with ``degrade --native``, ``python -m benchmarks.real --cases <training>``,
docs/BENCHMARKS.md "Fine inputs"): refinement lowered the mean DSC of every one of them at 2 mm (sagittal and
axial) and was no better than the input at 3 mm, and raised it at 4 and 5 mm. Below
:data:`vertrefine.spatial.COARSE_SPACING_MM` the input is CT-like and the model could only approximate it."""
CONSISTENCY = ("project", "none")
"""What refine does after the model for a thick input (RefineOptions.consistency): 'project' makes every slab of
the input grid hold the vertebra exactly where the input shows it (:func:`vertrefine.guidance.project_labels`),
'none' writes the model's result as it is."""
FINE_INPUTS = ("keep", "refine")
"""What refine does with an input no coarser than FINE_INPUT_MAX_MM (RefineOptions.fine_inputs)."""
FINE_INPUT_REASON = (
    "input no coarser than {limit:g} mm ({what} {spacing:g} mm), where refinement measured no better "
    "than the input (docs/BENCHMARKS.md, Fine inputs); --fine-inputs refine refines it anyway"
)
SLICE_DETECTION = ("auto", "off")
"""Whether refine reads the effective slice thickness from the labels (RefineOptions.slice_detection)."""

MIN_AGREEMENT = 0.6
"""Default --min-agreement (DSC on the input grid). What the true shape scores against simulated thick-slice
segmentations of it (28 real vertebrae of training individuals, `degrade --native`): mean 0.89 / 0.82 / 0.75
and lowest 0.83 / 0.70 / 0.57 at 3 / 5 / 7 mm, so a gate at 0.85 would reject correct refinements of most
thick inputs; a gross error (another shape in the vertebra's place, tests) scores 0.24."""
ON_DISAGREE = ("keep-input", "write")
MERGED_NEIGHBOUR_MM = 90.0
"""Centroids further apart than this (mm) are not compared as neighbours by the merged-vertebrae check (two
merged lumbar vertebrae have their centre about 1.5 vertebra heights, 55-65 mm, from the next one)."""
SPECK_FRACTION = 0.01
"""Pieces of a refined vertebra smaller than this fraction of it are dropped (islands of the decoder)."""
PIECE_FRACTION = 0.1
"""A refined vertebra whose second piece holds at least this fraction of it is flagged (one bone, one piece)."""
"""What refine writes for a vertebra whose result disagrees with the input (RefineOptions.on_disagree)."""


Status = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class RefineOptions:
    """What refine does beyond the bundle: sampling (None: decode the encoder's mean), samples, threshold."""

    sampler: SamplerSettings | None
    samples: int = 1
    threshold: float = 0.5
    labels: LabelSelection | frozenset[int] | None = None
    """Labels to refine (ids in the map's own numbering, or levels: ``--labels``); None: the vertebrae of
    the label scheme (:meth:`vertrefine.labels.LabelScheme.vertebrae`), or the components of a binary mask."""
    label_scheme: str = "auto"
    """The numbering of the input's label ids: 'auto' or a key of :data:`vertrefine.labels.SCHEMES`
    (:func:`vertrefine.labels.choose_scheme`; a DICOM SEG's segment codes always win)."""
    keep_maps: bool = False
    """Also build the mean-probability and standard-deviation maps (for --save-prob/--uncertainty)."""
    pose: bool = True
    """Crop each vertebra in its pose frame (the local spine axis, :func:`vertrefine.spatial.pose_rotations`)."""
    spacing: float | str = "auto"
    """Output grid (:func:`vertrefine.spatial.output_geometry`): 'auto' (1 mm for inputs coarser than 1.5 mm,
    else the input's grid), 'input', or an isotropic spacing in mm."""
    min_agreement: float = MIN_AGREEMENT
    """A vertebra whose result, seen on the input grid, has a DSC below this against the input disagrees with it
    (:func:`agreement_with_input`)."""
    min_fov_fraction: float = 0.5
    """A vertebra of whose refined shape less than this fraction lies inside the input's field of view is
    written as the input shows it (the rest would be the model's guess beyond the image)."""
    on_disagree: str = "keep-input"
    """'keep-input': a disagreeing vertebra is written as the input shows it; 'write': as refined (flagged)."""
    consistency: str = "project"
    """'project': for an input coarser than :data:`vertrefine.spatial.COARSE_SPACING_MM`, each refined vertebra
    is made to agree with every slab of the input grid after the model (the fewest voxels nearest its surface
    added or removed, :func:`vertrefine.guidance.project_labels`); 'none': the model's result as it is. The
    agreement gate (``min_agreement``) judges the model's result before the projection."""
    fine_inputs: str = "keep"
    """An input no coarser than :data:`FINE_INPUT_MAX_MM` along any axis: 'keep' writes its vertebrae as the
    input shows them, with a warning (refinement measured no better than such inputs; on the output grid by
    nearest neighbour, i.e. on 1 mm when coarser than :data:`vertrefine.spatial.COARSE_SPACING_MM`),
    'refine' refines them (unguided up to COARSE_SPACING_MM: every input voxel is then a slab of about 1 mm)."""
    slice_detection: str = "auto"
    """'auto': a label map whose labels change only every few planes along an axis (a thick-slice segmentation
    stored on a finer grid, :func:`vertrefine.thickness.detect_slices`) is refined as the thick-slice map it
    is (:func:`vertrefine.thickness.coarse_volume`: the fine-input rule, the working grid's labels and the
    slab observations use the slabs; the output stays on the input's grid); 'off': the header's spacing only."""

    def __post_init__(self) -> None:
        if isinstance(self.labels, str):  # the command line's spelling: '20-24', 'L1-L5'
            object.__setattr__(self, "labels", parse_label_selection(self.labels))
        if not is_whole_number(self.samples, 1):
            raise ValueError(f"samples must be a whole number >= 1, got {self.samples!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 <= self.min_fov_fraction <= 1.0:
            raise ValueError(f"min_fov_fraction must be in [0, 1], got {self.min_fov_fraction}")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be in [0, 1], got {self.min_agreement}")
        if self.label_scheme not in SCHEME_CHOICES:
            raise ValueError(f"label_scheme must be one of {', '.join(SCHEME_CHOICES)}, got {self.label_scheme!r}")
        if self.consistency not in CONSISTENCY:
            raise ValueError(f"consistency must be one of {', '.join(CONSISTENCY)}, got {self.consistency!r}")
        if self.fine_inputs not in FINE_INPUTS:
            raise ValueError(f"fine_inputs must be one of {', '.join(FINE_INPUTS)}, got {self.fine_inputs!r}")
        if self.slice_detection not in SLICE_DETECTION:
            raise ValueError(
                f"slice_detection must be one of {', '.join(SLICE_DETECTION)}, got {self.slice_detection!r}"
            )
        if self.on_disagree not in ON_DISAGREE:
            raise ValueError(f"on_disagree must be one of {', '.join(ON_DISAGREE)}, got {self.on_disagree!r}")
        if isinstance(self.spacing, str) and self.spacing not in ("auto", "input"):
            raise ValueError(f"spacing must be 'auto', 'input' or a number of mm, got {self.spacing!r}")
        low, high = OUTPUT_SPACING_MM
        if not isinstance(self.spacing, str) and not low <= self.spacing <= high:
            raise ValueError(f"spacing must be from {low:g} to {high:g} mm, 'input' or 'auto', got {self.spacing}")


@dataclass
class PreparedCase:
    """A case read, on its 1 mm working grid, with its vertebrae cropped and encoded.

    The second stage of a case (found :class:`vertrefine.cases.Case` -> prepared -> refined
    :class:`RefinedCase` -> :class:`vertrefine.batch.CaseOutcome`): what :func:`prepare_case` makes and
    :func:`sample_latents` / :func:`finish_case` use.
    """

    volume: Volume
    working: Geometry
    instance_array: np.ndarray
    """Instance ids on the working grid (refined and pass-through structures)."""
    instances: list[Instance]
    """The vertebrae to refine, superior first."""
    boxes: list[PatchBox]
    mu: np.ndarray
    """Encoder means [n, *Z], one row per refined vertebra."""
    patches: np.ndarray | None = None
    """uint8 [n, P, P, P]: the binary patches the encoder was given, kept for a bundle whose decoder also takes
    them (:attr:`vertrefine.bundle.Bundle.conditioned`); None otherwise."""
    rotations: list[np.ndarray] = field(default_factory=list)
    """Per vertebra, the rotation [3, 3] from its pose frame to the working grid (empty: all identity)."""
    observations: list[SlabObservation | None] = field(default_factory=list)
    """Per vertebra, what the input's slabs show (for guidance; empty or None: not guided)."""
    passed_through: list[tuple[Instance, str]] = field(default_factory=list)
    """Vertebrae of the input that are implausible as one vertebra, with the reason: written back unchanged."""
    from_binary_mask: bool = False
    """The vertebrae are connected components of a single-valued mask."""
    seconds: dict[str, float] = field(default_factory=dict)
    scheme: LabelScheme = VERSE
    """The numbering the input's label ids were read in (which are vertebrae, of which level)."""
    scheme_note: str = ""
    """One line saying which numbering was used and why (:func:`vertrefine.labels.choose_scheme`)."""
    thickness: SliceThickness | None = None
    """What :func:`vertrefine.thickness.detect_slices` found in the labels (None: ``slice_detection='off'``)."""
    slabs: Volume | None = None
    """The equivalent thick-slice label map (:func:`vertrefine.thickness.coarse_volume`) when the labels are a
    thick-slice segmentation stored on a finer grid; None: the input's own grid is what it shows."""

    @property
    def observed(self) -> Volume:
        """The grid the input's labels were really drawn on: :attr:`slabs`, else :attr:`volume`."""
        return self.volume if self.slabs is None else self.slabs

    @property
    def effective_spacing_ijk_mm(self) -> tuple[float, float, float]:
        """Spacing (mm) along index axes (i, j, k) of the grid the labels were drawn on (:attr:`observed`): the
        slab thickness along an axis read from the labels, the header's spacing elsewhere."""
        return self.observed.geometry.spacing

    @property
    def thickness_detected_ijk(self) -> tuple[bool, bool, bool]:
        """Per index axis (i, j, k): whether its spacing in :attr:`effective_spacing_ijk_mm` was read from the
        labels (a thick staircase, :attr:`slabs`) rather than the header."""
        if self.slabs is None or self.thickness is None:
            return (False, False, False)
        return self.thickness.detected_ijk

    @property
    def thickness_note(self) -> str:
        """One line for the console when the labels are thicker than the header says ('' otherwise)."""
        if self.slabs is None or self.thickness is None:
            return ""
        header = "x".join(f"{v:g}" for v in self.volume.geometry.spacing)
        effective = "x".join(f"{v:.3g}" for v in self.effective_spacing_ijk_mm)
        return (
            f"effective slice thickness from the labels: {effective} mm (header {header} mm; "
            f"{self.thickness.describe()}); refined as a thick-slice segmentation, written on the input's grid "
            "(--slice-detection off reads the header only)"
        )


@dataclass
class RefinedVertebra:
    """One refined vertebra's patch and its numbers (for the sidecar, meshes and QC)."""

    instance: Instance
    box: PatchBox
    probability: np.ndarray
    """Mean probability over samples on its 128^3 working-grid patch."""
    std: np.ndarray | None
    """Per-voxel standard deviation over samples (None for one sample)."""
    voxels_after: int = 0
    from_binary_mask: bool = False
    """True when the vertebra is a connected component of a single-valued mask (no level is known)."""
    agreement_dsc: float | None = None
    """DSC of the result against the input, both on the input grid (None: not measured)."""
    agreement_hd95_mm: float | None = None
    """HD95 (mm) of the result against the input on the input grid (None: a mask is empty)."""
    decision: str = "refined"
    """What was written: 'refined', 'kept input' (the input's voxels) or 'refined, flagged'."""
    reason: str = ""
    """Why the vertebra was kept as input or flagged ('' when refined without a problem)."""
    fov_fraction: float | None = None
    """Fraction of the refined shape inside the input's field of view."""
    pieces_ml: list[float] = field(default_factory=list)
    """Volumes (mL) of the refined shape's connected pieces, largest first, after dropping specks."""
    consistency_ml: tuple[float, float] | None = None
    """(added, removed) mL of the data-consistency projection (None: not projected)."""
    scheme: LabelScheme = VERSE
    """The numbering of the input's label ids (the level of this vertebra's id)."""
    rejected: np.ndarray | None = None
    """For a vertebra kept as input: the refinement's probability patch that was not written (QC image)."""

    @property
    def name(self) -> str:
        """'L3' for a labelled vertebra (in any scheme); 'vertebra_2' for the second component (superior
        first) of a mask; the scheme's name or 'label N' for a vertebra of unknown level."""
        if self.from_binary_mask:
            return f"vertebra_{self.instance.instance_id}"
        return self.scheme.name(self.instance.label)


@dataclass
class RefinedCase:
    """The result on the output grid, plus what --mesh, --qc and the sidecar need.

    The third stage of a case (found :class:`vertrefine.cases.Case` -> prepared :class:`PreparedCase` ->
    refined -> :class:`vertrefine.batch.CaseOutcome`): what :func:`finish_case` returns. Its per-vertebra
    numbers as the sidecar writes them: :func:`vertrefine.sidecar.vertebra_records`.
    """

    labels: Volume
    """The result on the output grid (:attr:`RefineOptions.spacing`), input label ids."""
    working: Geometry
    working_before: np.ndarray
    """Instance ids of the input on the working grid."""
    working_after: np.ndarray
    """Instance ids of the result on the working grid."""
    vertebrae: list[RefinedVertebra]
    probability: Volume | None = None
    uncertainty: Volume | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    passed_through: list[tuple[Instance, str]] = field(default_factory=list)
    """Input vertebrae not refined because they are implausible as one vertebra, with the reason."""
    from_binary_mask: bool = False
    scheme: LabelScheme = VERSE
    """The numbering the input's label ids were read in."""

    @property
    def warnings(self) -> list[str]:
        """One line per reason a vertebra was passed through (naming every vertebra it holds for), then one per
        vertebra kept as input or flagged."""
        reasons: dict[str, list[str]] = {}
        for inst, reason in self.passed_through:
            reasons.setdefault(reason, []).append(self.name_of(inst))
        lines = [f"{', '.join(names)}: {reason}; passed through unchanged" for reason, names in reasons.items()]
        lines += [f"{v.name}: {v.reason}; {v.decision}" for v in self.vertebrae if v.reason]
        return lines

    @property
    def summary(self) -> str:
        """'3 refined, 1 kept as input, 1 passed through; agreement with the input (DSC/HD95 mm): L1 0.93/1.8, ...'."""
        decisions = [v.decision.split(",")[0] for v in self.vertebrae] + ["passed through"] * len(self.passed_through)
        counts = {d: decisions.count(d) for d in dict.fromkeys(decisions)}
        said = {"kept input": "kept as input"}
        text = ", ".join(f"{n} {said.get(d, d)}" for d, n in counts.items()) or "no vertebra"
        measured = [v for v in self.vertebrae if v.agreement_dsc is not None]
        if measured:
            pairs = ", ".join(
                f"{v.name} {v.agreement_dsc:.2f}/{'-' if v.agreement_hd95_mm is None else f'{v.agreement_hd95_mm:.1f}'}"
                for v in measured
            )
            text += f"; agreement with the input (DSC/HD95 mm): {pairs}"
        return text

    def name_of(self, instance: Instance) -> str:
        """'L3', or 'vertebra_2' for a component of a binary mask."""
        return f"vertebra_{instance.instance_id}" if self.from_binary_mask else self.scheme.name(instance.label)

    @property
    def working_labels(self) -> Volume:
        """The refined label map on the 1 mm working grid (input label ids; pass-through structures left out)."""
        return Volume(restore_labels(self.working_after, [v.instance for v in self.vertebrae]), self.working)


def refined_instances(
    instances: Sequence[Instance],
    labels: LabelSelection | frozenset[int] | None,
    scheme: LabelScheme = VERSE,
) -> list[Instance]:
    """The instances to refine: those ``labels`` names (ids, or levels in ``scheme``), or by default the
    vertebrae of ``scheme`` (every component of a binary mask)."""
    if labels is not None:
        wanted = LabelSelection.of(labels).resolve(scheme)
        organs = sorted({i.label for i in instances if i.label in wanted and _named_non_vertebra(scheme, i.label)})
        if organs:  # a numbering that names a structure is trusted over --labels: never reshape an organ
            named = ", ".join(f"{label} ({scheme.name(label)})" for label in organs)
            raise SettingsError(
                f"--labels names {named}, which the file's numbering ({scheme.title}) says is not a vertebra; "
                "leave it out, or pass --label-scheme with the file's real numbering"
            )
        return [i for i in instances if i.label in wanted]
    if scheme.binary or any(i.instance_id != i.label for i in instances):
        return list(instances)
    vertebrae = scheme.vertebrae(i.label for i in instances)
    return [i for i in instances if i.label in vertebrae]


def _named_non_vertebra(scheme: LabelScheme, label: int) -> bool:
    """True when ``scheme`` names ``label`` as a structure that is not a vertebra (an organ, a disc)."""
    return not scheme.is_vertebra(label) and int(label) in scheme.names


def prepare_case(
    volume: Volume, sessions: BundleSessions, options: RefineOptions, status: Status = _quiet
) -> PreparedCase:
    """Resample to the bundle's working grid, find the vertebrae, crop 128^3 patches and encode them.

    A thick-slice segmentation stored on a finer grid (``options.slice_detection``, :func:`_slabs_of`) is
    read as its slabs: the working grid (that of ``volume``) gets the slabs' labels, and the fine-input rule,
    guidance and the slab observations use the slabs' spacing."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    status("resample")
    bundle = sessions.bundle
    thickness, slabs = _slabs_of(volume, options)
    seen = volume if slabs is None else slabs  # the grid the labels were drawn on
    working_grid = working_geometry(volume.geometry, bundle.spacing)
    working = resample_labels(seen, working_grid)
    scheme, scheme_note = label_scheme_of(volume, options.label_scheme)
    instance_array, instances = find_instances(working, split=scheme.binary)
    chosen = refined_instances(instances, options.labels, scheme)
    if not chosen:
        raise InputError(volume.source.path, *_nothing_to_refine(instances, scheme, scheme_note, options.labels))
    from_mask = scheme.binary
    voxel_ml = working_grid.voxel_volume_mm3 / 1000.0
    if options.label_scheme == "auto" and (
        problem := numbering_problem(scheme, [(i.label, i.voxels * voxel_ml) for i in instances])
    ):
        raise InputError(volume.source.path, problem, "pass --label-scheme totalsegmentator (or verse, if it is VerSe)")
    sizeable = [i for i in chosen if i.voxels * voxel_ml >= volume_range(scheme.verse_label(i.label)).min_ml]
    if problem := level_order_problem(scheme, [(i.label, i.centroid_lps[2]) for i in sizeable]):  # not specks
        raise InputError(
            volume.source.path, problem, "pass --label-scheme with the file's numbering, or correct its orientation"
        )
    chosen, passed_through = _plausible(chosen, instance_array, working_grid, scheme)
    coarsest = max(seen.geometry.spacing)
    if options.fine_inputs == "keep" and coarsest <= FINE_INPUT_MAX_MM + SPACING_TOLERANCE_MM:
        what = "coarsest spacing" if slabs is None else "effective slice thickness from the labels"
        reason = FINE_INPUT_REASON.format(limit=FINE_INPUT_MAX_MM, what=what, spacing=round(coarsest, 3))
        passed_through += [(inst, reason) for inst in chosen]
        chosen = []
    seconds["resample"] = time.perf_counter() - start
    start = time.perf_counter()
    status(f"encode {len(chosen)} vertebrae")
    rotations = pose_rotations(chosen) if options.pose else [np.eye(3) for _ in chosen]
    cropped = [crop_in_frame(instance_array, inst, r, bundle.patch) for inst, r in zip(chosen, rotations, strict=True)]
    patches = None
    if cropped:
        stacked = np.stack([patch for _, patch in cropped])
        mu, _ = sessions.encode(stacked)
        if bundle.conditioned:
            patches = stacked.astype(np.uint8)
    else:
        mu = np.zeros((0, *bundle.latent_shape), np.float32)
        if bundle.conditioned:
            patches = np.zeros((0, *(bundle.patch,) * 3), np.uint8)
    seconds["encode"] = time.perf_counter() - start
    observations: list[SlabObservation | None] = []
    if _guided(options, seen):
        start = time.perf_counter()
        # what each input voxel (slab) shows: its label, or for a binary mask its vertebra instance (nearest)
        shown = seen.array
        if from_mask:
            shown = resample_labels(Volume(instance_array, working_grid), seen.geometry, method="nearest").array
        for inst, (box, _), rotation in zip(chosen, cropped, rotations, strict=True):
            affine = patch_to_input_index(working_grid, box.start, rotation, bundle.patch, seen.geometry)
            value = inst.instance_id if from_mask else inst.label
            observations.append(observe(affine, shown, value, bundle.patch))
        seconds["observe"] = time.perf_counter() - start
    return PreparedCase(
        volume=volume,
        working=working_grid,
        instance_array=instance_array,
        instances=chosen,
        boxes=[box for box, _ in cropped],
        mu=mu,
        patches=patches,
        rotations=rotations,
        observations=observations,
        passed_through=passed_through,
        from_binary_mask=from_mask,
        seconds=seconds,
        scheme=scheme,
        scheme_note=scheme_note,
        thickness=thickness,
        slabs=slabs,
    )


def _slabs_of(volume: Volume, options: RefineOptions) -> tuple[SliceThickness | None, Volume | None]:
    """(what the labels show of their slice thickness, the equivalent thick-slice map or None).

    With ``options.slice_detection == 'auto'``: :func:`vertrefine.thickness.detect_slices`, and when an axis is
    a thick staircase coarser than the header's coarsest spacing (a native thick grid says so itself),
    :func:`vertrefine.thickness.coarse_volume`.
    """
    if options.slice_detection == "off":
        return None, None
    thickness = detect_slices(volume)
    coarsest = max(volume.geometry.spacing) + SPACING_TOLERANCE_MM
    if not any(s is not None and s.thickness_mm > coarsest for s in thickness.thick):
        return thickness, None
    return thickness, coarse_volume(volume, thickness)


def _nothing_to_refine(
    instances: Sequence[Instance], scheme: LabelScheme, note: str, labels: LabelSelection | frozenset[int] | None
) -> tuple[str, str]:
    """(problem, remedy) when no label of the input is one to refine."""
    found = ", ".join(f"{i.label} ({scheme.name(i.label)})" for i in instances[:12]) or "none"
    if labels is not None:
        asked = LabelSelection.of(labels).text
        return f"--labels {asked} names none of its labels ({note}; labels found: {found})", "check --labels"
    return (
        f"no vertebra to refine ({note}; labels found: {found})",
        "pass --label-scheme with the file's numbering, or --labels with the ids or levels to refine",
    )


def _plausible(
    chosen: list[Instance], instance_array: np.ndarray, working: Geometry, scheme: LabelScheme
) -> tuple[list[Instance], list[tuple[Instance, str]]]:
    """(the instances plausible as one vertebra, [(instance, reason)] for the others): :mod:`plausibility`.

    ``chosen`` is ordered superior first (:func:`vertrefine.spatial.find_instances`); the neighbours of an
    instance for :func:`vertrefine.plausibility.merged_problem` are the instances next to it in that order,
    within :data:`MERGED_NEIGHBOUR_MM`, that passed the other checks and do not reach the field of view's edge
    (the instance judged may: a cut vertebra is only smaller).
    """
    boxes = ndimage.find_objects(instance_array)
    voxel_ml = working.voxel_volume_mm3 / 1000.0
    spacing = max(working.spacing)
    keep, dropped = [], []
    from_mask = scheme.binary
    size: dict[int, tuple[float, float]] = {}  # instance id -> (volume mL, S-I height mm)
    whole: set[int] = set()  # not cut by the field of view: a neighbour to compare with
    for inst in chosen:
        box = boxes[inst.instance_id - 1]
        touching = touches(box, instance_array.shape)
        level = None if from_mask else scheme.verse_label(inst.label)
        mask = instance_array[box] == inst.instance_id
        problem = input_problem(level, inst.voxels, voxel_ml, extent_mm(box, spacing), touching, mask=mask)
        if problem is None:
            keep.append(inst)
            size[inst.instance_id] = (inst.voxels * voxel_ml, (box[0].stop - box[0].start) * spacing)
            if not touching:
                whole.add(inst.instance_id)
        else:
            if from_mask and problem.startswith("too"):
                problem += "; touching vertebrae of a binary mask form one component: label each vertebra"
            dropped.append((inst, f"implausible input: {problem}"))
    merged = []
    for n, inst in enumerate(keep):  # a candidate cut by the field of view is only smaller than it is
        neighbours = [
            size[other.instance_id]
            for other in keep[max(n - 1, 0) : n] + keep[n + 1 : n + 2]
            if other.instance_id in whole
            and np.linalg.norm(np.subtract(other.centroid, inst.centroid)) * spacing <= MERGED_NEIGHBOUR_MM
        ]
        if problem := merged_problem(*size[inst.instance_id], neighbours):
            remedy = "label each vertebra" if from_mask else "give each vertebra its own label"
            merged.append((inst, f"implausible input: {problem}; {remedy}"))
    gone = {inst.instance_id for inst, _ in merged}
    return [inst for inst in keep if inst.instance_id not in gone], dropped + merged


def _coarse(volume: Volume) -> bool:
    """Whether the input is coarser than the working grid can show (thick slices): its slabs then constrain."""
    return max(volume.geometry.spacing) > COARSE_SPACING_MM + SPACING_TOLERANCE_MM


def _guided(options: RefineOptions, volume: Volume) -> bool:
    """Whether the chain follows the input's slabs: guidance asked for, and an input coarser than the grid."""
    sampler = options.sampler
    return bool(sampler and sampler.guidance > 0 and _coarse(volume))


class RowNoise:
    """A ``standard_normal`` source whose rows come from per-case generators (rows grouped by case)."""

    def __init__(self, generators: Sequence[np.random.Generator], rows: Sequence[int]) -> None:
        self.generators = list(generators)
        self.rows = [int(r) for r in rows]

    def standard_normal(self, shape: tuple[int, ...]) -> np.ndarray:
        if shape[0] != sum(self.rows):
            raise ValueError(f"asked for {shape[0]} rows, the cases hold {sum(self.rows)}")
        pairs = zip(self.generators, self.rows, strict=True)
        parts = [g.standard_normal((n, *shape[1:]), dtype=np.float32) for g, n in pairs]
        return np.concatenate(parts) if parts else np.zeros(shape, np.float32)


def sample_latents(
    sessions: BundleSessions,
    cases: Sequence[PreparedCase],
    options: RefineOptions,
    generators: Sequence[np.random.Generator],
    status: Status = _quiet,
) -> list[np.ndarray]:
    """Latents [samples, n, *Z] per case: the encoder mean, or the LSD-EBM chain run on all cases at once.

    Rows of the shared chain are grouped by case, and within a case by sample (all vertebrae of sample 0,
    then of sample 1, ...). Cases with observations are guided by their input's slabs.
    """
    if options.sampler is None:
        return [np.repeat(case.mu[None], options.samples, axis=0) for case in cases]
    status(f"sample {sum(len(c.mu) for c in cases) * options.samples} chains")
    start = time.perf_counter()
    z0 = np.concatenate([np.tile(c.mu, (options.samples,) + (1,) * (c.mu.ndim - 1)) for c in cases])
    noise = RowNoise(generators, [len(c.mu) * options.samples for c in cases])
    observations = [obs for c in cases for obs in (c.observations or [None] * len(c.mu)) * options.samples]
    guide = None
    if any(o is not None for o in observations):
        inputs = None  # a conditioned decoder's input patch of each row of the chain
        if sessions.bundle.conditioned:
            inputs = [patch for c in cases for _ in range(options.samples) for patch in c.patches]

        def decode(z: np.ndarray, rows: Sequence[int]):
            return sessions.decode_chunks(z, None if inputs is None else np.stack([inputs[r] for r in rows]))

        guide = DataConsistency(lambda x: sessions.encode(x)[0], decode, observations)
    schedule = sessions.bundle.diffusion_schedule()
    z = z0 if len(z0) == 0 else refine_latents(sessions.energy_and_grad, z0, schedule, options.sampler, noise, guide)
    out, row = [], 0
    for case in cases:
        n = len(case.mu) * options.samples
        out.append(z[row : row + n].reshape(options.samples, len(case.mu), *case.mu.shape[1:]))
        row += n
    seconds = time.perf_counter() - start
    for case in cases:  # the shared chain's time, split by each case's share of the chains
        case.seconds["sample"] = seconds * len(case.mu) * options.samples / max(1, len(z0))
    return out


def _decode_mean_std(
    sessions: BundleSessions, z: np.ndarray, patches: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean and std over samples of the decoded probabilities; ``z`` is [samples, n, *Z], ``patches`` the n
    input patches a conditioned decoder also takes (:attr:`PreparedCase.patches`)."""
    samples, n = z.shape[:2]
    if n == 0:
        size = (sessions.bundle.patch,) * 3
        return np.zeros((0, *size), np.float32), (np.zeros((0, *size), np.float32) if samples > 1 else None)
    total: np.ndarray | None = None
    squares: np.ndarray | None = None
    x = None if patches is None else patches[np.arange(samples * n) % n]
    for start, probability in sessions.decode_chunks(z.reshape(samples * n, *z.shape[2:]), x):
        if total is None:
            size = probability.shape[1:]
            total = np.zeros((n, *size), np.float32)
            squares = np.zeros((n, *size), np.float32) if samples > 1 else None
        for offset, p in enumerate(probability):
            vertebra = (start + offset) % n
            total[vertebra] += p
            if squares is not None:
                squares[vertebra] += p * p
    assert total is not None
    mean = total / samples
    if squares is None:
        return mean, None
    variance = np.maximum(squares / samples - mean * mean, 0.0)
    return mean, np.sqrt(variance * samples / (samples - 1))


def _maps(shape: tuple[int, ...], vertebrae: Sequence[RefinedVertebra]) -> tuple[np.ndarray, np.ndarray]:
    """Working-grid foreground probability (max over vertebrae) and the winning vertebra's std."""
    probability = np.zeros(shape, np.float32)
    std = np.zeros(shape, np.float32)
    for v in vertebrae:
        inside, part = v.box.slices(shape)
        p = v.probability[part]
        wins = p > probability[inside]
        probability[inside][wins] = p[wins]
        if v.std is not None:
            std[inside][wins] = v.std[part][wins]
    return probability, std


def finish_case(
    prepared: PreparedCase,
    z: np.ndarray,
    sessions: BundleSessions,
    options: RefineOptions,
    status: Status = _quiet,
) -> RefinedCase:
    """Decode the latents, average the samples, stitch at the threshold and go back to the input grid."""
    seconds = dict(prepared.seconds)
    start = time.perf_counter()
    status("decode")
    gone = ~np.isfinite(z.reshape(*z.shape[:2], int(np.prod(z.shape[2:])))).all(axis=2)  # [samples, n]: NaN chains
    latents = np.where(gone.reshape(*gone.shape, *(1,) * (z.ndim - 2)), 0.0, z)
    mean, std = _decode_mean_std(sessions, latents, prepared.patches)
    mean[gone.any(axis=0)] = 0.0  # nothing of a diverged vertebra is stitched
    for k, rotation in enumerate(prepared.rotations):  # pose frame -> the axis-aligned box
        mean[k] = uncrop_from_frame(mean[k], rotation)
        if std is not None:
            std[k] = uncrop_from_frame(std[k], rotation)
    vertebrae = [
        RefinedVertebra(
            instance,
            box,
            mean[k],
            None if std is None else std[k],
            from_binary_mask=prepared.from_binary_mask,
            scheme=prepared.scheme,
        )
        for k, (instance, box) in enumerate(zip(prepared.instances, prepared.boxes, strict=True))
    ]
    seconds["decode"] = time.perf_counter() - start
    start = time.perf_counter()
    status("stitch")
    after = stitch(
        prepared.instance_array,
        [(v.instance.instance_id, v.box, v.probability) for v in vertebrae],
        threshold=options.threshold,
    )
    voxel_ml = prepared.working.voxel_volume_mm3 / 1000.0
    for v in vertebrae:  # specks of a result are dropped; a result in several large pieces is flagged below
        v.pieces_ml = [round(n * voxel_ml, 2) for n in _drop_specks(after, v)]
    input_ids = _input_instance_ids(prepared)
    seen_ids = input_ids if prepared.slabs is None else _input_instance_ids(prepared, prepared.slabs)
    observations = [_box_observation(prepared, seen_ids, v) for v in vertebrae]  # the input's slabs per box
    for v, observation in zip(vertebrae, observations, strict=True):
        v.agreement_dsc, v.agreement_hd95_mm = agreement_with_input(prepared, after, observation, v)
        if v.agreement_dsc < options.min_agreement:
            v.decision = "kept input" if options.on_disagree == "keep-input" else "refined, flagged"
            v.reason = (
                f"refinement disagrees with the input (DSC {v.agreement_dsc:.3f} < {options.min_agreement:g}): check it"
            )
    if options.consistency == "project" and _coarse(prepared.observed):
        for v, observation in zip(vertebrae, observations, strict=True):
            v.consistency_ml = _project(after, v, observation, voxel_ml)
    for v, observation in zip(vertebrae, observations, strict=True):
        if not v.reason and len(v.pieces_ml) > 1 and v.pieces_ml[1] >= PIECE_FRACTION * sum(v.pieces_ml):
            v.decision = "refined, flagged"
            v.reason = (
                f"refined shape in {len(v.pieces_ml)} pieces ({', '.join(f'{p:g}' for p in v.pieces_ml)} mL): check it"
            )
        problem = result_problem(v.instance.voxels, int(np.count_nonzero(after == v.instance.instance_id)))
        if problem is not None:
            v.decision, v.reason = "kept input", f"implausible result: {problem}"
        v.fov_fraction = _inside_fraction(v, observation)
        if v.fov_fraction < options.min_fov_fraction:
            v.decision = "kept input"
            v.reason = (
                f"only {v.fov_fraction:.0%} of the refined shape lies inside the field of view "
                f"(< {options.min_fov_fraction:.0%})"
            )
    for v, failed in zip(vertebrae, gone.sum(axis=0), strict=True):
        if failed:  # the sampler's verdict wins: the result is no refinement at all
            v.decision = "kept input"
            v.reason = f"sampler diverged ({failed} of {len(gone)} chains: latent non-finite or far outside the prior)"
    for v in vertebrae:
        if v.decision == "kept input":  # the input's shape everywhere: labels, probability map, mesh
            instance_id = v.instance.instance_id
            v.rejected = v.probability
            after[after == instance_id] = 0
            after[(prepared.instance_array == instance_id) & (after == 0)] = instance_id
            v.probability = (crop(prepared.instance_array, v.box) == instance_id).astype(np.float32)
            v.std = None if v.std is None else np.zeros_like(v.std)
        v.voxels_after = int(np.count_nonzero(after == v.instance.instance_id))
    target = output_geometry(prepared.volume.geometry, options.spacing)
    kept = {v.instance.instance_id for v in vertebrae if v.decision == "kept input"}
    kept |= {inst.instance_id for inst, _ in prepared.passed_through}
    labels = _back_to_input(prepared, after, target, kept, input_ids)
    probability = uncertainty = None
    if options.keep_maps:
        prob_map, std_map = _maps(after.shape, vertebrae)
        probability = resample_scalar(Volume(prob_map, prepared.working), target)
        uncertainty = resample_scalar(Volume(std_map, prepared.working), target)
    seconds["stitch"] = time.perf_counter() - start
    return RefinedCase(
        labels=labels,
        working=prepared.working,
        working_before=prepared.instance_array,
        working_after=after,
        vertebrae=vertebrae,
        probability=probability,
        uncertainty=uncertainty,
        seconds=seconds,
        passed_through=list(prepared.passed_through),
        from_binary_mask=prepared.from_binary_mask,
        scheme=prepared.scheme,
    )


def _input_instance_ids(prepared: PreparedCase, volume: Volume | None = None) -> np.ndarray:
    """The input's vertebra instance ids on its own grid (or on ``volume``'s, e.g. :attr:`PreparedCase.slabs`):
    its labels, or for a binary mask its components (the working grid's instances, nearest neighbour)."""
    volume = prepared.volume if volume is None else volume
    if not prepared.from_binary_mask:
        return volume.array
    ids = prepared.instance_array  # int32; a handful of instances fit a smaller type on a large fine grid
    ids = ids.astype(np.min_scalar_type(max(1, int(ids.max()))), copy=False)
    return _ids_on(prepared, ids, volume.geometry, method="nearest")


def _ids_on(prepared: PreparedCase, ids: np.ndarray, target: Geometry, method: str = "label-aware") -> np.ndarray:
    """Instance ids ``ids`` of the working grid on ``target`` (the array itself when it is the working grid)."""
    if prepared.working.same_grid(target, tol=1e-6):
        return ids
    return resample_labels(Volume(ids, prepared.working), target, method=method).array


def _drop_specks(after: np.ndarray, vertebra: RefinedVertebra) -> list[int]:
    """Remove, in place, the components of a refined vertebra smaller than SPECK_FRACTION of it (26-connected,
    inside its box on the working grid ``after``); the voxel counts of the pieces left, largest first."""
    inside, _ = vertebra.box.slices(after.shape)
    region = after[inside]  # a view: changes reach ``after``
    mask = region == vertebra.instance.instance_id
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return [int(mask.sum())] if count else []
    sizes = np.bincount(components.ravel())[1:]
    specks = np.flatnonzero(sizes < SPECK_FRACTION * sizes.sum()) + 1
    region[np.isin(components, specks)] = 0
    return sorted((int(n) for n in sizes if n >= SPECK_FRACTION * sizes.sum()), reverse=True)


def _box_observation(prepared: PreparedCase, input_ids: np.ndarray, vertebra: RefinedVertebra) -> SlabObservation:
    """The input's slabs (and field of view) in a refined vertebra's axis-aligned box on the working grid;
    ``input_ids`` on the grid the labels were drawn on (:attr:`PreparedCase.observed`)."""
    size = vertebra.box.size
    affine = patch_to_input_index(prepared.working, vertebra.box.start, np.eye(3), size, prepared.observed.geometry)
    return observe(affine, input_ids, vertebra.instance.instance_id, size)


def _project(after: np.ndarray, vertebra: RefinedVertebra, observation: SlabObservation, voxel_ml: float) -> tuple[float, float]:
    """Make one refined vertebra agree with the input's slabs, in place on ``after`` (instance ids on the working
    grid) and on its probability patch (added voxels at least 0.75, removed at most 0.25, so meshes and
    probability maps show the same shape); (added, removed) mL. Only background voxels may join."""
    inside, part = vertebra.box.slices(after.shape)
    region = after[inside]  # a view: changes reach ``after``
    instance_id = vertebra.instance.instance_id
    member = region == instance_id
    new = project_labels(member, region == 0, observation.slab[part], observation.inside, observation.outside)
    added, removed = new & ~member, member & ~new
    region[added] = instance_id
    region[removed] = 0
    probability = vertebra.probability[part]  # a view of the patch
    probability[added] = np.maximum(probability[added], 0.75)
    probability[removed] = np.minimum(probability[removed], 0.25)
    return round(int(added.sum()) * voxel_ml, 3), round(int(removed.sum()) * voxel_ml, 3)


def _inside_fraction(vertebra: RefinedVertebra, observation: SlabObservation) -> float:
    """Fraction of the refined shape (probability >= 0.5 on its box) inside the input's field of view."""
    shape = vertebra.probability >= 0.5
    total = int(shape.sum())
    if not total:
        return 1.0
    return float(np.count_nonzero(shape & (observation.slab >= 0)) / total)


def agreement_with_input(
    prepared: PreparedCase, after: np.ndarray, observation: SlabObservation, vertebra: RefinedVertebra
) -> tuple[float, float | None]:
    """(DSC, HD95 mm) of a refined vertebra against the input, as the input's own grid can tell them.

    DSC: the thick-slice forward model of :mod:`vertrefine.guidance`. Each input voxel (slab) of the
    vertebra's box (``observation``, from :func:`_box_observation`) holds the result if at least half of the
    1 mm working-grid voxels it covers do; the DSC of those input voxels against the input's own voxels of
    this vertebra. On an input as fine as the working grid this is the voxel-wise DSC. Sampling the result
    at slab centres instead would add the staircase's own error: the truth itself then disagrees with a
    5 mm input. HD95: between the result and the input as refine reads it (on the 1 mm working grid), inside
    the vertebra's 128^3 box. ``after`` holds the result's instance ids on the working grid.
    """
    instance_id = vertebra.instance.instance_id
    result = crop(after, vertebra.box) == instance_id
    held = slab_means(result.astype(np.float32), observation) >= 0.5
    shown = observation.inside
    total = int(held.sum() + shown.sum())
    dice = 2.0 * int((held & shown).sum()) / total if total else 1.0
    reference = crop(prepared.instance_array, vertebra.box) == instance_id
    hd95 = surface_distances(result, reference, prepared.working.spacing[::-1])[0]
    return float(dice), hd95


REGION_MARGIN = 3
"""Working-grid voxels kept around the handled vertebrae when going back to the output grid (more than the
label-aware resampling's own margin, so the region holds every voxel the vertebrae can reach)."""


def _handled_region(
    prepared: PreparedCase, after: np.ndarray, target: Geometry
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """(slices of the working grid, slices of ``target``) of the box holding every handled vertebra, before and
    after refinement, plus :data:`REGION_MARGIN`; None when there is none."""
    handled = [i.instance_id for i in prepared.instances] + [i.instance_id for i, _ in prepared.passed_through]
    mask = np.isin(after, handled) | np.isin(prepared.instance_array, handled)
    box = ndimage.find_objects(mask.view(np.uint8))
    if not box or box[0] is None:
        return None
    working = tuple(
        slice(max(s.start - REGION_MARGIN, 0), min(s.stop + REGION_MARGIN, n))
        for s, n in zip(box[0], after.shape, strict=True)
    )
    region = target_region(
        sub_geometry(prepared.working, [s.start for s in working], [s.stop - s.start for s in working]), target
    )
    return None if region is None else (working, region)


def _back_to_input(
    prepared: PreparedCase, after: np.ndarray, target: Geometry, kept: set[int], input_ids: np.ndarray
) -> Volume:
    """The refined label map on the output grid ``target``.

    Structures that were not refined keep their input voxels, and so do the vertebrae in ``kept`` (the
    input's own voxels on the input's grid, nearest neighbour on another grid). ``input_ids`` are the input's
    instance ids on its own grid (:func:`_input_instance_ids`). Only the box of the handled vertebrae
    (:func:`_handled_region`) is resampled; elsewhere the output is the input less its handled labels, so a
    large fine input costs what its vertebrae's region costs.
    """
    volume = prepared.volume
    same_grid = target.same_grid(volume.geometry, tol=1e-6)
    source = volume.array if same_grid else resample_labels(volume, target, method="nearest").array
    handled = [*prepared.instances, *(inst for inst, _ in prepared.passed_through)]
    refined_labels = np.array(sorted({i.label for i in handled}))
    out = np.where(_member(source, refined_labels), 0, source).astype(volume.array.dtype, copy=False)
    regions = _handled_region(prepared, after, target)
    if regions is None:
        return Volume(out, target, volume.source)
    working_box, region = regions
    region_grid = sub_geometry(target, [s.start for s in region], [s.stop - s.start for s in region])
    working_grid = sub_geometry(
        prepared.working, [s.start for s in working_box], [s.stop - s.start for s in working_box]
    )
    source = source[region]
    after = after[working_box]  # instance ids: int32, though they and their labels may fit a smaller type
    after = after.astype(np.min_scalar_type(max(1, int(after.max()), *(i.label for i in handled))), copy=False)
    ids = resample_labels(Volume(after, working_grid), region_grid).array
    if kept:
        if input_ids is volume.array:  # labelled maps: instance ids are the labels
            source_ids = source
        elif same_grid:
            source_ids = input_ids[region]
        else:
            source_ids = resample_labels(Volume(input_ids, volume.geometry), region_grid, method="nearest").array
        for instance_id in kept:
            ids[ids == instance_id] = 0
            ids[source_ids == instance_id] = instance_id
    result = restore_labels(ids, handled)
    passthrough = out[region]  # the input's other structures keep their voxels
    out[region] = np.where(passthrough != 0, passthrough, np.where(_member(result, refined_labels), result, 0))
    return Volume(out, target, volume.source)


def _member(array: np.ndarray, values: np.ndarray) -> np.ndarray:
    """bool, shape of ``array``: whether each element is one of ``values`` (a lookup table for 8/16-bit
    unsigned arrays, three times faster than ``np.isin`` on a 100 M voxel map)."""
    if array.dtype.kind == "u" and array.dtype.itemsize <= 2:
        table = np.zeros(1 << (8 * array.dtype.itemsize), dtype=bool)
        table[values[(values >= 0) & (values < table.size)]] = True
        return table[array]
    return np.isin(array, values)


def refine_volume(
    volume: Volume,
    sessions: BundleSessions,
    options: RefineOptions,
    seed: int = 0,
    status: Status = _quiet,
) -> RefinedCase:
    """One case through the whole pipeline (a batch of one)."""
    prepared = prepare_case(volume, sessions, options, status)
    (z,) = sample_latents(sessions, [prepared], options, [np.random.default_rng(seed)], status)
    return finish_case(prepared, z, sessions, options, status)


SAMPLER_OPTIONS = ("t_refine", "langevin_steps", "step_size", "guidance")
"""Sampler settings a run may set over the bundle's defaults (each bounded by the bundle's validated range)."""
SAMPLER_FIELDS = frozenset(SamplerSettings.__dataclass_fields__)
"""The :class:`SamplerSettings` fields :meth:`Refiner.with_options` takes as keywords."""


class Refiner:
    """A model bundle's ONNX Runtime sessions and the refine options, built once and called per volume.

    The Python API of ``vertrefine refine`` (the command line builds one with :meth:`from_bundle` and calls
    it for every case of a folder)::

        from vertrefine.io import read_label_map, write_label_map
        from vertrefine.refine import Refiner

        refiner = Refiner.from_bundle()                       # the shipped LSD-EBM bundle, default settings
        volume = read_label_map("case.nii.gz")
        result = refiner(volume, seed=0)                      # a RefinedCase: labels, vertebrae, warnings
        write_label_map(result.labels, "refined.nii.gz", like=volume)

    Batches use the three stages :meth:`prepare`, :meth:`sample` (one chain over the vertebrae of several
    cases) and :meth:`finish`; each case draws its noise from its own generator.
    """

    def __init__(self, sessions: BundleSessions, options: RefineOptions, note: str | None = None) -> None:
        self.sessions = sessions
        self.options = options
        self.note = note
        """What opening the sessions had to decide (e.g. CUDA asked for but not usable: the CPU is used)."""

    @property
    def bundle(self) -> Any:
        """The :class:`vertrefine.bundle.Bundle` the sessions run."""
        return self.sessions.bundle

    @classmethod
    def from_bundle(
        cls,
        bundle: str | Path | None = None,
        *,
        model: str | None = None,
        device: str = "auto",
        threads: int = 0,
        t_refine: int | None = None,
        langevin_steps: int | None = None,
        step_size: float | None = None,
        guidance: float | None = None,
        threshold: float | None = None,
        **options: Any,
    ) -> Refiner:
        """Load a bundle (a folder; default: the installed bundle of ``model``, 'lsd-ebm'), check its files
        against its manifest, open its sessions on ``device`` ('auto', 'cpu', 'cuda') and bind the options.

        The sampler settings and the probability ``threshold`` default to the bundle's manifest
        (``sampler_defaults``), the sampler settings bounded by the ranges it was validated for; ``options``
        are the other :class:`RefineOptions` fields (samples, spacing, ...).
        Raises :class:`vertrefine.errors.InputError` for a missing or damaged bundle and
        :class:`vertrefine.errors.SettingsError` for settings it cannot run: another kind than ``model``, an
        LEBM bundle (its posterior sampling needs the decoder's gradient, which ONNX bundles do not carry),
        sampler settings or several samples for a VAE, a setting outside its validated range.
        """
        from .bundle import default_bundle_dir, load_bundle, out_of_range

        if device not in DEVICES:
            raise SettingsError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        if not is_whole_number(threads):
            raise SettingsError(f"threads must be a whole number >= 0 (0: all cores), got {threads!r}")
        loaded = load_bundle(bundle if bundle is not None else default_bundle_dir(model or "lsd-ebm"))
        if model is not None and model != loaded.kind:
            raise SettingsError(f"{loaded.dir}: holds a {loaded.kind} bundle, not {model}; pass --model {loaded.kind}")
        if loaded.kind == "lebm":
            raise SettingsError(
                f"{loaded.dir}: refine cannot run LEBM bundles (posterior Langevin needs the decoder's gradient, "
                "which ONNX bundles do not carry); use an lsd-ebm or vae bundle"
            )
        chosen = dict(zip(SAMPLER_OPTIONS, (t_refine, langevin_steps, step_size, guidance), strict=True))
        sampler = None
        if loaded.kind == "lsd-ebm":
            try:
                sampler = SamplerSettings.from_manifest(loaded.sampler, **chosen)
            except ValueError as exc:
                raise SettingsError(f"{loaded.dir}: {exc}") from None
            outside = out_of_range(loaded.sampler_ranges, chosen)
            if outside is not None:
                key, value, (low, high) = outside
                measured = loaded.ranges_basis.startswith("measured")
                how = "measured" if measured else "derived from the diffusion schedule"
                raise SettingsError(
                    f"{_flag(key)} {value:g} is outside {low:g}..{high:g}, the range the bundle {loaded.dir} was "
                    f"validated for ({how}; its manifest.json 'validated'); leave it out for the bundle's default "
                    f"{loaded.sampler.get(key, '-')}"
                )
        else:
            given = [_flag(key) for key, value in chosen.items() if value is not None]
            if given:
                raise SettingsError(
                    f"{', '.join(given)}: sampler options need the lsd-ebm model; the vae decodes the encoder's mean"
                )
            if options.get("samples", 1) > 1:
                raise SettingsError("--samples needs the sampling lsd-ebm model; the vae decodes one mean per vertebra")
        if threshold is None:
            threshold = float(loaded.sampler.get("threshold", RefineOptions.threshold))
        try:
            refine_options = RefineOptions(sampler=sampler, threshold=threshold, **options)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        sessions, note = open_sessions(loaded, device, threads)
        return cls(sessions, refine_options, note)

    def __call__(self, volume: Volume | str | Path, seed: int = 0, status: Status = _quiet) -> RefinedCase:
        """Refine one label map (a :class:`Volume` on any grid, or a path :func:`vertrefine.io.read_label_map`
        reads); the same ``seed`` gives the same result.

        ``seed`` is used as given: ``vertrefine refine --seed S`` refines a case with
        :func:`vertrefine.cases.case_seed` ``(S, case name)`` (its sidecar's ``case_seed``), so pass that to
        reproduce a command-line result. Raises SettingsError for a seed that is not a whole number >= 0,
        InputError for a path that cannot be read.
        """
        if not is_whole_number(seed):
            raise SettingsError(f"seed must be a whole number >= 0, got {seed!r}")
        if isinstance(volume, (str, Path)):
            from .io import read_label_map

            volume = read_label_map(volume)
        return refine_volume(volume, self.sessions, self.options, seed, status)

    def prepare(self, volume: Volume, status: Status = _quiet) -> PreparedCase:
        """Stage 1 of a batch: :func:`prepare_case`."""
        return prepare_case(volume, self.sessions, self.options, status)

    def sample(
        self, cases: Sequence[PreparedCase], generators: Sequence[np.random.Generator], status: Status = _quiet
    ) -> list[np.ndarray]:
        """Stage 2 of a batch: :func:`sample_latents` over every case at once, each case drawing its noise from
        its own generator (``generators[n]`` for ``cases[n]``). Raises SettingsError when the counts differ."""
        if len(cases) != len(generators):
            raise SettingsError(f"sample needs one generator per case, got {len(generators)} for {len(cases)} cases")
        return sample_latents(self.sessions, cases, self.options, generators, status)

    def finish(self, prepared: PreparedCase, z: np.ndarray, status: Status = _quiet) -> RefinedCase:
        """Stage 3 of a batch: :func:`finish_case`."""
        return finish_case(prepared, z, self.sessions, self.options, status)

    def with_options(self, **changes: Any) -> Refiner:
        """A Refiner over the same open sessions with some :class:`RefineOptions` fields changed
        (:func:`dataclasses.replace`), so a sweep over settings loads and opens the bundle once::

            unguided = refiner.with_options(guidance=0.0)          # a sampler setting, as from_bundle takes it
            mean_only = refiner.with_options(sampler=None)        # decode the encoder's mean (the VAE row)

        The :class:`vertrefine.sampler.SamplerSettings` fields (t_refine, langevin_steps, step_size, guidance,
        guidance_steps, init) change the current sampler. Unlike :meth:`from_bundle`, sampler settings given
        here are not bounded by the bundle's validated ranges (benchmarks measure outside them). Raises
        :class:`vertrefine.errors.SettingsError` for a value :class:`RefineOptions` or SamplerSettings
        refuses, a sampler setting without a sampler, or a sampler for a bundle without an energy (a VAE);
        TypeError for a name that is neither.
        """
        opened = [key for key in ("device", "threads", "model", "bundle") if key in changes]
        if opened:
            raise SettingsError(
                f"{', '.join(opened)}: set when the sessions are opened; build another Refiner with from_bundle"
            )
        sampler_changes = {key: changes.pop(key) for key in list(changes) if key in SAMPLER_FIELDS}
        if sampler_changes:
            sampler = changes.get("sampler", self.options.sampler)
            if sampler is None:
                raise SettingsError(
                    f"{', '.join(sampler_changes)}: no sampler to change (this Refiner decodes the encoder's mean)"
                )
            try:
                changes["sampler"] = replace(sampler, **sampler_changes)
            except ValueError as exc:
                raise SettingsError(str(exc)) from None
        try:
            options = replace(self.options, **changes)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        if options.sampler is not None:
            if not self.bundle.has_energy:
                raise SettingsError(
                    f"{self.bundle.dir}: a {self.bundle.kind} bundle has no energy to sample with; "
                    "use an lsd-ebm bundle, or sampler=None to decode the encoder's mean"
                )
            steps = self.bundle.diffusion_schedule().timesteps
            if options.sampler.t_refine > steps:
                raise SettingsError(f"t_refine {options.sampler.t_refine} exceeds the bundle's {steps} diffusion steps")
        return Refiner(self.sessions, options, self.note)


def _flag(setting: str) -> str:
    """The command-line option of a setting: 'step_size' -> '--step-size'."""
    return "--" + setting.replace("_", "-")
