"""DICOM SEG (highdicom): coded anatomy, reading and writing, and reading a DICOM folder or file of either kind.

Orientation: as for image series (:mod:`vertrefine.dicom_series`), a SEG becomes an array ``[k, j, i]`` =
``[slice, row, column]`` whose ``k`` points along the normal row x column. Use :mod:`vertrefine.io` rather
than this module.

SEG written from a SEG: the new SEG references the series the input SEG referenced. When that series
is found next to the input (its own folder, sub-folders or sibling folders), its headers are used. When
it is not, the references are carried over from the input SEG itself: its Referenced Series and Source
Image sequences are copied, and each frame's Derivation Image Sequence points at the source instance
that the input SEG recorded at the same position (left empty, as the standard allows, where unknown).

De-identified series (emptied UIDs, see :mod:`vertrefine.dicom_series`): see :func:`write_dicom_seg` for
what a SEG of such a series references.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from . import __version__
from .atomic import atomic_path
from .dicom_series import (
    NO_SERIES_UID,
    SEG_SOP_CLASSES,
    DicomSeries,
    choose_series,
    class_uid_of,
    dicom_series_geometry,
    instance_uid_of,
    is_no_series_uid,
    read_header,
    read_series,
    scan_folder,
    series_geometry,
    series_of_file,
)
from .errors import InputError, OutputError
from .labels import LEVELS, LabelScheme, canonical_level, label_for_level, label_scheme_of, level_name
from .volume import Geometry, Source, Volume

MAX_SCANNED_FILES = 5000
"""Limit on DICOM headers read while looking for a SEG's source series around it."""
_MODALITY_OF_SOP_CLASS = {"1.2.840.10008.5.1.4.1.1.2": "CT", "1.2.840.10008.5.1.4.1.1.4": "MR"}
_PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
_TYPE2_IMAGE_KEYWORDS = (*_PATIENT_STUDY_KEYWORDS, "SliceThickness")


# --- coded anatomy ---------------------------------------------------------------------------------

SEGMENT_CATEGORY = codes.SCT.AnatomicalStructure  # SCT 91723000, CID 7150
GENERIC_VERTEBRA = codes.SCT.Vertebra  # SCT 51282000
OTHER_STRUCTURE = codes.SCT.AnatomicalStructure
"""Property type of a structure vertrefine names but has no code for (an organ of a NIfTI label map)."""
S1_VERTEBRA = pydicom.sr.coding.Code("65985001", "SCT", "S1 vertebra")  # CID 7151; not in pydicom's dictionary


def property_type_for_level(level: str | None) -> pydicom.sr.coding.Code:
    """SNOMED CT code (CID 7151) of a vertebra level: 'L1 vertebra' (66794005) for 'L1', 'Sacrum' ...

    Levels without a code of their own (L6, T13) and None get the generic 'Vertebra' (51282000); the
    segment label still names the level.
    """
    if level == "S1":
        return S1_VERTEBRA
    keyword = {"sacrum": "Sacrum", "coccyx": "Coccyx"}.get(level or "", f"{level}Vertebra")
    try:
        return getattr(codes.SCT, keyword)
    except AttributeError:
        return GENERIC_VERTEBRA


def property_type_for_label(label: int) -> pydicom.sr.coding.Code:
    """SNOMED CT code (CID 7151) of a VerSe label: 'L1 vertebra' (66794005) for 20, 'Sacrum' for 26, ...
    (:func:`property_type_for_level` of its level; ids that are no VerSe level get 'Vertebra')."""
    name = level_name(label)
    return property_type_for_level(name if name in LEVELS else None)


SPINE_REGION_CODES: dict[str, str] = {"122494005": "C", "122495006": "T", "122496007": "L"}
"""SNOMED CT 'Cervical spine', 'Thoracic spine', 'Lumbar spine' (structure; DICOM CID 4, Common Anatomic
Regions), with the letter of their levels. Coded as a segment's property type they say 'a vertebra of this
region' (some tools code a lumbar vertebra so); as its anatomic region, where a 'Vertebra' segment lies."""

_LEVEL_OF_CODE: dict[str, str] = {
    code.value: level for level in LEVELS if (code := property_type_for_level(level)).value != GENERIC_VERTEBRA.value
}


# --- reading DICOM folders and files ---------------------------------------------------------------


