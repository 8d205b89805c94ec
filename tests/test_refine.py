"""The refine pipeline with the shipped bundles: grids, labels, seeds, grouping, maps and meshes."""

import json
from dataclasses import replace

import numpy as np
import pytest

from vertrefine.bundle import default_bundle_dir
from vertrefine.errors import SettingsError
from vertrefine.refine import Refiner, RowNoise, refine_volume, refined_instances
from vertrefine.sampler import SamplerSettings
from vertrefine.sidecar import vertebra_records
from vertrefine.spatial import crop, find_instances, resample_labels
from vertrefine.synth import synth_spine
from vertrefine.volume import Geometry, Volume

FAST = SamplerSettings(t_refine=3, langevin_steps=10)


def _sidecar_rows(result):
    """The per-vertebra rows of the result's sidecar, as written to JSON."""
    return [row.to_dict() for row in vertebra_records(result)]


# The synthetic spines are 1 mm: refine them (by default refine writes inputs finer than 1.5 mm unchanged).
@pytest.fixture(scope="module")
def lsd() -> Refiner:
    """The shipped LSD-EBM bundle with a short chain (FAST)."""
    refiner = Refiner.from_bundle(model="lsd-ebm", device="cpu", fine_inputs="refine")
    assert refiner.note is None
    return refiner.with_options(sampler=FAST)


@pytest.fixture(scope="module")
def vae() -> Refiner:
    return Refiner.from_bundle(model="vae", device="cpu", fine_inputs="refine")


@pytest.fixture(scope="module")
def two_vertebrae() -> Volume:
    return synth_spine(11, levels=("L2", "L3"))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_refine_keeps_label_ids_and_shape_of_each_vertebra(two_vertebrae, lsd):
    result = lsd(two_vertebrae, seed=0)
    assert result.labels.geometry == two_vertebrae.geometry
    assert result.labels.labels == [21, 22]
    for label in (21, 22):
        assert _dice(result.labels.array == label, two_vertebrae.array == label) > 0.8
    rows = _sidecar_rows(result)
    assert [r["level"] for r in rows] == ["L2", "L3"]  # superior first
    assert all(40 < r["volume_before_ml"] < 90 and 40 < r["volume_after_ml"] < 90 for r in rows)


def test_same_seed_same_output_and_another_seed_differs(two_vertebrae, lsd):
    first = lsd(two_vertebrae, seed=5).labels.array
    again = lsd(two_vertebrae, seed=5).labels.array
    other = lsd(two_vertebrae, seed=6)
    np.testing.assert_array_equal(first, again)
    assert any(
        not np.array_equal(v.probability, w.probability)
        for v, w in zip(lsd(two_vertebrae, seed=5).vertebrae, other.vertebrae, strict=True)
    )


def test_a_case_samples_the_same_alone_or_in_a_group(two_vertebrae, lsd):
    other = synth_spine(12, levels=("L4",))
    alone = lsd.sample([lsd.prepare(two_vertebrae)], [np.random.default_rng(3)])
    group = lsd.sample(
        [lsd.prepare(other), lsd.prepare(two_vertebrae)], [np.random.default_rng(9), np.random.default_rng(3)]
    )
    np.testing.assert_allclose(group[1], alone[0], rtol=0, atol=1e-5)


def test_row_noise_takes_each_case_rows_from_its_own_generator():
    noise = RowNoise([np.random.default_rng(1), np.random.default_rng(2)], [2, 3]).standard_normal((5, 4))
    np.testing.assert_array_equal(noise[:2], np.random.default_rng(1).standard_normal((2, 4), dtype=np.float32))
    np.testing.assert_array_equal(noise[2:], np.random.default_rng(2).standard_normal((3, 4), dtype=np.float32))
    with pytest.raises(ValueError):
        RowNoise([np.random.default_rng(1)], [2]).standard_normal((3, 4))


def test_vae_decodes_the_mean_whatever_the_seed(two_vertebrae, vae):
    a = vae(two_vertebrae, seed=1).labels.array
    b = vae(two_vertebrae, seed=2).labels.array
    np.testing.assert_array_equal(a, b)


