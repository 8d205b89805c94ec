"""Training data: the patch cache (build, reuse, incremental update, variants), split and augmented dataset."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from dicom_helpers import make_series
from geometry_helpers import rotation

from vertrefine import io, spatial, synth
from vertrefine.degrade import degrade
from vertrefine.errors import InputError
from vertrefine.volume import Geometry, Volume

torch = pytest.importorskip("torch")

from vertrefine.train import dataset as data_set  # noqa: E402
from vertrefine.train import patch_cache as data  # noqa: E402
from vertrefine.train.dataset import PatchDataset, apply_draw, transform  # noqa: E402
from vertrefine.train.patch_cache import PatchCache, block_mean, build_patch_cache, split_indices  # noqa: E402
from vertrefine.train.validation import reconstruction_dice, validation_masks  # noqa: E402

CUT_SLICES = 25  # removed from the top of a spine so that its L1 runs out of the field of view


def oblique_grid(geometry: Geometry, spacing=(0.9, 1.2, 2.5), direction=None) -> Geometry:
    """An oblique anisotropic grid covering ``geometry``'s whole voxel box."""
    direction = rotation(0, 20) @ rotation(2, -12) if direction is None else direction
    spacing = np.asarray(spacing)
    corners = geometry.index_to_physical(
        np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in geometry.size_ijk])).reshape(3, -1).T
    )
    local = corners @ direction  # coordinates along the new grid's axes
    lo, hi = local.min(0), local.max(0)
    n = np.ceil((hi - lo) / spacing).astype(int) + 1
    return Geometry((n[2], n[1], n[0]), tuple(spacing), tuple(direction @ (lo + spacing / 2)), tuple(direction.ravel()))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def expected_patches(path: Path) -> list[tuple[spatial.Instance, spatial.PatchBox, np.ndarray]]:
    """The refine pipeline's patches of a case: read, working grid, instances, crop."""
    working = spatial.to_working_grid(io.read_label_map(path))
    return spatial.crop_instances(*spatial.find_instances(working))


@pytest.fixture(scope="module")
def spine() -> Volume:
    return synth.synth_spine(3)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, spine) -> Path:
    """A whole spine at 1 mm, the same spine cut at the top, another on an oblique anisotropic grid, a binary
    single-vertebra patch, a DICOM SEG of a 2 mm spine and a broken file."""
    root = tmp_path_factory.mktemp("train_data")
    folder = root / "data"
    folder.mkdir()
    io.write_label_map(spine, folder / "spine_a.nii.gz")
    cut = Volume(
        spine.array[:-CUT_SLICES].copy(),
        Geometry(
            (spine.array.shape[0] - CUT_SLICES, *spine.array.shape[1:]), spine.geometry.spacing, spine.geometry.origin
        ),
    )
    io.write_label_map(cut, folder / "spine_cut.nii.gz")
    other = synth.synth_spine(4)
    io.write_label_map(spatial.resample_labels(other, oblique_grid(other.geometry)), folder / "spine_oblique.nii.gz")
    ((_, patch),) = synth.synth_patches(6, levels=["L3"])
    io.write_label_map(patch, folder / "spine_00006_L3.nii.gz")
    coarse = synth.synth_spine(8, spacing=2.0)
    make_series(root / "ct", np.zeros(coarse.array.shape, np.uint16), spacing=(2.0,) * 3, origin=coarse.geometry.origin)
    io.write_dicom_seg(Volume(coarse.array, coarse.geometry), folder / "spine_seg.dcm", source_images=root / "ct")
    (folder / "broken.nii.gz").write_bytes(b"this is not a NIfTI file" * 10)
    return folder


@pytest.fixture(scope="module")
def built(dataset_dir, tmp_path_factory):
    events = []
    cache = build_patch_cache(dataset_dir, tmp_path_factory.mktemp("cache") / "c", on_progress=events.append)
    return cache, events


# --------------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------------


