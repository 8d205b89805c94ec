"""The training patch cache: built once from CT label maps, read memory-mapped, split by individual.

Cache (:func:`build_patch_cache`). Each case of ``--data`` (any layout :func:`vertrefine.cases.find_cases`
accepts) is read, resampled onto the 1 mm working grid, split into vertebra instances and cropped into
128^3 patches centred on each instance's centre of mass, exactly as ``refine`` will crop them. Per patch the
cache keeps the 1 mm mask (``np.packbits``, 256 KB), its 64^3 soft occupancy (2x2x2 block mean, float16,
512 KB: what the networks see) and, with ``degraded_variants=k``, ``k`` thick-slice versions of that
occupancy, made by :func:`vertrefine.degrade.degrade` on the whole working-grid case (so damage comes
from the whole spine) on the simulated acquisition's native grid, put back on the working grid by the
label-aware resampling refine uses for thick inputs, and cropped at the clean instance's box.

On disk (``cache_dir``)::

    index.json            parameters, cases (source key, rows, errors), one entry per patch
    lowres-G.npy          [N, 64, 64, 64] float16      memory-mapped when read
    masks-G.npy           [N, 262144] uint8            packed 128^3 masks
    degraded-G.npy        [N, k, 64, 64, 64] float16   only when k > 0
    shards/KEY.npz        one freshly processed case, until merged into generation G

A case's key is a hash of the cache parameters, its resolved path and the names, sizes and mtimes of its
files. A rebuild reuses the rows of every case whose key is unchanged (no volume is read), processes new or
changed cases (to shards, so an interrupted build resumes) and, only when something changed, writes the
next generation of the arrays and then ``index.json`` (each file atomically; old files are removed last).
Cases that fail with :class:`~vertrefine.errors.InputError` are remembered as skipped under the same key.

For the training loop:

* build on one process (DDP: rank 0, then a barrier, then :meth:`PatchCache.open` elsewhere); a rebuild
  that changes the cache replaces its array files, so reopen caches opened before it;
* call ``dataset.set_epoch(e)`` (and ``DistributedSampler.set_epoch(e)``) before iterating each epoch, with
  ``persistent_workers=False`` (the default), so that DataLoader workers get the new epoch;
* :attr:`PatchCache.fingerprint` identifies the contents and order of a cache: store it in checkpoints, as
  indices are only meaningful for the same cache;
* the arrays are memory-mapped: reading touches page cache (counted in RSS, but reclaimable), not heap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import atomic_path
from ..cases import Case, case_name, find_cases, is_dicom_file, is_nifti
from ..conventions import PATCH_SIZE, WORKING_SPACING_MM
from ..corruptions import corrupt
from ..degrade import CLEAN, degrade
from ..errors import InputError
from ..labels import BINARY_MASK_VALUES, label_for_level, level_name
from ..volume import Volume

if TYPE_CHECKING:  # io and spatial need SimpleITK: imported where the cache is built, so that training
    from .. import spatial  # from a built cache runs on machines with torch and numpy only

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PATCH = PATCH_SIZE
DOWNSAMPLE = 2
LOWRES = PATCH // DOWNSAMPLE
MASK_BYTES = PATCH**3 // 8
INDEX_NAME = "index.json"
SHARDS = "shards"
DEGRADE_AXES = ("sagittal", "axial", "coronal")
DEGRADE_SLICE_MM = (3.0, 7.0)
VARIANT_ERRORS = ("degrade", "families")
"""Where the errors of the degraded variants come from (``build_patch_cache(variant_errors=...)``)."""
_ARRAYS = ("lowres", "masks", "degraded")
BIDS_MASK = re.compile(r"_seg-vert_msk\.nii(\.gz)?$", re.IGNORECASE)
"""File names of VerSe's vertebra masks in its BIDS layout."""
_GENERATION_FILE = re.compile(r"^(lowres|masks|degraded)-\d+\.npy$")


