"""benchmarks/real.py: the real-CT protocol on two small phantom spines (input and sdf rows, no model)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.real import (
    axis_rotation,
    benchmark,
    case_seed,
    grid_centre,
    load_ground_truth,
    main,
    rotate_geometry,
    rotate_volume,
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
    argv = ["--data", str(data), "--cases", *CASES, "--methods", "input", "sdf", "--slice-mm", "5"]
    argv += ["--axis", "sagittal", "--no-ceiling", "--no-pose", "--json", str(out / "r.json")]
    argv += ["--markdown", str(out / "r.md")]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        main(argv)
    doc = json.loads((out / "r.json").read_text())
    return doc, (out / "r.md").read_text(), stdout.getvalue().strip().splitlines()[-1]


def _methods(doc: dict) -> dict:
    return doc["conditions"]["5mm sagittal"]["methods"]


def test_shape_based_interpolation_beats_nearest_on_thick_slices(run):
    methods = _methods(run[0])
    assert methods["sdf"]["summary"]["overall"]["dsc"]["mean"] > methods["input"]["summary"]["overall"]["dsc"]["mean"]


def test_every_case_and_vertebra_has_a_row_and_non_vertebra_labels_are_dropped(run):
    doc, markdown, _ = run
    expected = {(case, label) for case in CASES for label in (22, 23)}
    for method in ("input", "sdf"):
        rows = _methods(doc)[method]["rows"]
        assert {(r["case"], r["label"]) for r in rows if not r["extra"]} == expected
        assert all(r["label"] != SACRUM for r in rows)
        assert all(r[key] is not None for r in rows for key in ("dsc", "hd95_mm", "assd_mm"))
    assert doc["settings"]["methods"] == ["input", "sdf"]
    assert doc["bundle"] is None and doc["ceiling"] is None and doc["pose"] is None
    assert "| SDF interpolation |" in markdown and "4 vertebrae" in markdown


def test_worst_change_is_the_lowest_per_vertebra_difference(run):
    doc, markdown, line = run
    methods = _methods(doc)
    base = {(r["case"], r["label"]): r["dsc"] for r in methods["input"]["rows"]}
    diffs = [r["dsc"] - base[(r["case"], r["label"])] for r in methods["sdf"]["rows"]]
    change = methods["sdf"]["dsc_change"]
    assert change["worst"] == pytest.approx(min(diffs))
    assert change["mean"] == pytest.approx(np.mean(diffs))
    assert change["below"] == sum(d < 0 for d in diffs)
    assert f"{min(diffs):+.4f}" in markdown
    assert line.startswith("real: 5mm sagittal  input DSC ")
    assert line.endswith(f"LSD-EBM n/a  refine n/a  worst change {min(diffs):+.4f}")


def test_a_case_gets_the_same_seed_and_result_whichever_cases_are_listed(run, data):
    doc = run[0]
    alone = benchmark(data, CASES[1:], slice_mm=[5.0], axes=["sagittal"], methods=["input"], ceiling=False, pose=False)
    seeds = alone["conditions"]["5mm sagittal"]["seeds"]
    assert seeds == {CASES[1]: doc["conditions"]["5mm sagittal"]["seeds"][CASES[1]]}
    together = [r for r in _methods(doc)["input"]["rows"] if r["case"] == CASES[1]]
    assert json.loads(json.dumps(alone["conditions"]["5mm sagittal"]["methods"]["input"]["rows"])) == together
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