def test_structures_that_are_not_vertebrae_pass_through_unchanged(two_vertebrae, vae):
    array = two_vertebrae.array.copy()
    array[:8, :10, :10] = 26  # sacrum (below the lumbar vertebrae): not refined by default
    array[-6:, -6:, -6:] = 120  # another structure (a disc, as SPINEPS numbers them)
    array[-12:-6, -6:, -6:] = 90  # an id VerSe does not use: --label-scheme verse says how to read it
    volume = two_vertebrae.with_array(array)
    result = vae.with_options(label_scheme="verse")(volume)
    for label in (26, 90, 120):
        np.testing.assert_array_equal(result.labels.array == label, array == label)
    assert [v.instance.label for v in result.vertebrae] == [21, 22]
    only_l2 = vae.with_options(labels=frozenset({21}), label_scheme="verse")(volume)
    np.testing.assert_array_equal(only_l2.labels.array == 22, array == 22)
    without_90 = two_vertebrae.with_array(np.where(array == 90, 0, array))  # VerSe ids and 100+: auto reads VerSe
    assert [v.instance.label for v in vae(without_90).vertebrae] == [21, 22]


def test_binary_mask_components_are_refined_and_written_back_with_the_mask_value(two_vertebrae, vae):
    binary = two_vertebrae.with_array((two_vertebrae.array > 0).astype(np.uint8))
    instance_array, instances = find_instances(binary)
    assert len(refined_instances(instances, None)) == 2
    result = vae(binary)
    assert result.labels.labels == [1]
    assert _dice(result.labels.array == 1, binary.array == 1) > 0.8
    assert [v.name for v in result.vertebrae] == ["vertebra_1", "vertebra_2"]
    one = binary.with_array(np.where(two_vertebrae.array == 21, 1, 0).astype(np.uint8))  # one vertebra, value 1
    (single,) = vae(one).vertebrae
    assert single.name == "vertebra_1" and single.decision == "refined"  # not "C1", not too large for a C1


def _grids(volume: Volume) -> dict[str, Volume]:
    g = volume.geometry
    flipped = Volume(
        volume.array[:, ::-1, ::-1].copy(),
        replace(g, direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0), origin=(50.0, 40.0, g.origin[2])),
    )
    t = np.deg2rad(25)
    rotation = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])
    centre_ijk = (np.array(g.shape[::-1]) - 1) / 2
    centre_lps = g.index_to_physical(centre_ijk)
    origin = centre_lps - rotation @ (np.array(g.spacing) * centre_ijk)
    oblique_grid = replace(g, direction=tuple(rotation.ravel()), origin=tuple(origin))
    oblique = resample_labels(volume, oblique_grid)  # the same upright anatomy on an oblique grid
    thick = volume.array[::3]
    anisotropic = Volume(thick.copy(), Geometry(thick.shape, (0.9, 0.9, 3.0), g.origin))
    return {"flipped": flipped, "oblique": oblique, "anisotropic": anisotropic}


@pytest.mark.parametrize("kind", ["flipped", "oblique", "anisotropic"])
def test_output_lies_on_the_input_grid(two_vertebrae, vae, kind):
    volume = _grids(two_vertebrae)[kind]
    result = vae.with_options(spacing="input")(volume)
    assert result.labels.geometry == volume.geometry
    assert result.labels.array.shape == volume.array.shape
    assert result.labels.array.dtype == volume.array.dtype
    assert result.labels.labels == [21, 22]
    for label in (21, 22):
        assert _dice(result.labels.array == label, volume.array == label) > 0.7


def test_a_thick_slice_input_gets_a_1mm_grid_with_its_orientation_and_extent(two_vertebrae, vae):
    g = two_vertebrae.geometry
    thick = two_vertebrae.array[::5]
    t = np.deg2rad(15)
    direction = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])  # oblique in-plane
    volume = Volume(thick.copy(), Geometry(thick.shape, (0.8, 0.8, 5.0), g.origin, tuple(direction.ravel())))
    result = vae.with_options(keep_maps=True)(volume)
    out = result.labels.geometry
    assert out.spacing == (1.0, 1.0, 1.0) and out.direction == volume.geometry.direction
    extent = lambda geo: np.array(geo.size_ijk) * np.array(geo.spacing)  # noqa: E731
    np.testing.assert_allclose(extent(out), extent(volume.geometry), atol=1.0)
    corner = lambda geo: geo.index_to_physical(np.full(3, -0.5) * 1.0)  # noqa: E731
    np.testing.assert_allclose(corner(out), corner(volume.geometry), atol=1e-6)  # the same physical box
    assert result.probability.geometry == out and result.labels.labels == [21, 22]
    assert vae.with_options(spacing="input")(volume).labels.geometry == volume.geometry
    assert vae.with_options(spacing=2.0)(volume).labels.geometry.spacing == (2.0, 2.0, 2.0)
    fine = _grids(two_vertebrae)["flipped"]  # 1 mm input: its own grid by default
    assert vae(fine).labels.geometry == fine.geometry