def test_cache_holds_a_patch_per_usable_vertebra(built, dataset_dir):
    cache, events = built
    by_case = {}
    for e in cache.entries:
        by_case.setdefault(e.case, []).append(e)
    assert set(by_case) == {"spine_a", "spine_cut", "spine_oblique", "spine_00006_L3", "spine_seg"}
    for case in ("spine_a", "spine_oblique", "spine_seg"):
        assert [e.level for e in by_case[case]] == ["L1", "L2", "L3", "L4", "L5"]
        assert [e.label for e in by_case[case]] == [20, 21, 22, 23, 24]
    assert [e.level for e in by_case["spine_cut"]] == ["L2", "L3", "L4", "L5"]  # L1 runs out of the scan
    single = by_case["spine_00006_L3"]
    assert len(single) == 1 and single[0].label == 1 and single[0].level == "L3" and single[0].group == "spine_00006"
    assert len(cache) == 20 and [e.index for e in cache.entries] == list(range(20))
    assert all(Path(e.source).is_absolute() and Path(e.source).exists() for e in cache.entries)

    status = {e.case: e.status for e in events}
    assert status["broken"] == "skipped" and status["spine_a"] == "processed"
    assert [e.done for e in events] == list(range(1, 7)) and all(e.total == 6 for e in events)
    broken = next(e for e in events if e.case == "broken")
    assert "broken.nii.gz" in broken.message and "\n" not in broken.message
    assert "L1" in next(e for e in events if e.case == "spine_cut").message
    assert cache.skipped == [(str((dataset_dir / "broken.nii.gz").resolve()), broken.message)]
    assert not list((cache.path / "shards").iterdir())


def test_masks_are_the_cropper_patches_and_lowres_their_block_mean(built, dataset_dir):
    cache, _ = built
    for case in ("spine_a", "spine_oblique", "spine_00006_L3", "spine_seg"):
        rows = [e for e in cache.entries if e.case == case]
        patches = expected_patches(dataset_dir / f"{case}{'.dcm' if case.endswith('seg') else '.nii.gz'}")
        assert len(rows) == len(patches)
        for entry, (instance, box, patch) in zip(rows, patches, strict=True):
            assert entry.instance_id == instance.instance_id and entry.box_start == box.start
            mask = cache.mask(entry.index)
            assert mask.dtype == bool and mask.shape == (128,) * 3
            np.testing.assert_array_equal(mask, patch > 0.5)
            low = cache.lowres(entry.index)
            assert low.dtype == np.float16 and low.shape == (64,) * 3
            np.testing.assert_array_equal(low, patch.reshape(64, 2, 64, 2, 64, 2).mean(axis=(1, 3, 5)))
    assert isinstance(cache.array("lowres"), np.memmap)  # memory-mapped, not loaded


def test_rebuild_reads_no_volume_and_open_is_lazy(built, dataset_dir, monkeypatch):
    cache, _ = built
    before = sorted(p.name for p in cache.path.iterdir())

    def fail(*args, **kwargs):
        raise AssertionError("a cached case was read again")

    monkeypatch.setattr(io, "read_label_map", fail)
    events = []
    again = build_patch_cache(dataset_dir, cache.path, on_progress=events.append)
    assert again.fingerprint == cache.fingerprint and len(again) == len(cache)
    assert {e.status for e in events} == {"reused", "skipped"}  # the broken file is remembered, not re-read
    assert sorted(p.name for p in cache.path.iterdir()) == before
    opened = PatchCache.open(cache.path)
    assert opened._arrays == {} and len(pickle.dumps(opened)) < 200_000
    np.testing.assert_array_equal(opened.mask(3), cache.mask(3))
    clone = pickle.loads(pickle.dumps(opened))  # what a DataLoader worker receives: files re-mapped
    assert clone._arrays == {} and np.array_equal(clone.lowres(3), cache.lowres(3))


@pytest.fixture()
def patch_dir(tmp_path) -> Path:
    folder = tmp_path / "patches"
    folder.mkdir()
    for level, patch in synth.synth_patches(9, levels=["L2", "L3", "L4"]):
        io.write_label_map(patch, folder / f"spine_00009_{level}.nii.gz")
    return folder


def counting_reads(monkeypatch) -> list[str]:
    reads, real = [], io.read_label_map

    def read(path, **kwargs):
        reads.append(Path(path).name)
        return real(path, **kwargs)

    monkeypatch.setattr(io, "read_label_map", read)
    return reads