# --------------------------------------------------------------------------------------------------
# Cache contents
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchEntry:
    """One cached vertebra patch."""

    index: int
    """Row in the cache."""
    case: str
    """Case name (file name without suffix, or DICOM folder name)."""
    source: str
    """The case's file or folder (resolved path)."""
    group: str
    """Split group: the case name without a trailing level (``spine_00003_L2`` -> ``spine_00003``)."""
    label: int
    """Label value in the source (for a binary mask: its single value)."""
    level: str
    """Vertebra level ('L1'), from the VerSe label or, for binary masks, the case name; '' when unknown."""
    instance_id: int
    box_start: tuple[int, int, int]
    """Patch box on the case's 1 mm working grid (array index k, j, i)."""
    voxels: int
    """Voxels of the instance at 1 mm (the whole instance, also outside the patch)."""
    variants: tuple[tuple[str, float], ...] = ()
    """Slice axis and thickness (mm) of each degraded variant."""


@dataclass(frozen=True)
class CacheEvent:
    """Progress of :func:`build_patch_cache`, one per case."""

    done: int
    total: int
    case: str
    status: str
    """'processed' (read now), 'reused' (from the cache) or 'skipped' (bad input; ``message`` says why)."""
    patches: int
    message: str = ""
    """One line: why the case was skipped, or which instances were left out."""