def test_samples_give_mean_probability_and_uncertainty_maps(two_vertebrae, lsd):
    three = lsd.with_options(samples=3, keep_maps=True)
    prepared = three.prepare(two_vertebrae)
    (z,) = three.sample([prepared], [np.random.default_rng(0)])
    assert z.shape == (3, 2, *lsd.bundle.latent_shape)
    result = three.finish(prepared, z)
    probability, std = result.probability.array, result.uncertainty.array
    assert result.probability.geometry == two_vertebrae.geometry
    assert probability.min() >= 0 and probability.max() <= 1 and std.min() >= 0
    foreground = result.labels.array > 0
    assert probability[foreground].min() >= 0.5 - 1e-6  # every labelled voxel passed the threshold
    assert std.max() > 0  # three chains do not agree everywhere
    assert all(v.std is not None for v in result.vertebrae)


def test_meshes_are_closed_and_lie_on_their_vertebra_in_patient_coordinates(two_vertebrae, vae):
    from vertrefine.mesh import vertebra_mesh

    result = vae(two_vertebrae)
    for vertebra in result.vertebrae:
        owned = np.ones(vertebra.probability.shape, dtype=bool)
        mesh = vertebra_mesh(vertebra.probability, owned, vertebra.box, result.working)
        assert mesh.is_watertight
        assert mesh.volume > 0  # outward normals
        volume_ml = vertebra.voxels_after / 1000.0
        assert abs(mesh.volume / 1000.0 - volume_ml) < 0.1 * volume_ml
        np.testing.assert_allclose(mesh.center_mass, vertebra.instance.centroid_lps, atol=4.0)


def test_no_vertebra_labels_is_a_clear_error(two_vertebrae, vae):
    from vertrefine.errors import InputError

    only_sacrum = two_vertebrae.with_array(np.where(two_vertebrae.array > 0, 26, 0).astype(np.uint8))
    sacrum_and_other = only_sacrum.with_array(np.where(two_vertebrae.array == 21, 90, only_sacrum.array))
    with pytest.raises(InputError, match="--labels"):
        vae(sacrum_and_other)


def _slab_agreement(result, thick: Volume) -> float:
    """Fraction of the thick input's voxels near the vertebrae whose label the result's majority reproduces."""
    back = resample_labels(result.labels, thick.geometry, method="nearest").array
    near = np.zeros(thick.array.shape, bool)
    near[thick.array > 0] = True
    near |= back > 0
    return float(np.mean(back[near] == thick.array[near]))


@pytest.mark.parametrize("binary", [False, True])
def test_guidance_makes_the_result_agree_with_the_thick_slices(two_vertebrae, lsd, binary):
    from dataclasses import replace as with_

    from vertrefine.degrade import degrade

    thick = degrade(two_vertebrae, slice_mm=5, axis="sagittal", seed=3, native=True, islands=0)
    if binary:  # one value for both vertebrae, kept apart by a 3-voxel gap (touching ones would be one)
        from scipy import ndimage

        gap = ndimage.binary_dilation(thick.array == 21, iterations=3) & (thick.array == 22)
        thick = thick.with_array(((thick.array > 0) & ~gap).astype(np.uint8))
    unprojected = dict(spacing="input", on_disagree="write", consistency="none")  # the guidance alone
    plain = lsd.with_options(sampler=with_(FAST, guidance=0.0), **unprojected)(thick, seed=1)
    guided_refiner = lsd.with_options(sampler=with_(FAST, guidance=0.7), **unprojected)
    prepared = guided_refiner.prepare(thick)
    assert len(prepared.observations) == 2 and all(o is not None and o.slabs > 0 for o in prepared.observations)
    guided = guided_refiner(thick, seed=1)
    assert _slab_agreement(guided, thick) > _slab_agreement(plain, thick)
    fine = guided_refiner.prepare(two_vertebrae)  # a 1 mm input: nothing to guide by
    assert fine.observations == []