def test_incremental_update_processes_only_new_and_changed_files(patch_dir, tmp_path, monkeypatch):
    moved = tmp_path / "spine_00009_L4.nii.gz"
    (patch_dir / "spine_00009_L4.nii.gz").rename(moved)
    first = build_patch_cache(patch_dir, tmp_path / "cache")
    assert [e.level for e in first.entries] == ["L2", "L3"]
    l3 = first.mask(1).copy()

    moved.rename(patch_dir / "spine_00009_L4.nii.gz")  # added
    changed = patch_dir / "spine_00009_L2.nii.gz"
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched
    reads = counting_reads(monkeypatch)
    second = build_patch_cache(patch_dir, tmp_path / "cache")
    assert sorted(reads) == ["spine_00009_L2.nii.gz", "spine_00009_L4.nii.gz"]
    assert [e.level for e in second.entries] == ["L2", "L3", "L4"]
    np.testing.assert_array_equal(second.mask(1), l3)
    assert second.fingerprint != first.fingerprint
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "index.json",
        "lowres-2.npy",
        "masks-2.npy",
        "shards",
    ]

    l4 = second.lowres(2).copy()
    (patch_dir / "spine_00009_L3.nii.gz").unlink()  # removed: no read, its rows dropped
    reads.clear()
    third = build_patch_cache(patch_dir, tmp_path / "cache")
    assert reads == [] and [e.level for e in third.entries] == ["L2", "L4"]
    np.testing.assert_array_equal(third.lowres(1), l4)


def test_an_interrupted_build_resumes_from_its_processed_cases(patch_dir, tmp_path, monkeypatch):
    def stop(event):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_patch_cache(patch_dir, tmp_path / "cache", on_progress=stop)
    assert not (tmp_path / "cache" / "index.json").exists()
    reads = counting_reads(monkeypatch)
    cache = build_patch_cache(patch_dir, tmp_path / "cache")
    assert reads == ["spine_00009_L3.nii.gz", "spine_00009_L4.nii.gz"] and len(cache) == 3


def test_other_parameters_make_another_cache_and_an_empty_result_is_one_error(patch_dir, tmp_path, monkeypatch):
    first = build_patch_cache(patch_dir, tmp_path / "cache")
    reads = counting_reads(monkeypatch)
    other = build_patch_cache(patch_dir, tmp_path / "cache", min_voxels=100)
    assert len(reads) == 3 and other.fingerprint != first.fingerprint and len(other) == 3
    assert other.params["min_voxels"] == 100
    with pytest.raises(InputError, match="no usable vertebra patch") as info:
        build_patch_cache(patch_dir, tmp_path / "cache", min_voxels=10**9)
    assert "\n" not in str(info.value) and str(patch_dir) in str(info.value)
    assert PatchCache.open(tmp_path / "cache").params["min_voxels"] == 100  # the last good cache is kept
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no label map"):
        build_patch_cache(tmp_path / "empty", tmp_path / "cache2")
    with pytest.raises(InputError, match="not a vertrefine patch cache"):
        PatchCache.open(tmp_path / "empty")


# --------------------------------------------------------------------------------------------------
# degraded variants
# --------------------------------------------------------------------------------------------------


