"""Robustness, round three (issue 20): every input a real pipeline writes gets the right result or one line.

Every input is made here, small: NIfTI headers no scanner writes (NaN in the affine, voxels of 100 mm and of
0.0001 mm), maps of random label ids, SPINEPS subregion masks, TotalSegmentator --roi_subset maps, a cube
labelled L3, DICOM SEG segments named 'Vertebra L4'; and the command line's help pages and usage errors.
"""

import shutil

import nibabel as nib
import numpy as np
import pytest
from cli_helpers import error_line, invoke
from typer.testing import CliRunner

from vertrefine import cli
from vertrefine.errors import InputError
from vertrefine.io import read_label_map, write_label_map
from vertrefine.synth import synth_spine
from vertrefine.volume import Geometry, Volume, grid_problem

QOFFSET_X, SROW_X3, PIXDIM = 268, 292, 76
"""Byte offsets in a NIfTI-1 header: qoffset_x, srow_x[3], pixdim[0] (float32 each)."""


def _blocks(shape=(24, 20, 12)) -> np.ndarray:
    """Nibabel-ordered [i, j, k] array with L2 (21) and L3 (22) as two blocks."""
    array = np.zeros(shape, dtype=np.uint8)
    array[4:20, 3:9, 2:10] = 21
    array[4:20, 11:17, 2:10] = 22
    return array


def _nifti(path, zooms=(1.0, 1.0, 5.0), array=None):
    """An uncompressed NIfTI (so its header can be patched byte by byte) with qform = sform, code 1."""
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = (10.0, -20.0, 5.0)
    image = nib.Nifti1Image(_blocks() if array is None else array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))
    return path


def _patch(path, offset, values):
    """Overwrite float32 header fields of an uncompressed NIfTI in place, as a broken tool writes them."""
    field = np.memmap(path, dtype=np.float32, mode="r+", offset=offset, shape=(len(values),))
    field[:] = values
    field.flush()
    del field
    return path


# --- item 2: header values no scanner writes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "offset", "values", "words"),
    [
        ("srow-nan", SROW_X3, [np.nan], "sform"),
        ("qoffset-nan", QOFFSET_X, [np.nan], "qform"),
        ("qoffset-inf", QOFFSET_X, [np.inf], "qform"),
    ],
)
def test_nan_or_inf_in_the_affine_is_one_line_naming_the_file(tmp_path, name, offset, values, words):
    source = _patch(_nifti(tmp_path / f"{name}.nii"), offset, values)
    before = sorted(p.name for p in tmp_path.iterdir())
    for command in (
        ("refine", source, "-o", tmp_path / "out.nii.gz", "--model", "vae"),
        ("degrade", source, "-o", tmp_path / "deg.nii.gz"),
    ):
        result = invoke(*command)
        assert result.exit_code == 2, result.output
        line = error_line(result)
        assert str(source) in line and "implausible affine" in line and words in line, line
        assert "RuntimeWarning" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize(("zooms", "shown"), [((100.0, 100.0, 100.0), "100 x 100 x 100"), ((1e-4,) * 3, "0.0001")])
def test_voxels_of_100_mm_or_a_tenth_of_a_micrometre_are_refused_before_any_allocation(tmp_path, zooms, shown):
    source = _nifti(tmp_path / "odd.nii", zooms=zooms)
    result = invoke("refine", source, "-o", tmp_path / "out.nii.gz", "--model", "vae")
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert str(source) in line and "implausible voxel size" in line and shown in line, line
    assert "MemoryError" not in result.output and "labels found" not in result.output


