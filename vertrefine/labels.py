"""Label numbering: which label ids are vertebrae, and of which level, in the schemes vertrefine reads.

A label map says nothing about its numbering: VerSe numbers vertebrae 1-28 from C1 down, TotalSegmentator
numbers 117 structures (organs, vessels, bones) with its vertebrae from S1 up, a DICOM SEG codes each
segment's anatomy. A :class:`LabelScheme` holds one numbering as data: every id's structure name and, for
the vertebrae, their level (``'C1'`` ... ``'T13'``, ``'L1'`` ... ``'L6'``, ``'S1'``, ``'sacrum'``,
``'coccyx'``). The model was trained on VerSe-level patches; a level only matters for the plausibility ranges
(:mod:`vertrefine.plausibility`) and for names, and :meth:`LabelScheme.verse_label` is the one place where
a scheme's id becomes a VerSe id. Refined vertebrae keep their own ids in the output, whatever the scheme.

Sources of the tables (as published by their authors):

* VerSe: Sekuboyina et al., "VerSe: A Vertebrae labelling and segmentation benchmark for multi-detector
  CT images", Medical Image Analysis 73 (2021): 1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6, 26 sacrum,
  27 coccyx, 28 T13 (the transitional vertebra).
* TotalSegmentator: ``class_map["total"]`` (v2, 117 classes), ``class_map["total_v1"]`` (v1, 104 classes)
  and ``class_map["vertebrae_mr"]`` (25 classes) of ``totalsegmentator/map_to_binary.py`` in
  github.com/wasserth/TotalSegmentator (read at commit 0275d3046117a9615a9876e6e4eefd5156843f1c; early v2
  releases, e.g. commit 4cb664c1507782a7e503a203cd619406fbb06abe, ordered the ribs 92-115 differently:
  the vertebra ids are the same, only the names of pass-through ribs differ). The ``total_mr`` task (one
  class for all vertebrae, numbering changed between releases) is not a scheme here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .volume import Volume

# --- levels ---------------------------------------------------------------------------------------

LEVELS: tuple[str, ...] = (
    *(f"C{i}" for i in range(1, 8)),
    *(f"T{i}" for i in range(1, 14)),
    *(f"L{i}" for i in range(1, 7)),
    "S1",
    "sacrum",
    "coccyx",
)
"""Every vertebra level vertrefine knows, superior first (T13 and L6 are transitional vertebrae)."""
NOT_REFINED_BY_DEFAULT: frozenset[str] = frozenset({"S1", "sacrum", "coccyx"})
"""Levels that pass through unless ``--labels`` names them: the model learned single free vertebrae."""
BINARY_MASK_VALUES: frozenset[int] = frozenset({1, 255})
"""The value of a binary mask: a single-valued map of 1 or 255 names no level; its connected components
are the vertebrae (the only case where components are used)."""

# VerSe: 1-7 = C1-C7, 8-19 = T1-T12, 20-24 = L1-L5, 25 = L6, 26 = sacrum, 27 = coccyx, 28 = T13.
_VERSE_NAMES: dict[int, str] = {
    **{i: f"C{i}" for i in range(1, 8)},
    **{i + 7: f"T{i}" for i in range(1, 13)},
    **{i + 19: f"L{i}" for i in range(1, 7)},
    26: "sacrum",
    27: "coccyx",
    28: "T13",
}
_VERSE_ID_OF_LEVEL: dict[str, int] = {name: label for label, name in _VERSE_NAMES.items()} | {"S1": 26}
"""VerSe has no S1: its sacrum label (26) is the nearest level for the model's plausibility ranges."""
_CANONICAL: dict[str, str] = {level.upper(): level for level in LEVELS}

LUMBAR_LABELS: tuple[int, ...] = (20, 21, 22, 23, 24)
"""L1..L5, the labels that ``synth`` writes."""