def read_dicom_folder(folder: Path, *, series_uid: str | None = None) -> Volume:
    """Read the SEG or the label-map image series held by ``folder``."""
    series = scan_folder(folder)
    chosen = choose_series(folder, series, series_uid)
    if chosen.is_seg:
        if len(chosen.files) > 1:
            names = ", ".join(f.name for f in chosen.files[:5])
            raise InputError(
                folder, f"holds {len(chosen.files)} SEG instances of one series ({names})", "pass one SEG file"
            )
        return read_seg(chosen.files[0], nearby=[s for s in series if not s.is_seg])
    return read_series(chosen, folder)


def read_dicom_file(file: Path, *, series_uid: str | None = None) -> Volume:
    """Read a DICOM SEG file; an image file stands for the series it belongs to in its folder."""
    dataset = read_header(file)
    if dataset.get("Modality") == "SEG" or dataset.get("SOPClassUID") in SEG_SOP_CLASSES:
        return read_seg(file)
    return read_series(series_of_file(file, dataset, series_uid), file.parent)


# --- reading SEG -----------------------------------------------------------------------------------


def _geometry_from_hd_affine(affine: np.ndarray, shape: tuple[int, int, int]) -> Geometry:
    """highdicom maps (slice, row, column) to LPS; vertrefine's index axes (i, j, k) are (column, row, slice)."""
    linear = np.asarray(affine, dtype=float)[:3, [2, 1, 0]]
    spacing = np.linalg.norm(linear, axis=0)
    return Geometry(shape, spacing, np.asarray(affine, dtype=float)[:3, 3], linear / spacing)


def _hd_affine_from_geometry(geometry: Geometry) -> np.ndarray:
    affine = geometry.index_to_physical_matrix()
    affine[:3, :3] = affine[:3, [2, 1, 0]]
    return affine


def segment_level(description: Dataset) -> str | None:
    """The vertebra level a SEG segment stands for: from its SegmentLabel ('L3', 'vertebrae_L3',
    'L3 vertebra', 'Vertebra L3', 'Lumbar vertebra 3'), else from its SegmentedPropertyTypeCodeSequence
    (SNOMED CT, CID 7151: 'L3 vertebra' 36470004, 'Sacrum', 'S1 vertebra' ...), else from a number in its
    label ('Vertebra 3', 'bone 3') and the spine region it is coded in (:data:`SPINE_REGION_CODES`: 'Lumbar
    spine' makes it L3); None for other anatomy and for a vertebra of unknown level (a region code and no
    number: its level is not guessed from its position)."""
    label = str(description.get("SegmentLabel", "") or "")
    level = canonical_level(label)
    if level is None:
        for item in description.get("SegmentedPropertyTypeCodeSequence", []) or []:
            level = _LEVEL_OF_CODE.get(str(item.get("CodeValue", ""))) or level
    region = _spine_region(description)
    if level is None and region and _is_vertebra_code(description):
        numbers = re.findall(r"\d+", label)
        if len(numbers) == 1:
            level = canonical_level(f"{region}{int(numbers[0])}")
    return level


def _spine_region(description: Dataset) -> str | None:
    """'C', 'T' or 'L' when the segment's property type or anatomic region is a spine region's code."""
    for keyword in ("SegmentedPropertyTypeCodeSequence", "AnatomicRegionSequence"):
        for item in description.get(keyword, []) or []:
            if (letter := SPINE_REGION_CODES.get(str(item.get("CodeValue", "")))) is not None:
                return letter
    return None


def _is_vertebra_code(description: Dataset) -> bool:
    """The segment is coded as a vertebra without saying which: 'Vertebra' (51282000), or a spine region
    ('Lumbar spine' 122496007, ...) as its property type."""
    items = description.get("SegmentedPropertyTypeCodeSequence", []) or []
    return any(str(item.get("CodeValue", "")) in (GENERIC_VERTEBRA.value, *SPINE_REGION_CODES) for item in items)


def segment_labels(seg: hd.seg.Segmentation, path: Path | None = None) -> dict[int, int]:
    """Label id for each segment number: a named or coded vertebra level gets its VerSe id; any other
    segment keeps its segment number, or the next free id when that number is taken. Which segments are
    vertebrae is told by their codes and labels (:func:`segment_scheme`), never by these ids.

    Two segments naming one level would become one label (one of them lost): refused, InputError."""
    levels: dict[int, int | None] = {}
    for number in seg.segment_numbers:
        level = segment_level(seg.get_segment_description(number))
        levels[number] = None if level is None else label_for_level(level)
        twins = [n for n, label in levels.items() if label is not None and label == levels[number] and n != number]
        if twins:
            raise InputError(
                path,
                f"segments {twins[0]} and {number} both name {level}: one would overwrite the other",
                "name each segment by its own level (or code it only as 'Vertebra') and export the SEG again",
            )
    used = {label for label in levels.values() if label is not None}
    result: dict[int, int] = {}
    for number, label in levels.items():
        if label is None:
            label = number
            while label in used:
                label += 1
            used.add(label)
        result[number] = label
    return result