def test_a_folder_run_lists_the_implausible_header_in_its_failed_case_table(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    _nifti(cases / "huge.nii", zooms=(100.0, 100.0, 100.0))
    _patch(_nifti(cases / "nan.nii"), SROW_X3, [np.nan])
    result = invoke("refine", cases, "-o", tmp_path / "out", "--model", "vae")
    assert result.exit_code == 1, result.output
    flat = " ".join(result.output.split())
    assert "implausible voxel size" in flat and "implausible affine" in flat, result.output
    assert "MemoryError" not in flat and "0 done, 0 skipped, 2 failed" in flat


def test_grid_problem_accepts_real_scans_and_names_what_no_scanner_writes():
    def grid(spacing, shape=(40, 300, 300), origin=(0.0, 0.0, 0.0)):
        return Geometry(shape, spacing, origin)

    for spacing in ((0.3, 0.3, 0.6), (0.7, 0.7, 6.0), (1.0, 1.0, 12.0), (0.05, 0.05, 0.05)):
        assert grid_problem(grid(spacing)) is None, spacing
    assert "voxel size" in grid_problem(grid((1.0, 1.0, 25.0)))
    assert "voxel size" in grid_problem(grid((0.001, 1.0, 1.0)))
    assert "field of view" in grid_problem(grid((10.0, 10.0, 10.0), shape=(400, 10, 10)))
    assert "not finite" in grid_problem(grid((1.0, 1.0, 1.0), origin=(np.nan, 0.0, 0.0)))
    assert "kilometres" in grid_problem(grid((1.0, 1.0, 1.0), origin=(0.0, 5e6, 0.0)))


def test_an_in_memory_volume_on_an_implausible_grid_is_refused_by_validation(tmp_path):
    volume = Volume(np.pad(np.ones((4, 4, 4), np.uint8) * 20, 2), Geometry((8, 8, 8), (50.0, 50.0, 50.0), (0, 0, 0)))
    with pytest.raises(InputError, match="implausible voxel size"):
        from vertrefine.io import validate_label_map

        validate_label_map(volume, tmp_path / "memory.nii.gz")


# --- item 4: --help in full when piped; item 7: usage errors in one line -------------------------------------

COMMANDS = ("info", "synth", "refine", "degrade", "score", "train", "export")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_every_option_in_full_at_80_columns_when_piped(command):
    result = CliRunner().invoke(cli.app, [command, "--help"], env={"COLUMNS": "80"})  # not a terminal
    assert result.exit_code == 0, result.output
    assert "…" not in result.output, result.output
    click_command = cli.typer.main.get_command(cli.app).commands[command]
    for param in click_command.params:
        for name in [*param.opts, *getattr(param, "secondary_opts", [])]:
            if name.startswith("--"):
                assert name in result.output, (command, name)


def test_help_keeps_the_terminal_width_on_a_terminal():
    class Tty:
        def isatty(self):
            return True

    assert cli.help_width(None, Tty()) is None  # rich measures the terminal
    assert cli.help_width(None, object()) == cli.HELP_MIN_WIDTH
    assert cli.help_width(200, object()) == 200


def test_info_shows_bundle_paths_in_full_when_piped(tmp_path):
    bundle = tmp_path / "a-rather-long-folder-name-for-bundles" / "another-long-sub-folder" / "bundle"
    bundle.parent.mkdir(parents=True)
    shutil.copytree(cli.Path(__file__).resolve().parents[1] / "weights" / "vae", bundle)
    result = CliRunner().invoke(cli.app, ["info"], env={"COLUMNS": "80", "VERTREFINE_WEIGHTS": str(bundle.parent)})
    assert result.exit_code == 0, result.output
    assert str(bundle) in result.output, result.output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["refine"], "Missing argument 'IN'"),
        (["refine", "in.nii.gz", "-o", "out.nii.gz", "--threads", "many"], "'--threads'"),
        (["refine", "in.nii.gz", "-o", "out.nii.gz", "--shard", "1"], "--shard"),
        (["degrade", "in.nii.gz", "-o", "o.nii.gz", "--no-such-option"], "No such option"),
        (["no-such-command"], "No such command"),
    ],
)
def test_usage_errors_are_one_line_not_boxed_panels(args, words):
    result = CliRunner().invoke(cli.app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert words in line and "--help" in line, line
    assert "╭" not in result.output and "│" not in result.output and "Usage:" not in result.output


# --- item 5: score with no name in common -------------------------------------------------------------------


def test_score_with_no_matching_names_refuses_once_listing_names_on_both_sides(tmp_path):
    spine = synth_spine(3, levels=("L2", "L3"))
    for folder, names in (("pred", ("case01_pred", "case02_pred")), ("gt", ("case01", "case02", "case03", "case04"))):
        (tmp_path / folder).mkdir()
        for name in names:
            write_label_map(spine, tmp_path / folder / f"{name}.nii.gz")
    result = invoke("score", tmp_path / "pred", tmp_path / "gt")
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "matched by case name" in line and "case01_pred" in line and "case01" in line, line
    assert "and 1 more" in line  # four ground truths: three shown
    assert "missing prediction" not in result.output and "scored as an empty" not in result.output


# --- item 1: --mesh writes every vertebra of the written label map ------------------------------------------


def test_mesh_writes_an_stl_for_each_vertebra_kept_as_input(tmp_path):
    import trimesh

    source = tmp_path / "fine.nii.gz"
    spine = synth_spine(5, levels=("L2", "L3"))  # 1 mm: finer than 3 mm, kept as it is by default
    write_label_map(spine, source)
    result = invoke("refine", source, "-o", tmp_path / "out.nii.gz", "--model", "vae", "--mesh", tmp_path / "meshes")
    assert result.exit_code == 0, result.output
    assert "passed through" in result.output
    assert sorted(p.name for p in (tmp_path / "meshes").iterdir()) == ["L2.stl", "L3.stl"]
    written = np.asarray(nib.load(tmp_path / "out.nii.gz").dataobj)
    for level, label in (("L2", 21), ("L3", 22)):
        mesh = trimesh.load(tmp_path / "meshes" / f"{level}.stl")
        assert mesh.is_watertight
        voxels_mm3 = float(np.count_nonzero(written == label))  # 1 mm voxels
        assert abs(mesh.volume - voxels_mm3) < 0.1 * voxels_mm3, (level, mesh.volume, voxels_mm3)


# --- item 6: SPINEPS subregion masks --------------------------------------------------------------------------


def _subregions(spine: Volume) -> Volume:
    """A SPINEPS-like subregion mask of ``spine``: every vertebra's front half body (49), back half arch (41),
    a process (42) at its back and a disc (100) between neighbours."""
    array = np.zeros_like(spine.array)
    labelled = spine.array > 0
    ys = np.nonzero(labelled.any(axis=(0, 2)))[0]
    middle = (ys.min() + ys.max()) // 2
    array[:, :middle][labelled[:, :middle]] = 49
    array[:, middle:][labelled[:, middle:]] = 41
    array[:, ys.max() - 3 :][labelled[:, ys.max() - 3 :]] = 42
    zs = np.nonzero(labelled.any(axis=(1, 2)))[0]
    array[zs.min() + 2, :middle][~labelled[zs.min() + 2, :middle]] = 0
    array[(zs.min() + zs.max()) // 2, :4, :4] = 100
    return spine.with_array(array)


def test_a_spineps_folder_refines_the_vertebra_mask_and_leaves_the_subregion_mask_out(tmp_path):
    spine = synth_spine(7, levels=("L2", "L3"))
    cases = tmp_path / "derivatives"
    cases.mkdir()
    write_label_map(spine, cases / "sub-01_seg-vert_msk.nii.gz")
    write_label_map(_subregions(spine), cases / "sub-01_seg-spine_msk.nii.gz")
    result = invoke("refine", cases, "-o", tmp_path / "out", "--model", "vae")
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "sub-01_seg-spine_msk.nii.gz: not a case: a SPINEPS subregion mask" in flat, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".gz") == ["sub-01_seg-vert_msk.nii.gz"]


@pytest.mark.parametrize("name", ["sub-01_seg-spine_msk.nii.gz", "subregions.nii.gz"])
def test_a_subregion_mask_given_directly_is_refused_in_one_line(tmp_path, name):
    source = tmp_path / name
    write_label_map(_subregions(synth_spine(7, levels=("L2", "L3"))), source)
    result = invoke("refine", source, "-o", tmp_path / "out.nii.gz", "--model", "vae")
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert str(source) in line and "SPINEPS subregion mask" in line and "seg-vert_msk" in line, line
    assert not (tmp_path / "out.nii.gz").exists()


def test_spineps_subregion_ids_are_recognised_but_totalsegmentator_and_verse_maps_are_not():
    from vertrefine.labels import SPINEPS_SUBREGIONS, TOTALSEGMENTATOR, VERSE, recognise_scheme

    assert recognise_scheme({41, 42, 45, 46, 47, 48, 49, 60, 61, 62, 100})[0] is SPINEPS_SUBREGIONS
    assert recognise_scheme(range(1, 118))[0] is TOTALSEGMENTATOR
    assert recognise_scheme({5, 27, 28, 29, 30, 31, 51, 52})[0] is TOTALSEGMENTATOR
    assert recognise_scheme({20, 21, 22, 100, 120})[0] is VERSE  # VerSe vertebrae, discs of a spine tool


# --- item 3: random label ids are no segmentation -------------------------------------------------------------


@pytest.mark.parametrize(("shape", "zooms"), [((64, 64, 64), (1.0, 1.0, 1.0)), ((48, 96, 20), (1.0, 1.0, 5.0))])
def test_a_map_of_random_label_ids_is_refused_as_not_a_segmentation(tmp_path, shape, zooms):
    array = np.random.default_rng(1).integers(0, 25, size=shape).astype(np.uint8)  # ids 0-24 per voxel
    source = _nifti(tmp_path / "random.nii", zooms=zooms, array=array)
    result = invoke("refine", source, "-o", tmp_path / "out.nii.gz", "--model", "vae")
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert str(source) in line and "not a segmentation" in line and "pieces" in line, line
    assert not (tmp_path / "out.nii.gz").exists()


def test_real_label_maps_with_islands_thick_slices_or_many_classes_are_segmentations(tmp_path):
    from vertrefine.degrade import degrade

    spine = synth_spine(2, levels=("L1", "L2", "L3"))
    thick = degrade(spine, slice_mm=6.0, islands=20.0, seed=3, native=True)  # with spurious islands
    write_label_map(thick, tmp_path / "thick.nii.gz")
    assert read_label_map(tmp_path / "thick.nii.gz").labels == [20, 21, 22]
    blocks = np.zeros((40, 60, 60), np.uint8)
    for n in range(117):  # TotalSegmentator's 117 classes, each a small region, most touching others
        i, j = divmod(n, 11)
        blocks[5:15 + n % 7, i * 5 : i * 5 + 5, j * 5 : j * 5 + 5] = n + 1
    write_label_map(Volume(blocks, Geometry(blocks.shape, (1.0, 1.0, 1.0), (0, 0, 0))), tmp_path / "total.nii.gz")
    assert len(read_label_map(tmp_path / "total.nii.gz").labels) == 117


# --- item 7: TotalSegmentator --roi_subset maps, a cube labelled L3 --------------------------------------------


def _ellipsoid(shape, centre, radii):
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return sum((axis - c) ** 2 / r**2 for axis, c, r in zip((k, j, i), centre, radii, strict=True)) <= 1


def test_a_totalsegmentator_roi_subset_map_is_not_read_as_verse_and_its_organs_are_not_reshaped(tmp_path):
    spine = synth_spine(4, levels=("L4", "L5"))  # VerSe 23, 24 -> TotalSegmentator v2 28 (L4), 27 (L5)
    shape = (spine.array.shape[0], 200, 200)
    array = np.zeros(shape, np.uint8)
    nz, ny, nx = spine.array.shape
    array[:, 200 - ny :, 100 - nx // 2 : 100 - nx // 2 + nx] = np.select(
        [spine.array == 23, spine.array == 24], [28, 27], 0
    )
    array[_ellipsoid(shape, (nz * 0.7, 40, 40), (40, 25, 25))] = 2  # kidney_right, about 100 mL
    array[_ellipsoid(shape, (nz * 0.7, 40, 160), (40, 25, 25))] = 3  # kidney_left
    array[_ellipsoid(shape, (nz * 0.8, 40, 100), (25, 35, 30))] = 5  # liver (a small one), about 110 mL
    source = tmp_path / "roi_subset.nii.gz"
    write_label_map(Volume(array, Geometry(shape, (1.0, 1.0, 1.0), spine.geometry.origin)), source)
    result = invoke("refine", source, "-o", tmp_path / "out.nii.gz", "--model", "vae")
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "kidney_right" in line and "liver" in line and "vertebrae_L4" in line, line
    assert "--label-scheme" in line and not (tmp_path / "out.nii.gz").exists()
    named = invoke(
        "refine", source, "-o", tmp_path / "out.nii.gz", "--model", "vae", "--label-scheme", "totalsegmentator"
    )
    assert named.exit_code == 0, named.output
    written = np.asarray(nib.load(tmp_path / "out.nii.gz").dataobj).transpose(2, 1, 0)
    for organ in (2, 3, 5):  # organs pass through voxel for voxel
        np.testing.assert_array_equal(written == organ, array == organ)


def test_a_cube_labelled_l3_fails_the_shape_test_and_passes_through(tmp_path):
    from vertrefine.plausibility import MAX_SOLIDITY, solidity

    array = np.zeros((80, 80, 80), np.uint8)
    array[20:60, 20:60, 20:60] = 22  # a 40 mm cube: 64 mL, a lumbar vertebra's volume
    source = tmp_path / "cube.nii.gz"
    write_label_map(Volume(array, Geometry(array.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))), source)
    result = invoke("refine", source, "-o", tmp_path / "out.nii.gz", "--model", "vae", "--fine-inputs", "refine")
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "L3: implausible input: not shaped like a vertebra" in flat and "passed through" in flat, result.output
    spine = synth_spine(4, levels=("L3",))
    assert solidity(spine.array == 22) < MAX_SOLIDITY / 1.5  # a vertebra is far from convex