class WrongShape:
    """Sessions whose decoder draws a cube where the second vertebra should be (a model gone wrong)."""

    @classmethod
    def refiner(cls, refiner: Refiner, wrong_row: int, **options) -> Refiner:
        """``refiner`` with these sessions around its own and ``options`` changed."""
        return Refiner(cls(refiner.sessions, wrong_row), refiner.with_options(**options).options)

    def __init__(self, sessions, wrong_row: int) -> None:
        self._sessions, self.wrong_row = sessions, wrong_row

    def __getattr__(self, name):
        return getattr(self._sessions, name)

    def decode_chunks(self, z, x=None):
        for start, probability in self._sessions.decode_chunks(z, x):
            probability = probability.copy()
            for offset in range(len(probability)):
                if (start + offset) % 2 == self.wrong_row:
                    probability[offset] = 0.0
                    probability[offset, 15:60, 40:90, 40:90] = 1.0  # below the superior neighbour
            yield start, probability


@pytest.mark.parametrize("on_disagree", ["keep-input", "write"])
def test_a_vertebra_that_disagrees_with_the_input_is_flagged_and_kept_as_input(two_vertebrae, vae, on_disagree):
    result = WrongShape.refiner(vae, wrong_row=1, on_disagree=on_disagree)(two_vertebrae)
    good, wrong = result.vertebrae
    assert good.decision == "refined" and good.reason == "" and good.agreement_dsc > 0.8
    assert wrong.agreement_dsc < 0.6 and wrong.agreement_hd95_mm > 5
    rows = _sidecar_rows(result)
    assert rows[1]["decision"] == wrong.decision and rows[1]["agreement_dsc"] == round(wrong.agreement_dsc, 4)
    l3 = result.labels.array == wrong.instance.label
    if on_disagree == "keep-input":
        assert wrong.decision == "kept input" and "disagrees with the input" in wrong.reason
        np.testing.assert_array_equal(l3, two_vertebrae.array == wrong.instance.label)  # the input's own voxels
        kept_patch = crop(result.working_before, wrong.box) == wrong.instance.instance_id
        np.testing.assert_array_equal(wrong.probability, kept_patch)  # meshes and maps follow what is written
    else:
        assert wrong.decision == "refined, flagged" and "check it" in wrong.reason
        assert _dice(l3, two_vertebrae.array == wrong.instance.label) < 0.85
    with pytest.raises(SettingsError, match="on_disagree"):
        vae.with_options(on_disagree="ignore")


def _with_structure(spine: Volume, label: int, where: tuple[slice, ...]) -> Volume:
    array = spine.array.copy()
    array[where] = label
    return spine.with_array(array)


@pytest.mark.parametrize(
    "kind, label, where, words",
    [
        ("single voxel", 19, (slice(2, 3), slice(2, 3), slice(2, 3)), "too small"),
        ("specks", 19, (slice(2, 40, 9), slice(2, 40, 9), slice(2, 40, 9)), "too small"),
    ],
)
def test_an_implausible_input_vertebra_passes_through_unchanged_with_a_warning(
    two_vertebrae, vae, kind, label, where, words
):
    volume = _with_structure(two_vertebrae, label, where)
    result = vae(volume)
    np.testing.assert_array_equal(result.labels.array == label, volume.array == label)  # voxel for voxel
    assert [v.instance.label for v in result.vertebrae] == [21, 22]  # the real ones are refined
    (row,) = [r for r in _sidecar_rows(result) if r["label"] == label]
    assert row["decision"] == "passed through" and words in row["reason"]
    assert set(row) == set(_sidecar_rows(result)[0])  # every vertebra has the same sidecar keys
    assert any(line.startswith("T12:") and words in line for line in result.warnings)


def test_a_liver_sized_blob_is_not_refined_as_a_vertebra(vae):
    g = Geometry((150, 150, 150), (1.5, 1.5, 1.5), (0.0, 0.0, 0.0))
    k, j, i = np.ogrid[:150, :150, :150]
    blob = ((k - 75) ** 2 / 60**2 + (j - 75) ** 2 / 50**2 + (i - 75) ** 2 / 45**2 <= 1).astype(np.uint8) * 20
    volume = Volume(blob, g)
    result = vae(volume)
    assert result.vertebrae == [] and "too large" in result.warnings[0]
    np.testing.assert_array_equal(result.labels.array, blob)