def segment_scheme(seg: hd.seg.Segmentation, labels: dict[int, int]) -> LabelScheme:
    """The numbering of a SEG read as a label map with ``labels`` (segment number -> label id): each
    label's name is its segment's SegmentLabel; it is a vertebra of a level when :func:`segment_level`
    says so, a vertebra of unknown level when coded 'Vertebra' alone, else another structure."""
    names: dict[int, str] = {}
    levels: dict[int, str] = {}
    unlevelled: set[int] = set()
    for number, label in labels.items():
        description = seg.get_segment_description(number)
        names[label] = str(description.get("SegmentLabel", "") or f"segment {number}")
        level = segment_level(description)
        if level is not None:
            levels[label] = level
        elif _is_vertebra_code(description):
            unlevelled.add(label)
    return LabelScheme("dicom-seg", "the DICOM SEG's segment codes", names, levels, frozenset(unlevelled))


def read_seg(file: Path, *, nearby: Sequence[DicomSeries] = ()) -> Volume:
    """Read a DICOM SEG as a label map; segments become label ids (see :func:`segment_labels`).

    When the referenced series is found (among ``nearby`` or in folders around ``file``) and the SEG's
    frames lie on its slices, the label map is placed on the whole series' grid, so that SEGs of one
    series share a grid whatever slices they cover; otherwise the grid is the SEG's own frames.
    """
    try:
        seg = hd.seg.segread(file)
        volume_geometry = seg.get_volume_geometry()
    except Exception as exc:  # highdicom/pydicom raise many types on malformed objects
        raise InputError(file, f"cannot read this DICOM SEG ({type(exc).__name__}: {exc})", "re-export it") from exc
    if volume_geometry is None:
        raise InputError(file, "its frames do not form a regular 3D volume", "pass a SEG of a 3D series")
    labels = segment_labels(seg, file)
    shape = tuple(int(n) for n in volume_geometry.spatial_shape)
    array = np.zeros(shape, dtype=np.uint16 if max(labels.values(), default=0) < 65536 else np.int32)
    fractional = seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    for number, label in labels.items():
        part = seg.get_volume(segment_numbers=[number], rescale_fractional=True)
        if part.spatial_shape != shape or not np.allclose(part.affine, volume_geometry.affine, atol=1e-4):
            raise InputError(file, f"segment {number} does not share the SEG's grid", "re-export it")
        mask = part.array[..., 0]
        array[(mask >= 0.5) if fractional else (mask > 0)] = label  # overlaps: the later segment wins
    geometry = _geometry_from_hd_affine(volume_geometry.affine, shape)
    directions = geometry.direction_matrix
    if float(np.cross(directions[:, 0], directions[:, 1]) @ directions[:, 2]) < 0:
        # Stack slices along row x column, as a series is read, so both give the same grid.
        top = geometry.index_to_physical(np.array([0.0, 0.0, shape[0] - 1.0]))
        directions = directions * np.array([1.0, 1.0, -1.0])
        array = np.ascontiguousarray(array[::-1])
        geometry = Geometry(shape, geometry.spacing, top, directions)
    referenced = [
        str(uid) for item in seg.get("ReferencedSeriesSequence", []) or [] if (uid := item.get("SeriesInstanceUID"))
    ]
    source_series = _find_source_series(file, referenced, nearby, set() if referenced else _referenced_instances(seg))
    if source_series is not None:
        try:
            source_geometry, order = series_geometry(source_series, file)
        except InputError:  # an unusable neighbour is no reason to refuse the SEG: keep its own grid
            source_series = None
    if source_series is not None:
        placed = _place_on_grid(array, geometry, source_geometry)
        if placed is not None:
            array, geometry = placed, source_geometry
        source_series = DicomSeries(
            source_series.uid,
            [source_series.files[i] for i in order],
            [source_series.datasets[i] for i in order],
        )
    meta: dict[str, Any] = {
        "dataset": seg,
        "segment_labels": labels,
        "label_scheme": segment_scheme(seg, labels),
        "referenced_series_uids": referenced,
        "source_series": source_series,
        "geometry": geometry,
    }
    return Volume(array, geometry, Source(Path(file), "dicom-seg", meta))