def canonical_level(name: str) -> str | None:
    """The level a name stands for, in any scheme's spelling, or None.

    'L1', 'l1', 'L1 vertebra', 'vertebrae_L1' (TotalSegmentator), 'vertebra_L1', 'Vertebra L1',
    'Lumbar vertebra 1', 'lumbar_vertebra_L1' -> 'L1';
    'Sacrum', 'vertebrae_S1' -> 'sacrum', 'S1'. Organ names and other text -> None.
    """
    key = " ".join(name.strip().upper().replace("-", "_").split())
    for suffix in (" VERTEBRA", "_VERTEBRA", " VERTEBRAE", "_VERTEBRAE"):
        if key.endswith(suffix):
            key = key[: -len(suffix)].strip()
    for prefix in ("VERTEBRAE_", "VERTEBRA_", "VERTEBRAE ", "VERTEBRA "):
        if key.startswith(prefix):
            key = key[len(prefix) :].strip()
    region = re.fullmatch(r"(CERVICAL|THORACIC|LUMBAR)[ _]+(?:VERTEBRAE?[ _]*)?([CTL]?)(\d+)", key)
    if region and region.group(2) in ("", region.group(1)[0]):  # 'Lumbar vertebra 3', 'lumbar_vertebra_L3'
        key = f"{region.group(1)[0]}{int(region.group(3))}"
    return _CANONICAL.get(key)


def level_name(label: int) -> str:
    """The VerSe level of VerSe id ``label``: 'L1' for 20, 'T12' for 19; other ids are named 'label N'."""
    return _VERSE_NAMES.get(int(label), f"label {int(label)}")


def label_for_level(name: str) -> int | None:
    """VerSe id of a level name in any spelling (:func:`canonical_level`); None when not a VerSe level."""
    level = canonical_level(name)
    return None if level is None or level == "S1" else _VERSE_ID_OF_LEVEL[level]


# --- schemes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelScheme:
    """One numbering of a label map: the structure name of each id and the level of each vertebra id.

    ``names``: id -> structure name as the scheme spells it ('spleen', 'vertebrae_L3', 'L3').
    ``levels``: id -> level (one of :data:`LEVELS`) for the ids that are vertebrae (sacrum included).
    ``unlevelled``: ids known to be vertebrae whose level is unknown (a SEG segment coded 'Vertebra').
    ``binary``: a binary mask, whose connected components are the vertebrae (no id names a level).
    """

    key: str
    title: str
    names: Mapping[int, str] = field(default_factory=dict, repr=False)
    levels: Mapping[int, str] = field(default_factory=dict, repr=False)
    unlevelled: frozenset[int] = frozenset()
    binary: bool = False

    def level(self, label: int) -> str | None:
        """The vertebra level of ``label`` ('L3'), or None (not a vertebra, or level unknown)."""
        return self.levels.get(int(label))

    def verse_label(self, label: int) -> int | None:
        """The VerSe id of ``label``'s level (TotalSegmentator's 29 -> 22 for L3): the one mapping from a
        scheme's ids to the levels the model and :mod:`vertrefine.plausibility` know. None: no level."""
        level = self.level(label)
        return None if level is None else _VERSE_ID_OF_LEVEL[level]

    def name(self, label: int) -> str:
        """A vertebra's level ('L3'), else the structure's name in this scheme ('spleen'), else 'label N'."""
        label = int(label)
        return self.levels.get(label) or self.names.get(label) or f"label {label}"

    def is_vertebra(self, label: int) -> bool:
        """Whether ``label`` is a vertebra (sacrum and coccyx included) in this scheme."""
        return self.binary or int(label) in self.levels or int(label) in self.unlevelled

    def vertebrae(self, present: Iterable[int]) -> frozenset[int]:
        """The ids of ``present`` that are refined by default: vertebrae, but not S1, sacrum or coccyx."""
        return frozenset(
            int(label)
            for label in present
            if self.binary
            or int(label) in self.unlevelled
            or (self.level(label) is not None and self.level(label) not in NOT_REFINED_BY_DEFAULT)
        )

    def ids_of_levels(self, levels: Collection[str]) -> frozenset[int]:
        """The ids whose level is one of ``levels``."""
        return frozenset(label for label, level in self.levels.items() if level in levels)