def test_degraded_variants_are_the_degraded_case_cropped_at_the_clean_box(spine, tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    io.write_label_map(spine, folder / "spine_a.nii.gz")
    cache = build_patch_cache(folder, tmp_path / "cache", degraded_variants=2, seed=5)
    assert cache.n_variants == 2 and len(cache) == 5
    assert sorted(p.name for p in cache.path.glob("*.npy")) == ["degraded-1.npy", "lowres-1.npy", "masks-1.npy"]
    settings = [data.variant_settings(5, "spine_a", v) for v in range(2)]
    for entry in cache.entries:
        assert entry.variants == tuple((axis, mm) for axis, mm, _ in settings)
        for axis, mm, _ in settings:
            assert axis in ("sagittal", "axial", "coronal") and 3.0 <= mm <= 7.0
        clean = cache.lowres(entry.index).astype(np.float32) > 0.5
        for v in range(2):
            variant = cache.degraded_lowres(entry.index, v)
            assert variant.dtype == np.float16 and variant.shape == (64,) * 3
            assert 0.5 < dice(clean, variant.astype(np.float32) > 0.5) < 0.97
    assert data.variant_settings(5, "spine_a", 0) != data.variant_settings(6, "spine_a", 0)
    assert data.variant_settings(5, "spine_a", 0) != data.variant_settings(5, "spine_b", 0)

    # variant 1 again by hand: the whole working-grid case degraded on its native thick grid, put back on the
    # working grid as refine puts a thick input there, each instance cropped at its clean box
    working = spatial.to_working_grid(io.read_label_map(folder / "spine_a.nii.gz"))
    instance_array, instances = spatial.find_instances(working)
    axis, mm, seed = settings[1]
    native = degrade(working.with_array(instance_array), slice_mm=mm, axis=axis, seed=seed, native=True)
    assert max(native.geometry.spacing) == mm
    damaged = spatial.resample_labels(native, working.geometry).array
    for entry, (instance, box, _) in zip(cache.entries, spatial.crop_instances(instance_array, instances), strict=True):
        expected = block_mean(spatial.crop(damaged, box) == instance.instance_id)
        np.testing.assert_array_equal(cache.degraded_lowres(entry.index, 1), expected)
    with pytest.raises(IndexError):
        cache.degraded_lowres(0, 2)


# --------------------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------------------


def fake_cache(groups: dict[str, int], tmp_path: Path) -> PatchCache:
    """A cache index without arrays: ``count`` patches per case name (enough for splitting)."""
    entries = [
        {"case": case, "source": case, "group": data.split_group(case), "label": 20, "level": "L1",
         "instance_id": 20, "box_start": [0, 0, 0], "voxels": 1, "variants": []}
        for case, count in groups.items() for _ in range(count)
    ]  # fmt: skip
    params = {"degraded_variants": 0, "format": data.FORMAT_VERSION}
    return PatchCache(tmp_path, {"params": params, "cases": [], "files": {}, "entries": entries})


def test_split_keeps_each_spine_on_one_side_and_is_deterministic(tmp_path):
    names = {f"spine_{n:05d}": 5 for n in range(30)} | {f"spine_00100_L{k}": 1 for k in range(1, 6)}
    cache = fake_cache(names, tmp_path)
    train, val = split_indices(cache, 0.2, seed=1)
    assert sorted(train + val) == list(range(len(cache))) and not set(train) & set(val)
    groups = lambda idx: {cache.entries[i].group for i in idx}  # noqa: E731
    assert not groups(train) & groups(val)  # the five single-vertebra files of spine 100 stay together
    assert "spine_00100" in groups(train) | groups(val) and data.split_group("spine_00100_L3") == "spine_00100"
    assert 0.15 * len(cache) <= len(val) <= 0.3 * len(cache)
    assert split_indices(cache, 0.2, seed=1) == (train, val)
    assert split_indices(cache, 0.2, seed=2) != (train, val)
    assert split_indices(cache, 0.0, seed=1) == (list(range(len(cache))), [])

    bigger = fake_cache(names | {"spine_09999": 5}, tmp_path)  # adding a spine moves no other one
    assert groups(split_indices(bigger, 0.2, seed=1)[1]) - {"spine_09999"} <= groups(val)


def test_split_with_few_cases(tmp_path):
    two = fake_cache({"a": 5, "b": 1}, tmp_path)
    train, val = split_indices(two, 0.1)
    assert len(train) >= 1 and len(val) >= 1 and sorted(train + val) == list(range(6))
    one = fake_cache({"spine_00001_L1": 1, "spine_00001_L2": 1}, tmp_path)  # one spine: no validation
    assert split_indices(one, 0.5) == ([0, 1], [])
    with pytest.raises(ValueError):
        split_indices(two, 1.0)


# --------------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def variant_cache(tmp_path_factory) -> PatchCache:
    """A small cache with 2 degraded variants per patch (two single-vertebra files)."""
    root = tmp_path_factory.mktemp("variants")
    (root / "data").mkdir()
    for level, patch in synth.synth_patches(12, levels=["L4", "L5"]):
        io.write_label_map(patch, root / "data" / f"spine_00012_{level}.nii.gz")
    return build_patch_cache(root / "data", root / "cache", degraded_variants=2)


def test_items_without_augmentation_are_the_cached_maps(built):
    cache, _ = built
    dataset = PatchDataset(cache, [4, 2], augment=False)
    item = dataset[1]
    assert item["index"] == 2 and len(dataset) == 2
    for key in ("x", "target"):
        assert item[key].shape == (1, 64, 64, 64) and item[key].dtype == torch.float32
        np.testing.assert_array_equal(item[key][0].numpy(), cache.lowres(2).astype(np.float32))
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch["x"].shape == (2, 1, 64, 64, 64) and batch["index"].tolist() == [4, 2]


def test_augmentation_is_a_function_of_seed_epoch_and_index(built):
    cache, _ = built
    a = PatchDataset(cache, [0, 1, 2, 3], augment=True, seed=7)
    b = PatchDataset(cache, [3, 2], augment=True, seed=7)
    torch.testing.assert_close(a[3]["x"], b[0]["x"], rtol=0, atol=0)  # same index, other position
    a.set_epoch(4)
    b.set_epoch(4)
    torch.testing.assert_close(a[2]["target"], b[1]["target"], rtol=0, atol=0)
    first = a[2]["x"].clone()
    a.set_epoch(5)
    assert not torch.equal(a[2]["x"], first)
    assert not torch.equal(PatchDataset(cache, [2], augment=True, seed=8)[0]["x"], b[1]["x"])
    draws = [a.draw(i) for i in range(len(cache))]
    assert all(0.9 <= d.zoom <= 1.1 and max(abs(s) for s in d.shift) <= 3.5 and d.variant == -1 for d in draws)
    assert 0 < sum(d.flip for d in draws) < len(draws)
    for item in (a[0], a[1]):
        torch.testing.assert_close(item["x"], item["target"], rtol=0, atol=0)  # clean input: one transform
        assert float(item["x"].min()) >= 0.0 and float(item["x"].max()) <= 1.0
        assert not torch.equal(item["x"][0], torch.from_numpy(cache.lowres(item["index"]).astype(np.float32)))


def test_the_same_transform_moves_input_and_target(variant_cache):
    dataset = PatchDataset(variant_cache, [0, 1], augment=True, degraded_prob=1.0, seed=3)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for position, index in enumerate(dataset.indices):
            draw = dataset.draw(index)
            item = dataset[position]
            assert draw.variant in (0, 1)
            clean = torch.from_numpy(variant_cache.lowres(index).astype(np.float32))[None, None]
            noisy = torch.from_numpy(variant_cache.degraded_lowres(index, draw.variant).astype(np.float32))[None, None]
            torch.testing.assert_close(item["target"][None], apply_draw(clean, draw))
            torch.testing.assert_close(item["x"][None], apply_draw(noisy, draw))
            assert not torch.equal(item["x"], item["target"])
    half = PatchDataset(variant_cache, [0, 1], augment=False, degraded_prob=0.5, seed=0)
    used = []
    for epoch in range(40):
        half.set_epoch(epoch)
        used += [half.draw(i).variant for i in (0, 1)]
    assert 20 < sum(v >= 0 for v in used) < 60 and {-1, 0, 1} <= set(used)
    with pytest.raises(ValueError, match="degraded_variants"):
        PatchDataset(fake_cache({"a": 1}, variant_cache.path), [0], augment=False, degraded_prob=0.5)


def test_transform_flips_shifts_and_zooms_as_stated():
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.random((1, 2, 16, 16, 16), dtype=np.float32))
    torch.testing.assert_close(transform(maps, 1.0, (0.0, 0.0, 0.0), False), maps)
    torch.testing.assert_close(transform(maps, 1.0, (0.0, 0.0, 0.0), True), torch.flip(maps, dims=[4]))
    shifted = transform(maps, 1.0, (2.0, -1.0, 3.0), False)  # whole voxels: content moves, zeros come in
    expected = torch.zeros_like(maps)
    expected[..., 2:, :-1, 3:] = maps[..., :-2, 1:, :-3]
    torch.testing.assert_close(shifted, expected)

    ball = np.zeros((1, 1, 64, 64, 64), np.float32)
    k, j, i = np.ogrid[:64, :64, :64]
    ball[0, 0] = ((k - 31.5) ** 2 + (j - 31.5) ** 2 + (i - 31.5) ** 2) <= 12.0**2
    ball = torch.from_numpy(ball)
    for zoom in (0.9, 1.1):
        scaled = transform(ball, zoom, (0.0, 0.0, 0.0), False)
        assert float(scaled.sum()) / float(ball.sum()) == pytest.approx(zoom**3, rel=0.02)
        profiles = [scaled[0, 0].sum(dim=[a for a in range(3) if a != axis]) for axis in range(3)]
        centre = [float((profile * torch.arange(64)).sum() / profile.sum()) for profile in profiles]
        assert centre == pytest.approx([31.5] * 3, abs=0.05)


