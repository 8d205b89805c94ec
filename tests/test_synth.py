"""Procedural lumbar phantoms: anatomy, morphometry, spines, patches and datasets on disk."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from vertrefine import synth
from vertrefine.labels import LUMBAR_LABELS, label_for_level

CUBE = np.ones((3, 3, 3), bool)


@pytest.fixture(scope="module")
def spine():
    return synth.synth_spine(11)


# --------------------------------------------------------------------------------------------------
# morphometry
# --------------------------------------------------------------------------------------------------


def test_sampled_morphometry_stays_in_the_lumbar_ranges_and_follows_the_levels():
    rng = np.random.default_rng(0)
    samples = {lv: [synth.sample_morphometry(lv, rng, volume_cm3=None) for _ in range(150)] for lv in synth.LEVELS}
    for ms in samples.values():
        for m in ms:
            for name, (lo, hi) in synth.MORPHOMETRY_RANGES.items():
                assert lo <= getattr(m, name) <= hi, (m.level, name)

    def mean(level, name):
        return np.mean([getattr(m, name) for m in samples[level]])

    assert mean("L1", "body_width") + 4 < mean("L5", "body_width")
    assert 40 <= mean("L1", "body_width") <= 46 and 49 <= mean("L5", "body_width") <= 56
    lengths = [mean(lv, "transverse_length") for lv in synth.LEVELS]
    assert int(np.argmax(lengths)) == 2  # longest at L3
    assert mean("L5", "spinous_length") < mean("L3", "spinous_length") - 4
    assert mean("L1", "superior_facet_angle_deg") + 15 < mean("L5", "superior_facet_angle_deg")  # sagittal -> coronal


def test_sampling_takes_level_names_and_labels_and_refuses_others():
    a = synth.sample_morphometry("l3", np.random.default_rng(1))
    b = synth.sample_morphometry(label_for_level("L3"), np.random.default_rng(1))
    assert a == b and a.level == "L3"
    with pytest.raises(ValueError, match="L1"):
        synth.sample_morphometry("T12", np.random.default_rng(0))


# --------------------------------------------------------------------------------------------------
# one vertebra, measured on the rendered mask
# --------------------------------------------------------------------------------------------------


def _measure(m: synth.VertebraMorphometry) -> dict[str, float]:
    """Render unrotated with the body centre at a known voxel and measure it like a morphometry study."""
    z0, y0, x0 = 45, 50, 70
    mask = synth.render_vertebra(m, shape=(90, 140, 140), center_mm=(z0, y0, x0))
    D, H = m.body_depth, m.body_height
    out: dict[str, float] = {"volume_cm3": mask.sum() / 1000.0}
    out["components"] = ndimage.label(mask, CUBE)[1]
    # body: width of the part in front of the body's mid-depth, depth and height along the midline
    xs = np.nonzero(mask[:, : y0 + 1, :].any(axis=(0, 1)))[0]
    out["body_width"] = xs.max() - xs.min() + 1
    depths = []
    for z in range(z0 - int(H / 2) + 2, z0 + int(H / 2) - 1):
        runs, _ = ndimage.label(mask[z, :, x0])
        depths.append(np.count_nonzero(runs == runs[np.nonzero(runs)[0][0]]))
    out["body_depth"] = max(depths)
    heights = []
    for y in range(y0 - int(D / 2) + 3, y0 + 1):
        runs, _ = ndimage.label(mask[:, y, x0])
        heights.append(np.count_nonzero(runs == runs[z0]) if runs[z0] else 0)
    out["body_height"] = max(heights)
    # canal: a hole through the axial slice at pedicle level, behind the body wall
    top = H / 2 - D / 2 * math.tan(math.radians(m.body_wedge_deg) / 2)
    axial = mask[int(round(z0 + top - m.pedicle_height / 2 - 0.5))]
    holes, _ = ndimage.label(ndimage.binary_fill_holes(axial) & ~axial)
    canal = holes == holes[int(round(y0 + D / 2)) + 4, x0]
    out["canal_found"] = bool(holes[int(round(y0 + D / 2)) + 4, x0])
    out["canal_width"] = canal.sum(axis=1).max()
    out["canal_depth"] = canal[:, x0].sum()
    # spinous process: reach behind the body wall and height near its tip
    midline = mask[:, :, x0 - 1 : x0 + 2].any(axis=2)
    y_tip = np.nonzero(midline.any(axis=0))[0].max()
    out["spinous_length"] = y_tip - (y0 + D / 2)
    out["spinous_height"] = midline[:, y_tip - 3].sum()
    return out


@pytest.mark.parametrize("level", synth.LEVELS)
def test_rendered_vertebra_is_one_piece_of_lumbar_size_with_its_measurements(level):
    m = synth.sample_morphometry(level, np.random.default_rng(7))
    got = _measure(m)
    assert got["components"] == 1
    assert 50.0 <= got["volume_cm3"] <= 75.0
    assert got["canal_found"], "no vertebral foramen at pedicle level"
    for name in ("body_width", "body_depth", "body_height", "canal_width", "canal_depth", "spinous_length"):
        lo, hi = synth.MORPHOMETRY_RANGES[name]
        assert abs(got[name] - getattr(m, name)) <= 3.5, (name, got[name], getattr(m, name))
        assert lo - 2.5 <= got[name] <= hi + 2.5, (name, got[name])
    assert abs(got["spinous_height"] - m.spinous_height) <= 3.0


def test_rendering_is_rotation_stable_and_vertebra_has_posterior_elements():
    m = synth.sample_morphometry("L4", np.random.default_rng(3))
    upright = synth.render_vertebra(m)
    tilted = synth.render_vertebra(m, rotation_deg=(5.0, -4.0, 20.0))
    assert abs(int(tilted.sum()) - int(upright.sum())) < 0.02 * upright.sum()
    assert ndimage.label(tilted, CUBE)[1] == 1
    # the arch makes the vertebra reach far behind the body: spinous tip ~ body depth + spinous length
    ys = np.nonzero(upright.any(axis=(0, 2)))[0]
    assert ys.max() - ys.min() + 1 >= m.body_depth / 2 + m.spinous_length + m.body_depth / 2 - 3


def test_coarser_spacing_keeps_the_volume():
    m = synth.sample_morphometry("L2", np.random.default_rng(5))
    fine = synth.render_vertebra(m).sum()
    coarse = synth.render_vertebra(m, spacing=2.0).sum() * 8
    assert abs(coarse - fine) < 0.05 * fine


# --------------------------------------------------------------------------------------------------
# whole spines
# --------------------------------------------------------------------------------------------------


def test_spine_is_deterministic_for_a_seed(spine):
    again = synth.synth_spine(11)
    assert again.geometry == spine.geometry
    assert np.array_equal(again.array, spine.array)
    other = synth.synth_spine(12)
    assert other.array.shape != spine.array.shape or not np.array_equal(other.array, spine.array)


def test_spine_labels_order_size_and_separation(spine):
    a = spine.array
    assert spine.labels == list(LUMBAR_LABELS)
    assert a.dtype == np.uint8
    g = spine.geometry
    assert g.spacing == (1.0, 1.0, 1.0) and np.allclose(g.direction_matrix, np.eye(3))
    heights = [ndimage.center_of_mass(a == lab)[0] for lab in LUMBAR_LABELS]
    assert all(h1 > h2 + 25 for h1, h2 in zip(heights, heights[1:], strict=False)), heights  # L1 on top
    for lab in LUMBAR_LABELS:
        mask = a == lab
        assert ndimage.label(mask, CUBE)[1] == 1, lab
        assert 50.0 <= mask.sum() / 1000.0 <= 75.0, (lab, mask.sum())
        grown = ndimage.binary_dilation(mask, CUBE)
        assert not np.any(grown & (a > 0) & (a != lab)), f"label {lab} touches a neighbour"
    # vertebrae stay inside the grid with a margin
    assert not a[0].any() and not a[-1].any() and not a[:, 0].any() and not a[:, :, -1].any()


def test_spine_is_lordotic(spine):
    plan = synth.plan_spine(11)
    assert 40.0 <= plan.lordosis_deg <= 60.0
    assert all(8.0 <= d <= 12.0 for d in plan.discs_mm)
    # bodies form a curve convex anteriorly: L3 lies in front of the line from L1 to L5
    c = np.array(plan.centres_mm)
    chord = c[0] + (c[4] - c[0]) * (c[2, 0] - c[0, 0]) / (c[4, 0] - c[0, 0])
    assert c[2, 1] < chord[1] - 3.0
    # and L5's superior axis leans forward more than L1's
    assert plan.rotations_deg[4][2] < plan.rotations_deg[0][2] - 20.0


def test_partial_spine_and_bad_levels():
    two = synth.synth_spine(3, levels=("L4", "L5"), spacing=2.0)
    assert two.labels == [23, 24] and two.geometry.spacing == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError):
        synth.synth_spine(3, levels=("L1", "L3"))


# --------------------------------------------------------------------------------------------------
# patches and files
# --------------------------------------------------------------------------------------------------


def test_patches_hold_one_centred_vertebra_each(spine):
    patches = synth.synth_patches(11)
    assert [name for name, _ in patches] == list(synth.LEVELS)
    padded = np.pad(spine.array, 128)  # patches may reach past the spine's grid (zero padding)
    for (name, patch), lab in zip(patches, LUMBAR_LABELS, strict=True):
        arr = patch.array
        assert arr.shape == (128, 128, 128) and arr.dtype == np.uint8 and set(np.unique(arr)) == {0, 1}
        assert np.allclose(ndimage.center_of_mass(arr), 64, atol=1.0), name
        assert arr.sum() == np.count_nonzero(spine.array == lab)  # the whole vertebra, nothing else
        # the patch sits where the vertebra is in the spine's physical space
        corner = np.array(patch.geometry.origin)
        idx = np.round(spine.geometry.physical_to_index(corner)).astype(int)[::-1] + 128
        sub = padded[idx[0] : idx[0] + 128, idx[1] : idx[1] + 128, idx[2] : idx[2] + 128] == lab
        assert sub.sum() == arr.sum()


def test_write_dataset_names_and_contents(tmp_path):
    from vertrefine.io import read_label_map

    ticks = []
    written = synth.write_synth_dataset(tmp_path, 2, 40, on_case=lambda: ticks.append(1))
    assert [p.name for p in written] == ["spine_00040.nii.gz", "spine_00041.nii.gz"] and len(ticks) == 2
    back = read_label_map(written[0])
    assert np.array_equal(back.array, synth.synth_spine(40).array)
    assert synth.write_synth_dataset(tmp_path, 2, 40) == []  # kept unless overwrite
    assert len(synth.write_synth_dataset(tmp_path, 1, 41, overwrite=True)) == 1
    patches = synth.write_synth_dataset(tmp_path, 1, 40, patches=True, levels=("L2", "L3"))
    assert [p.name for p in patches] == ["spine_00040_L2.nii.gz", "spine_00040_L3.nii.gz"]
    patch = read_label_map(patches[1])
    assert patch.array.shape == (128, 128, 128) and patch.labels == [1]
