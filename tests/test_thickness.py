"""The effective slice thickness read from the labels, and refine on a thick-slice map stored on a fine grid."""

import json
from dataclasses import replace

import numpy as np
import pytest

from vertrefine.refine import Refiner
from vertrefine.spatial import output_geometry, resample_labels
from vertrefine.synth import synth_spine
from vertrefine.thickness import coarse_volume, detect_slices
from vertrefine.volume import Geometry, Volume

from cli_helpers import invoke


@pytest.fixture(scope="module")
def spine() -> Volume:
    """Two phantom vertebrae on a 1 mm grid (a smooth, truly fine shape)."""
    return synth_spine(11, levels=("L2", "L3"))


@pytest.fixture(scope="module")
def vae() -> Refiner:
    """The shipped VAE bundle with refine's defaults (fine inputs kept)."""
    return Refiner.from_bundle(model="vae", device="cpu")


def native(volume: Volume, axis: int, voxels: int) -> Volume:
    """The thick-slice map a scanner would give: slabs of ``voxels`` planes along array ``axis``, each holding
    the label of its middle plane, one voxel per slab, centred on the slab."""
    array = np.take(volume.array, np.arange(voxels // 2, volume.array.shape[axis], voxels), axis=axis)
    spacing = list(volume.geometry.spacing)
    spacing[2 - axis] *= voxels
    first = [0.0, 0.0, 0.0]  # (i, j, k)
    first[2 - axis] = (voxels - 1) / 2
    origin = volume.geometry.index_to_physical(np.asarray(first))
    return Volume(array, Geometry(array.shape, tuple(spacing), tuple(origin), volume.geometry.direction))


def staircase(volume: Volume, axis: int, voxels: int) -> Volume:
    """The native thick-slice map of ``voxels`` planes per slab, back on ``volume``'s own fine grid (nearest
    neighbour): what many pipelines write."""
    return resample_labels(native(volume, axis, voxels), volume.geometry, method="nearest")


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("voxels", [3, 5, 7])
def test_finds_3_5_and_7_mm_staircases_on_a_1_mm_grid_along_each_axis(spine, axis, voxels):
    found = detect_slices(staircase(spine, axis, voxels))
    stairs = found.staircases
    assert stairs[axis] is not None and stairs[axis].thickness_mm == pytest.approx(voxels, abs=0.02)
    assert [s for a, s in enumerate(stairs) if a != axis] == [None, None]  # the other axes are fine
    spacing = [1.0, 1.0, 1.0]
    spacing[2 - axis] = stairs[axis].thickness_mm
    assert found.spacing_ijk_mm == pytest.approx(spacing, abs=0.02)
    assert found.detected and f"every {voxels} mm" in found.describe()


def test_no_staircase_on_a_smooth_shape_nor_on_a_native_thick_grid(spine):
    assert detect_slices(spine).staircases == (None, None, None)
    assert not detect_slices(spine).detected
    thick = native(spine, 0, 5)  # 1 x 1 x 5 mm: its header says so, every plane differs
    assert detect_slices(thick).staircases == (None, None, None)


def test_a_period_of_a_fraction_of_voxels_5_mm_slabs_on_a_0_8_mm_grid(spine):
    thick = native(spine, 2, 5)  # 5 mm along i
    fine = resample_labels(thick, output_geometry(thick.geometry, 0.8), method="nearest")  # gaps of 6 and 7 voxels
    gaps = np.diff(np.flatnonzero(np.any(fine.array[:, :, 1:] != fine.array[:, :, :-1], axis=(0, 1))))
    assert set(gaps.tolist()) >= {6, 7}
    stair = detect_slices(fine).staircases[2]
    assert stair is not None and stair.period == pytest.approx(6.25, abs=0.02)
    assert stair.thickness_mm == pytest.approx(5.0, abs=0.02)


def test_the_thick_grid_is_rebuilt_from_its_staircase_voxel_for_voxel(spine):
    """Slab centres, spacing and labels of the native map come back from its staircase (slabs starting 2 voxels
    into the fine grid: a phase)."""
    cut = spine.array[:, :, 2:]
    shifted = Volume(cut, replace(spine.geometry, shape=cut.shape, origin=spine.geometry.index_to_physical([2, 0, 0])))
    thick = native(shifted, 2, 5)
    fine = resample_labels(thick, spine.geometry, method="nearest")
    rebuilt = coarse_volume(fine, detect_slices(fine))
    assert rebuilt.geometry.same_grid(thick.geometry, tol=1e-6)
    np.testing.assert_array_equal(rebuilt.array, thick.array)


@pytest.mark.parametrize(("axis", "array_axis"), [("sagittal", 2), ("coronal", 1), ("axial", 0)])
def test_degrade_written_on_the_input_grid_is_read_as_its_slices(spine, axis, array_axis):
    """``vertrefine degrade`` without --native writes its 5 mm simulation on the input's 1 mm grid (with
    boundary noise, islands, a random slab phase of a fraction of a voxel)."""
    from vertrefine.degrade import degrade

    stairs = detect_slices(degrade(spine, slice_mm=5, axis=axis, seed=3)).staircases
    assert stairs[array_axis] is not None and stairs[array_axis].thickness_mm == pytest.approx(5.0, abs=0.02)
    assert sum(s is not None for s in stairs) == 1


def test_islands_and_a_noisy_plane_do_not_hide_the_staircase(spine):
    array = staircase(spine, 0, 5).array.copy()
    rng = np.random.default_rng(0)
    for k, j, i in rng.integers(10, 100, (8, 3)):  # islands of 2 voxels
        array[k : k + 2, j : j + 2, i : i + 2] = 21
    plane = array[40]
    array[40, 1:] = np.where(plane[1:] == 0, plane[:-1], plane[1:])  # one plane's labels grown by a voxel
    stair = detect_slices(Volume(array, spine.geometry)).staircases[0]
    assert stair is not None and stair.thickness_mm == pytest.approx(5.0, abs=0.02)


def test_refine_reads_a_5_mm_staircase_on_a_1_mm_grid_as_thick_slices_and_writes_on_its_grid(spine, vae):
    fine = staircase(spine, 0, 5)  # 5 mm axial slabs written on 1 mm
    prepared = vae.prepare(fine)
    assert prepared.slabs is not None and prepared.effective_spacing_ijk_mm == pytest.approx((1.0, 1.0, 5.0), abs=0.02)
    assert prepared.thickness_detected_ijk == (False, False, True)
    assert "effective slice thickness from the labels: 1x1x5 mm (header 1x1x1 mm" in prepared.thickness_note
    result = vae(fine)
    assert [v.decision for v in result.vertebrae] == ["refined", "refined"]  # not "fine input kept"
    assert result.labels.geometry == fine.geometry  # the input's own grid
    assert not np.array_equal(result.labels.array, fine.array)  # refined: the staircase is gone
    for label in (21, 22):  # and closer to the smooth shape than the staircase is
        assert _dice(result.labels.array == label, spine.array == label) > 0.8
    header_only = vae.with_options(slice_detection="off")(fine)
    assert header_only.vertebrae == [] and "input no coarser than 3 mm" in header_only.warnings[0]


def test_a_truly_fine_input_is_still_kept(spine, vae):
    result = vae(spine)
    assert result.vertebrae == [] and "coarsest spacing 1 mm" in result.warnings[0]
    np.testing.assert_array_equal(result.labels.array, spine.array)
    assert vae.prepare(spine).thickness_note == ""


def test_a_3_mm_staircase_is_a_fine_input_by_its_effective_thickness(spine, vae):
    result = vae(staircase(spine, 1, 3))
    assert result.vertebrae == [] and "effective slice thickness from the labels 3 mm" in result.warnings[0]


def test_the_command_line_says_the_thickness_and_the_sidecar_records_it(spine, tmp_path):
    from vertrefine.io import write_label_map

    source = tmp_path / "stairs.nii.gz"
    write_label_map(staircase(spine, 2, 5), source)
    out = tmp_path / "out.nii.gz"
    result = invoke("refine", source, "-o", out, "--model", "vae")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "effective slice thickness" in line]
    assert len(lines) == 1 and "5x1x1 mm (header 1x1x1 mm" in lines[0]
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert sidecar["effective_spacing_mm"] == pytest.approx([5.0, 1.0, 1.0], abs=0.02)
    assert sidecar["effective_spacing_detected"] == [True, False, False]
    assert sidecar["output_grid"] == sidecar["input_grid"]
    assert all(v["decision"] == "refined" for v in sidecar["vertebrae"])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