# --- item 7: DICOM SEG segments named 'Vertebra L4' or coded as the lumbar spine --------------------------------


def test_seg_segments_named_vertebra_l4_or_coded_lumbar_spine_are_vertebrae(tmp_path):
    import highdicom as hd
    import pydicom
    from dicom_helpers import make_series
    from pydicom.sr.coding import Code
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from vertrefine.labels import label_scheme_of

    lumbar_spine = Code("122496007", "SCT", "Lumbar spine")
    spine = synth_spine(13, levels=("L3", "L4", "L5"))
    array = np.select([spine.array == 22, spine.array == 23, spine.array == 24], [1, 2, 3], 0).astype(np.uint8)
    make_series(tmp_path / "ct", np.full(array.shape, 100, np.uint16), spacing=(1.0, 1.0, 1.0),
                origin=spine.geometry.origin)  # fmt: skip
    ct = sorted(
        (pydicom.dcmread(f) for f in (tmp_path / "ct").iterdir()), key=lambda d: float(d.ImagePositionPatient[2])
    )
    algorithm = hd.AlgorithmIdentificationSequence(name="x", family=codes.cid7162.ArtificialIntelligence, version="1")

    def segment(number, label, code):
        return hd.seg.SegmentDescription(
            number, label, codes.SCT.BodyStructure, code, "AUTOMATIC", algorithm_identification=algorithm
        )

    descriptions = [
        segment(1, "bone", lumbar_spine),  # a lumbar vertebra, no level: a vertebra of unknown level
        segment(2, "Vertebra L4", lumbar_spine),  # the label names the level
        segment(3, "Lumbar vertebra 5", codes.SCT.Vertebra),
    ]
    seg = hd.seg.Segmentation(
        ct, array, "BINARY", descriptions, generate_uid(), 8, generate_uid(), 1, "x", "x", "1", "1"
    )
    seg.save_as(tmp_path / "seg.dcm")
    volume = read_label_map(tmp_path / "seg.dcm")
    scheme, _ = label_scheme_of(volume)
    assert volume.source.meta["segment_labels"] == {1: 1, 2: 23, 3: 24}  # L4, L5 get their VerSe ids
    assert scheme.level(23) == "L4" and scheme.level(24) == "L5" and scheme.unlevelled == frozenset({1})
    assert scheme.vertebrae(volume.labels) == frozenset({1, 23, 24})