class PatchCache:
    """A built patch cache, read lazily: arrays are memory-mapped on first use (cheap to open and pickle)."""

    def __init__(self, path: Path, index: dict[str, Any]) -> None:
        self.path = Path(path)
        self.index = index
        self.params: dict[str, Any] = dict(index["params"])
        self.n_variants = int(self.params["degraded_variants"])
        self.entries: tuple[PatchEntry, ...] = tuple(
            PatchEntry(
                index=i,
                case=e["case"],
                source=e["source"],
                group=e["group"],
                label=int(e["label"]),
                level=e["level"],
                instance_id=int(e["instance_id"]),
                box_start=tuple(e["box_start"]),
                voxels=int(e["voxels"]),
                variants=tuple((v[0], float(v[1])) for v in e["variants"]),
            )
            for i, e in enumerate(index["entries"])
        )
        self._arrays: dict[str, np.ndarray] = {}

    @classmethod
    def open(cls, cache_dir: str | Path) -> PatchCache:
        cache_dir = Path(cache_dir)
        index = _read_index(cache_dir)
        if index is None:
            raise InputError(
                cache_dir, "is not a vertrefine patch cache (no readable index.json)", "build it from --data first"
            )
        return cls(cache_dir, index)

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = {}  # DataLoader workers re-map the files instead of receiving copies
        return state

    @property
    def fingerprint(self) -> str:
        """Hash of the parameters and every case's key: equal fingerprints, identical contents and order."""
        keys = [c["key"] for c in self.index["cases"]]
        return _hash([self.params, keys])[:16]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(source, reason) of the cases that could not be used."""
        return [(c["source"], c["error"]) for c in self.index["cases"] if c["error"]]

    def array(self, name: str) -> np.ndarray:
        """The memory-mapped array 'lowres' [N,64,64,64], 'masks' [N,262144] or 'degraded' [N,k,64,64,64]."""
        if name not in self._arrays:
            file = self.index["files"].get(name)
            if file is None:
                raise ValueError(f"this cache has no {name!r} array (built with degraded_variants=0?)")
            self._arrays[name] = np.load(self.path / file, mmap_mode="r")
        return self._arrays[name]

    def lowres(self, i: int) -> np.ndarray:
        """float16 [64, 64, 64] soft occupancy (2x2x2 mean of the 1 mm mask), read-only."""
        return self.array("lowres")[i]

    def mask(self, i: int) -> np.ndarray:
        """bool [128, 128, 128] 1 mm patch mask (as :func:`vertrefine.spatial.crop_instances` gives it)."""
        return np.unpackbits(self.array("masks")[i], count=PATCH**3).view(bool).reshape((PATCH,) * 3)

    def degraded_lowres(self, i: int, v: int) -> np.ndarray:
        """float16 [64, 64, 64] soft occupancy of degraded variant ``v`` of patch ``i``, read-only."""
        if not 0 <= v < self.n_variants:
            raise IndexError(f"variant {v} out of range: this cache has {self.n_variants} degraded variants")
        return self.array("degraded")[i, v]


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def find_training_cases(folder: str | Path) -> list[Case]:
    """The training cases of one ``--data`` path: a folder, or one label map file.

    A VerSe / BIDS tree (``derivatives/sub-*/..._seg-vert_msk.nii.gz``, found at any depth) gives its
    vertebra masks, named by file (``sub-verse004_seg-vert_msk``, split group ``sub-verse004``); any other
    folder gives the cases :func:`vertrefine.cases.find_cases` finds directly inside it; a NIfTI or DICOM
    (SEG) file is one case. Raises InputError (one line) for a path that is none of these.
    """
    folder = Path(folder)
    if folder.is_file():
        if is_nifti(folder) or is_dicom_file(folder):
            return [Case(case_name(folder), folder)]
        raise InputError(
            folder, "is not a label map (NIfTI or DICOM SEG)", "pass a folder of CT segmentations or one such file"
        )
    if not folder.exists():
        raise InputError(folder, "does not exist", "pass a folder of CT segmentations or one label map file")
    if folder.is_dir():
        bids = sorted(
            p for p in folder.rglob("*") if p.is_file() and BIDS_MASK.search(p.name) and not p.name.startswith(".")
        )
        if bids:
            cases = [Case(case_name(p), p) for p in bids]
            names = [c.name for c in cases]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise InputError(folder, f"holds several masks named {', '.join(duplicates)}", "keep one per subject")
            return cases
    return find_cases(folder)


def build_patch_cache(
    data_dir: str | Path | Sequence[str | Path],
    cache_dir: str | Path,
    *,
    degraded_variants: int = 0,
    clean_variants: int = 0,
    variant_errors: str = "degrade",
    seed: int = 0,
    min_voxels: int = 1000,
    drop_cut: bool = True,
    exclude_labels: Sequence[int] = (26, 27),
    workers: int = 1,
    on_progress: Callable[[CacheEvent], object] | None = None,
) -> PatchCache:
    """Cache the vertebra patches of every case in ``data_dir`` (reusing what ``cache_dir`` holds).

    Args:
        data_dir: folder (or folders, their cases in turn) of CT label maps (NIfTI, DICOM SEG, DICOM series
            folders, or a VerSe/BIDS tree: :func:`find_training_cases`): whole spines with one label per
            vertebra, binary masks of several vertebrae (split into connected components) or
            single-vertebra masks; any spacing and orientation.
        cache_dir: where the cache lives (created; reused and updated when it exists).
        degraded_variants: thick-slice variants stored per patch (0 = none); each has a random slice
            axis (sagittal, axial, coronal) and thickness (3-7 mm), seeded by ``(seed, case, variant)``.
        clean_variants: how many of those variants (the first ones) are clean thick slices: each slab's
            partial volume thresholded at 0.5 and nothing else (no boundary error, lost parts or islands),
            what a good segmentation of a thick-slice MRI gives; the others have every error of
            :func:`vertrefine.degrade.degrade`.
        variant_errors: the errors of the other variants: "degrade" (:func:`vertrefine.degrade.degrade`'s,
            thickness-scaled boundary error, lost posterior parts, islands) or "families" (a random draw of
            :data:`vertrefine.corruptions.TRAINING_FAMILIES` per variant, the ``mixed`` family; the held-out
            families ``mri-like`` and ``degrade`` are never used, so they stay a test of generalisation).
        seed: seed of the variants (ignored, and not part of the key, when there are none).
        min_voxels: instances smaller than this (1 mm voxels) are left out (fragments, tiny labels).
        drop_cut: leave out instances touching the edge of the scan's field of view in cases with more
            than one instance (the top and bottom vertebrae of a CT are often cut). A case with a single
            instance (a single-vertebra mask, maybe cropped tightly) always keeps it.
        exclude_labels: label values left out (default: sacrum 26 and coccyx 27 in VerSe numbering).
        workers: processes for the cases to (re)process; each holds one case's volumes in memory.
        on_progress: called with a :class:`CacheEvent` after each case; skipped cases are also logged.

    Raises InputError (one line) when ``data_dir`` holds no case or no usable patch.
    """
    folders = [Path(data_dir)] if isinstance(data_dir, (str, Path)) else [Path(d) for d in data_dir]
    cache_dir = Path(cache_dir)
    if degraded_variants < 0 or seed < 0 or workers < 1:
        raise ValueError("degraded_variants and seed must be non-negative and workers positive")
    if not 0 <= clean_variants <= degraded_variants:
        raise ValueError("clean_variants must be from 0 to degraded_variants")
    if variant_errors not in VARIANT_ERRORS:
        raise ValueError(f"variant_errors must be one of {', '.join(VARIANT_ERRORS)}, got {variant_errors!r}")
    data_dir = folders[0] if len(folders) == 1 else Path(", ".join(str(f) for f in folders))
    cases = [case for folder in folders for case in find_training_cases(folder)]
    if not cases:
        raise InputError(
            data_dir, "holds no label map (NIfTI, DICOM SEG or DICOM folder)", "pass a folder of CT vertebra masks"
        )
    params = {
        "format": FORMAT_VERSION,
        "patch": PATCH,
        "downsample": DOWNSAMPLE,
        "spacing_mm": WORKING_SPACING_MM,
        "degraded_variants": int(degraded_variants),
        "seed": int(seed) if degraded_variants else 0,
        "slice_mm": list(DEGRADE_SLICE_MM) if degraded_variants else [],
        "variant_grid": "native, resampled" if degraded_variants else "",
        "min_voxels": int(min_voxels),
        "drop_cut": bool(drop_cut),
        "exclude_labels": sorted(int(v) for v in exclude_labels),
    }
    if clean_variants:  # only then part of the key: caches built before the option stay valid
        params["clean_variants"] = int(clean_variants)
    if variant_errors != "degrade" and degraded_variants:
        params["variant_errors"] = variant_errors
    cache_dir.mkdir(parents=True, exist_ok=True)
    shard_dir = cache_dir / SHARDS
    shard_dir.mkdir(exist_ok=True)
    old_index = _read_index(cache_dir)
    old = PatchCache(cache_dir, old_index) if old_index is not None and old_index["params"] == params else None
    _remove_strays(cache_dir, old_index)
    old_cases = {c["key"]: c for c in old.index["cases"]} if old is not None else {}
    keys = [_case_key(case, params) for case in cases]

    total, done = len(cases), 0
    records: dict[str, dict[str, Any]] = {}

    def report(record: dict[str, Any], status: str) -> None:
        nonlocal done
        done += 1
        message = record["error"] or "; ".join(record["dropped"])
        if record["error"]:
            status = "skipped"
            log.warning("skipped %s", message)
        elif message:
            log.info("%s: %s", record["name"], message)
        if on_progress is not None:
            on_progress(CacheEvent(done, total, record["name"], status, len(record["entries"]), message))

    todo: list[tuple[Case, str]] = []
    for case, key in zip(cases, keys, strict=True):
        if key in old_cases:
            records[key] = _old_record(old, old_cases[key])
            report(records[key], "reused")
        elif (shard_dir / f"{key}.npz").exists() and (meta := _shard_meta(shard_dir / f"{key}.npz")) is not None:
            records[key] = meta
            report(meta, "reused")
        else:
            todo.append((case, key))

    for record in _process_all(todo, shard_dir, params, workers):
        records[record["key"]] = record
        report(record, "processed")

    ordered = [records[key] for key in keys]
    if old is not None and keys == [c["key"] for c in old.index["cases"]]:
        return old  # nothing changed: the cache on disk is the answer
    if not any(r["entries"] for r in ordered):
        skipped = sum(1 for r in ordered if r["error"])
        left_out = [d for r in ordered for d in r["dropped"]]
        why = f", {len(left_out)} vertebra(e) left out, e.g. {left_out[0]}" if left_out else ""
        raise InputError(
            data_dir,
            f"gives no usable vertebra patch ({total} case(s), {skipped} unreadable{why})",
            "pass CT label maps with one label per vertebra, or single-vertebra masks",
        )
    cache = _write_generation(cache_dir, params, ordered, old, old_index)
    for shard in shard_dir.iterdir():  # merged, stale (changed sources) or temporaries of an interrupted write
        shard.unlink(missing_ok=True)
    return cache


def _process_all(
    todo: list[tuple[Case, str]], shard_dir: Path, params: dict[str, Any], workers: int
) -> Iterable[dict[str, Any]]:
    """Process the cases (in order when serial, as they finish in a process pool)."""
    jobs = [(str(case.path.resolve()), case.name, str(shard_dir / f"{key}.npz"), key, params) for case, key in todo]
    if workers == 1 or len(jobs) < 2:
        for job in jobs:
            yield _process_case(*job)
        return
    context = multiprocessing.get_context("spawn")  # torch is imported here: no fork of its thread pools
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_worker_init) as pool:
        futures = [pool.submit(_process_case, *job) for job in jobs]
        try:
            for future in futures:
                yield future.result()
        except BaseException:  # a failed case or an interrupt: do not process the rest first
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _worker_init() -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # one core per worker process


def _process_case(path: str, name: str, shard: str, key: str, params: dict[str, Any]) -> dict[str, Any]:
    """Read, resample, split and crop one case; write its shard (arrays + metadata) and return the metadata."""
    from .. import io as label_io

    record: dict[str, Any] = {"name": name, "source": path, "key": key, "error": "", "dropped": [], "entries": []}
    arrays: dict[str, np.ndarray] = {}
    try:
        volume = label_io.read_label_map(path)
    except InputError as exc:
        record["error"] = str(exc)
    else:
        try:
            record, arrays = _patches_of(volume, record, params)
        except Exception:  # a bug or a resource error: fatal, but say which case
            log.error("failed while caching the patches of %s", path)
            raise
    with atomic_path(shard) as tmp:
        np.savez(tmp, meta=np.array(json.dumps(record)), **arrays)
    return record


def _patches_of(
    volume: Volume, record: dict[str, Any], params: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The patches of one validated label map: (record with its entries, arrays for the shard)."""
    from .. import spatial

    working = spatial.to_working_grid(volume)
    instance_array, instances = spatial.find_instances(working)
    instance_array = instance_array.astype(np.min_scalar_type(int(instance_array.max())), copy=False)  # memory
    values = {inst.label for inst in instances}
    binary = len(values) == 1 and values <= BINARY_MASK_VALUES  # a binary mask: its value names no level
    cut = _cut_instances(volume, working, instance_array) if params["drop_cut"] and len(instances) > 1 else set()
    kept = []
    for inst in instances:
        reason = _left_out(inst, cut, params)
        if reason:
            record["dropped"].append(f"{_describe(inst, binary)} left out ({reason})")
        else:
            kept.append(inst)
    crops = spatial.crop_instances(instance_array, kept)
    masks = np.zeros((len(crops), MASK_BYTES), np.uint8)
    lowres = np.zeros((len(crops), LOWRES, LOWRES, LOWRES), np.float16)
    for n, (_, _, patch) in enumerate(crops):
        mask = patch > 0.5
        masks[n] = np.packbits(mask)
        lowres[n] = block_mean(mask)
    k = params["degraded_variants"]
    degraded = np.zeros((len(crops), k, LOWRES, LOWRES, LOWRES), np.float16)
    variants: list[tuple[str, float]] = []
    if crops and k:
        instances_volume = working.with_array(instance_array)  # binary masks: degrade each instance apart
        for v in range(k):
            axis, slice_mm, degrade_seed = variant_settings(params["seed"], record["name"], v)
            variants.append((axis, slice_mm))
            # as refine sees a clinic's thick-slice segmentation: on its native grid, then put on the 1 mm
            # working grid by the same label-aware resampling
            clean = v < params.get("clean_variants", 0)
            if params.get("variant_errors", "degrade") == "families":
                ids = range(1, int(instance_array.max()) + 1)
                family = "clean" if clean else "mixed"
                native = corrupt(instances_volume, family, slice_mm=slice_mm, axis=axis, seed=degrade_seed, vertebrae=ids)
            else:
                noise = CLEAN if clean else {}  # degrade --clean's settings
                native = degrade(instances_volume, slice_mm=slice_mm, axis=axis, seed=degrade_seed, native=True, **noise)
            damaged = spatial.resample_labels(native, working.geometry).array
            for n, (inst, box, _) in enumerate(crops):
                degraded[n, v] = block_mean(spatial.crop(damaged, box) == inst.instance_id)
    record["entries"] = [
        {
            "case": record["name"],
            "source": record["source"],
            "group": split_group(record["name"]),
            "label": inst.label,
            "level": _level(inst, binary, record["name"]),
            "instance_id": inst.instance_id,
            "box_start": list(box.start),
            "voxels": inst.voxels,
            "variants": [list(v) for v in variants],
        }
        for inst, box, _ in crops
    ]
    arrays = {"masks": masks, "lowres": lowres}
    if k:
        arrays["degraded"] = degraded
    return record, arrays


