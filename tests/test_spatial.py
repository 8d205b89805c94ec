"""Tests for vertrefine.spatial: working grid, label resampling, instances, crop and stitch."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from geometry_helpers import rotation
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vertrefine.spatial import (
    PATCH_SIZE,
    WORKING_SPACING_MM,
    Instance,
    PatchBox,
    crop,
    crop_instances,
    find_instances,
    patch_box,
    resample_labels,
    resample_scalar,
    restore_labels,
    stitch,
    to_input_grid,
    to_working_grid,
    working_geometry,
)
from vertrefine.volume import Geometry, Volume

CENTRE = np.array([3.3, -12.1, 40.7])  # LPS mm; deliberately off any lattice


# The phantom's own orientation relative to LPS: generic, so that no flat face is parallel to the working
# grid's axes (a face exactly parallel to them is quantised coherently to 1 mm, a loss no resampler avoids).
PHANTOM_TILT = rotation(0, 11) @ rotation(1, -7) @ rotation(2, 13)


def grid(spacing, direction=None, extent=(64.0, 64.0, 100.0), centre=CENTRE) -> Geometry:
    """A grid with ``spacing`` and ``direction`` whose voxel box (about ``extent`` mm) is centred on ``centre``."""
    spacing = np.asarray(spacing, dtype=float)
    n = np.ceil(np.asarray(extent) / spacing).astype(int)
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    origin = np.asarray(centre) - direction @ ((n - 1) / 2 * spacing)
    return Geometry((n[2], n[1], n[0]), tuple(spacing), tuple(origin), tuple(direction.ravel()))


def voxel_centres(geometry: Geometry) -> np.ndarray:
    k, j, i = np.indices(geometry.shape, dtype=np.float32)
    ijk = np.stack([i, j, k], axis=-1).reshape(-1, 3)
    return geometry.index_to_physical(ijk).reshape(*geometry.shape, 3)


def vertebra_phantom(geometry: Geometry, dtype=np.uint8) -> Volume:
    """Three vertebra-sized labels: an ellipsoid with a canal, a box with a cavity and a notch, and an
    ellipsoid touching the box (so two labels share a surface)."""
    p = (voxel_centres(geometry) - CENTRE) @ PHANTOM_TILT
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    a = np.zeros(geometry.shape, dtype=dtype)
    body = (x / 20) ** 2 + (y / 15) ** 2 + ((z - 32) / 15) ** 2 <= 1
    a[body & (x**2 + (y - 4) ** 2 > 36)] = 20
    block = (np.abs(x) <= 20) & (np.abs(y) <= 15) & (np.abs(z) <= 12)
    a[block & (x**2 + y**2 + z**2 > 49) & ~((y > 8) & (np.abs(x) < 4))] = 21
    q = p @ rotation(2, 25).T
    lower = (q[..., 0] / 20) ** 2 + (q[..., 1] / 14) ** 2 + ((q[..., 2] + 27) / 15) ** 2 <= 1
    a[lower & (a == 0)] = 22
    return Volume(a, geometry)


def label_counts(array: np.ndarray, labels=(20, 21, 22)) -> np.ndarray:
    return np.array([np.count_nonzero(array == v) for v in labels], dtype=float)


def corners_lps(geometry: Geometry) -> np.ndarray:
    ijk = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in geometry.size_ijk])))
    return geometry.index_to_physical(ijk)


def assert_covers(working: Geometry, geometry: Geometry) -> None:
    lo = np.asarray(working.origin) - np.asarray(working.spacing) / 2
    hi = lo + np.asarray(working.size_ijk) * np.asarray(working.spacing)
    corners = corners_lps(geometry)
    assert np.all(corners >= lo - 1e-6) and np.all(corners <= hi + 1e-6)
    # and not wastefully: less than one working voxel of slack on each side
    assert np.all(corners.min(axis=0) - lo < np.asarray(working.spacing) + 1e-6)
    assert np.all(hi - corners.max(axis=0) < np.asarray(working.spacing) + 1e-6)


FLIP = np.diag([-1.0, -1.0, 1.0])
FLIP_Z = np.diag([1.0, 1.0, -1.0])
OBLIQUE = rotation(0, 20) @ rotation(2, 8)
SAGITTAL = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # axes permuted and flipped

GRIDS = {
    "iso-0.5": ((0.5, 0.5, 0.5), np.eye(3)),
    "iso-1.3": ((1.3, 1.3, 1.3), np.eye(3)),
    "iso-3": ((3.0, 3.0, 3.0), np.eye(3)),
    "flipped-2.5": ((2.5, 2.5, 2.5), FLIP),
    "flipped-z-0.7": ((0.7, 0.7, 0.7), FLIP_Z),
    "oblique-1.2": ((1.2, 1.2, 1.2), OBLIQUE),
    "oblique-3": ((3.0, 3.0, 3.0), OBLIQUE),
    "aniso-0.8x0.8x3": ((0.8, 0.8, 3.0), np.eye(3)),
    "oblique-aniso-0.8x0.8x3": ((0.8, 0.8, 3.0), rotation(1, 20)),
    "sagittal-3x0.9x0.9": ((3.0, 0.9, 0.9), SAGITTAL),
}


# --------------------------------------------------------------------------------------------------
# Working grid
# --------------------------------------------------------------------------------------------------


def test_working_geometry_of_a_1mm_axis_aligned_grid_is_the_grid_itself():
    g = Geometry((40, 30, 20), (1.0, 1.0, 1.0), (-10.25, 3.5, 7.125))
    assert working_geometry(g) is g
    assert WORKING_SPACING_MM == 1.0 and PATCH_SIZE == 128


@pytest.mark.parametrize("name", GRIDS)
def test_working_geometry_is_axis_aligned_isotropic_and_covers_the_input(name):
    spacing, direction = GRIDS[name]
    g = grid(spacing, direction)
    w = working_geometry(g)
    assert w.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert w.spacing == (1.0, 1.0, 1.0)
    assert_covers(w, g)


@pytest.mark.parametrize(
    ("spacing", "direction"),
    [((3.0, 3.0, 3.0), np.eye(3)), ((2.0, 1.0, 3.0), FLIP), ((2.0, 2.0, 4.0), FLIP_Z), ((3.0, 1.0, 2.0), SAGITTAL)],
)
def test_working_voxel_centres_contain_input_centres_for_integer_spacing(spacing, direction):
    g = grid(spacing, direction, extent=(30.0, 24.0, 36.0))
    w = working_geometry(g)
    ijk = np.array(list(itertools.product(*[range(n) for n in g.size_ijk])), dtype=float)
    index = w.physical_to_index(g.index_to_physical(ijk))
    np.testing.assert_allclose(index, np.round(index), atol=1e-6)


def test_working_geometry_other_spacing():
    g = grid((0.5, 0.5, 2.0), OBLIQUE)
    w = working_geometry(g, spacing=2.0)
    assert w.spacing == (2.0, 2.0, 2.0)
    assert_covers(w, g)


# --------------------------------------------------------------------------------------------------
# Label and scalar resampling
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GRIDS)
def test_working_grid_and_back_preserves_each_label_volume(name):
    spacing, direction = GRIDS[name]
    volume = vertebra_phantom(grid(spacing, direction))
    working = to_working_grid(volume)
    assert working.geometry == working_geometry(volume.geometry)
    back = to_input_grid(working, volume.geometry)
    assert back.geometry == volume.geometry and back.array.dtype == volume.array.dtype
    before, after = label_counts(volume.array), label_counts(back.array)
    assert before.min() > 500
    np.testing.assert_array_less(np.abs(after / before - 1), 0.02)
    # the working grid itself holds about the same volume (mm^3) of each label
    working_mm3 = label_counts(working.array)
    np.testing.assert_array_less(np.abs(working_mm3 / (before * volume.geometry.voxel_volume_mm3) - 1), 0.04)


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    spacing=st.tuples(*[st.floats(0.5, 3.0)] * 3),
    angles=st.tuples(*[st.floats(-25.0, 25.0)] * 3),
    flips=st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3),
)
def test_round_trip_volume_on_random_grids(spacing, angles, flips):
    direction = rotation(0, angles[0]) @ rotation(1, angles[1]) @ rotation(2, angles[2]) @ np.diag(flips)
    volume = vertebra_phantom(grid(spacing, direction))
    working = to_working_grid(volume)
    assert_covers(working.geometry, volume.geometry)
    back = to_input_grid(working, volume.geometry)
    before, after = label_counts(volume.array), label_counts(back.array)
    np.testing.assert_array_less(np.abs(after / before - 1), 0.02)


def test_coarse_axis_aligned_round_trip_is_exact():
    for method in ("label-aware", "nearest"):
        volume = vertebra_phantom(grid((3.0, 2.0, 3.0), FLIP))
        back = to_input_grid(to_working_grid(volume, method=method), volume.geometry, method=method)
        np.testing.assert_array_equal(back.array, volume.array)


def test_label_aware_smooths_staircases_when_upsampling():
    """From 3 mm, the label-aware working volume is closer to the true 1 mm shape than nearest's blocks."""
    g = grid((3.0, 3.0, 3.0), OBLIQUE)
    volume = vertebra_phantom(g)
    truth = vertebra_phantom(working_geometry(g)).array

    def mean_dice(work: np.ndarray) -> float:
        both = label_counts(np.where(work == truth, work, 0))
        return float(np.mean(2 * both / (label_counts(work) + label_counts(truth))))

    nearest = mean_dice(to_working_grid(volume, method="nearest").array)
    label_aware = mean_dice(to_working_grid(volume).array)
    assert label_aware > nearest + 0.01


