"""Data consistency (slabs, projection, the guided chain) and pose frames, on data the tests make."""

from __future__ import annotations

import numpy as np
import pytest
from geometry_helpers import rotation
from scipy import ndimage

from vertrefine import spatial
from vertrefine.degrade import degrade
from vertrefine.guidance import DataConsistency, agreement, observe, patch_to_input_index, project, slab_means
from vertrefine.sampler import SamplerSettings, refine_latents
from vertrefine.schedule import DiffusionSchedule
from vertrefine.synth import synth_spine
from vertrefine.volume import Geometry, Volume

P = 32


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def ball(size: int = P, radius: float = 9.0, centre=None) -> np.ndarray:
    centre = np.full(3, (size - 1) / 2) if centre is None else np.asarray(centre)
    grid = np.indices((size,) * 3).reshape(3, -1).T
    return (np.linalg.norm(grid - centre, axis=1) <= radius).reshape((size,) * 3).astype(np.float32)


# ------------------------------------------------------------------------------------------ slabs


def ball_on(geometry: Geometry, radius: float, centre=(15.5, 15.5, 15.5)) -> np.ndarray:
    """uint8 [z, y, x] on ``geometry``: 1 where a voxel centre lies within ``radius`` mm of LPS ``centre``."""
    ijk = np.indices(geometry.size_ijk).reshape(3, -1).T
    inside = np.linalg.norm(geometry.index_to_physical(ijk) - np.asarray(centre), axis=1) <= radius
    return inside.reshape(geometry.size_ijk).transpose(2, 1, 0).astype(np.uint8)