def _left_out(inst: spatial.Instance, cut: set[int], params: dict[str, Any]) -> str:
    """Why an instance is not cached ('' when it is)."""
    if inst.label in params["exclude_labels"]:
        return "excluded label"
    if inst.voxels < params["min_voxels"]:
        return f"{inst.voxels} voxels < {params['min_voxels']}"
    if inst.instance_id in cut:
        return "cut by the field of view"
    return ""


def block_mean(mask: np.ndarray) -> np.ndarray:
    """float16 [64, 64, 64] mean over 2x2x2 blocks of a [128, 128, 128] mask (exact: multiples of 1/8)."""
    a = np.asarray(mask, dtype=bool).view(np.uint8)
    a = a[0::2] + a[1::2]  # pairwise sums along each axis in turn: contiguous and fast
    a = a[:, 0::2] + a[:, 1::2]
    a = a[:, :, 0::2] + a[:, :, 1::2]
    return a.astype(np.float16) * np.float16(1 / DOWNSAMPLE**3)


def variant_settings(seed: int, case: str, variant: int) -> tuple[str, float, int]:
    """(axis, slice_mm, degrade seed) of degraded variant ``variant`` of ``case``: a function of the three."""
    case_code = int.from_bytes(hashlib.sha256(case.encode()).digest()[:8], "little")
    rng = np.random.default_rng([int(seed), case_code, int(variant)])
    axis = DEGRADE_AXES[int(rng.integers(len(DEGRADE_AXES)))]
    slice_mm = round(float(rng.uniform(*DEGRADE_SLICE_MM)), 3)
    return axis, slice_mm, int(rng.integers(2**31 - 1))


