"""Thick-slice simulation: grid and labels kept, realistic damage, any grid orientation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from vertrefine import synth
from vertrefine.degrade import degrade, slice_array_axis
from vertrefine.volume import Geometry, Volume

CUBE = np.ones((3, 3, 3), bool)
QUIET = dict(boundary_amplitude_mm=0.0, threshold_jitter=0.0, truncation=0.0, islands=0, posterior_loss_mm=0.0)


@pytest.fixture(scope="module")
def spine() -> Volume:
    return synth.synth_spine(5)


@pytest.fixture(scope="module")
def small() -> Volume:
    return synth.synth_spine(8, levels=("L3", "L4"))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def mean_dice(truth: Volume, pred: Volume) -> float:
    return float(np.mean([dice(truth.array == lab, pred.array == lab) for lab in truth.labels]))


def permuted_flipped(volume: Volume) -> Volume:
    """Same anatomy on another grid: array axes 0 and 2 swapped, then axis 1 reversed."""
    g = volume.geometry
    arr = np.transpose(volume.array, (2, 1, 0))[:, ::-1, :]
    d = g.direction_matrix[:, [2, 1, 0]].copy()  # new index axis i = old k, k = old i
    origin = np.asarray(g.origin) + d[:, 1] * g.spacing[1] * (arr.shape[1] - 1)
    d[:, 1] *= -1
    spacing = (g.spacing[2], g.spacing[1], g.spacing[0])
    return Volume(np.ascontiguousarray(arr), Geometry(arr.shape, spacing, tuple(origin), tuple(d.ravel())))


def test_keeps_the_grid_and_labels_and_is_deterministic(small):
    out = degrade(small, seed=3)
    assert out.geometry == small.geometry and out.array.dtype == small.array.dtype
    assert out.labels == small.labels
    again = degrade(small, seed=3)
    assert np.array_equal(out.array, again.array)
    assert not np.array_equal(out.array, degrade(small, seed=4).array)
    assert not np.array_equal(out.array, small.array)


def test_default_damage_is_in_the_thick_slice_range(spine):
    out = degrade(spine, seed=1)
    scores = [dice(spine.array == lab, out.array == lab) for lab in spine.labels]
    assert 0.70 <= np.mean(scores) <= 0.90, scores
    assert min(scores) > 0.6


def test_thicker_slices_do_more_damage(small):
    thin = mean_dice(small, degrade(small, slice_mm=3.0, seed=2))
    thick = mean_dice(small, degrade(small, slice_mm=7.0, seed=2))
    assert thick < thin


@pytest.mark.parametrize("axis", ["sagittal", "coronal", "axial"])
def test_slabs_are_constant_along_the_slice_axis(small, axis):
    out = degrade(small, slice_mm=5.0, axis=axis, seed=4, islands=3).array
    a = {"sagittal": 2, "coronal": 1, "axial": 0}[axis]
    changes = np.flatnonzero(np.any(np.diff(out, axis=a) != 0, axis=tuple(b for b in range(3) if b != a)))
    assert len(changes) >= 4
    assert set(np.diff(changes) % 5) == {0}  # 1 mm voxels, 5 mm slabs: boundaries every 5th plane


def test_adds_islands_near_the_spine(small):
    quiet = degrade(small, seed=6, islands=0)
    noisy = degrade(small, seed=6, islands=8)

    def pieces(v: Volume) -> int:
        return sum(ndimage.label(v.array == lab, CUBE)[1] for lab in v.labels)

    assert pieces(noisy) > pieces(quiet)
    extra = (noisy.array > 0) & (quiet.array == 0)
    dist = ndimage.distance_transform_edt(small.array == 0)
    assert extra.any() and dist[extra].max() < 40.0  # near the spine, not anywhere in the field


def test_thin_posterior_structures_lose_more_than_bodies(small):
    out = degrade(small, seed=7, **{**QUIET, "posterior_loss_mm": 2.5, "truncation": 1.0})
    ys = np.arange(small.array.shape[1])[None, :, None]
    for lab in small.labels:
        truth, pred = small.array == lab, out.array == lab
        y_com = ndimage.center_of_mass(truth)[1]
        behind = truth & (ys > y_com + 5)
        front = truth & (ys < y_com - 5)
        lost_behind = np.count_nonzero(behind & ~pred) / np.count_nonzero(behind)
        lost_front = np.count_nonzero(front & ~pred) / np.count_nonzero(front)
        assert lost_behind > 2 * lost_front + 0.05, (lab, lost_behind, lost_front)


def test_works_on_a_permuted_and_flipped_grid(small):
    moved = permuted_flipped(small)
    assert slice_array_axis(moved.geometry, "sagittal") == 0
    assert slice_array_axis(moved.geometry, "coronal") == 1
    out = degrade(moved, slice_mm=5.0, axis="sagittal", seed=2)
    assert out.geometry == moved.geometry and out.labels == moved.labels
    assert 0.65 <= mean_dice(moved, out) <= 0.92
    # the slabs follow the left-right axis, now array axis 0
    quiet = degrade(moved, slice_mm=5.0, axis="sagittal", seed=2, islands=0).array
    changes = np.flatnonzero(np.any(np.diff(quiet, axis=0) != 0, axis=(1, 2)))
    assert set(np.diff(changes) % 5) == {0}
    # posterior is found from the geometry: on this grid posterior is towards smaller j
    thin = degrade(moved, seed=7, **{**QUIET, "posterior_loss_mm": 2.5, "truncation": 1.0})
    lab = moved.labels[0]
    truth, pred = moved.array == lab, thin.array == lab
    j_com = ndimage.center_of_mass(truth)[1]
    js = np.arange(truth.shape[1])[None, :, None]
    behind, front = truth & (js < j_com - 5), truth & (js > j_com + 5)
    assert np.count_nonzero(behind & ~pred) / behind.sum() > np.count_nonzero(front & ~pred) / front.sum() + 0.05


def test_oblique_anisotropic_grid(small):
    from vertrefine import spatial

    angle = np.radians(20.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    shape, spacing = (70, 130, 160), np.array([1.0, 1.2, 2.0])  # (nz, ny, nx); spacing along (i, j, k)
    g = small.geometry
    centre = g.index_to_physical((np.array(g.size_ijk) - 1) / 2.0)
    origin = centre - rot @ ((np.array(shape[::-1]) - 1) / 2.0 * spacing)
    target = Geometry(shape, tuple(spacing), tuple(origin), tuple(rot.ravel()))
    oblique = spatial.resample_labels(small, target, method="nearest")
    assert oblique.labels == small.labels
    out = degrade(oblique, slice_mm=6.0, axis="axial", seed=1)
    assert out.geometry == oblique.geometry and set(out.labels) <= set(oblique.labels)
    assert 0.55 <= mean_dice(oblique, out) <= 0.95


def test_empty_and_bad_arguments():
    g = Geometry((8, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    empty = Volume(np.zeros((8, 8, 8), np.uint8), g)
    assert not degrade(empty).array.any()
    with pytest.raises(ValueError):
        degrade(empty, axis="oblique")
    with pytest.raises(ValueError):
        degrade(empty, slice_mm=0.0)


def test_degrade_file_writes_what_degrade_returns_and_leaves_the_input(small, tmp_path):
    from vertrefine.degrade import degrade_file
    from vertrefine.io import read_label_map, write_label_map

    source = tmp_path / "case.nii.gz"
    write_label_map(small, source)
    before = source.read_bytes()
    lines = degrade_file(source, tmp_path / "out.nii.gz", seed=11, slice_mm=5.0)
    assert lines[0] == "seed 11"
    expected = degrade(read_label_map(source), seed=11, slice_mm=5.0)
    written = read_label_map(tmp_path / "out.nii.gz")
    assert np.array_equal(written.array, expected.array)
    assert np.allclose(written.geometry.spacing, small.geometry.spacing)
    assert source.read_bytes() == before


@pytest.mark.parametrize(
    ("output", "knobs", "named"),
    [
        ("out.dcm", dict(native=True), "--native writes NIfTI only"),
        ("out.nii.gz", dict(slice_mm=30.0), "--slice-mm must be in 0.5..20"),
        ("out.nii.gz", dict(island_radius_mm=(4.0, 2.0)), "--island-radius-mm takes the smallest radius first"),
    ],
)
def test_check_options_names_the_option(output, knobs, named):
    from vertrefine.degrade import check_options
    from vertrefine.errors import SettingsError

    with pytest.raises(SettingsError, match=named):
        check_options(output, **knobs)
    check_options("out.nii.gz", native=True, slice_mm=5.0)  # valid: no error
