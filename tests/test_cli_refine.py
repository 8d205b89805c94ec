"""`vertrefine refine` as users run it: outputs, sidecar, extras, batches, DICOM SEG and every bad input."""

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from cli_helpers import error_line, invoke

from vertrefine.bundle import default_bundle_dir
from vertrefine.io import write_label_map
from vertrefine.synth import synth_spine

FAST = ("--t-refine", "2", "--langevin-steps", "5", "--fine-inputs", "refine")  # 1 mm synthetic spines


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases")
    for seed, levels in ((21, ("L2", "L3")), (22, ("L4",))):
        write_label_map(synth_spine(seed, levels=levels), folder / f"spine_{seed}.nii.gz")
    return folder


def test_refine_keeps_the_nifti_header_and_writes_a_sidecar(cases, tmp_path):
    source = cases / "spine_21.nii.gz"
    result = invoke("refine", source, "-o", tmp_path / "out.nii.gz", "--seed", "4", *FAST)
    assert result.exit_code == 0, result.output
    before, after = nib.load(source), nib.load(tmp_path / "out.nii.gz")
    assert after.header.binaryblock == before.header.binaryblock
    assert set(np.unique(np.asarray(after.dataobj))) == {0, 21, 22}
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert sidecar["seed"] == 4 and sidecar["device"] == "cpu" and sidecar["vertrefine"]
    assert len(sidecar["model"]["manifest_sha256"]) == 64 and sidecar["model"]["kind"] == "lsd-ebm"
    assert sidecar["settings"]["sampler"]["t_refine"] == 2 and sidecar["settings"]["sampler"]["langevin_steps"] == 5
    assert [v["level"] for v in sidecar["vertebrae"]] == ["L2", "L3"]
    assert all(v["volume_before_ml"] > 30 and v["volume_after_ml"] > 30 for v in sidecar["vertebrae"])
    assert all(0 <= v["agreement_dsc"] <= 1 and v["agreement_hd95_mm"] >= 0 for v in sidecar["vertebrae"])
    assert all(v["decision"] in ("refined", "kept input") for v in sidecar["vertebrae"])
    assert sidecar["settings"]["min_agreement"] == 0.6 and sidecar["settings"]["on_disagree"] == "keep-input"
    assert sidecar["seconds"]["total"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.nii.gz"]


def test_a_thick_slice_nifti_is_refined_onto_1mm_keeping_orientation_and_codes(tmp_path):
    from vertrefine.degrade import degrade

    spine = synth_spine(23, levels=("L2", "L3"))
    thick = degrade(spine, slice_mm=5, axis="sagittal", seed=2, native=True, in_plane_mm=0.8)
    write_label_map(thick, tmp_path / "thick.nii.gz")
    image = nib.load(tmp_path / "thick.nii.gz")
    affine = image.affine.copy()  # the same anatomy stored with the first axis reversed
    affine[:3, 0] *= -1
    affine[:3, 3] += image.affine[:3, 0] * (image.shape[0] - 1)
    flipped = nib.Nifti1Image(np.asarray(image.dataobj)[::-1].copy(), affine)
    flipped.set_qform(affine, code=2)  # aligned to another scan
    flipped.set_sform(affine, code=4)  # MNI: any code must survive
    nib.save(flipped, tmp_path / "clinic.nii.gz")
    result = invoke("refine", tmp_path / "clinic.nii.gz", "-o", tmp_path / "out.nii.gz", *FAST)
    assert result.exit_code == 0, result.output
    assert "written on a 1x1x1 mm grid" in result.output
    out = nib.load(tmp_path / "out.nii.gz")
    assert out.header.get_zooms() == (1.0, 1.0, 1.0)
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (2, 4)
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(flipped.affine)
    corner = lambda img: img.affine @ np.array([-0.5, -0.5, -0.5, 1.0])  # noqa: E731
    size = lambda img: np.array(img.shape) * np.array(img.header.get_zooms())  # noqa: E731
    np.testing.assert_allclose(corner(out)[:3], corner(flipped)[:3], atol=1e-4)
    np.testing.assert_allclose(size(out), size(flipped), atol=1.0)
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert sidecar["output_grid"]["spacing_ijk_mm"] == [1.0, 1.0, 1.0]
    assert sidecar["output_grid"]["size_ijk"] != sidecar["input_grid"]["size_ijk"]
    kept = invoke("refine", tmp_path / "clinic.nii.gz", "-o", tmp_path / "same.nii.gz", "--spacing", "input", *FAST)
    assert kept.exit_code == 0, kept.output
    assert nib.load(tmp_path / "same.nii.gz").header.binaryblock == flipped.header.binaryblock
    bad = invoke("refine", tmp_path / "clinic.nii.gz", "-o", tmp_path / "x.nii.gz", "--spacing", "fine")
    assert bad.exit_code == 2 and "--spacing" in bad.output


def test_refine_extras_probability_uncertainty_meshes_and_qc(cases, tmp_path):
    import trimesh

    source = cases / "spine_21.nii.gz"
    result = invoke(
        "refine", source, "-o", tmp_path / "out.nii.gz", *FAST, "--samples", "2",
        "--save-prob", tmp_path / "prob.nii.gz", "--uncertainty", tmp_path / "std.nii.gz",
        "--mesh", tmp_path / "meshes", "--qc", tmp_path / "qc.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for name in ("prob.nii.gz", "std.nii.gz"):
        image = nib.load(tmp_path / name)
        assert image.get_data_dtype() == np.float32
        np.testing.assert_allclose(image.affine, nib.load(source).affine)
    labels = np.asarray(nib.load(tmp_path / "out.nii.gz").dataobj)
    probability = np.asarray(nib.load(tmp_path / "prob.nii.gz").dataobj)
    assert probability[labels > 0].min() >= 0.5 - 1e-6 and probability[labels == 0].max() <= 0.5 + 1e-6
    assert sorted(p.name for p in (tmp_path / "meshes").iterdir()) == ["L2.stl", "L3.stl"]
    mesh = trimesh.load(tmp_path / "meshes" / "L2.stl")
    assert mesh.is_watertight and 30_000 < mesh.volume < 100_000  # mm^3
    assert (tmp_path / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refine_runs_without_torch(cases, tmp_path):
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from vertrefine.cli import app\n"
        f"app(['refine', {str(cases / 'spine_22.nii.gz')!r}, '-o', {str(tmp_path / 'o.nii.gz')!r},"
        " '--model', 'vae', '--qc', " + repr(str(tmp_path / "q.png")) + "], standalone_mode=False)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o.nii.gz").exists()


def test_batch_goes_on_past_a_bad_case_resumes_and_matches_single_runs(cases, tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(cases, inputs)
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b truncated")
    out = tmp_path / "out"
    result = invoke("refine", inputs, "-o", out, *FAST, "--seed", "10", "--qc", tmp_path / "qc")
    assert result.exit_code == 1, result.output
    assert "broken" in result.output and "2 done, 0 skipped, 1 failed" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "spine_21.json",
        "spine_21.nii.gz",
        "spine_22.json",
        "spine_22.nii.gz",
    ]
    assert sorted(p.name for p in (tmp_path / "qc").iterdir()) == ["spine_21.png", "spine_22.png"]

    # a case's seed comes from its name, and its chains do not depend on the other cases sampled with it
    single = invoke("refine", inputs / "spine_22.nii.gz", "-o", tmp_path / "single.nii.gz", *FAST, "--seed", "10")
    assert single.exit_code == 0, single.output
    np.testing.assert_array_equal(
        np.asarray(nib.load(out / "spine_22.nii.gz").dataobj), np.asarray(nib.load(tmp_path / "single.nii.gz").dataobj)
    )

    (inputs / "broken.nii.gz").unlink()
    (out / "spine_22.nii.gz").unlink()  # as if the batch had been interrupted before this case finished
    kept = (out / "spine_21.nii.gz").stat().st_mtime_ns
    again = invoke("refine", inputs, "-o", out, *FAST, "--seed", "10", "--skip-existing")
    assert again.exit_code == 0 and "1 done, 1 skipped, 0 failed" in again.output
    assert (out / "spine_21.nii.gz").stat().st_mtime_ns == kept
    assert (out / "spine_22.nii.gz").exists()


def test_dicom_seg_input_gives_a_seg_referencing_the_same_series(tmp_path):
    import pydicom
    from dicom_helpers import make_series

    from vertrefine import io

    spine = synth_spine(23, levels=("L3",))
    ct_uid, _ = make_series(tmp_path / "ct", np.full(spine.array.shape, 100, np.uint16), spacing=(1.0, 1.0, 1.0),
                            origin=spine.geometry.origin)  # fmt: skip
    io.write_dicom_seg(spine, tmp_path / "seg.dcm", source_images=tmp_path / "ct")
    result = invoke("refine", tmp_path / "seg.dcm", "-o", tmp_path / "refined.dcm", "--model", "vae")
    assert result.exit_code == 0, result.output
    seg = pydicom.dcmread(tmp_path / "refined.dcm")
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["L3"]
    refined = io.read_label_map(tmp_path / "refined.dcm")
    assert refined.geometry.same_grid(spine.geometry)
    overlap = np.count_nonzero((refined.array == 22) & (spine.array == 22))
    assert 2 * overlap / (np.count_nonzero(refined.array == 22) + np.count_nonzero(spine.array == 22)) > 0.8


def _bad_inputs(folder, spine_file):
    from dicom_helpers import lumbar_bars, make_series

    bad = {}
    ct = np.random.default_rng(0).normal(40, 300, (20, 20, 20)).astype(np.float32)
    nib.save(nib.Nifti1Image(ct, np.eye(4)), folder / "intensity.nii.gz")
    bad["intensity.nii.gz"] = "segment it first"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 2), np.uint8), np.eye(4)), folder / "four_d.nii.gz")
    bad["four_d.nii.gz"] = "4D"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), folder / "empty.nii.gz")
    bad["empty.nii.gz"] = "empty"
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), sheared), folder / "sheared.nii.gz")
    bad["sheared.nii.gz"] = "shear"
    data = spine_file.read_bytes()
    (folder / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    bad["truncated.nii.gz"] = "truncated"
    bad["missing.nii.gz"] = "does not exist"
    make_series(folder / "two_series", lumbar_bars(), modality="OT")
    make_series(folder / "two_series", lumbar_bars(), modality="OT")
    bad["two_series"] = "series-uid"
    return bad


def test_every_bad_input_gives_one_line_and_no_output(cases, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, expected in _bad_inputs(inputs, cases / "spine_21.nii.gz").items():
        out = tmp_path / f"out_{name}"
        out.mkdir()
        result = invoke("refine", inputs / name, "-o", out / "o.nii.gz", "--model", "vae")
        assert result.exit_code == 2, (name, result.output)
        line = error_line(result)
        assert name in line and expected.lower() in line.lower(), (name, line)
        assert list(out.iterdir()) == [], name  # no output, sidecar or temporary file


@pytest.fixture()
def bundle_copy(tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(default_bundle_dir("vae"), folder)
    return folder


def test_corrupt_bundles_give_one_line_and_no_output(cases, tmp_path, bundle_copy):
    source = cases / "spine_22.nii.gz"
    out = tmp_path / "out"
    out.mkdir()

    decoder = bundle_copy / "decoder.onnx"
    data = bytearray(decoder.read_bytes())
    data[len(data) // 2] ^= 0xFF
    decoder.write_bytes(bytes(data))
    result = invoke("refine", source, "-o", out / "o.nii.gz", "--weights", bundle_copy)
    assert result.exit_code == 2 and "checksum" in error_line(result) and "decoder.onnx" in result.output

    manifest = bundle_copy / "manifest.json"
    record = json.loads(manifest.read_text())
    garbage = b"this is not an ONNX model" * 10
    decoder.write_bytes(garbage)
    from vertrefine.bundle import sha256_file

    record["files"]["decoder"].update(sha256=sha256_file(decoder), bytes=len(garbage))
    manifest.write_text(json.dumps(record))
    result = invoke("refine", source, "-o", out / "o.nii.gz", "--weights", bundle_copy)
    assert result.exit_code == 2 and "ONNX Runtime cannot load the decoder" in error_line(result)

    manifest.write_text("{ not json")
    result = invoke("refine", source, "-o", out / "o.nii.gz", "--weights", bundle_copy)
    assert result.exit_code == 2 and "manifest.json" in error_line(result)
    assert list(out.iterdir()) == []

    run = tmp_path / "run"  # a training run folder given as --weights: its bundle is named
    (run / "bundle").mkdir(parents=True)
    (run / "bundle" / "manifest.json").write_text("{}")
    result = invoke("refine", source, "-o", out / "o.nii.gz", "--weights", run)
    assert result.exit_code == 2 and f"it is a training run; pass its bundle, {run / 'bundle'}" in error_line(result)


def test_refused_model_choices_say_what_to_do(cases, tmp_path):
    source = cases / "spine_22.nii.gz"
    lebm_like = tmp_path / "lebm"
    shutil.copytree(default_bundle_dir("lsd-ebm"), lebm_like)
    record = json.loads((lebm_like / "manifest.json").read_text())
    record["kind"] = "lebm"
    (lebm_like / "manifest.json").write_text(json.dumps(record))
    checks = [
        (("--weights", lebm_like), "decoder's gradient"),
        (("--model", "vae", "--samples", "2"), "--samples"),
        (("--samples", "1", "--uncertainty", tmp_path / "u.nii.gz"), "--samples 2"),
        (("--model", "vae", "--weights", default_bundle_dir("lsd-ebm")), "--model lsd-ebm"),
        (("--qc", tmp_path / "qc.jpg"), ".png"),
        (("--labels", "L5-L1"), "backwards"),
    ]
    for extra, expected in checks:
        result = invoke("refine", source, "-o", tmp_path / "o.nii.gz", *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert expected in result.output, (extra, result.output)
        assert not (tmp_path / "o.nii.gz").exists()


def test_output_equal_to_input_is_refused(cases):
    source = cases / "spine_22.nii.gz"
    before = source.read_bytes()
    result = invoke("refine", source, "-o", source, "--model", "vae")
    assert result.exit_code == 2 and "input" in error_line(result)
    assert source.read_bytes() == before


def test_flagged_vertebrae_are_reported_in_single_and_folder_mode(cases, tmp_path):
    single = invoke(
        "refine", cases / "spine_22.nii.gz", "-o", tmp_path / "one.nii.gz", "--min-agreement", "0.99", *FAST
    )
    assert single.exit_code == 0, single.output
    assert "warning: L4: refinement disagrees with the input" in single.output and "kept input" in single.output
    folder = invoke("refine", cases, "-o", tmp_path / "all", "--min-agreement", "0.99", *FAST)
    assert folder.exit_code == 0, folder.output
    assert "2 done (2 with warnings)" in folder.output and "spine_21" in folder.output and "check it" in folder.output
    sidecar = json.loads((tmp_path / "all" / "spine_21.json").read_text())
    assert {v["decision"] for v in sidecar["vertebrae"]} == {"kept input"}


def _seg_on_thick_series(tmp_path, in_plane=(0.8, 0.7)):
    """One lumbar vertebra as a DICOM SEG on an axial ``in_plane`` x 5 mm CT series; returns (series UID, labels)."""
    from dicom_helpers import make_series

    from vertrefine import io
    from vertrefine.spatial import resample_labels

    spine = synth_spine(23, levels=("L3",))
    extent = np.array(spine.array.shape) * np.array(spine.geometry.spacing)[::-1]  # mm along k, j, i
    shape = tuple(int(np.ceil(e / s)) for e, s in zip(extent, (5.0, in_plane[1], in_plane[0]), strict=True))
    ct_uid, _ = make_series(tmp_path / "ct", np.full(shape, 100, np.uint16), spacing=(*in_plane, 5.0),
                            origin=spine.geometry.origin)  # fmt: skip
    thick = resample_labels(spine, io.dicom_series_geometry(tmp_path / "ct"))
    io.write_dicom_seg(thick, tmp_path / "seg.dcm", source_images=tmp_path / "ct")
    return ct_uid, thick


@pytest.mark.parametrize("in_plane", [(0.8, 0.7), (1.0, 1.0)])
@pytest.mark.parametrize("source_next_to_seg", [True, False])
def test_a_seg_of_a_thick_series_is_written_on_a_1mm_grid_referencing_its_series(
    tmp_path, source_next_to_seg, in_plane
):
    import highdicom as hd
    import pydicom

    from vertrefine.spatial import output_geometry, resample_labels
    from vertrefine.volume import Volume

    ct_uid, thick = _seg_on_thick_series(tmp_path, in_plane)
    if not source_next_to_seg:  # the references are carried over from the input SEG itself
        (tmp_path / "elsewhere").mkdir()
        shutil.move(tmp_path / "seg.dcm", tmp_path / "elsewhere" / "seg.dcm")
        shutil.move(tmp_path / "ct", tmp_path / "archive_ct")
    source = tmp_path / ("seg.dcm" if source_next_to_seg else "elsewhere/seg.dcm")
    (tmp_path / "out").mkdir()
    result = invoke("refine", source, "-o", tmp_path / "out" / "refined.dcm", "--model", "vae")
    assert result.exit_code == 0, result.output
    assert "written on a 1x1x1 mm grid" in result.output

    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(tmp_path / "out" / "refined.dcm"))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_uid
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [1, 1]
    assert float(measures.SliceThickness) == 1 and float(measures.SpacingBetweenSlices) == 1
    # Every frame lies on the 1 mm output grid (its own plane positions), within the input's extent.
    grid = output_geometry(thick.geometry, "auto")
    frames = seg.PerFrameFunctionalGroupsSequence
    positions = np.array([f.PlanePositionSequence[0].ImagePositionPatient for f in frames], dtype=float)
    index = grid.physical_to_index(positions)
    np.testing.assert_allclose(index, np.round(index), atol=1e-3)
    assert (index >= -1e-3).all() and (index <= np.array(grid.size_ijk) - 1 + 1e-3).all()
    # highdicom's own reading places the vertebra where the input shows it.
    volume = seg.get_volume(combine_segments=True)
    read = Volume(volume.array.astype(np.uint8), _geometry_of(volume))
    on_grid = resample_labels(read, grid, method="nearest").array > 0
    expected = resample_labels(thick, grid).array == 22
    dsc = 2 * np.count_nonzero(on_grid & expected) / (np.count_nonzero(on_grid) + np.count_nonzero(expected))
    assert dsc > 0.75, dsc
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["L3"]
    again = invoke("score", tmp_path / "out" / "refined.dcm", source, "--resample")  # vertrefine reads it back
    assert again.exit_code == 0, again.output


def _geometry_of(volume):
    """A vertrefine Geometry for a highdicom Volume (affine maps [i0, i1, i2] array indices to LPS mm)."""
    from vertrefine.volume import Geometry

    affine = volume.affine
    # vertrefine arrays are [k, j, i] with the first sitk axis last: reverse the index order.
    columns = affine[:3, :3][:, ::-1]
    spacing = np.linalg.norm(columns, axis=0)
    return Geometry(
        shape=tuple(volume.spatial_shape),
        spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(v) for v in affine[:3, 3]),
        direction=tuple(float(v) for v in (columns / spacing).ravel()),
    )