def split_group(case: str) -> str:
    """The individual a case belongs to, so that one individual's files stay on one side of the split.

    BIDS names give their subject (``sub-verse004_seg-vert_msk`` -> ``sub-verse004``); other names lose a
    trailing vertebra level (``spine_00003_L2`` -> ``spine_00003``).
    """
    bids = re.match(r"(sub-[A-Za-z0-9]+)_", case)
    if bids:
        return bids.group(1)
    head, label = _trailing_level(case)
    return head if label is not None else case


def _trailing_level(case: str) -> tuple[str, int | None]:
    """('spine_00003', 21) for 'spine_00003_L2' (separators _ - . or space); (case, None) without a level."""
    match = re.fullmatch(r"(.+?)[_\-. ]([^_\-. ]+)", case)
    label = label_for_level(match.group(2)) if match else None
    return (match.group(1), label) if match and label is not None else (case, None)


def _level(inst: spatial.Instance, binary: bool, case: str) -> str:
    """The level of a labelled instance; for a binary mask, the level its case name ends with ('' if none)."""
    label = _trailing_level(case)[1] if binary else inst.label
    return level_name(label) if label is not None else ""


def _describe(inst: spatial.Instance, binary: bool) -> str:
    return f"instance {inst.instance_id}" if binary else f"label {inst.label} ({level_name(inst.label)})"