# --------------------------------------------------------------------------------------------------
# validation at 1 mm
# --------------------------------------------------------------------------------------------------


def test_reconstruction_dice_at_1mm(built):
    cache, _ = built
    indices = [0, 7]
    masks = validation_masks(cache, indices)
    assert masks.shape == (2, 1, 128, 128, 128) and masks.dtype == torch.bool
    soft = torch.from_numpy(np.stack([cache.lowres(i).astype(np.float32) for i in indices]))[:, None]
    logits = torch.logit(soft.clamp(1e-4, 1 - 1e-4))
    scores = reconstruction_dice(logits, masks)
    assert scores.shape == (2,) and bool((scores > 0.97).all()) and bool((scores < 1.0).all())
    assert float(reconstruction_dice(torch.full_like(logits, -5.0), masks).max()) == 0.0
    assert reconstruction_dice(torch.full((1, 1, 64, 64, 64), -5.0), torch.zeros(1, 1, 128, 128, 128)).item() == 1.0


def test_index_is_plain_json(built):
    cache, _ = built
    index = json.loads((cache.path / "index.json").read_text())
    assert index["params"]["degraded_variants"] == 0 and index["params"]["seed"] == 0
    assert [c["count"] for c in index["cases"] if c["name"] == "broken"] == [0]