def _scheme_from_names(key: str, title: str, names: Sequence[str]) -> LabelScheme:
    """A scheme whose ids are 1..n in the order of ``names``; vertebrae are found by their names."""
    table = {number: name for number, name in enumerate(names, start=1)}
    levels = {
        number: level
        for number, name in table.items()
        if (name.startswith("vertebrae_") or name == "sacrum") and (level := canonical_level(name))
    }
    return LabelScheme(key, title, table, levels)


# TotalSegmentator v2, task "total" (class_map["total"]), ids 1..117.
_TOTALSEG_V2 = (
    *("spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas"),
    *("adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left"),
    *("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus", "trachea"),
    *("thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate"),
    *("kidney_cyst_left", "kidney_cyst_right", "sacrum", "vertebrae_S1"),
    *(f"vertebrae_L{i}" for i in range(5, 0, -1)),  # 27-31
    *(f"vertebrae_T{i}" for i in range(12, 0, -1)),  # 32-43
    *(f"vertebrae_C{i}" for i in range(7, 0, -1)),  # 44-50
    *("heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right"),
    *("subclavian_artery_left", "common_carotid_artery_right", "common_carotid_artery_left"),
    *("brachiocephalic_vein_left", "brachiocephalic_vein_right", "atrial_appendage_left"),
    *("superior_vena_cava", "inferior_vena_cava", "portal_vein_and_splenic_vein", "iliac_artery_left"),
    *("iliac_artery_right", "iliac_vena_left", "iliac_vena_right", "humerus_left", "humerus_right"),
    *("scapula_left", "scapula_right", "clavicula_left", "clavicula_right", "femur_left", "femur_right"),
    *("hip_left", "hip_right", "spinal_cord", "gluteus_maximus_left", "gluteus_maximus_right"),
    *("gluteus_medius_left", "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right"),
    *("autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right", "brain", "skull"),
    *(f"rib_left_{i}" for i in range(1, 13)),  # 92-103
    *(f"rib_right_{i}" for i in range(1, 13)),  # 104-115
    *("sternum", "costal_cartilages"),
)
# TotalSegmentator v1 (class_map["total_v1"]), ids 1..104.
_TOTALSEG_V1 = (
    *("spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta"),
    *("inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right"),
    *("adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right"),
    *("lung_middle_lobe_right", "lung_lower_lobe_right"),
    *(f"vertebrae_L{i}" for i in range(5, 0, -1)),  # 18-22
    *(f"vertebrae_T{i}" for i in range(12, 0, -1)),  # 23-34
    *(f"vertebrae_C{i}" for i in range(7, 0, -1)),  # 35-41
    *("esophagus", "trachea", "heart_myocardium", "heart_atrium_left", "heart_ventricle_left"),
    *("heart_atrium_right", "heart_ventricle_right", "pulmonary_artery", "brain", "iliac_artery_left"),
    *("iliac_artery_right", "iliac_vena_left", "iliac_vena_right", "small_bowel", "duodenum", "colon"),
    *(f"rib_left_{i}" for i in range(1, 13)),  # 58-69
    *(f"rib_right_{i}" for i in range(1, 13)),  # 70-81
    *("humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left"),
    *("clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "sacrum", "face"),
    *("gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right"),
    *("gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left", "autochthon_right"),
    *("iliopsoas_left", "iliopsoas_right", "urinary_bladder"),
)
# TotalSegmentator task "vertebrae_mr" (class_map["vertebrae_mr"]), ids 1..25.
_TOTALSEG_VERTEBRAE_MR = (
    "sacrum",
    *(f"vertebrae_L{i}" for i in range(5, 0, -1)),
    *(f"vertebrae_T{i}" for i in range(12, 0, -1)),
    *(f"vertebrae_C{i}" for i in range(7, 0, -1)),
)

VERSE = LabelScheme("verse", "VerSe", dict(_VERSE_NAMES), dict(_VERSE_NAMES))
TOTALSEGMENTATOR = _scheme_from_names("totalsegmentator", "TotalSegmentator v2 'total'", _TOTALSEG_V2)
TOTALSEGMENTATOR_V1 = _scheme_from_names("totalsegmentator-v1", "TotalSegmentator v1 'total'", _TOTALSEG_V1)
TOTALSEGMENTATOR_VERTEBRAE_MR = _scheme_from_names(
    "totalsegmentator-vertebrae-mr", "TotalSegmentator 'vertebrae_mr'", _TOTALSEG_VERTEBRAE_MR
)
BINARY_MASK = LabelScheme("binary", "binary mask (its connected components are the vertebrae)", binary=True)
UNKNOWN = LabelScheme("unknown", "an unknown numbering")
"""No id names a level: only ids given by ``--labels`` are refined."""

SCHEMES: dict[str, LabelScheme] = {
    s.key: s for s in (VERSE, TOTALSEGMENTATOR, TOTALSEGMENTATOR_V1, TOTALSEGMENTATOR_VERTEBRAE_MR)
}
"""The schemes ``--label-scheme`` names (besides ``auto``)."""
SCHEME_CHOICES: tuple[str, ...] = ("auto", *SCHEMES)

# SPINEPS subregion masks (*_seg-spine_msk): the ``Location`` ids of TPTBox (github.com/Hendrik-code/TPTBox,
# TPTBox/core/vert_constants.py), which SPINEPS (Moeller et al., European Radiology 2024) writes.
_SPINEPS_SUBREGIONS: dict[int, str] = {
    40: "vertebra_full",
    41: "arcus_vertebrae",
    42: "spinosus_process",
    43: "costal_process_left",
    44: "costal_process_right",
    45: "superior_articular_left",
    46: "superior_articular_right",
    47: "inferior_articular_left",
    48: "inferior_articular_right",
    49: "vertebra_corpus_border",
    50: "vertebra_corpus",
    51: "dens_axis",
    52: "endplate_superior",
    53: "endplate_inferior",
    58: "disc_superior",
    59: "disc_inferior",
    60: "spinal_cord",
    61: "spinal_canal",
    62: "endplate",
    100: "vertebra_disc",
}
_SPINEPS_PARTS = frozenset(range(41, 51))
"""Parts of a vertebra: a subregion mask holds several of them (arch, processes, body), one id each for
every vertebra of the image."""
SPINEPS_SUBREGIONS = LabelScheme(
    "spineps-subregions", "a SPINEPS subregion mask (seg-spine_msk)", dict(_SPINEPS_SUBREGIONS)
)
"""Vertebra parts, canal and discs, each id for every vertebra at once: nothing in it is one vertebra."""
SPINEPS_SUBREGION_SUFFIX = "_seg-spine_msk"
SPINEPS_SUBREGION_NOTE = (
    "a SPINEPS subregion mask (41 arch, 42-48 processes, 49-50 body, 60-62 canal and endplates, 100 discs: "
    "parts of every vertebra, not one label per vertebra), never refined; its *_seg-vert_msk beside it is "
    "the vertebra label map to refine"
)


def is_spineps_subregion_name(path: str | os.PathLike[str]) -> bool:
    """True for a file named as SPINEPS names its subregion masks (``*_seg-spine_msk.nii.gz``, any case)."""
    name = os.path.basename(os.fspath(path)).lower()
    stem = name.split(".", 1)[0]
    return stem.endswith(SPINEPS_SUBREGION_SUFFIX)


def looks_like_spineps_subregions(ids: Collection[int]) -> bool:
    """Whether non-zero ``ids`` are SPINEPS subregion ids only, with at least three parts of a vertebra
    (41-50: arch, processes, body), as every subregion mask of a spine holds. (TotalSegmentator v2 numbers
    T4..C1 40-50 too, but a map of those vertebrae alone, with no other structure, is what ``--label-scheme
    totalsegmentator`` is for.)"""
    present = {int(i) for i in ids if int(i) != 0}
    return bool(present) and present <= set(_SPINEPS_SUBREGIONS) and len(present & _SPINEPS_PARTS) >= 3


VERSE_MAX_ID = max(_VERSE_NAMES)
EXTRA_STRUCTURE_MIN_ID = 100
"""Spine tools that number vertebrae as VerSe put other structures at 100 and above (SPINEPS: discs
100 + the level above, endplates 200 + ...; SPIDER: spinal canal 100, discs 201...)."""


def recognise_scheme(labels: Collection[int]) -> tuple[LabelScheme, str]:
    """(scheme, why) for a label map holding the non-zero ids ``labels`` (``--label-scheme auto``).

    * one value of :data:`BINARY_MASK_VALUES` (1 or 255): a binary mask;
    * SPINEPS subregion ids only, with several parts of a vertebra (:func:`looks_like_spineps_subregions`):
      :data:`SPINEPS_SUBREGIONS`, in which nothing is one vertebra;
    * every id in 1..28, or VerSe vertebra ids plus ids of 100 and above (discs, endplates, canal of
      spine tools that number vertebrae as VerSe): VerSe; unless a transitional vertebra stands without the
      levels it sits between (28 T13 without T12 or L1, 25 L6 without L5: a TotalSegmentator --roi_subset map
      of L4, L5 and the sacrum is 28, 27, 25), which is :data:`UNKNOWN`: name the numbering;
    * every id in 1..117 and some in 29..99 (ids VerSe does not use; TotalSegmentator's vertebrae L3..C1,
      heart, vessels, muscles): TotalSegmentator v2 'total'. v1 and 'vertebrae_mr' maps cannot be told
      from v2 and VerSe by their ids: name them with ``--label-scheme``;
    * anything else: :data:`UNKNOWN`.
    """
    ids = sorted({int(label) for label in labels if int(label) != 0})
    if len(ids) == 1 and ids[0] in BINARY_MASK_VALUES:
        return BINARY_MASK, f"a single value, {ids[0]}"
    shown = _id_summary(ids)
    if looks_like_spineps_subregions(ids):
        return SPINEPS_SUBREGIONS, f"ids {shown}: SPINEPS's subregions (41 arch, 49 body, ...), parts of every vertebra"
    if ids and ids[-1] <= VERSE_MAX_ID and (lone := _lone_transitional(ids)):
        named = ", ".join(f"{i} {_TOTALSEG_V2[i - 1]}" for i in ids if i <= len(_TOTALSEG_V2))
        return UNKNOWN, (
            f"ids {shown}: read as VerSe, {lone}, which a VerSe map never holds alone; read as TotalSegmentator "
            f"v2 (a --roi_subset run) they are {named}"
        )
    if ids and ids[-1] <= VERSE_MAX_ID:
        return VERSE, f"ids {shown}, all within VerSe's 1-{VERSE_MAX_ID}"
    if ids and ids[-1] <= len(_TOTALSEG_V2) and any(VERSE_MAX_ID < i < EXTRA_STRUCTURE_MIN_ID for i in ids):
        return TOTALSEGMENTATOR, f"ids {shown}: ids from {VERSE_MAX_ID + 1} to 99 are not VerSe's"
    low = [i for i in ids if i < EXTRA_STRUCTURE_MIN_ID]
    if low and all(i <= VERSE_MAX_ID for i in low):
        return VERSE, f"ids {shown}: VerSe vertebrae, other structures numbered {EXTRA_STRUCTURE_MIN_ID} and up"
    return UNKNOWN, f"ids {shown} match neither VerSe nor TotalSegmentator"


def _lone_transitional(ids: Collection[int]) -> str:
    """'' or what makes ids within 1..28 unlikely to be VerSe's: its transitional vertebrae without the
    neighbours they sit between (28 T13 without T12 19 or L1 20; 25 L6 without L5 24 but beside 27 or 28).
    A VerSe map with a mislabelled L6 alone (a poor prediction) stays VerSe."""
    found = set(ids)
    lone = []
    if 28 in found and not found & {19, 20}:
        lone.append("28 (T13) without T12 or L1")
    if 25 in found and 24 not in found and found & {27, 28}:  # with the coccyx or T13: TotalSegmentator's L5/L4
        lone.append("25 (L6) without L5")
    return " and ".join(lone)


def _id_summary(ids: Sequence[int], most: int = 8) -> str:
    """'20-24, 120' for a sorted id list (runs joined), cut after ``most`` runs."""
    runs: list[list[int]] = []
    for label in ids:
        if runs and label == runs[-1][1] + 1:
            runs[-1][1] = label
        else:
            runs.append([label, label])
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs]
    return ", ".join(parts[:most]) + (", ..." if len(parts) > most else "")