def _cut_instances(volume: Volume, working: Volume, instance_array: np.ndarray, depth: int = 2) -> set[int]:
    """Ids of instances within ``depth`` working voxels of the edge of the input's field of view."""
    if working.geometry.same_grid(volume.geometry, tol=1e-6):  # the field of view is the array: its faces
        faces = [np.moveaxis(instance_array, axis, 0)[s] for axis in range(3) for s in (np.s_[:depth], np.s_[-depth:])]
        ids = np.unique(np.concatenate([f.ravel() for f in faces]))
    else:
        import SimpleITK as sitk

        ones = volume.geometry.apply_to(sitk.GetImageFromArray(np.ones(volume.geometry.shape, np.uint8)))
        reference = working.geometry.reference_image()
        inside = sitk.GetArrayFromImage(sitk.Resample(ones, reference, sitk.Transform(), sitk.sitkNearestNeighbor))
        near_edge = ~_erode(inside.astype(bool), depth)
        ids = np.unique(instance_array[near_edge & (instance_array > 0)])
    return {int(i) for i in ids if i > 0}


def _erode(mask: np.ndarray, depth: int) -> np.ndarray:
    """``mask`` eroded by a cube of side ``2 depth + 1`` (outside the array counts as background)."""
    out = mask
    for axis in range(3):
        moved = np.moveaxis(out, axis, 0)
        keep = moved.copy()
        for d in range(1, depth + 1):
            keep[d:] &= moved[:-d]
            keep[:-d] &= moved[d:]
        keep[:depth] = False
        keep[-depth:] = False
        out = np.moveaxis(keep, 0, axis)
    return out