def test_slabs_follow_a_thick_input_grid_and_its_field_of_view():
    working = Geometry((P, P, P), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    # 5 mm along x (ITK i = array axis 2), starting 2 mm into the patch: 20 x-columns hold the patch's left part
    source = Geometry((P, P, 4), (5.0, 1.0, 1.0), (2.0, 0.0, 0.0))
    affine = patch_to_input_index(working, (0, 0, 0), np.eye(3), P, source)
    obs = observe(affine, ball_on(source, 9.0), 1, P)
    x_of_voxel = np.arange(P)
    slab_x = np.rint((x_of_voxel - 2.0) / 5.0).astype(int)
    inside_fov = (slab_x >= 0) & (slab_x < 4)
    assert np.all((obs.slab[0, 0, :] >= 0) == inside_fov)  # outside the field of view: -1
    assert set(np.unique(obs.counts)) == {5.0}  # every slab: 5 voxels along x, one in y and z
    assert obs.slabs == int(inside_fov.sum() // 5) * P * P
    assert np.all(obs.inside ^ obs.outside)  # every slab in the field of view shows 1 or 0
    # the slab of patch voxel (16, 16, 17) is source voxel (16, 16, 3): inside the ball
    assert obs.inside[obs.slab[16, 16, 17]] and obs.outside[obs.slab[0, 0, 3]]


def test_projection_makes_disagreeing_slabs_agree_and_leaves_agreeing_ones_alone():
    working = Geometry((P, P, P), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    source = Geometry((P, P, 7), (5.0, 1.0, 1.0), (-0.5 + 2.5, 0.0, 0.0))
    affine = patch_to_input_index(working, (0, 0, 0), np.eye(3), P, source)
    obs = observe(affine, ball_on(source, 10.0), 1, P)
    wrong = ball(radius=7)  # eroded: the slabs at the rim disagree
    assert agreement(wrong, obs) < 0.97
    fixed = project(wrong, obs, margin=0.1)
    assert agreement(fixed, obs) == 1.0
    means = slab_means(wrong, obs)
    agreeing = np.where(obs.inside, means >= 0.6, np.where(obs.outside, means <= 0.4, True))
    unchanged = agreeing[np.maximum(obs.slab, 0)] | (obs.slab < 0)
    np.testing.assert_array_equal(fixed[unchanged], wrong[unchanged])
    assert fixed.min() >= 0 and fixed.max() <= 1


class BlockAutoencoder:
    """A linear stand-in for the networks: z = 4^3 block means of the patch, decode = nearest upsampling."""

    def encode(self, x: np.ndarray) -> np.ndarray:
        b = x.reshape(len(x), P // 4, 4, P // 4, 4, P // 4, 4)
        return b.mean(axis=(2, 4, 6))[:, None].astype(np.float32)

    def decode_chunks(self, z: np.ndarray, rows=None):
        up = z[:, 0].repeat(4, 1).repeat(4, 2).repeat(4, 3)
        yield 0, np.clip(up, 0, 1).astype(np.float32)


def test_data_consistency_step_moves_the_decoded_shape_towards_the_input():
    working = Geometry((P, P, P), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    source = Geometry((6, P, P), (1.0, 1.0, 5.0), (0.0, 0.0, 2.0))  # 5 mm axial slabs
    affine = patch_to_input_index(working, (0, 0, 0), np.eye(3), P, source)
    obs = observe(affine, ball_on(source, 10.0), 1, P)
    ae = BlockAutoencoder()
    guide = DataConsistency(ae.encode, ae.decode_chunks, [obs])
    z = ae.encode(ball(radius=6)[None])
    before = agreement(next(ae.decode_chunks(z))[1][0], obs)
    for _ in range(6):
        z = guide(z, 0.5)
    after = agreement(next(ae.decode_chunks(z))[1][0], obs)
    assert after > before + 0.02
    np.testing.assert_array_equal(DataConsistency(ae.encode, ae.decode_chunks, [None])(z, 0.5), z)  # not guided
    np.testing.assert_array_equal(guide(z, 0.0), z)


def test_guided_chain_reaches_the_analytic_answer_and_guidance_zero_is_the_plain_chain():
    """Quadratic energy E = ||z - m||^2 / 2 and a guide that pulls to y: with no Langevin noise, the reverse
    chain is deterministic; its result must match the same recursion written out by hand."""
    schedule = DiffusionSchedule(timesteps=20)
    m, y = np.float32(2.0), np.float32(-1.0)

    def energy_and_grad(z, t):
        return 0.5 * ((z - m) ** 2).reshape(len(z), -1).sum(1), z - m

    settings = SamplerSettings(t_refine=3, langevin_steps=50, step_size=0.01, noise_scale=0.0, guidance=0.3)
    z0 = np.zeros((2, 3, 2, 2, 2), np.float32)
    guided = refine_latents(
        energy_and_grad, z0, schedule, settings, np.random.default_rng(0), lambda z, w: z + w * (y - z)
    )
    # by hand: the same diffusion draw, then each reverse step's 50 gradient steps and the pull to y
    z = schedule.a_s_cum[3] * z0 + schedule.sigmas_cum[3] * np.random.default_rng(0).standard_normal(z0.shape)
    for t in (2, 1, 0):
        s2 = schedule.sigmas[t + 1] ** 2
        v = z.astype(np.float64)
        for _ in range(50):
            v = v - 0.005 * ((v - m) + (v - z) / s2)
        z = v / schedule.a_s[t + 1]
        z = z + 0.3 * (y - z)
    np.testing.assert_allclose(guided, z, rtol=1e-4, atol=1e-4)
    plain = refine_latents(
        energy_and_grad, z0, schedule, SamplerSettings(t_refine=3, noise_scale=0.0), np.random.default_rng(0)
    )
    zero = refine_latents(
        energy_and_grad,
        z0,
        schedule,
        SamplerSettings(t_refine=3, noise_scale=0.0, guidance=0.0),
        np.random.default_rng(0),
        lambda z, w: z + 1.0,
    )
    np.testing.assert_array_equal(plain, zero)
    assert np.all(np.abs(guided - y) < np.abs(plain - y))


def test_guidance_settings_are_bounded():
    with pytest.raises(ValueError, match="guidance"):
        SamplerSettings(guidance=1.5)
    assert SamplerSettings.from_manifest({"guidance": 0.4}).guidance == 0.4
    assert SamplerSettings.from_manifest({}).guidance == 0.0  # older bundles are not guided


# ------------------------------------------------------------------------------------------ pose


def tilted_spine(degrees: float, axis: int = 1) -> Volume:
    """A synthetic spine rotated in patient space about LPS axis ``axis`` (0 = x, 1 = y, 2 = z) by ``degrees``:
    only the geometry changes (the same array), so every vertebra turns with it."""
    spine = synth_spine(11, levels=("L1", "L2", "L3"))
    g = spine.geometry
    r = rotation(axis, degrees)
    centre = g.index_to_physical((np.array(g.size_ijk) - 1) / 2)
    direction = r @ g.direction_matrix
    origin = r @ (np.asarray(g.origin) - centre) + centre
    return Volume(spine.array, Geometry(g.shape, g.spacing, tuple(origin), tuple(direction.ravel())))


def working_instances(volume: Volume):
    working = spatial.to_working_grid(volume)
    return spatial.find_instances(working)


def test_pose_frames_follow_the_spine_axis_and_undo_a_sagittal_tilt():
    upright_array, upright = working_instances(tilted_spine(0.0))
    tilted_array, tilted = working_instances(tilted_spine(30.0, axis=0))  # about left-right: a sagittal tilt
    r_up, r_tilt = spatial.pose_rotations(upright), spatial.pose_rotations(tilted)
    for r in r_up + r_tilt:
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-9)
        assert np.linalg.det(r) == pytest.approx(1.0)
    turned = np.degrees(np.arccos(np.clip(r_up[1][:, 0] @ r_tilt[1][:, 0], -1, 1)))
    assert abs(turned - 30.0) < 3.0  # the spine axis turned with the spine
    _, upright_patch = spatial.crop_in_frame(upright_array, upright[1], r_up[1])
    _, tilted_patch = spatial.crop_in_frame(tilted_array, tilted[1], r_tilt[1])
    # the middle vertebra looks the same to the model whichever way the spine leans
    shift = np.round(ndimage.center_of_mass(upright_patch)) - np.round(ndimage.center_of_mass(tilted_patch))
    aligned = ndimage.shift(tilted_patch, shift, order=0)
    assert dice(upright_patch > 0.5, aligned > 0.5) > 0.9
    axis_aligned = spatial.crop(tilted_array, spatial.patch_box(tilted[1].centroid)) == tilted[1].instance_id
    shift2 = np.round(ndimage.center_of_mass(upright_patch)) - np.round(ndimage.center_of_mass(axis_aligned))
    assert dice(upright_patch > 0.5, ndimage.shift(axis_aligned, shift2, order=0)) < 0.85  # without the frame


def test_pose_frame_round_trip_and_identity_cases():
    array, instances = working_instances(tilted_spine(20.0, axis=0))
    rotations = spatial.pose_rotations(instances)
    box, patch = spatial.crop_in_frame(array, instances[0], rotations[0])
    back = spatial.uncrop_from_frame(patch, rotations[0]) >= 0.5
    original = spatial.crop(array, box) == instances[0].instance_id
    assert dice(back, original) > 0.97
    assert spatial.is_identity(spatial.pose_rotations(instances[:1])[0])  # no neighbour: axis-aligned
    ident_box, ident = spatial.crop_in_frame(array, instances[0], np.eye(3))
    np.testing.assert_array_equal(ident, spatial.crop_instances(array, instances[:1])[0][2])
    np.testing.assert_array_equal(spatial.uncrop_from_frame(ident, np.eye(3)), ident)


# ------------------------------------------------------------------------------------------ degrade


@pytest.mark.parametrize("axis", ["sagittal", "axial", "coronal"])
def test_native_degrade_is_the_fine_result_on_the_acquisition_grid(axis):
    import SimpleITK as sitk

    spine = synth_spine(4, levels=("L2", "L3"), spacing=1.0)
    fine = degrade(spine, slice_mm=5, axis=axis, seed=3)
    native = degrade(spine, slice_mm=5, axis=axis, seed=3, native=True)
    assert sorted(native.geometry.spacing) == [1.0, 1.0, 5.0]
    assert native.geometry.direction == spine.geometry.direction
    back = sitk.Resample(native.to_sitk(), spine.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), fine.array)
    assert set(native.labels) == set(fine.labels)


def test_slabs_of_an_input_finer_than_the_patch_are_its_voxels_at_the_patch_centres():
    # 0.3 mm input: its box around the patch holds ~37 times more voxels than the patch, so every patch voxel
    # is its own slab: the input voxel its centre falls in, read once, with a count of one.
    working = Geometry((P, P, P), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    n = int(P / 0.3) - 10  # a little smaller than the patch: its border lies outside the field of view
    source = Geometry((n, n, n), (0.3, 0.3, 0.3), (0.1, 0.2, 0.3))
    labels = ball_on(source, 6.0)
    obs = observe(patch_to_input_index(working, (0, 0, 0), np.eye(3), P, source), labels, 1, P)
    centres = np.indices((P, P, P)).reshape(3, -1).T[:, ::-1].astype(float)  # patch voxel (i, j, k) = LPS mm
    index = np.rint(source.physical_to_index(centres)).astype(int)  # (i, j, k) on the source
    valid = np.all((index >= 0) & (index < n), axis=1)
    np.testing.assert_array_equal(obs.slab.reshape(-1) >= 0, valid)
    assert obs.slabs == valid.sum() and set(np.unique(obs.counts)) == {1.0}
    shown = labels[index[valid, 2], index[valid, 1], index[valid, 0]] == 1
    np.testing.assert_array_equal(obs.inside[obs.slab.reshape(-1)[valid]], shown)