def choose_scheme(requested: str, labels: Collection[int], coded: LabelScheme | None = None) -> tuple[LabelScheme, str]:
    """(scheme, one line saying which and why) for a label map with the non-zero ids ``labels``.

    ``requested``: 'auto' or a key of :data:`SCHEMES`. ``coded``: the scheme a DICOM SEG's segment codes
    and labels give (:func:`vertrefine.dicom_seg.read_seg`); it wins over any request, since a SEG says
    what each segment is. A single value 1 or 255 is a binary mask under 'auto' and 'verse'.
    Raises ValueError for an unknown request.
    """
    if requested != "auto" and requested not in SCHEMES:
        raise ValueError(f"unknown label scheme {requested!r}; use one of {', '.join(SCHEME_CHOICES)}")
    if coded is not None:
        return coded, "labels read from the DICOM SEG's segment codes and names"
    ids = {int(label) for label in labels if int(label) != 0}
    if requested == "auto":
        scheme, why = recognise_scheme(ids)
        if scheme is UNKNOWN:
            return scheme, f"labels not recognised ({why})"
        return scheme, f"labels read as {scheme.title} ({why}; --label-scheme sets it)"
    if requested == "verse" and len(ids) == 1 and ids <= BINARY_MASK_VALUES:
        return BINARY_MASK, f"labels read as a binary mask (a single value, {min(ids)})"
    return SCHEMES[requested], f"labels read as {SCHEMES[requested].title} (--label-scheme {requested})"