# --------------------------------------------------------------------------------------------------
# Cache files
# --------------------------------------------------------------------------------------------------


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _case_key(case: Case, params: dict[str, Any]) -> str:
    path = case.path.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and p.name[0] != ".")
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return _hash([params, str(path), stats])[:32]


def _read_index(cache_dir: Path) -> dict[str, Any] | None:
    try:
        index = json.loads((cache_dir / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or index.get("params", {}).get("format") != FORMAT_VERSION:
        return None
    files = [f for f in index.get("files", {}).values() if f]
    return index if all((cache_dir / f).is_file() for f in files) else None


def _shard_meta(shard: Path) -> dict[str, Any] | None:
    try:
        with np.load(shard) as data:
            return json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError):
        return None


def _old_record(old: PatchCache, case: dict[str, Any]) -> dict[str, Any]:
    first, count = case["first"], case["count"]
    return {
        "name": case["name"],
        "source": case["source"],
        "key": case["key"],
        "error": case["error"],
        "dropped": case["dropped"],
        "entries": old.index["entries"][first : first + count],
        "rows": (first, count),
    }


def _remove_strays(cache_dir: Path, index: dict[str, Any] | None) -> None:
    """Array files of no generation in use and temporaries of an interrupted write."""
    used = set((index or {}).get("files", {}).values())
    for path in cache_dir.iterdir():
        stale = _GENERATION_FILE.match(path.name) and path.name not in used
        if path.is_file() and (stale or ".part" in path.name):
            path.unlink(missing_ok=True)


def _write_generation(
    cache_dir: Path,
    params: dict[str, Any],
    records: list[dict[str, Any]],
    old: PatchCache | None,
    old_index: dict[str, Any] | None,
) -> PatchCache:
    """Merge reused rows and new shards into the next generation of arrays; write index.json last."""
    generation = int(old_index["generation"]) + 1 if old_index else 1
    k = params["degraded_variants"]
    total = sum(len(r["entries"]) for r in records)
    shapes = {
        "lowres": ((total, LOWRES, LOWRES, LOWRES), np.float16),
        "masks": ((total, MASK_BYTES), np.uint8),
        "degraded": ((total, k, LOWRES, LOWRES, LOWRES), np.float16),
    }
    names = [n for n in _ARRAYS if n != "degraded" or k]
    files = {n: f"{n}-{generation}.npy" for n in names}
    cases, entries = [], []
    with contextlib.ExitStack() as stack:
        outs = {}
        for n in names:
            tmp = stack.enter_context(atomic_path(cache_dir / files[n]))
            shape, dtype = shapes[n]
            outs[n] = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        row = 0
        for record in records:
            count = len(record["entries"])
            if count:
                if "rows" in record:
                    first = record["rows"][0]
                    for n in names:
                        outs[n][row : row + count] = old.array(n)[first : first + count]
                else:
                    with np.load(Path(cache_dir) / SHARDS / f"{record['key']}.npz") as shard:
                        for n in names:
                            outs[n][row : row + count] = shard[n]
            cases.append(
                {
                    "name": record["name"],
                    "source": record["source"],
                    "key": record["key"],
                    "error": record["error"],
                    "dropped": record["dropped"],
                    "first": row,
                    "count": count,
                }
            )
            entries.extend(record["entries"])
            row += count
        for array in outs.values():
            array.flush()
        outs.clear()
    index = {"params": params, "generation": generation, "files": files, "cases": cases, "entries": entries}
    with atomic_path(cache_dir / INDEX_NAME) as tmp:
        tmp.write_text(json.dumps(index, indent=1))
    if old_index:
        for f in old_index["files"].values():
            if f and f not in files.values():
                (cache_dir / f).unlink(missing_ok=True)
    return PatchCache(cache_dir, index)


# --------------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------------


def split_indices(
    cache: PatchCache, val_fraction: float = 0.1, seed: int = 0, val_groups: Sequence[str] = ()
) -> tuple[list[int], list[int]]:
    """Deterministic (train, validation) patch indices, whole split groups (individuals) on either side.

    With ``val_groups`` (split groups, see :func:`split_group`, or case names) those individuals are the
    validation set and ``val_fraction`` is ignored; a name that matches no patch raises ``ValueError``.

    Groups (:attr:`PatchEntry.group`) are ranked by a hash of ``(seed, group)`` and moved to validation in
    that order until it holds ``val_fraction`` of the patches; with ``val_fraction > 0`` and two or more
    groups, validation gets at least one group and training keeps at least one. Adding cases to the data
    leaves the rank of the existing groups unchanged.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    members: dict[str, list[int]] = {}
    for entry in cache.entries:
        members.setdefault(entry.group, []).append(entry.index)
    if val_groups:
        wanted = set(val_groups)
        known = {e.group for e in cache.entries} | {e.case for e in cache.entries}
        missing = sorted(wanted - known)
        if missing:
            raise ValueError(f"validation group(s) {', '.join(missing)} match no cached patch")
        chosen = [e.group in wanted or e.case in wanted for e in cache.entries]
        train = [e.index for e, c in zip(cache.entries, chosen, strict=True) if not c]
        val = [e.index for e, c in zip(cache.entries, chosen, strict=True) if c]
        return train, val
    ranked = sorted(members, key=lambda g: hashlib.sha256(f"{seed}\0{g}".encode()).hexdigest())
    target = val_fraction * len(cache)
    val_groups: set[str] = set()
    taken = 0
    for group in ranked[: max(len(ranked) - 1, 0)]:
        if val_fraction == 0 or (val_groups and taken >= target):
            break
        val_groups.add(group)
        taken += len(members[group])
    train = [e.index for e in cache.entries if e.group not in val_groups]
    val = [e.index for e in cache.entries if e.group in val_groups]
    return train, val