# --- item 7: --shard on one file; Ctrl-C early ----------------------------------------------------------------


def test_a_shard_that_does_not_hold_the_single_file_says_so_and_which_shard_does(tmp_path):
    from vertrefine.cases import Shard

    source = tmp_path / "spine.nii.gz"
    write_label_map(synth_spine(3, levels=("L2",)), source)
    owner = next(k for k in range(1, 4) if Shard(k, 3).holds("spine"))
    other = 1 if owner != 1 else 2
    output = tmp_path / "out" / "spine.nii.gz"
    result = invoke("refine", source, "-o", output, "--model", "vae", "--shard", f"{other}/3")
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert f"shard {other}/3 does not hold the one case spine" in flat and f"shard {owner}/3 holds it" in flat
    assert "0 of 1" not in flat and not (tmp_path / "out").exists()


def test_ctrl_c_early_leaves_no_empty_output_folder_made_by_the_run(tmp_path, monkeypatch):
    from vertrefine import refine_batch

    source = tmp_path / "spine.nii.gz"
    write_label_map(synth_spine(3, levels=("L2",)), source)
    existing = tmp_path / "existing"
    existing.mkdir()

    def interrupted(self, case, destination, status):
        raise KeyboardInterrupt

    monkeypatch.setattr(refine_batch.RefineJob, "prepare", interrupted)
    for output in (tmp_path / "new" / "deeper" / "out.nii.gz", existing / "out.nii.gz"):
        result = invoke("refine", source, "-o", output, "--model", "vae")
        assert result.exit_code == 130, result.output
        assert "interrupted" in error_line(result)
    assert not (tmp_path / "new").exists() and existing.is_dir()  # a folder that was there stays
    folder = tmp_path / "cases"
    folder.mkdir()
    shutil.copy(source, folder / "a.nii.gz")
    shutil.copy(source, folder / "b.nii.gz")
    result = invoke("refine", folder, "-o", tmp_path / "batch_out", "--model", "vae")
    assert result.exit_code == 130 and not (tmp_path / "batch_out").exists(), result.output