def label_scheme_of(volume: Volume, requested: str = "auto") -> tuple[LabelScheme, str]:
    """The numbering of ``volume``'s label ids and one line saying which and why.

    A DICOM SEG's segments say what they are (:func:`vertrefine.dicom_seg.read_seg` records the scheme
    their codes and names give in ``source.meta["label_scheme"]``); other inputs follow ``requested``
    (:func:`choose_scheme`; 'auto': recognised from the ids). Raises ValueError for an unknown request.
    """
    coded = volume.source.meta.get("label_scheme") if volume.source.kind == "dicom-seg" else None
    return choose_scheme(requested, volume.labels, coded)


def level_order_problem(
    scheme: LabelScheme, placed: Iterable[tuple[int, float]], tolerance_mm: float = 5.0
) -> str | None:
    """Why the vertebra levels of ``scheme`` cannot be the ones of this map, or None.

    ``placed``: (label id, superior coordinate of its centre, LPS z in mm). In a body the levels run from
    the head down (C1 above C2 ...). When most pairs of levelled vertebrae more than ``tolerance_mm``
    apart lie the other way round, the map is not numbered as ``scheme`` says (e.g. TotalSegmentator's
    'vertebrae_mr' or a dataset numbering from L5 up read as VerSe), or its header flips superior/inferior.
    """
    ranked = [(LEVELS.index(level), z, label) for label, z in placed if (level := scheme.level(label))]
    agree = disagree = 0
    for (rank_a, z_a, _), (rank_b, z_b, _) in combinations(ranked, 2):
        if rank_a == rank_b or abs(z_a - z_b) <= tolerance_mm:
            continue
        if (rank_a < rank_b) == (z_a > z_b):
            agree += 1
        else:
            disagree += 1
    if disagree <= agree:
        return None
    top_down = ", ".join(scheme.name(label) for _, _, label in sorted(ranked, key=lambda r: -r[1]))
    return (
        f"read as {scheme.title}, its vertebrae run {top_down} from head to feet, against the anatomy: "
        "the numbering is another one, or the header flips superior and inferior"
    )