def test_worker_processes_give_the_serial_cache(patch_dir, tmp_path):
    serial = build_patch_cache(patch_dir, tmp_path / "serial")
    parallel = build_patch_cache(patch_dir, tmp_path / "parallel", workers=2)
    assert parallel.entries == serial.entries and parallel.fingerprint == serial.fingerprint
    for name in ("lowres", "masks"):
        np.testing.assert_array_equal(parallel.array(name), serial.array(name))


# --------------------------------------------------------------------------------------------------
# real-data training: VerSe trees, several folders, explicit validation individuals, rotations
# --------------------------------------------------------------------------------------------------


def test_verse_bids_tree_is_read_as_it_comes_and_split_by_subject(tmp_path):
    spine = synth.synth_spine(21, levels=("L1", "L2"))
    root = tmp_path / "verse"
    for subject in ("sub-verse004", "sub-gl017"):
        folder = root / "derivatives" / subject
        folder.mkdir(parents=True)
        io.write_label_map(spine, folder / f"{subject}_seg-vert_msk.nii.gz")
        (folder / f"{subject}_seg-subreg_ctd.json").write_text("[]")  # centroids: not a mask
    (root / "rawdata" / "sub-verse004").mkdir(parents=True)
    io.write_label_map(spine, root / "rawdata" / "sub-verse004" / "sub-verse004_ct.nii.gz")  # the CT: not read
    cases = data.find_training_cases(root)
    assert [c.name for c in cases] == ["sub-gl017_seg-vert_msk", "sub-verse004_seg-vert_msk"]
    cache = build_patch_cache(root, tmp_path / "cache")
    assert {e.group for e in cache.entries} == {"sub-verse004", "sub-gl017"}
    train, val = split_indices(cache, val_groups=["sub-gl017"])
    assert {cache.entries[i].group for i in val} == {"sub-gl017"} and len(train) == len(val) == 2
    with pytest.raises(ValueError, match="sub-verse999"):
        split_indices(cache, val_groups=["sub-verse999"])


def test_several_data_folders_and_repeats_in_training(tmp_path):
    from vertrefine.train import loop
    from vertrefine.train.config import TrainConfig

    real, phantoms = tmp_path / "real", tmp_path / "phantoms"
    real.mkdir()
    phantoms.mkdir()
    io.write_label_map(synth.synth_spine(31, levels=("L3",)), real / "ct_a.nii.gz")
    io.write_label_map(synth.synth_spine(32, levels=("L3",)), real / "ct_b.nii.gz")
    io.write_label_map(synth.synth_spine(33, levels=("L4", "L5")), phantoms / "spine_00033.nii.gz")
    config = TrainConfig.from_options(
        out=tmp_path / "run", data_dir=[real, phantoms], data_repeat=(3, 1), val_groups=("ct_b",)
    )
    assert config.data_paths == [real, phantoms]
    cache = build_patch_cache(config.data_paths, config.cache_path)
    train, val = split_indices(cache, val_groups=config.val_groups)
    repeated = loop._repeated(cache, train, config)
    names = [cache.entries[i].case for i in repeated]
    assert names.count("ct_a") == 3 and names.count("spine_00033") == 2 and "ct_b" not in names
    dataset = PatchDataset(cache, repeated, augment=True)
    copies = [n for n, i in enumerate(repeated) if cache.entries[i].case == "ct_a"]
    first, second = (dataset[n]["target"] for n in copies[:2])
    assert not torch.equal(first, second)  # each copy gets its own augmentation
    with pytest.raises(InputError, match="data_repeat"):
        TrainConfig.from_options(out=tmp_path / "r2", data_dir=[real, phantoms], data_repeat=(3,))