# --- item 8: degrade --clean ----------------------------------------------------------------------------------


def test_degrade_clean_is_the_noise_free_simulation_and_refuses_a_noise_option_beside_it(tmp_path):
    from scipy import ndimage

    from vertrefine.cases import case_seed
    from vertrefine.degrade import CLEAN, degrade

    spine = synth_spine(6, levels=("L2", "L3"))
    source = tmp_path / "spine.nii.gz"
    write_label_map(spine, source)
    result = invoke("degrade", source, "-o", tmp_path / "clean.nii.gz", "--clean", "--slice-mm", "6")
    assert result.exit_code == 0, result.output
    written = read_label_map(tmp_path / "clean.nii.gz").array
    expected = degrade(read_label_map(source), slice_mm=6.0, seed=case_seed(0, "spine"), **CLEAN)
    np.testing.assert_array_equal(written, expected.array)
    for label in (21, 22):  # no islands, no process tips cut loose: one piece per vertebra
        assert ndimage.label(written == label)[1] == 1
    refused = invoke("degrade", source, "-o", tmp_path / "x.nii.gz", "--clean", "--islands", "3")
    assert refused.exit_code == 2 and "--clean" in error_line(refused) and "--islands" in error_line(refused)
    assert not (tmp_path / "x.nii.gz").exists()