# --- --labels -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelSelection:
    """What ``--labels`` names: label ids (in the map's own numbering) and levels (in any scheme's spelling)."""

    ids: frozenset[int] = frozenset()
    levels: frozenset[str] = frozenset()
    text: str = ""

    @classmethod
    def of(cls, value: LabelSelection | Collection[int]) -> LabelSelection:
        """A selection from itself or from a collection of label ids."""
        if isinstance(value, LabelSelection):
            return value
        ids = frozenset(int(v) for v in value)
        return cls(ids=ids, text=_id_summary(sorted(ids)))

    def resolve(self, scheme: LabelScheme) -> frozenset[int]:
        """The ids this selection names in ``scheme``: its ids, plus the ids of its levels there."""
        return self.ids | scheme.ids_of_levels(self.levels)


def parse_label_selection(text: str) -> LabelSelection:
    """Label ids and levels from '20-24,19', 'L1-L5,T12' or 'vertebrae_L3' (ranges inclusive).

    An id range runs over ids; a level range over :data:`LEVELS` in anatomical order ('T12-L1' holds
    T13 when the map has one). Raises ValueError for text naming neither, backwards ranges, mixed ranges
    and 0 (the background).
    """
    ids: set[int] = set()
    levels: set[str] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part.isdigit():
            ids.add(int(part))
            continue
        if canonical_level(part) is not None:
            levels.add(canonical_level(part) or "")
            continue
        ends = _range_ends(part)
        if ends is None:
            raise ValueError(f"{part!r} is neither a label id nor a level name such as L1, T12 or vertebrae_L3")
        low, high = ends
        if isinstance(low, int) and isinstance(high, int):
            if high < low:
                raise ValueError(f"range {part!r} runs backwards")
            ids.update(range(low, high + 1))
        elif isinstance(low, str) and isinstance(high, str):
            first, last = LEVELS.index(low), LEVELS.index(high)
            if last < first:
                raise ValueError(f"range {part!r} runs backwards (levels run from C1 down)")
            levels.update(LEVELS[first : last + 1])
        else:
            raise ValueError(f"range {part!r} mixes an id and a level; write ids or levels on both sides")
    if (not ids and not levels) or 0 in ids:
        raise ValueError(f"{text!r} names no label ids (0 is background)")
    return LabelSelection(frozenset(ids), frozenset(levels), text.strip())