def _referenced_instances(seg: Dataset) -> set[str]:
    """SOPInstanceUIDs of the images a SEG references (series, source and per-frame references)."""
    items = [
        item
        for series in seg.get("ReferencedSeriesSequence", []) or []
        for item in series.get("ReferencedInstanceSequence", []) or []
    ]
    items += list(seg.get("SourceImageSequence", []) or [])
    for frame in seg.get("PerFrameFunctionalGroupsSequence", []) or []:
        for derivation in frame.get("DerivationImageSequence", []) or []:
            items += list(derivation.get("SourceImageSequence", []) or [])
    return {str(uid) for item in items if (uid := item.get("ReferencedSOPInstanceUID"))}


def _find_source_series(
    file: Path, uids: Sequence[str], nearby: Sequence[DicomSeries], instances: Collection[str] = ()
) -> DicomSeries | None:
    """The first referenced series found among ``nearby``, else in the SEG's folder, sub-folders and siblings.

    ``uids`` are the series UIDs the SEG references; a SEG of a series without SeriesInstanceUID
    references none, and its source is the series without one that holds any of its ``instances``.
    """

    def is_source(series: DicomSeries) -> bool:
        if series.is_seg:
            return False
        if series.uid in uids:
            return True
        return is_no_series_uid(series.uid) and any(instance_uid_of(ds) in instances for ds in series.datasets)

    for series in nearby:
        if is_source(series):
            return series
    wanted = list(uids) or ([NO_SERIES_UID] if instances else [])
    if not wanted:
        return None
    folder = file.parent
    candidates = [folder]
    for parent in (folder, folder.parent) if folder.parent != folder else (folder,):
        try:
            candidates += sorted(p for p in parent.iterdir() if p.is_dir() and p not in candidates)
        except OSError:
            continue
    budget = [MAX_SCANNED_FILES]
    for candidate in candidates:
        for uid in wanted:
            try:
                found = scan_folder(candidate, uid=uid, budget=budget)
            except OSError:
                continue
            for series in found:
                if is_source(series):
                    return series
        if budget[0] <= 0:
            break
    return None


def _place_on_grid(array: np.ndarray, geometry: Geometry, target: Geometry) -> np.ndarray | None:
    """``array`` embedded in the larger ``target`` grid when its voxels are a run of target slices.

    Both grids stack their slices along row x column (see the module docstring), so no flip is needed.
    """
    if geometry.shape[1:] != target.shape[1:] or not np.allclose(geometry.spacing, target.spacing, rtol=1e-3):
        return None
    if not np.allclose(geometry.direction, target.direction, atol=1e-4):
        return None
    index = target.physical_to_index(np.asarray(geometry.origin))
    start = int(round(index[2]))
    if not np.allclose(index, [0.0, 0.0, start], atol=1e-2) or start < 0 or start + array.shape[0] > target.shape[0]:
        return None
    placed = np.zeros(target.shape, dtype=array.dtype)
    placed[start : start + array.shape[0]] = array
    return placed


# --- writing SEG -----------------------------------------------------------------------------------