# --- item 8: the QC image names its fill, its directions and the refinement not written -----------------------


def _pixels_of(png, colour: str) -> int:
    from matplotlib import image

    rgb = image.imread(png)[..., :3]
    target = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return int(np.count_nonzero(np.abs(rgb - target).max(axis=-1) < 0.06))


def test_qc_shows_the_rejected_refinement_dashed_with_a_legend_and_direction_letters(tmp_path):
    from vertrefine.qc import QcVertebra, REJECTED_COLOUR, write_qc_png

    before = np.zeros((60, 50, 50), np.int32)
    before[15:45, 10:40, 10:40] = 1
    rejected = np.zeros_like(before)
    rejected[20:40, 15:35, 15:35] = 1
    vertebra = [QcVertebra(1, "L3", (30.0, 25.0, 25.0), "kept input")]
    with_rejected = write_qc_png(before, before, tmp_path / "a.png", vertebrae=vertebra, rejected=rejected)
    without = write_qc_png(before, before, tmp_path / "b.png", vertebrae=vertebra)
    assert _pixels_of(with_rejected, REJECTED_COLOUR) > 100  # dashed outlines in three views, and the legend
    assert _pixels_of(without, REJECTED_COLOUR) == 0


def test_refine_qc_of_a_vertebra_kept_as_input_draws_its_rejected_refinement(tmp_path):
    from vertrefine.qc import REJECTED_COLOUR

    source = tmp_path / "spine.nii.gz"
    write_label_map(synth_spine(5, levels=("L2", "L3")), source)
    result = invoke(
        "refine", source, "-o", tmp_path / "out.nii.gz", "--model", "vae", "--fine-inputs", "refine",
        "--min-agreement", "1", "--qc", tmp_path / "qc.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "kept input" in " ".join(result.output.split())
    assert _pixels_of(tmp_path / "qc.png", REJECTED_COLOUR) > 100


# --- found by the fresh-user check ------------------------------------------------------------------------------


def _qform_only(path, zooms=(1.0, 1.0, 5.0)):
    """An uncompressed NIfTI whose orientation is its qform alone (sform_code 0), as some converters write."""
    affine = np.diag([*zooms, 1.0])
    image = nib.Nifti1Image(_blocks(), affine)
    image.set_qform(affine, code=1)
    image.set_sform(None, code=0)
    nib.save(image, str(path))
    return path


def test_a_zero_voxel_size_a_huge_or_a_truncated_array_is_one_line_before_any_allocation(tmp_path):
    zero = _patch(_qform_only(tmp_path / "pixdim0.nii"), PIXDIM + 12, [0.0])  # pixdim[3], which nibabel sets to 1
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_qform(np.diag([0.1, 0.1, 0.1, 1.0]), code=1)
    cases = {zero: "voxel size of 0 mm"}
    for name, side, words in (("huge.nii", 29000, "implausible array size"), ("short.nii", 1200, "truncated")):
        header.set_data_shape((side, side, side))
        (tmp_path / name).write_bytes(header.binaryblock + b"\0" * 1004)  # a 1 kB file claiming GB of voxels
        cases[tmp_path / name] = words
    for source, words in cases.items():
        result = invoke("refine", source, "-o", tmp_path / "out.nii.gz", "--model", "vae")
        assert result.exit_code == 2, result.output
        line = error_line(result)
        assert str(source) in line and words in line, line
        assert "should be non-zero" not in result.output and not (tmp_path / "out.nii.gz").exists()


def test_a_random_binary_mask_is_not_a_segmentation(tmp_path):
    array = (np.random.default_rng(2).random((48, 96, 20)) < 0.5).astype(np.uint8)
    source = _nifti(tmp_path / "noise.nii", array=array)
    result = invoke("refine", source, "-o", tmp_path / "out.nii.gz", "--model", "vae")
    assert result.exit_code == 2 and "not a segmentation" in error_line(result), result.output


@pytest.mark.parametrize(("ids", "other"), [((25, 27, 28), None), ((27, 28), 15)])
def test_a_totalsegmentator_lumbar_subset_without_organ_sized_labels_is_not_read_as_verse(tmp_path, ids, other):
    spine = synth_spine(5, levels=("L3", "L4", "L5"))  # as VerSe 22-24 -> TotalSegmentator 28 (L4), 27 (L5), ...
    as_total = dict(zip((22, 23, 24), (28, 27, 25), strict=True))  # sacrum 25 stands in below L5
    array = np.zeros_like(spine.array)
    for verse, total in as_total.items():
        if total in ids:
            array[spine.array == verse] = total
    if other is not None:  # an esophagus-like tube (id 15) beside them
        array[:, 5:9, 5:9] = other
    source = tmp_path / "lumbar_subset.nii.gz"
    write_label_map(spine.with_array(array), source)
    result = invoke("refine", source, "-o", tmp_path / "out.nii.gz", "--model", "vae")
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "T13" in line and "vertebrae_L4" in line and "--label-scheme" in line, line
    named = invoke(
        "refine", source, "-o", tmp_path / "out.nii.gz", "--model", "vae", "--label-scheme", "totalsegmentator"
    )
    assert named.exit_code == 0, named.output


def test_score_pairs_case_names_in_any_letter_case(tmp_path):
    spine = synth_spine(3, levels=("L2", "L3"))
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    write_label_map(spine, tmp_path / "pred" / "Y.NII.GZ")  # as refine names an output of CASE.NII.GZ
    write_label_map(spine, tmp_path / "gt" / "y.nii.gz")
    result = invoke("score", tmp_path / "pred", tmp_path / "gt")
    assert result.exit_code == 0, result.output
    write_label_map(spine, tmp_path / "gt" / "Y.nii.gz")
    clash = invoke("score", tmp_path / "pred", tmp_path / "gt")
    assert clash.exit_code == 2 and "share the case name" in error_line(clash), clash.output