def _range_ends(part: str) -> tuple[int | str, int | str] | None:
    """The two ends of 'a-b' (ids or canonical levels; level names may hold '_', never '-'), or None."""
    pieces = part.split("-")
    if len(pieces) != 2:
        return None
    ends: list[int | str] = []
    for piece in pieces:
        piece = piece.strip()
        if piece.isdigit():
            ends.append(int(piece))
        elif (level := canonical_level(piece)) is not None:
            ends.append(level)
        else:
            return None
    return ends[0], ends[1]


__all__ = [
    "BINARY_MASK",
    "BINARY_MASK_VALUES",
    "LEVELS",
    "LUMBAR_LABELS",
    "SCHEMES",
    "SPINEPS_SUBREGIONS",
    "SPINEPS_SUBREGION_NOTE",
    "SCHEME_CHOICES",
    "TOTALSEGMENTATOR",
    "TOTALSEGMENTATOR_V1",
    "TOTALSEGMENTATOR_VERTEBRAE_MR",
    "UNKNOWN",
    "VERSE",
    "LabelScheme",
    "LabelSelection",
    "canonical_level",
    "is_spineps_subregion_name",
    "looks_like_spineps_subregions",
    "choose_scheme",
    "label_for_level",
    "label_scheme_of",
    "level_name",
    "level_order_problem",
    "parse_label_selection",
    "recognise_scheme",
]