def write_dicom_seg(
    volume: Volume,
    path: str | Path,
    *,
    source_images: str | Path | Sequence[Dataset | str | Path] | None = None,
    like: Volume | None = None,
    scheme: LabelScheme | None = None,
    refined: Collection[int] | None = None,
) -> Path:
    """Write ``volume`` as a BINARY DICOM SEG, one segment per label present, atomically; return the path.

    Segments (:func:`_segment_descriptions`): a label that came from a segment of the SEG ``like`` was
    read from, and that vertrefine did not refine, keeps that segment's description (number, label,
    codes, algorithm) as it was. A refined vertebra, and any label of a NIfTI or image-series input, is
    described by vertrefine: its level ('L1', coded SCT 'Anatomical Structure' / '<level> vertebra', CID
    7150 / 7151), or its name in ``scheme`` ('spleen', coded 'Anatomical Structure') for other anatomy,
    algorithm type AUTOMATIC, algorithm 'vertrefine' with its version. ``scheme``: the numbering of the
    label ids (default: :func:`vertrefine.labels.label_scheme_of` ``like``, auto). ``refined``: the labels
    vertrefine refined (default: every vertebra of ``scheme``). Segment numbers run 1..n (a BINARY SEG
    needs them so): the input SEG's segments first, in their order, so that they keep their numbers
    when all are present. The SEG
    references its source series: ``source_images`` (datasets, files, or a series folder) when given;
    else the series that ``like`` (default ``volume.source``) was read from; for a ``like`` read from a
    SEG, the series that SEG referenced (see the module docstring). On the source series' grid
    (:func:`vertrefine.dicom_series.dicom_series_geometry`) each frame references the source instance it
    lies on (a label map holding the series' voxels in another axis order, as dcm2niix writes them, is put in
    the series' order first); on another grid (refine's 1 mm output of a thick-slice series) highdicom
    writes the label map's own plane
    positions, orientation and pixel measures, and the SEG references the source series as a whole
    (Referenced Series Sequence) with no per-frame source instance, as the standard allows.

    Source series whose UIDs were emptied by de-identification: an empty SOPInstanceUID or SOPClassUID
    is taken from the file meta (MediaStorageSOPInstanceUID / ...ClassUID), so the SEG references every
    source instance by its real UID (Source Image Sequence, and per frame the Derivation Image
    Sequence) and shares its FrameOfReferenceUID, which places it on the images. With an empty
    StudyInstanceUID the SEG gets a new study UID of its own (it cannot join a study without a UID),
    derived from the source instances' UIDs so that every SEG of that series shares it.
    With an empty SeriesInstanceUID the Referenced Series Sequence is left out rather than naming an
    empty or invented series (an empty UID would pair the SEG with any other blanked series): viewers
    that pair a SEG with its images by series UID will not do so; those that place it by frame of
    reference and positions will, and :func:`vertrefine.io.read_label_map` finds such a series next
    to the SEG by its instance UIDs. Refused, with one line: source images without a
    FrameOfReferenceUID, or without a SOPInstanceUID even in their file meta.
    """
    path = Path(path)
    if not volume.labels:
        raise OutputError(f"{path}: nothing to write: the label map has no labelled voxel")
    source = like.source if like is not None else volume.source
    restore_from: Dataset | None = None
    where = source.path or path
    if source_images is not None:
        datasets = _source_datasets(source_images, path)
        where = Path(source_images) if isinstance(source_images, (str, Path)) else path
    elif source.kind == "dicom-series":
        datasets = source.meta["series"].datasets
    elif source.kind == "dicom-seg" and source.meta.get("source_series") is not None:
        datasets = source.meta["source_series"].datasets
    elif source.kind == "dicom-seg":
        restore_from = source.meta["dataset"]
        datasets = _reference_stubs(restore_from, where)
    else:
        raise InputError(
            source.path or path,
            f"a DICOM SEG must reference the DICOM images it segments, and this label map came from "
            f"{'a ' + source.kind + ' file' if source.kind != 'memory' else 'memory'}",
            "pass the source DICOM series folder (source_images / --source-series), or write NIfTI",
        )
    datasets = _prepared_sources(datasets, where)
    if isinstance(source_images, (str, Path)):  # the series' own axis order, so frames lie on its images
        grid = dicom_series_geometry(Path(source_images))
        if not volume.geometry.same_grid(grid, tol=1e-6) and volume.geometry.same_voxels(grid):
            volume = volume.reoriented(grid)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="vertrefine", family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    if scheme is None:
        scheme = label_scheme_of(like if like is not None else volume)[0]
    segments = _segment_descriptions(volume.labels, source, scheme, refined, algorithm)
    labels = [label for label, _ in segments]
    lookup = np.zeros(max(labels) + 1, dtype=np.uint16 if len(labels) > 255 else np.uint8)
    lookup[labels] = np.arange(1, len(labels) + 1)
    pixels = hd.Volume(
        array=lookup[volume.array],
        affine=_hd_affine_from_geometry(volume.geometry),
        coordinate_system="PATIENT",
        frame_of_reference_uid=datasets[0].FrameOfReferenceUID,
    )
    descriptions = [description for _, description in segments]
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=_series_number(datasets[0]),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="vertrefine",
            manufacturer_model_name="vertrefine",
            software_versions=__version__,
            device_serial_number="0",
            content_label="VERTEBRAE",
            content_description="Vertebra segmentation (vertrefine)",
            series_description="Vertebrae (vertrefine)",
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise InputError(
            where, f"cannot build a DICOM SEG on these source images ({exc})", "check the source series"
        ) from exc
    _describe_own_grid(seg, volume.geometry)
    if not datasets[0].get("SeriesInstanceUID"):
        del seg.ReferencedSeriesSequence
        seg.SourceImageSequence = [_reference_item(ds.SOPClassUID, ds.SOPInstanceUID) for ds in datasets]
    if restore_from is not None:
        _restore_references(seg, restore_from)
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return path


