"""Hard data consistency: the refined shape holds exactly what a thick-slice input's slabs show."""

import numpy as np
import pytest

from vertrefine.degrade import CLEAN, degrade
from vertrefine.guidance import project_labels, slab_means
from vertrefine.refine import Refiner, _box_observation, _input_instance_ids
from vertrefine.sampler import SamplerSettings
from vertrefine.spatial import crop, resample_labels
from vertrefine.synth import synth_spine

NOISE_FREE = CLEAN  # degrade --clean


def _columns(shape: tuple[int, int, int], thickness: int) -> np.ndarray:
    """Slab ids of 1 x 1 x ``thickness`` voxel columns along axis 0."""
    k, j, i = np.indices(shape)
    return ((k // thickness) * shape[1] + j) * shape[2] + i


def _held(mask: np.ndarray, slab: np.ndarray, n: int) -> np.ndarray:
    counts = np.bincount(slab.ravel(), minlength=n)
    return np.bincount(slab.ravel(), weights=mask.ravel(), minlength=n) >= (counts + 1) // 2


def _ball(shape, centre, radius) -> np.ndarray:
    k, j, i = np.indices(shape)
    return (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 < radius**2


@pytest.mark.parametrize("radius", [9, 12, 15])
def test_projection_makes_every_slab_show_what_the_input_shows_with_the_fewest_changes(radius):
    shape = (40, 32, 32)
    slab = _columns(shape, 5).astype(np.int32)
    n = int(slab.max()) + 1
    truth = _ball(shape, (20, 16, 16), 12)
    inside = _held(truth, slab, n)
    result = _ball(shape, (21, 15, 16), radius)  # shrunk, swollen or shifted
    out = project_labels(result, np.ones(shape, bool), slab, inside, ~inside)
    np.testing.assert_array_equal(_held(out, slab, n), inside)
    counts = np.bincount(slab.ravel(), minlength=n)
    before = np.bincount(slab.ravel(), weights=result.ravel(), minlength=n).astype(int)
    half = (counts + 1) // 2
    fewest = np.where(inside & (before < half), half - before, 0) + np.where(~inside & (before >= half), before - half + 1, 0)
    assert np.count_nonzero(out != result) == fewest.sum()
    # a result that already agrees is left alone
    np.testing.assert_array_equal(project_labels(out, np.ones(shape, bool), slab, inside, ~inside), out)


def test_projection_adds_only_free_voxels_and_leaves_unobserved_voxels_alone():
    shape = (20, 16, 16)
    slab = _columns(shape, 5).astype(np.int32)
    slab[:, :, :4] = -1  # outside the input's field of view
    n = int(slab.max()) + 1
    inside = np.ones(n, bool)  # the input shows the vertebra everywhere it sees
    result = np.zeros(shape, bool)
    result[:, :, :6] = True
    free = np.ones(shape, bool)
    free[:, 8:, :] = False  # another vertebra holds these voxels
    out = project_labels(result, free, slab, inside, ~inside)
    assert not out[:, 8:, 6:].any()
    np.testing.assert_array_equal(out[:, :, :4], result[:, :, :4])
    assert out[:, :8, 6:].sum() >= 3 * out[:, :8, 6:].size // 5


@pytest.fixture(scope="module")
def lsd() -> Refiner:
    return Refiner.from_bundle(model="lsd-ebm", device="cpu").with_options(
        sampler=SamplerSettings(t_refine=3, langevin_steps=10)
    )


@pytest.fixture(scope="module")
def clean_thick():
    truth = synth_spine(21, levels=("L2", "L3", "L4"))
    return truth, degrade(truth, slice_mm=5, axis="sagittal", seed=4, native=True, **NOISE_FREE)


def test_refine_reproduces_clean_slabs_exactly(lsd, clean_thick):
    _, thick = clean_thick
    prepared = lsd.prepare(thick)
    result = lsd.finish(prepared, lsd.sample([prepared], [np.random.default_rng(0)])[0])
    input_ids = _input_instance_ids(prepared)
    for v in result.vertebrae:
        assert v.decision == "refined" and v.consistency_ml is not None
        observation = _box_observation(prepared, input_ids, v)
        held = slab_means((crop(result.working_after, v.box) == v.instance.instance_id).astype(np.float32), observation)
        observed = observation.inside | observation.outside
        np.testing.assert_array_equal((held >= 0.5)[observed], observation.inside[observed])
    unprojected = lsd.with_options(consistency="none").finish(prepared, lsd.sample([prepared], [np.random.default_rng(0)])[0])
    assert all(v.consistency_ml is None for v in unprojected.vertebrae)


def _dsc(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _per_vertebra_dsc(refiner: Refiner, truth, thick) -> list[float]:
    refined = resample_labels(refiner(thick, seed=0).labels, truth.geometry, method="nearest").array
    return [_dsc(refined == label, truth.array == label) for label in (21, 22, 23)]


def test_refine_does_not_make_a_clean_thick_phantom_worse(lsd, clean_thick):
    truth, thick = clean_thick
    given = resample_labels(thick, truth.geometry, method="nearest").array
    before = [_dsc(given == label, truth.array == label) for label in (21, 22, 23)]
    after = _per_vertebra_dsc(lsd, truth, thick)
    assert all(a >= b - 0.005 for a, b in zip(after, before, strict=True)), (before, after)


def test_a_thick_staircase_stored_on_the_1mm_grid_is_projected_onto_its_slabs(lsd, clean_thick):
    truth, _ = clean_thick
    staircase = degrade(truth, slice_mm=5, axis="sagittal", seed=4, **NOISE_FREE)  # on the truth's 1 mm grid
    result = lsd(staircase, seed=0)
    assert all(v.consistency_ml is not None for v in result.vertebrae)
    back = result.labels.array
    given = staircase.array
    for label in (21, 22, 23):
        assert _dsc(back == label, truth.array == label) >= _dsc(given == label, truth.array == label) - 0.005
