"""benchmarks/real.py: the real-CT protocol on two small phantom spines (input and interpolation rows, no model)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.real import (
    METHODS,
    MODEL_ROWS,
    axis_rotation,
    benchmark,
    case_seed,
    grid_centre,
    load_ground_truth,
    main,
    merge_runs,
    rotate_geometry,
    rotate_volume,
    thick_input,
)
from vertrefine.nifti import write_nifti
from vertrefine.synth import synth_spine
from vertrefine.volume import Geometry, Volume

CASES = ("verse__sub-test1", "verse__sub-test2")
LEVELS = ("L3", "L4")  # labels 22, 23
SACRUM = 26


def _flipped_x(volume: Volume) -> Volume:
    """The same anatomy stored with the i axis pointing right (direction -x): another file layout."""
    g = volume.geometry
    origin = g.index_to_physical(np.array([g.size_ijk[0] - 1, 0, 0], dtype=float))
    direction = np.diag([-1.0, 1.0, 1.0]).ravel()
    return Volume(volume.array[:, :, ::-1].copy(), Geometry(g.shape, g.spacing, tuple(origin), tuple(direction)))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("real-ct")
    for n, case in enumerate(CASES):
        spine = synth_spine(7 + n, levels=LEVELS)
        array = spine.array.copy()
        array[:6, :6, :6] = SACRUM  # not a vertebra 1..25: the benchmark drops it
        spine = spine.with_array(array)
        write_nifti(_flipped_x(spine) if n else spine, folder / f"{case}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> tuple[dict, str, str]:
    out = tmp_path_factory.mktemp("out")
    argv = ["--data", str(data), "--cases", *CASES, "--methods", "input", "sdf", "sdf2d", "--slice-mm", "5"]
    argv += ["--families", "clean", "warp", "--forms", "native", "fine"]
    argv += ["--axis", "sagittal", "--no-ceiling", "--no-pose", "--json", str(out / "r.json")]
    argv += ["--markdown", str(out / "r.md")]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        main(argv)
    doc = json.loads((out / "r.json").read_text())
    return doc, (out / "r.md").read_text(), stdout.getvalue().strip().splitlines()[-1]


KEY = "clean 5mm sagittal native"


def _methods(doc: dict, key: str = KEY) -> dict:
    return doc["conditions"][key]["methods"]


def _dsc(entry: dict) -> float:
    return entry["summary"]["overall"]["dsc"]["mean"]


def test_shape_based_interpolation_beats_nearest_on_clean_thick_slices(run):
    methods = _methods(run[0])
    assert _dsc(methods["sdf"]) > _dsc(methods["input"])
    assert _dsc(methods["sdf2d"]) > _dsc(methods["input"])
    assert _dsc(methods["sdf"]) != _dsc(methods["sdf2d"])  # two different interpolations


def test_conditions_are_family_thickness_axis_and_form(run):
    doc = run[0]
    keys = {f"{family} 5mm sagittal {form}" for family in ("clean", "warp") for form in ("native", "fine")}
    assert set(doc["conditions"]) == keys
    native, fine = doc["conditions"][KEY], doc["conditions"]["clean 5mm sagittal fine"]
    for case in CASES:
        assert sorted(native["input_spacing_mm"][case])[-1] == pytest.approx(5.0)  # the slabs, one voxel each
        assert fine["input_spacing_mm"][case] == pytest.approx([1.0, 1.0, 1.0])
    # the fine form holds the same staircase: its input row scores as the native one's
    assert _dsc(_methods(doc, "clean 5mm sagittal fine")["input"]) == pytest.approx(_dsc(_methods(doc)["input"]))
    assert _dsc(_methods(doc, "warp 5mm sagittal native")["input"]) < _dsc(_methods(doc)["input"])


def test_signed_volume_error_is_measured_against_the_truth(run, data):
    doc = run[0]
    rows = _methods(doc)["input"]["rows"]
    gt = load_ground_truth(data / f"{CASES[0]}.nii.gz")
    given = thick_input(gt, "clean", 5.0, "sagittal", "fine", case_seed(CASES[0], 5.0, "sagittal"))
    for row in rows:
        if row["case"] == CASES[0]:
            truth, found = np.sum(gt.array == row["label"]), np.sum(given.array == row["label"])
            assert row["volume_error_pct"] == pytest.approx(100.0 * (found - truth) / truth)
    summary = _methods(doc)["input"]["volume_error_pct"]
    assert summary["min"] <= summary["mean"] <= summary["max"]
    assert "volume error %" in run[1]


def test_a_model_row_is_one_entry_and_the_rows_are_in_order():
    assert METHODS[:3] == ("input", "sdf", "sdf2d") and set(MODEL_ROWS) <= set(METHODS)
    assert METHODS[-1] == "refine"


def test_merging_runs_adds_conditions_and_rows(run, data):
    doc = run[0]
    later = benchmark(
        data, CASES, families=["clean"], slice_mm=[5.0], axes=["axial"], forms=["native"], methods=["input"],
        ceiling=False, pose=False,
    )  # fmt: skip
    merged = merge_runs(doc, json.loads(json.dumps(later)))
    assert set(merged["conditions"]) == set(doc["conditions"]) | {"clean 5mm axial native"}
    assert len(merged["runs"]) == 2
    with pytest.raises(ValueError, match="different cases"):
        merge_runs(doc, dict(later, settings=dict(later["settings"], cases=[CASES[0]])))


def test_every_case_and_vertebra_has_a_row_and_non_vertebra_labels_are_dropped(run):
    doc, markdown, _ = run
    expected = {(case, label) for case in CASES for label in (22, 23)}
    for method in ("input", "sdf"):
        rows = _methods(doc)[method]["rows"]
        assert {(r["case"], r["label"]) for r in rows if not r["extra"]} == expected
        assert all(r["label"] != SACRUM for r in rows)
        assert all(r[key] is not None for r in rows for key in ("dsc", "hd95_mm", "assd_mm"))
    assert doc["settings"]["methods"] == ["input", "sdf", "sdf2d"]
    assert doc["bundle"] is None and doc["ceiling"] is None and doc["pose"] is None
    assert "| SDF interpolation, 3D label-aware |" in markdown and "4 vertebrae" in markdown
    assert "| SDF interpolation per slice (2D, Raya-Udupa) |" in markdown


def test_worst_change_is_the_lowest_per_vertebra_difference(run):
    doc, markdown, line = run
    methods = _methods(doc)
    base = {(r["case"], r["label"]): r["dsc"] for r in methods["input"]["rows"]}
    diffs = [r["dsc"] - base[(r["case"], r["label"])] for r in methods["sdf2d"]["rows"]]
    change = methods["sdf2d"]["dsc_change"]
    assert change["worst"] == pytest.approx(min(diffs))
    assert change["mean"] == pytest.approx(np.mean(diffs))
    assert change["below"] == sum(d < 0 for d in diffs)
    assert f"{min(diffs):+.4f}" in markdown
    assert line.startswith("real: clean 5mm sagittal native  input DSC ")
    assert line.endswith(f"LSD-EBM n/a  LSD-EBM+DC n/a  refine n/a  worst change {min(diffs):+.4f}")


def test_a_case_gets_the_same_seed_and_result_whichever_cases_are_listed(run, data):
    doc = run[0]
    alone = benchmark(
        data, CASES[1:], families=["clean"], slice_mm=[5.0], axes=["sagittal"], forms=["native"], methods=["input"],
        ceiling=False, pose=False,
    )  # fmt: skip
    seeds = alone["conditions"][KEY]["seeds"]
    assert seeds == {CASES[1]: doc["conditions"][KEY]["seeds"][CASES[1]]}
    together = [r for r in _methods(doc)["input"]["rows"] if r["case"] == CASES[1]]
    assert json.loads(json.dumps(alone["conditions"][KEY]["methods"]["input"]["rows"])) == together
    assert len({case_seed(CASES[0], mm, axis) for mm in (3, 5) for axis in ("sagittal", "axial")}) == 4


def test_ground_truth_does_not_depend_on_how_the_file_is_stored(data):
    stored = load_ground_truth(data / f"{CASES[1]}.nii.gz")
    upright = synth_spine(8, levels=LEVELS)
    assert stored.geometry.same_grid(upright.geometry)
    assert np.array_equal(stored.array, upright.array)


def test_rotating_a_grid_by_r_then_r_transposed_gives_it_back():
    g = Geometry((20, 30, 40), (0.8, 1.1, 3.0), (10.0, -25.0, 40.0), tuple(axis_rotation(1, 12.0).ravel()))
    r = axis_rotation(0, 30.0) @ axis_rotation(2, -30.0)
    centre = grid_centre(g)
    there = rotate_geometry(g, r, centre)
    assert not there.same_grid(g)
    back = rotate_geometry(there, r.T, centre)
    assert back.same_grid(g, tol=1e-9)
    assert np.allclose(grid_centre(there), centre)  # rotation about the grid's own centre


def test_a_rotated_volume_moves_its_anatomy_as_r_says():
    assert np.allclose(axis_rotation(2, 90.0) @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0])  # about z: x -> y
    array = np.zeros((30, 30, 30), np.uint8)
    array[3:9, 18:26, 5:12] = 22
    volume = Volume(array, Geometry(array.shape, (1.0, 1.5, 2.0), (-7.0, 3.0, 12.0)))
    centre = grid_centre(volume.geometry)
    r = axis_rotation(0, 30.0)

    def centroid(v: Volume) -> np.ndarray:
        kji = np.argwhere(v.array == 22).mean(axis=0)
        return v.geometry.index_to_physical(kji[::-1])

    rotated = rotate_volume(volume, r, centre)
    assert np.array_equal(rotated.array, volume.array)  # nothing is resampled
    assert np.allclose(centroid(rotated), centre + r @ (centroid(volume) - centre))
