"""Corruption families: native thick grids, the clean slab majority exactly, seeds, damage in a sensible band."""

from __future__ import annotations

import numpy as np
import pytest

from vertrefine import synth
from vertrefine.corruptions import (
    ERROR_FAMILIES,
    FAMILIES,
    HELD_OUT_FAMILIES,
    IN_PLANE_RANGE_MM,
    TRAINING_FAMILIES,
    corrupt,
    family_draw,
)
from vertrefine.spatial import resample_labels
from vertrefine.volume import Volume

SLAB_AXIS = {"sagittal": 2, "axial": 0}  # array axis of the slabs on the phantoms' identity grid
OTHER = 100  # a label that is no vertebra


@pytest.fixture(scope="module")
def spine() -> Volume:
    volume = synth.synth_spine(8, levels=("L3", "L4"))
    array = volume.array.copy()
    array[5:15, 5:15, 5:15] = OTHER
    return volume.with_array(array)


def mean_dice(truth: Volume, native: Volume, labels=(22, 23)) -> float:
    back = resample_labels(native, truth.geometry, method="nearest").array
    scores = []
    for lab in labels:
        a, b = back == lab, truth.array == lab
        scores.append(2 * np.sum(a & b) / (np.sum(a) + np.sum(b)))
    return float(np.mean(scores))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("axis", ["sagittal", "axial"])
def test_every_family_returns_its_native_thick_grid(spine, family, axis):
    out = corrupt(spine, family, slice_mm=5.0, axis=axis, seed=2)
    spacing = out.geometry.spacing[::-1]  # per array axis
    slab = SLAB_AXIS[axis]
    assert spacing[slab] == pytest.approx(5.0)
    in_plane = [spacing[a] for a in range(3) if a != slab]
    if family == "degrade":
        assert in_plane == pytest.approx([1.0, 1.0])  # degrade keeps the input's in-plane grid
    else:
        assert in_plane[0] == pytest.approx(in_plane[1])
        assert IN_PLANE_RANGE_MM[0] <= in_plane[0] <= IN_PLANE_RANGE_MM[1]
    # the native grid covers the input's field of view, to within a voxel at each end
    g, n = spine.geometry, out.geometry
    extent = np.array(g.shape) * np.array(g.spacing[::-1])
    covered = np.array(n.shape) * np.array(n.spacing[::-1])
    assert np.all(np.abs(covered - extent) <= 2 * np.array(n.spacing[::-1]) + 1e-6)  # the outer slabs may reach past it
    assert set(out.labels) >= {22, 23} and out.array.dtype == spine.array.dtype


@pytest.mark.parametrize("axis", ["sagittal", "axial"])
@pytest.mark.parametrize("slice_mm", [3.0, 7.0])
def test_clean_is_exactly_the_slab_majority(spine, axis, slice_mm):
    out = corrupt(spine, "clean", slice_mm=slice_mm, axis=axis, seed=5, in_plane_mm=1.0)
    slab = SLAB_AXIS[axis]
    # independent slab average: each native slab's centre, read from the native grid, and the fine voxels
    # whose centres lie within half a slab of it
    n_slabs = out.array.shape[slab]
    index = np.zeros((n_slabs, 3))
    index[:, 2 - slab] = np.arange(n_slabs)
    centres = spine.geometry.physical_to_index(out.geometry.index_to_physical(index))[:, 2 - slab]
    fine = np.arange(spine.array.shape[slab])
    expected = np.zeros(out.array.shape, spine.array.dtype)
    for lab in spine.labels:
        mask = np.moveaxis(spine.array == lab, slab, 0).astype(float)
        for q, c in enumerate(centres):
            rows = (fine >= c - slice_mm / 2 - 1e-6) & (fine < c + slice_mm / 2 - 1e-6)
            if rows.any():
                majority = mask[rows].mean(axis=0) > 0.5
                np.moveaxis(expected, slab, 0)[q][majority] = lab
    assert np.array_equal(out.array, expected)


def test_seeds_reproduce_and_differ(spine):
    for family in ("mixed", "mri-like", "slab-shift"):
        a = corrupt(spine, family, seed=11)
        b = corrupt(spine, family, seed=11)
        assert a.geometry == b.geometry and np.array_equal(a.array, b.array)
    warped = [corrupt(spine, "warp", seed=s, in_plane_mm=1.0).array for s in (11, 12)]
    assert not np.array_equal(*warped)
    # every family of one seed shares one grid
    assert corrupt(spine, "clean", seed=4).geometry == corrupt(spine, "islands", seed=4).geometry


def test_damage_is_in_a_sensible_band_and_errors_lower_the_clean_score(spine):
    scores = {f: np.mean([mean_dice(spine, corrupt(spine, f, seed=s)) for s in (1, 2)]) for f in FAMILIES}
    assert 0.9 <= scores["clean"] <= 0.97, scores
    for family, score in scores.items():
        assert 0.72 <= score <= 0.97, (family, score)
    for family in ("in-plane", "warp", "processes", "slab-shift", "mri-like", "degrade"):
        assert scores[family] < scores["clean"], (family, scores)


def test_held_out_families_are_never_trained_on_and_mixed_draws_training_errors():
    assert not set(HELD_OUT_FAMILIES) & set(TRAINING_FAMILIES)
    assert "mri-like" in HELD_OUT_FAMILIES and "degrade" in HELD_OUT_FAMILIES
    draws = [family_draw("mixed", np.random.default_rng(s)) for s in range(200)]
    assert set().union(*draws) == set(ERROR_FAMILIES)
    assert frozenset() in draws  # a clean case is among the draws


def test_other_labels_pass_through_the_per_vertebra_errors(spine):
    clean = corrupt(spine, "clean", seed=3)
    grown = corrupt(spine, "in-plane", seed=3)
    assert np.array_equal(clean.array == OTHER, grown.array == OTHER)
    assert not np.array_equal(clean.array, grown.array)
    assert OTHER in corrupt(spine, "mri-like", seed=3).labels


def test_bad_settings_are_refused(spine):
    with pytest.raises(ValueError, match="unknown corruption family"):
        corrupt(spine, "noise", seed=0)
    with pytest.raises(ValueError, match="seed"):
        corrupt(spine, "clean", seed=-1)
    with pytest.raises(ValueError, match="axis"):
        corrupt(spine, "clean", axis="oblique")