def test_rotation_augmentation_turns_content_about_the_patch_centre():
    k, j, i = np.ogrid[:64, :64, :64]
    blob = np.zeros((1, 1, 64, 64, 64), np.float32)
    blob[0, 0] = ((k - 31.5) ** 2 + (j - 45.5) ** 2 + (i - 31.5) ** 2) <= 5.0**2  # off-centre along j
    turned = transform(torch.from_numpy(blob), 1.0, (0.0, 0.0, 0.0), False, rotation=(90.0, 0.0, 0.0))
    profiles = [turned[0, 0].sum(dim=[a for a in range(3) if a != axis]) for axis in range(3)]
    centre = [float((p * torch.arange(64)).sum() / p.sum()) for p in profiles]
    # a quarter turn about axis k moves the blob from +14 along j to +-14 along i, keeping k
    assert centre[0] == pytest.approx(31.5, abs=0.3) and centre[1] == pytest.approx(31.5, abs=0.3)
    assert abs(centre[2] - 31.5) == pytest.approx(14.0, abs=0.3)
    assert float(turned.sum()) == pytest.approx(float(blob.sum()), rel=0.02)
    np.testing.assert_allclose(
        data_set.rotation_matrix((10, -20, 30)) @ data_set.rotation_matrix((10, -20, 30)).T, np.eye(3), atol=1e-12
    )
    squeezed = transform(torch.from_numpy(blob), 1.0, (0.0, 0.0, 0.0), False, scales=(1.0, 1.0, 0.8))
    assert float(squeezed.sum()) / float(blob.sum()) == pytest.approx(0.8, rel=0.03)
    field = np.zeros((3, 4, 4, 4))
    field[2] = 2.0  # a uniform elastic displacement is a shift: the content moves by -2 voxels along i
    moved = transform(torch.from_numpy(blob), 1.0, (0.0, 0.0, 0.0), False, elastic=field)
    expected = transform(torch.from_numpy(blob), 1.0, (0.0, 0.0, -2.0), False)
    torch.testing.assert_close(moved, expected, atol=1e-5, rtol=0)


def test_clean_variants_and_corruption_family_variants(spine, tmp_path):
    from vertrefine.corruptions import corrupt

    folder = tmp_path / "one"
    folder.mkdir()
    io.write_label_map(spine, folder / "spine_a.nii.gz")
    cache = build_patch_cache(
        folder, tmp_path / "cache", degraded_variants=2, clean_variants=1, variant_errors="families", seed=5
    )
    assert cache.params["clean_variants"] == 1 and cache.params["variant_errors"] == "families"
    working = spatial.to_working_grid(io.read_label_map(folder / "spine_a.nii.gz"))
    instance_array, instances = spatial.find_instances(working)
    ids = range(1, int(instance_array.max()) + 1)
    crops = spatial.crop_instances(instance_array, instances)
    for v, family in enumerate(("clean", "mixed")):  # variant 0 clean slabs, variant 1 a training-family draw
        axis, mm, seed = data.variant_settings(5, "spine_a", v)
        native = corrupt(working.with_array(instance_array), family, slice_mm=mm, axis=axis, seed=seed, vertebrae=ids)
        damaged = spatial.resample_labels(native, working.geometry).array
        for entry, (instance, box, _) in zip(cache.entries, crops, strict=True):
            expected = block_mean(spatial.crop(damaged, box) == instance.instance_id)
            np.testing.assert_array_equal(cache.degraded_lowres(entry.index, v), expected)
    with pytest.raises(ValueError, match="variant_errors"):
        build_patch_cache(folder, tmp_path / "cache2", degraded_variants=1, variant_errors="mri-like")
    # without the new options the key is the one caches had before them
    assert "variant_errors" not in build_patch_cache(folder, tmp_path / "cache3", degraded_variants=1).params