def test_same_grid_is_an_exact_copy_and_dtype_is_kept():
    for dtype in (np.uint8, np.int16, np.uint16, np.int32, np.int64):
        volume = vertebra_phantom(grid((1.0, 1.0, 1.0), extent=(50.0, 40.0, 60.0)), dtype=dtype)
        for method in ("label-aware", "nearest"):
            same = resample_labels(volume, volume.geometry, method=method)
            assert same.array.dtype == dtype and same.array is not volume.array
            np.testing.assert_array_equal(same.array, volume.array)
            other = resample_labels(volume, grid((1.5, 1.5, 1.5), extent=(50.0, 40.0, 60.0)), method=method)
            assert other.array.dtype == dtype
            assert set(np.unique(other.array)) <= {0, 20, 21, 22}


def test_to_working_grid_of_a_1mm_input_is_exact():
    volume = vertebra_phantom(grid((1.0, 1.0, 1.0), extent=(50.0, 40.0, 90.0)))
    working = to_working_grid(volume)
    assert working.geometry is volume.geometry
    np.testing.assert_array_equal(working.array, volume.array)


def test_resample_labels_rejects_unknown_method():
    volume = vertebra_phantom(grid((2.0, 2.0, 2.0)))
    with pytest.raises(ValueError, match="label-aware"):
        resample_labels(volume, working_geometry(volume.geometry), method="cubic")