def test_an_emptied_result_is_not_written_the_input_is_kept(two_vertebrae, vae):
    class Empty(WrongShape):
        def decode_chunks(self, z, x=None):
            for start, probability in self._sessions.decode_chunks(z, x):
                probability = probability.copy()
                probability[[(start + n) % 2 == self.wrong_row for n in range(len(probability))]] = 0.0
                yield start, probability

    result = Empty.refiner(vae, wrong_row=0, on_disagree="write")(two_vertebrae)
    emptied = result.vertebrae[0]
    assert emptied.decision == "kept input" and emptied.reason == "implausible result: empty result"
    label = emptied.instance.label
    np.testing.assert_array_equal(result.labels.array == label, two_vertebrae.array == label)
    assert result.vertebrae[1].decision == "refined"


class BallDecoder(WrongShape):
    """Decodes every latent as a ball of radius 24 mm around the patch centre: a shape that does not stop at
    the image's border, as a model completing a cut vertebra would."""

    def decode_chunks(self, z, x=None):
        grid = np.indices((128, 128, 128)).reshape(3, -1).T
        ball = (np.linalg.norm(grid - 63.5, axis=1) <= 24).reshape((128,) * 3).astype(np.float32)
        for start, probability in self._sessions.decode_chunks(z, x):
            yield start, np.broadcast_to(ball, probability.shape).copy()


def test_a_vertebra_cut_by_the_border_is_refined_only_inside_or_passed_through(two_vertebrae, vae):
    g = two_vertebrae.geometry
    l3 = np.argwhere(two_vertebrae.array == 22)
    k_mid = int(np.median(l3[:, 0]))  # L3 (inferior, low k) cut through its middle: the image starts there
    origin = tuple(g.index_to_physical(np.array([0, 0, k_mid])))
    cut = Volume(
        two_vertebrae.array[k_mid:].copy(), replace(g, shape=(g.shape[0] - k_mid, *g.shape[1:]), origin=origin)
    )
    result = BallDecoder.refiner(vae, wrong_row=-1, on_disagree="write")(cut)
    assert result.labels.geometry == cut.geometry  # nothing is written beyond the image
    upper, lower = result.vertebrae
    assert upper.fov_fraction == 1.0 and 0.5 < lower.fov_fraction < 0.9
    assert [r["fov_fraction"] for r in _sidecar_rows(result)] == [1.0, round(lower.fov_fraction, 3)]
    strict = BallDecoder.refiner(vae, wrong_row=-1, on_disagree="write", min_fov_fraction=0.95)(cut)
    kept = strict.vertebrae[1]
    assert kept.decision == "kept input" and "field of view" in kept.reason
    np.testing.assert_array_equal(strict.labels.array == 22, cut.array == 22)  # passed through unchanged
    assert strict.vertebrae[0].decision in ("refined", "refined, flagged")  # the whole vertebra is not gated


class ExtraPieces(WrongShape):
    """Adds a speck (2^3 voxels) to the first vertebra's decoded patch and a second large piece to the second's."""

    def decode_chunks(self, z, x=None):
        for start, probability in self._sessions.decode_chunks(z, x):
            probability = probability.copy()
            for offset in range(len(probability)):
                if (start + offset) % 2 == 0:
                    probability[offset, 100:102, 40:42, 40:42] = 1.0  # above the vertebra: a speck
                else:
                    probability[offset, 28:40, 30:60, 30:60] = 1.0  # below the vertebra: a 10.8 mL block
            yield start, probability


def test_specks_are_dropped_and_a_result_in_large_pieces_is_flagged(two_vertebrae, vae):
    result = ExtraPieces.refiner(vae, wrong_row=-1, on_disagree="write")(two_vertebrae)
    first, second = result.vertebrae
    assert len(first.pieces_ml) == 1 and first.decision == "refined"  # the speck is gone
    box_slices, patch_slices = first.box.slices(result.working_after.shape)
    speck = np.zeros((128,) * 3, bool)
    speck[100:102, 40:42, 40:42] = True
    assert not (result.working_after[box_slices][speck[patch_slices]] == first.instance.instance_id).any()
    assert len(second.pieces_ml) == 2 and second.pieces_ml[1] > 8.0
    assert second.decision == "refined, flagged" and "2 pieces" in second.reason
    assert any("2 pieces" in line for line in result.warnings)