def _segment_descriptions(
    labels: Sequence[int],
    source: Source,
    scheme: LabelScheme,
    refined: Collection[int] | None,
    algorithm: hd.AlgorithmIdentificationSequence,
) -> list[tuple[int, hd.seg.SegmentDescription]]:
    """(label id, its segment's description) for every label of a SEG being written, in segment order.

    Segments of the source SEG that are not vertebrae and hold no voxel are described too (empty), so that
    the other segments keep their numbers; a vertebra missing from ``labels`` is left out."""
    original: dict[int, tuple[int, Dataset]] = {}
    if source.kind == "dicom-seg":
        seg = source.meta["dataset"]
        for number, label in source.meta["segment_labels"].items():
            original[label] = (number, seg.get_segment_description(number))
    made = set(scheme.vertebrae(labels) if refined is None else refined)
    empty = [label for label in original if label not in labels and not scheme.is_vertebra(label)]
    ordered = sorted([*labels, *empty], key=lambda label: (original[label][0] if label in original else 1 << 20, label))
    out: list[tuple[int, hd.seg.SegmentDescription]] = []
    for number, label in enumerate(ordered, start=1):
        if label in original and label not in made:  # passes through as the input SEG described it
            description = hd.seg.SegmentDescription.from_dataset(original[label][1], copy=True)
            description.SegmentNumber = number
        else:
            description = _vertrefine_description(number, label, scheme, algorithm)
        out.append((label, description))
    return out


def _vertrefine_description(
    number: int, label: int, scheme: LabelScheme, algorithm: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    """vertrefine's description of segment ``number`` holding ``label``: a vertebra coded by its level
    (CID 7151; 'Vertebra' when unknown), any other structure named as ``scheme`` names it."""
    level = scheme.level(label)
    if level is not None or scheme.is_vertebra(label):
        name = level or ("vertebrae" if scheme.binary else scheme.name(label))
        code = property_type_for_level(level)
    else:
        name, code = scheme.name(label), OTHER_STRUCTURE
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name,
        segmented_property_category=SEGMENT_CATEGORY,
        segmented_property_type=code,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_id=name,
        tracking_uid=hd.UID(),
    )


def _describe_own_grid(seg: Dataset, geometry: Geometry) -> None:
    """Make the SEG's shared Pixel Measures describe its frames when they do not lie on the source's slices.

    highdicom copies the source images' Pixel Measures when the row/column spacing and orientation match
    (a 1 x 1 x 5 mm series written on a 1 mm grid would state 5 mm slices), and keeps the source's
    SliceThickness. Frames without a source instance under them (no Derivation Image Sequence) lie on
    their own grid: PixelSpacing is (row, column) = (j, i) spacing, SpacingBetweenSlices and SliceThickness
    the k spacing (mm).
    """
    frames = seg.PerFrameFunctionalGroupsSequence
    if any(frame.get("DerivationImageSequence") for frame in frames):
        return
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    spacing_i, spacing_j, spacing_k = geometry.spacing
    measures.PixelSpacing = [_ds(spacing_j), _ds(spacing_i)]
    measures.SpacingBetweenSlices = _ds(spacing_k)
    measures.SliceThickness = _ds(spacing_k)


def _ds(value: float) -> str:
    """A millimetre value as a DICOM decimal string (at most 16 characters)."""
    return f"{value:.10g}"[:16]