def test_label_outside_target_and_target_beyond_source():
    g = Geometry((10, 10, 10), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    a = np.zeros(g.shape, np.uint8)
    a[1:4, 1:4, 1:4] = 5
    a[7:9, 7:9, 7:9] = 6
    target = Geometry((8, 8, 8), (1.0, 1.0, 1.0), (-3.5, -3.5, -3.5))  # sees label 5 only, and empty space
    nearest = resample_labels(Volume(a, g), target, method="nearest").array
    assert np.count_nonzero(nearest == 5) == 3 * 3 * 3  # the part of the 6 mm cube [1, 7) inside [-4, 4)
    out = resample_labels(Volume(a, g), target).array
    assert set(np.unique(out)) == {0, 5}
    assert np.count_nonzero(out == 5) >= 26 and not out[nearest != 5].any()  # the cube's corner is rounded


def test_resample_scalar_is_linear_float32():
    g = Geometry((6, 5, 4), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    i = np.arange(4, dtype=np.float64)[None, None, :] * np.ones((6, 5, 1))
    ramp = Volume(i, g)  # value = i index = x / 2
    target = Geometry((4, 3, 5), (1.0, 1.0, 1.0), (1.0, 2.0, 3.0))
    out = resample_scalar(ramp, target, default=-1.0)
    assert out.array.dtype == np.float32
    x = 1.0 + np.arange(5)
    np.testing.assert_allclose(out.array[0, 0], x / 2, atol=1e-3)
    outside = resample_scalar(ramp, Geometry((2, 2, 2), (1.0, 1.0, 1.0), (100.0, 0.0, 0.0)), default=-1.0)
    np.testing.assert_array_equal(outside.array, -1.0)


# --------------------------------------------------------------------------------------------------
# Instances
# --------------------------------------------------------------------------------------------------


def blobs_volume(direction=None, value=1) -> tuple[Volume, list[tuple[int, int, int]]]:
    """Three separated blobs stacked along array axis 0 plus small islands; returns their centres (k, j, i)."""
    direction = np.eye(3) if direction is None else direction
    g = Geometry((60, 30, 30), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.ravel(direction)))
    a = np.zeros(g.shape, np.uint8)
    k, j, i = np.indices(g.shape)
    centres = [(10, 15, 15), (30, 15, 14), (50, 14, 15)]
    for (ck, cj, ci), r in zip(centres, (6, 7, 5), strict=True):
        a[(k - ck) ** 2 + (j - cj) ** 2 + (i - ci) ** 2 <= r * r] = value
    a[20, 2, 2] = value  # a lone voxel
    a[40:42, 25:27, 25:27] = value  # an 8-voxel island
    a[0:2, 0:2, 0:2] = value
    return Volume(a, g), centres


def test_find_instances_splits_a_binary_mask_superior_to_inferior_and_drops_islands():
    volume, centres = blobs_volume()
    instance_array, instances = find_instances(volume)
    assert instance_array.dtype == np.int32
    assert [i.instance_id for i in instances] == [1, 2, 3]
    assert all(i.label == 1 for i in instances)
    # identity direction: array axis 0 is superior, so the largest k comes first
    expected = sorted(centres, reverse=True)
    for instance, centre in zip(instances, expected, strict=True):
        np.testing.assert_allclose(instance.centroid, centre, atol=1e-9)
        np.testing.assert_allclose(instance.centroid_lps, centre[::-1], atol=1e-9)
        assert instance.voxels == np.count_nonzero(instance_array == instance.instance_id)
    z = [i.centroid_lps[2] for i in instances]
    assert z == sorted(z, reverse=True)
    assert instance_array[20, 2, 2] == 0 and not instance_array[40:42, 25:27, 25:27].any()
    assert np.count_nonzero(instance_array) == sum(i.voxels for i in instances)
    np.testing.assert_array_equal(restore_labels(instance_array, instances) > 0, instance_array > 0)


def test_find_instances_orders_by_physical_superior_on_a_flipped_z_grid():
    volume, centres = blobs_volume(direction=FLIP_Z, value=255)
    instance_array, instances = find_instances(volume)
    # array axis 0 now points inferior: the smallest k is the most superior
    assert [round(i.centroid[0]) for i in instances] == [10, 30, 50]
    assert [i.instance_id for i in instances] == [1, 2, 3]
    assert instance_array[10, 15, 15] == 1 and instance_array[50, 14, 15] == 3
    z = [i.centroid_lps[2] for i in instances]
    assert z == sorted(z, reverse=True)
    restored = restore_labels(instance_array, instances)
    assert set(np.unique(restored)) == {0, 255}


@pytest.mark.parametrize("value", [7, 22, 29])
def test_a_label_in_several_pieces_is_one_vertebra(value):
    """A pedicle break splits a vertebra in two: its label is still one instance (components are used for
    binary masks only, value 1 or 255), unless the caller says the map is a binary mask."""
    volume, _ = blobs_volume(value=value)
    instance_array, instances = find_instances(volume)
    assert [(i.instance_id, i.label) for i in instances] == [(value, value)]
    assert instances[0].voxels == np.count_nonzero(volume.array)
    np.testing.assert_array_equal(instance_array, volume.array)
    assert len(find_instances(volume, split=True)[1]) == 3
    assert len(find_instances(blobs_volume(value=1)[0], split=False)[1]) == 1


def test_find_instances_with_6_connectivity_splits_diagonal_touches():
    g = Geometry((20, 10, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    a = np.zeros(g.shape, np.uint8)
    a[2:9, 2:8, 2:8] = 1
    a[9:16, 8:10, 8:10] = 1  # touches the first only along an edge
    assert len(find_instances(Volume(a, g), min_fraction=0.0, min_voxels=1)[1]) == 1
    assert len(find_instances(Volume(a, g), min_fraction=0.0, min_voxels=1, connectivity=6)[1]) == 2


def test_find_instances_of_a_labelled_map_keeps_labels_as_ids():
    volume = vertebra_phantom(grid((1.5, 1.5, 1.5), FLIP_Z))
    instance_array, instances = find_instances(volume)
    np.testing.assert_array_equal(instance_array, volume.array.astype(np.int32))
    assert [i.label for i in instances] == [20, 21, 22]  # 20 is the most superior in the phantom
    assert all(i.instance_id == i.label for i in instances)
    np.testing.assert_array_equal(restore_labels(instance_array, instances), instance_array)


def test_a_single_vertebra_label_is_one_instance_even_with_islands():
    g = Geometry((30, 30, 30), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    a = np.zeros(g.shape, np.int16)
    a[5:25, 5:25, 5:25] = 22
    a[0, 0, 0] = 22  # an island: not a reason to split a one-vertebra file
    instance_array, instances = find_instances(Volume(a, g))
    assert [(i.instance_id, i.label, i.voxels) for i in instances] == [(22, 22, 20**3 + 1)]
    np.testing.assert_array_equal(instance_array, a)


def test_find_instances_of_an_empty_map():
    g = Geometry((5, 5, 5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    instance_array, instances = find_instances(Volume(np.zeros(g.shape, np.uint8), g))
    assert instances == [] and not instance_array.any()


def test_restore_labels_maps_ids_back():
    instances = [Instance(1, 9, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 1), Instance(2, 9, (0.0,) * 3, (0.0,) * 3, 1)]
    ids = np.array([[[0, 1, 2, 3]]], dtype=np.int32)
    np.testing.assert_array_equal(restore_labels(ids, instances), [[[0, 9, 9, 3]]])


# --------------------------------------------------------------------------------------------------
# Crop and stitch
# --------------------------------------------------------------------------------------------------


def test_patch_box_is_centred_on_the_rounded_centroid():
    box = patch_box((10.4, 20.5, -3.6))
    assert box == PatchBox((10 - 64, 21 - 64, -4 - 64), 128)
    assert box.stop == (10 + 64, 21 + 64, -4 + 64)


def test_crop_zero_pads_a_vertebra_touching_the_border():
    g = Geometry((40, 50, 60), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    a = np.zeros(g.shape, np.uint8)
    a[0:12, 30:50, 40:60] = 3  # touches three borders
    instance_array, instances = find_instances(Volume(a, g))
    [(instance, box, patch)] = crop_instances(instance_array, instances)
    assert patch.shape == (128, 128, 128) and patch.dtype == np.float32
    assert patch.sum() == instance.voxels == 12 * 20 * 20
    kc, jc, ic = (int(np.floor(c + 0.5)) for c in instance.centroid)
    assert box.start == (kc - 64, jc - 64, ic - 64)
    # voxel [0, 30, 40] of the volume sits at patch index (0 - start) on each axis; beyond the border: 0
    origin = tuple(-s for s in box.start)
    assert patch[origin[0], 30 + origin[1], 40 + origin[2]] == 1
    assert patch[origin[0] - 1, 30 + origin[1], 40 + origin[2]] == 0
    assert not patch[:, :, 60 + origin[2] :].any()
    raw = crop(a, box, fill=255)
    assert (raw[: origin[0]] == 255).all() and raw[origin[0], 30 + origin[1], 40 + origin[2]] == 3


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    shape=st.tuples(*[st.integers(1, 12)] * 3),
    start=st.tuples(*[st.integers(-20, 15)] * 3),
    size=st.integers(1, 16),
)
def test_crop_matches_a_padded_reference(shape, start, size):
    a = np.arange(1, np.prod(shape) + 1, dtype=np.int32).reshape(shape)
    pad = 40
    reference = np.pad(a, pad, constant_values=-7)
    expected = reference[tuple(slice(s + pad, s + pad + size) for s in start)]
    np.testing.assert_array_equal(crop(a, PatchBox(start, size), fill=-7), expected)


def test_crop_of_a_box_outside_the_volume_is_all_fill():
    a = np.ones((4, 4, 4), np.int16)
    np.testing.assert_array_equal(crop(a, PatchBox((10, 0, 0), 8)), 0)
    np.testing.assert_array_equal(crop(a, PatchBox((-20, -20, -20), 8), fill=-1), -1)


def stitch_own_patches(instance_array, instances, size, refine=None):
    crops = crop_instances(instance_array, instances, size=size)
    return stitch(
        instance_array, [(i.instance_id, box, patch) for i, box, patch in crops if refine is None or i.label in refine]
    )


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    shape=st.tuples(*[st.integers(20, 48)] * 3),
    blobs=st.lists(
        st.tuples(st.integers(-4, 52), st.integers(-4, 52), st.integers(-4, 52), st.integers(3, 14)),
        min_size=1,
        max_size=6,
    ),
    size=st.sampled_from([16, 24, 32]),
)
def test_crop_then_stitch_reproduces_the_input(shape, blobs, size):
    """Boxes smaller than the blobs, leaving the volume and overlapping each other: still exact."""
    a = np.zeros(shape, np.uint8)
    k, j, i = np.indices(shape)
    for n, (ck, cj, ci, r) in enumerate(blobs):
        a[(k - ck) ** 2 + (j - cj) ** 2 + (i - ci) ** 2 <= r * r] = 20 + n
    if not a.any():
        return
    volume = Volume(a, Geometry(shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    instance_array, instances = find_instances(volume)
    # a blob bigger than its box loses the part outside the box: that part is the model's job
    exact = True
    for instance in instances:
        where = np.argwhere(instance_array == instance.instance_id)
        box = patch_box(instance.centroid, size)
        exact &= bool(np.all(where.min(axis=0) >= box.start) and np.all(where.max(axis=0) < box.stop))
    if exact:
        np.testing.assert_array_equal(stitch_own_patches(instance_array, instances, size), instance_array)
    # refining some instances only: the others are untouched whatever the patches say
    refined = {i.label for i in instances[::2]}
    out = stitch_own_patches(instance_array, instances, size, refine=refined)
    untouched = (instance_array != 0) & ~np.isin(instance_array, list(refined))
    np.testing.assert_array_equal(out[untouched], instance_array[untouched])


def test_crop_then_stitch_of_a_1mm_spine_at_128_is_exact():
    """Five touching vertebrae, the top one leaving the volume, boxes overlapping: stitched back exactly."""
    g = Geometry((150, 70, 80), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    a = np.zeros(g.shape, np.uint8)
    k, j, i = np.indices(g.shape)
    for n in range(5):
        ck = 140 - 30 * n
        body = ((i - 40) / 22.0) ** 2 + ((j - 30) / 16.0) ** 2 <= 1
        arch = (np.abs(i - 40) < 6) & (j >= 44) & (j < 70)
        a[(np.abs(k - ck) <= 15) & (body | arch) & (a == 0)] = 20 + n
    volume = Volume(a, g)
    instance_array, instances = find_instances(volume)
    assert [i.label for i in instances] == [20, 21, 22, 23, 24]
    np.testing.assert_array_equal(stitch_own_patches(instance_array, instances, PATCH_SIZE), a)


def test_stitch_resolves_overlaps_by_highest_probability_and_protects_unrefined_labels():
    shape = (20, 20, 20)
    ids = np.zeros(shape, np.int32)
    ids[2:8, 2:8, 2:8] = 1
    ids[12:18, 2:8, 2:8] = 2
    ids[8:12, 10:14, 10:14] = 3  # not refined
    box = PatchBox((0, 0, 0), 20)
    p1 = np.zeros((20,) * 3, np.float32)
    p2 = np.zeros((20,) * 3, np.float32)
    p1[:, :, :10] = 0.6  # instance 1 claims the whole i < 10 half
    p2[10:, :, :] = 0.9  # instance 2 claims the whole k >= 10 half, more confidently
    p1[:, 10:14, 10:14] = 1.0  # and both claim instance 3's voxels
    p2[:, 10:14, 10:14] = 1.0
    out = stitch(ids, [(1, box, p1), (2, box, p2)], threshold=0.5)
    np.testing.assert_array_equal(out[ids == 3], 3)
    assert (out[:10, :, :10] == 1).all()
    assert (out[10:, ~np.isin(np.arange(20), range(10, 14))][:, :, 0] == 2).all()
    assert (out[10:, :10, :10] == 2).all()  # 0.9 beats 0.6
    # below the threshold: background; old voxels of refined ids are cleared everywhere
    out = stitch(ids, [(1, box, np.full((20,) * 3, 0.5, np.float32))])
    assert not (out == 1).any() and (out[ids == 2] == 2).all() and (out[ids == 3] == 3).all()
    with pytest.raises(ValueError, match="does not match"):
        stitch(ids, [(1, box, np.zeros((8, 8, 8), np.float32))])


def test_stitch_without_patches_and_with_boxes_outside():
    ids = np.arange(27, dtype=np.int32).reshape(3, 3, 3)
    np.testing.assert_array_equal(stitch(ids, []), ids)
    out = stitch(ids, [(5, PatchBox((10, 10, 10), 4), np.ones((4, 4, 4), np.float32))])
    expected = ids.copy()
    expected[ids == 5] = 0
    np.testing.assert_array_equal(out, expected)


# --------------------------------------------------------------------------------------------------
# Timings (loose bounds; the measured figures are printed with -s)
# --------------------------------------------------------------------------------------------------


def spine_phantom(geometry: Geometry) -> Volume:
    p = voxel_centres(geometry)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    a = np.zeros(geometry.shape, np.uint8)
    for n in range(5):
        zc = 100 - 40 * n
        body = ((x / 22) ** 2 + ((y + 5) / 16) ** 2 <= 1) & (np.abs(z - zc) <= 13)
        arch = (np.abs(x) <= 14) & (y > 12) & (y < 45) & (np.abs(z - zc) <= 8) & (x**2 + (y - 22) ** 2 >= 64)
        a[body | arch] = 20 + n
    return Volume(a, geometry)


def test_whole_spine_timings():
    g = grid((3.0, 3.0, 3.0), OBLIQUE, extent=(200.0, 200.0, 250.0), centre=(0.0, 0.0, 20.0))
    volume = spine_phantom(g)
    start = time.perf_counter()
    working = to_working_grid(volume)
    resample_s = time.perf_counter() - start
    instance_array, instances = find_instances(working)
    assert len(instances) == 5
    crops = crop_instances(instance_array, instances)
    start = time.perf_counter()
    stitched = stitch(instance_array, [(i.instance_id, box, patch) for i, box, patch in crops])
    stitch_s = time.perf_counter() - start
    np.testing.assert_array_equal(stitched, instance_array)
    print(f"\nto_working_grid {g.shape} -> {working.geometry.shape}: {resample_s:.2f} s", end="; ")
    print(f"stitch 5 patches {stitch_s:.2f} s")
    assert resample_s < 5.0 and stitch_s < 5.0


def test_same_voxels_holds_for_flipped_or_permuted_axes_only():
    from vertrefine.volume import Geometry

    g = Geometry((20, 30, 40), (0.8, 0.7, 2.5), (-10.0, 20.0, 30.0), rotation(2, 20.0))
    d, n = g.direction_matrix, g.size_ijk
    flipped_j = Geometry(g.shape, g.spacing, g.index_to_physical([0, n[1] - 1, 0]), d * [1, -1, 1])
    # i and k swapped (array axes 2 and 0), k then reversed: what a converter writing another axis order does
    permuted = Geometry(
        (n[0], n[1], n[2]),
        (g.spacing[2], g.spacing[1], g.spacing[0]),
        g.index_to_physical([0, 0, n[2] - 1]),
        d[:, [2, 1, 0]] * [-1, 1, 1],
    )
    assert g.same_voxels(g) and g.same_voxels(flipped_j) and g.same_voxels(permuted) and permuted.same_voxels(g)
    assert not g.same_grid(flipped_j)
    shifted = Geometry(g.shape, g.spacing, np.add(g.origin, d[:, 0] * 0.4), g.direction)  # half a voxel along i
    far = Geometry(g.shape, g.spacing, np.add(g.origin, 800.0), g.direction)  # patient coordinates far from 0
    far_shifted = Geometry(g.shape, g.spacing, np.add(far.origin, d[:, 0] * 0.4), g.direction)
    assert far.same_voxels(Geometry(g.shape, g.spacing, np.add(far.origin, 1e-4), g.direction))  # header noise
    assert not far.same_voxels(far_shifted)
    assert not g.same_voxels(shifted)
    assert not g.same_voxels(Geometry(g.shape, (0.8, 0.7, 2.0), g.origin, g.direction))
    assert not g.same_voxels(Geometry((20, 30, 41), g.spacing, g.origin, g.direction))


def test_reoriented_moves_every_voxel_to_the_same_place_on_a_flipped_or_permuted_grid():
    from vertrefine.volume import Geometry, Volume

    g = Geometry((5, 6, 7), (0.8, 0.7, 2.5), (-10.0, 20.0, 30.0), rotation(2, 20.0))
    volume = Volume(np.random.default_rng(0).integers(0, 9, g.shape).astype(np.uint8), g)
    d, n = g.direction_matrix, g.size_ijk
    flipped = Geometry(g.shape, g.spacing, g.index_to_physical([0, n[1] - 1, 0]), d * [1, -1, 1])
    permuted = Geometry(
        (n[0], n[1], n[2]), g.spacing[::-1], g.index_to_physical([0, 0, n[2] - 1]), d[:, [2, 1, 0]] * [-1, 1, 1]
    )
    for target in (g, flipped, permuted):
        moved = volume.reoriented(target)
        k, j, i = np.indices(target.shape)
        points = target.index_to_physical(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))
        src = np.rint(g.physical_to_index(points)).astype(int)
        np.testing.assert_array_equal(moved.array.ravel(), volume.array[src[:, 2], src[:, 1], src[:, 0]])
    with pytest.raises(ValueError, match="same voxels"):
        volume.reoriented(Geometry((5, 6, 8), g.spacing, g.origin, g.direction))


def test_slice_sdf_interpolates_each_slices_2d_shape_across_slices():
    """Raya and Udupa: discs of radius 4, 6, 8 ... mm in 4 mm slices give discs of the interpolated radius
    between them (a cone), and the shape ends at the last slab's face."""
    n, step = 41, 4.0
    radii = [4.0, 6.0, 8.0, 10.0]
    array = np.zeros((len(radii) + 2, n, n), np.uint8)  # axis 0: slices, an empty one at each end
    yy, xx = np.mgrid[:n, :n] - n // 2
    for k, r in enumerate(radii, start=1):
        array[k][yy**2 + xx**2 <= r**2] = 5
    thick = Volume(array, Geometry(array.shape, (1.0, 1.0, step), (0.0, 0.0, 0.0)))
    fine_geometry = Geometry((int(step * (len(radii) + 1)) + 1, n, n), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    fine = resample_labels(thick, fine_geometry, method="slice-sdf").array
    for k in range(1, len(radii)):
        z = int(step * k + step / 2)  # half-way between slices k and k + 1
        r = np.sqrt(np.count_nonzero(fine[z] == 5) / np.pi)
        assert r == pytest.approx((radii[k - 1] + radii[k]) / 2, abs=0.5)
    present = np.flatnonzero((fine == 5).any(axis=(1, 2)))
    assert present[0] == pytest.approx(step * 0.5, abs=1) and present[-1] == pytest.approx(step * 4.5, abs=1)
    assert set(np.unique(fine)) == {0, 5}