def test_a_fine_input_is_refined_on_its_own_grid_and_left_as_it_is_outside_the_vertebrae(two_vertebrae, vae):
    # 0.4 mm: the input is sampled (not distance-mapped) onto the working grid, and only the vertebrae's region
    # goes back onto the fine grid: every other voxel, near or far, is the input's.
    g = two_vertebrae.geometry
    fine_grid = Geometry(tuple(int(n * 2.5) for n in g.shape), (0.4, 0.4, 0.4), tuple(np.array(g.origin) - 0.3))
    fine = resample_labels(two_vertebrae, fine_grid)
    array = fine.array.copy()
    array[:20, :20, :20] = 120  # another structure (a disc id) in a corner, far from the vertebrae
    near = (fine.array == 0) & np.roll(fine.array == 21, 10, axis=2)  # another structure touching L2
    array[near] = 121
    volume = fine.with_array(array)
    result = vae(volume)
    assert result.labels.geometry == fine_grid and result.labels.array.dtype == array.dtype
    for label in (120, 121):
        np.testing.assert_array_equal(result.labels.array == label, array == label)
    for label in (21, 22):
        assert _dice(result.labels.array == label, array == label) > 0.8
    assert np.isin(result.labels.array, [21, 22])[array == 0].any()  # refined, not copied
    on_working = resample_labels(volume, result.working, method="nearest").array
    np.testing.assert_array_equal(np.isin(result.working_before, [21, 22]), np.isin(on_working, [21, 22]))


def test_a_fine_input_is_written_unchanged_by_default_with_one_warning(two_vertebrae, vae):
    # up to 3 mm refinement measured no better than the input (docs/BENCHMARKS.md, Fine inputs)
    result = vae.with_options(fine_inputs="keep")(two_vertebrae)  # refine's default
    np.testing.assert_array_equal(result.labels.array, two_vertebrae.array)
    assert result.vertebrae == [] and [r["decision"] for r in _sidecar_rows(result)] == ["passed through"] * 2
    (warning,) = result.warnings  # one line for the case, naming both vertebrae and the way to refine anyway
    assert warning.startswith("L2, L3: input no coarser than 3 mm") and "--fine-inputs refine" in warning
    assert result.summary.startswith("2 passed through")

    def thick(step: int, noise: float = 0.0) -> Volume:
        array = two_vertebrae.array[::step].copy()  # every step-th slice along k: step mm
        spacing = (1.0, 1.0, float(step) + noise)
        return Volume(array, replace(two_vertebrae.geometry, shape=array.shape, spacing=spacing))

    kept = vae.with_options(fine_inputs="keep")(thick(3))
    assert kept.vertebrae == [] and "coarsest spacing 3 mm" in kept.warnings[0]
    assert vae.with_options(fine_inputs="keep")(thick(3, 2e-7)).vertebrae == []  # a header's float noise: 3 mm
    assert [v.decision for v in vae.with_options(fine_inputs="keep")(thick(4)).vertebrae] == ["refined", "refined"]


def test_a_diverging_chain_keeps_the_input_and_says_the_sampler_diverged(two_vertebrae, lsd):
    """A step size far beyond what the schedule allows (the API does not bound it; the CLI does) makes every
    chain diverge: no vertebra may vanish or grow, each keeps the input's voxels and the reason says why."""
    diverging = SamplerSettings(t_refine=3, langevin_steps=10, step_size=0.5)
    result = lsd.with_options(sampler=diverging, samples=2, keep_maps=True)(two_vertebrae, seed=0)
    assert [v.decision for v in result.vertebrae] == ["kept input", "kept input"]
    assert all(v.reason.startswith("sampler diverged (2 of 2 chains") for v in result.vertebrae)
    np.testing.assert_array_equal(result.labels.array, two_vertebrae.array)  # voxel for voxel
    assert np.isfinite(result.probability.array).all() and np.isfinite(result.uncertainty.array).all()
    assert all(line.endswith("; kept input") and "sampler diverged" in line for line in result.warnings)
    assert [r["decision"] for r in _sidecar_rows(result)] == ["kept input", "kept input"]