def _source_datasets(source_images: str | Path | Sequence[Dataset | str | Path], path: Path) -> list[Dataset]:
    if isinstance(source_images, (str, Path)):
        folder = Path(source_images)
        if folder.is_file():  # one image file stands for its series
            return series_of_file(folder, read_header(folder), None).datasets
        if not folder.is_dir():
            raise InputError(folder, "is not a folder of DICOM images", "pass the source series folder")
        images = [s for s in scan_folder(folder) if not s.is_seg]
        return choose_series(folder, images, None).datasets
    datasets = []
    for item in source_images:
        if isinstance(item, Dataset):
            datasets.append(item)
            continue
        try:
            datasets.append(pydicom.dcmread(item, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError, EOFError, TypeError) as exc:
            raise InputError(item, "is not a readable DICOM image", "pass the source series' files") from exc
    if not datasets:
        raise InputError(path, "no source images were given", "pass the source series folder")
    return datasets


def seg_source_geometry(source_images: str | Path) -> Geometry:
    """Grid of the image series that a SEG written with ``source_images`` (a folder, or one of its files)
    would reference, after checking that a SEG can reference it (what :func:`write_dicom_seg` needs).

    For checking a ``--source-series`` before any case runs. Raises InputError naming the path: missing,
    not a DICOM image series, several series, no FrameOfReferenceUID or SOPInstanceUID.
    """
    path = Path(source_images)
    if not path.exists():
        raise InputError(path, "does not exist", "pass the folder of the DICOM image series the SEG references")
    _prepared_sources(_source_datasets(path, path), path)
    return dicom_series_geometry(path)


def _prepared_sources(datasets: Sequence[Dataset], where: Path) -> list[Dataset]:
    """The source headers as highdicom needs them; changed ones are copies, the callers' stay untouched.

    Adds the empty type 2 attributes highdicom reads where missing, takes an empty SOPInstanceUID /
    SOPClassUID from the file meta, and gives a series without StudyInstanceUID a new one (see
    :func:`write_dicom_seg`).
    """
    remedy = "de-identify the series keeping its UIDs (or replacing them consistently), or write NIfTI (.nii.gz)"
    if not all(ds.get("FrameOfReferenceUID") for ds in datasets):
        raise InputError(
            where, "the source images have no FrameOfReferenceUID, so a DICOM SEG cannot be placed on them", remedy
        )
    new_study = None
    if not any(ds.get("StudyInstanceUID") for ds in datasets):
        # The same for every SEG of these images, so that they share one study.
        sources = sorted(instance_uid_of(ds) for ds in datasets)
        new_study = generate_uid(entropy_srcs=["vertrefine study", datasets[0].FrameOfReferenceUID, *sources])
    prepared = []
    for dataset in datasets:
        changes: dict[str, Any] = {kw: None for kw in _TYPE2_IMAGE_KEYWORDS if kw not in dataset}
        if not dataset.get("SOPInstanceUID"):
            changes["SOPInstanceUID"] = instance_uid_of(dataset)
        if not dataset.get("SOPClassUID"):
            changes["SOPClassUID"] = class_uid_of(dataset)
        if not (changes.get("SOPInstanceUID", True) and changes.get("SOPClassUID", True)):
            raise InputError(
                where,
                "a source image has no SOPInstanceUID or SOPClassUID, not even in its file meta, "
                "so a DICOM SEG cannot reference it",
                remedy,
            )
        if new_study is not None:
            changes["StudyInstanceUID"] = new_study
        if "SeriesInstanceUID" not in dataset:
            changes["SeriesInstanceUID"] = ""
        if changes:
            dataset = copy.deepcopy(dataset)  # copy.copy would share (and change) the caller's elements
            for keyword, value in changes.items():
                setattr(dataset, keyword, value)
        prepared.append(dataset)
    return prepared


def _series_number(source: Dataset) -> int:
    try:
        return int(source.get("SeriesNumber") or 0) % 100000 + 1000
    except (TypeError, ValueError):
        return 1000


def _known_source_positions(seg: Dataset) -> dict[str, np.ndarray]:
    """Position of each source instance that a SEG's frames record as spatially aligned with them."""
    known: dict[str, np.ndarray] = {}
    for frame in seg.get("PerFrameFunctionalGroupsSequence", []):
        planes = frame.get("PlanePositionSequence")
        if not planes:
            continue
        position = np.asarray(planes[0].ImagePositionPatient, dtype=float)
        for derivation in frame.get("DerivationImageSequence", []) or []:
            for item in derivation.get("SourceImageSequence", []) or []:
                if item.get("SpatialLocationsPreserved", "YES") == "YES" and "ReferencedFrameNumber" not in item:
                    known[str(item.ReferencedSOPInstanceUID)] = position
    return known


def _reference_stubs(seg: Dataset, path: Path) -> list[Dataset]:
    """Header-only stand-ins for the images a SEG references, to build a new SEG referencing them.

    Only patient/study/series/frame-of-reference identity matters: :func:`_restore_references`
    replaces every reference highdicom derives from them by the input SEG's own references.
    """
    series_items = seg.get("ReferencedSeriesSequence") or []
    instances = _instance_items(seg)
    if not instances or "FrameOfReferenceUID" not in seg:
        raise InputError(
            path,
            "this DICOM SEG does not say which series it segments",
            "pass the source DICOM series folder (source_images / --source-series)",
        )
    shared = seg.SharedFunctionalGroupsSequence[0]
    first = instances[0]
    stub = Dataset()
    for keyword in _PATIENT_STUDY_KEYWORDS:
        setattr(stub, keyword, seg.get(keyword))
    stub.SeriesInstanceUID = series_items[0].get("SeriesInstanceUID") if series_items else ""
    stub.SOPClassUID = first.ReferencedSOPClassUID
    stub.SOPInstanceUID = first.ReferencedSOPInstanceUID
    stub.Modality = _MODALITY_OF_SOP_CLASS.get(str(first.ReferencedSOPClassUID), "OT")
    stub.FrameOfReferenceUID = seg.FrameOfReferenceUID
    stub.Rows, stub.Columns = seg.Rows, seg.Columns
    stub.ImageOrientationPatient = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    stub.PixelSpacing = shared.PixelMeasuresSequence[0].PixelSpacing
    stub.SliceThickness = shared.PixelMeasuresSequence[0].get("SliceThickness")
    frame = seg.PerFrameFunctionalGroupsSequence[0]
    stub.ImagePositionPatient = frame.PlanePositionSequence[0].ImagePositionPatient
    return [stub]


def _instance_items(seg: Dataset) -> list[Dataset]:
    """The SEG's references to whole source instances: its Referenced Series, else its Source Image Sequence."""
    items = [
        item
        for series in seg.get("ReferencedSeriesSequence", []) or []
        for item in series.get("ReferencedInstanceSequence", []) or []
    ]
    return items or list(seg.get("SourceImageSequence", []) or [])


def _restore_references(seg: Dataset, original: Dataset) -> None:
    """Make ``seg`` reference what ``original`` (the SEG it was derived from) referenced."""
    if "ReferencedSeriesSequence" in original:
        seg.ReferencedSeriesSequence = copy.deepcopy(original.ReferencedSeriesSequence)
    elif "ReferencedSeriesSequence" in seg:
        del seg.ReferencedSeriesSequence
    instances = _instance_items(original)
    if "SourceImageSequence" in original:
        seg.SourceImageSequence = copy.deepcopy(original.SourceImageSequence)
    else:
        seg.SourceImageSequence = [
            _reference_item(item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) for item in instances
        ]
    known = _known_source_positions(original)
    classes = {str(item.ReferencedSOPInstanceUID): item.ReferencedSOPClassUID for item in instances}
    aligned = _same_frame_layout(seg, original) and bool(known)
    uids = list(known)
    positions = np.array([known[uid] for uid in uids]) if uids else np.zeros((0, 3))
    for frame in seg.PerFrameFunctionalGroupsSequence:
        frame.DerivationImageSequence = []
        if not aligned:
            continue
        position = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        distance = np.linalg.norm(positions - position, axis=1)
        nearest = int(np.argmin(distance))
        if distance[nearest] > 1e-2 or uids[nearest] not in classes:
            continue
        item = _reference_item(classes[uids[nearest]], uids[nearest])
        item.PurposeOfReferenceCodeSequence = [
            hd.sr.CodedConcept.from_code(codes.cid7202.SourceImageForImageProcessingOperation)
        ]
        item.SpatialLocationsPreserved = "YES"
        derivation = Dataset()
        derivation.DerivationCodeSequence = [hd.sr.CodedConcept.from_code(codes.cid7203.SegmentationImageDerivation)]
        derivation.SourceImageSequence = [item]
        frame.DerivationImageSequence = [derivation]


def _reference_item(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item


def _same_frame_layout(a: Dataset, b: Dataset) -> bool:
    """True when two multi-frame objects have frames of one size, orientation and pixel spacing."""
    try:
        sa, sb = a.SharedFunctionalGroupsSequence[0], b.SharedFunctionalGroupsSequence[0]
        return (
            (a.Rows, a.Columns) == (b.Rows, b.Columns)
            and np.allclose(
                [float(v) for v in sa.PlaneOrientationSequence[0].ImageOrientationPatient],
                [float(v) for v in sb.PlaneOrientationSequence[0].ImageOrientationPatient],
                atol=1e-4,
            )
            and np.allclose(
                [float(v) for v in sa.PixelMeasuresSequence[0].PixelSpacing],
                [float(v) for v in sb.PixelMeasuresSequence[0].PixelSpacing],
                rtol=1e-4,
            )
        )
    except (AttributeError, IndexError, KeyError):
        return False