def test_an_empty_decode_keeps_the_input(two_vertebrae, vae):
    class Empty(WrongShape):
        def decode_chunks(self, z, x=None):
            for start, probability in self._sessions.decode_chunks(z, x):
                yield start, np.zeros_like(probability)

    result = Empty.refiner(vae, wrong_row=0)(two_vertebrae)
    assert [v.decision for v in result.vertebrae] == ["kept input", "kept input"]
    assert all("empty result" in v.reason for v in result.vertebrae)
    np.testing.assert_array_equal(result.labels.array, two_vertebrae.array)


def test_the_refiner_is_the_pipeline_built_once_and_refuses_what_it_cannot_run(two_vertebrae, lsd, tmp_path):
    import shutil

    from vertrefine.errors import InputError

    refiner = Refiner.from_bundle(device="cpu", t_refine=3, langevin_steps=10, fine_inputs="refine")
    sampler = refiner.options.sampler
    assert refiner.bundle.kind == "lsd-ebm" and (sampler.t_refine, sampler.langevin_steps) == (3, 10)
    assert sampler.guidance == refiner.bundle.sampler["guidance"] and refiner.note is None  # the bundle's default
    same = refine_volume(two_vertebrae, lsd.sessions, refiner.options, seed=4)
    np.testing.assert_array_equal(refiner(two_vertebrae, seed=4).labels.array, same.labels.array)
    with pytest.raises(SettingsError, match="--step-size 40 is outside"):
        Refiner.from_bundle(device="cpu", step_size=40.0)
    with pytest.raises(SettingsError, match="--samples needs"):
        Refiner.from_bundle(model="vae", device="cpu", samples=2)
    with pytest.raises(SettingsError, match="--t-refine: sampler options need"):
        Refiner.from_bundle(model="vae", device="cpu", t_refine=3)
    with pytest.raises(SettingsError, match="not lsd-ebm"):
        Refiner.from_bundle(default_bundle_dir("vae"), model="lsd-ebm", device="cpu")
    with pytest.raises(SettingsError, match="threshold"):
        Refiner.from_bundle(model="vae", device="cpu", threshold=1.5)
    copy = tmp_path / "bundle"
    shutil.copytree(default_bundle_dir("vae"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["sampler_defaults"]["threshold"] = 0.4  # the bundle's threshold is refine's default
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert Refiner.from_bundle(copy, device="cpu").options.threshold == 0.4
    assert Refiner.from_bundle(copy, device="cpu", threshold=0.6).options.threshold == 0.6
    (copy / next(p.name for p in copy.glob("*.onnx"))).write_bytes(b"damaged")
    with pytest.raises(InputError, match="checksum does not match"):
        Refiner.from_bundle(copy, device="cpu")


def test_with_options_shares_the_open_sessions_and_changes_only_the_options_given(two_vertebrae, vae):
    kept = vae.with_options(fine_inputs="keep", on_disagree="write")
    assert kept.sessions is vae.sessions and kept.note == vae.note  # nothing is loaded or opened again
    assert kept.options == replace(vae.options, fine_inputs="keep", on_disagree="write")
    assert vae.options.fine_inputs == "refine"  # the Refiner it came from is unchanged
    np.testing.assert_array_equal(kept(two_vertebrae).labels.array, two_vertebrae.array)  # 1 mm: written unchanged
    assert vae(two_vertebrae).vertebrae != []
    with pytest.raises(SettingsError, match="threshold must be in"):
        vae.with_options(threshold=1.5)
    with pytest.raises(SettingsError, match="vae bundle has no energy"):
        vae.with_options(sampler=FAST)
    with pytest.raises(TypeError):
        vae.with_options(treshold=0.4)


def test_two_vertebrae_under_one_label_pass_through_and_single_ones_are_refined(vae):
    spine = synth_spine(12)  # L1..L5 (20..24)
    whole = vae(spine)
    assert not any("two vertebrae" in line for line in whole.warnings)
    array = spine.array.copy()
    array[array == 23] = 22  # L3 and L4 under L3's label, as a segmentation that missed a boundary
    result = vae(spine.with_array(array))
    np.testing.assert_array_equal(result.labels.array == 22, array == 22)  # passed through voxel for voxel
    assert sorted(v.instance.label for v in result.vertebrae) == [20, 21, 24]  # the others are refined
    (row,) = [r for r in _sidecar_rows(result) if r["label"] == 22]
    assert row["decision"] == "passed through" and "looks like two vertebrae under one label" in row["reason"]
    assert any(line.startswith("L3:") and "give each vertebra its own label" in line for line in result.warnings)


def test_merged_problem_needs_both_ratios_or_a_doubled_volume():
    from vertrefine.plausibility import merged_problem

    neighbours = [(50.0, 40.0), (54.0, 42.0)]  # mean 52 mL, 41 mm
    assert merged_problem(104.0, 70.0, neighbours) is not None  # doubled and taller
    assert merged_problem(104.0, 45.0, neighbours) is not None  # doubled volume alone (a tilted pair)
    assert merged_problem(85.0, 60.0, neighbours) is not None  # 1.6 x volume and 1.5 x height
    assert merged_problem(85.0, 45.0, neighbours) is None  # large but not tall: one big vertebra
    assert merged_problem(60.0, 70.0, neighbours) is None  # tall but not large
    assert merged_problem(200.0, 90.0, []) is None  # no whole neighbour: nothing to compare with
    assert merged_problem(104.0, 45.0, neighbours[:1]) is None  # one neighbour (it may have lost volume): not alone
    assert merged_problem(104.0, 70.0, neighbours[:1]) is not None  # ... but doubled and taller


def test_lumbar_vertebrae_numbered_1_to_5_are_not_refined_as_cervical_and_the_warning_says_why(vae):
    spine = synth_spine(13)  # L1..L5 as VerSe 20..24
    array = spine.array.copy()
    nonzero = array > 0
    array[nonzero] -= 19  # 1..5, as some nnU-Net datasets number L1..L5: VerSe's C1..C5
    result = vae(spine.with_array(array))
    assert result.vertebrae == []
    np.testing.assert_array_equal(result.labels.array, array)
    assert any("renumber them to VerSe's ids" in line and "L1-L5: 20-24" in line for line in result.warnings)


def test_the_python_api_refuses_what_the_command_line_refuses_in_one_line(lsd, two_vertebrae):
    from vertrefine.errors import InputError, SettingsError

    refused = {
        "spacing must be from 0.25 to 5": lambda: lsd.with_options(spacing=100),
        "spacing must be from 0.25": lambda: lsd.with_options(spacing=0.1),
        "device must be one of auto, cpu, cuda, got 'tpu'": lambda: Refiner.from_bundle(device="tpu"),
        "threads must be a whole number >= 0": lambda: Refiner.from_bundle(threads=-1),
        "samples must be a whole number >= 1, got '3'": lambda: lsd.with_options(samples="3"),
        "guidance must be in [0, 1], got 2": lambda: lsd.with_options(guidance=2),
        "step_size must be > 0, got -1": lambda: lsd.with_options(step_size=-1),
        "seed must be a whole number >= 0, got -1": lambda: lsd(two_vertebrae, seed=-1),
        "one generator per case, got 1 for 2 cases": lambda: lsd.sample([None, None], [np.random.default_rng(0)]),
        "no sampler to change": lambda: lsd.with_options(sampler=None, t_refine=2),
        "device: set when the sessions are opened": lambda: lsd.with_options(device="cpu"),
        "t_refine 1000000 exceeds the bundle's 20 diffusion steps": lambda: lsd.with_options(t_refine=10**6),
    }
    for words, call in refused.items():
        with pytest.raises(SettingsError) as caught:
            call()
        assert words in str(caught.value), (words, str(caught.value))
    with pytest.raises(InputError, match="does not exist"):
        lsd("no_such_file.nii.gz")


def test_with_options_takes_sampler_settings_and_the_command_lines_label_spelling(lsd):
    before = lsd.options
    changed = lsd.with_options(t_refine=4, guidance=0.75, labels="L1-L3")
    assert changed.options.sampler == replace(before.sampler, t_refine=4, guidance=0.75)
    assert changed.options.labels.levels == frozenset({"L1", "L2", "L3"})
    assert lsd.options is before and changed.sessions is lsd.sessions  # the original is unchanged, sessions shared
