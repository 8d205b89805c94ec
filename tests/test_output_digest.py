"""benchmarks/output_digest.py: digests that see the voxels, geometry and results, not time stamps or paths."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from benchmarks.output_digest import CASES, command_args, json_digest, nifti_digest


def _label_image() -> nib.Nifti1Image:
    array = np.zeros((6, 7, 5), dtype=np.uint8)
    array[1:4, 2:5, 1:3] = 20
    affine = np.diag([1.0, 1.0, 5.0, 1.0])
    return nib.Nifti1Image(array, affine)


def test_nifti_digest_ignores_the_gzip_header_but_sees_voxels_and_geometry(tmp_path: Path) -> None:
    image = _label_image()
    plain = tmp_path / "a.nii"
    nib.save(image, str(plain))
    early, late = tmp_path / "early.nii.gz", tmp_path / "late.nii.gz"
    early.write_bytes(gzip.compress(plain.read_bytes(), mtime=1_000_000))
    late.write_bytes(gzip.compress(plain.read_bytes(), mtime=2_000_000, compresslevel=1))
    assert early.read_bytes() != late.read_bytes()
    assert nifti_digest(early) == nifti_digest(late) == nifti_digest(plain)

    voxel = _label_image()
    voxel.dataobj[0, 0, 0] = 21
    nib.save(voxel, str(tmp_path / "voxel.nii.gz"))
    moved = nib.Nifti1Image(np.asarray(image.dataobj), np.diag([1.0, 1.0, 5.0, 1.0]) + np.eye(4, k=3) * 0.5)
    nib.save(moved, str(tmp_path / "moved.nii.gz"))
    wider = nib.Nifti1Image(np.asarray(image.dataobj).astype(np.int16), image.affine)
    nib.save(wider, str(tmp_path / "int16.nii.gz"))
    digests = {nifti_digest(tmp_path / name) for name in ("voxel.nii.gz", "moved.nii.gz", "int16.nii.gz")}
    assert len(digests) == 3 and nifti_digest(plain) not in digests


def test_json_digest_ignores_times_and_places_but_sees_results(tmp_path: Path) -> None:
    def sidecar(name: str, work: str, created: str, seconds: float, dsc: float) -> tuple[Path, str]:
        data = {
            "created_utc": created,
            "command": f"vertrefine refine {work}/in/a.nii.gz -o {work}/out/a.nii.gz",
            "output": f"{work}/out/a.nii.gz",
            "model": {"kind": "lsd-ebm", "path": "/somewhere/weights/lsd-ebm"},
            "extra_outputs": {"probability": f"{work}/out/prob.nii.gz"},
            "seconds": {"total": seconds},
            "vertebrae": [{"level": "L1", "agreement_dsc": dsc}],
        }
        path = tmp_path / name
        path.write_text(json.dumps(data), encoding="utf-8")
        return path, work

    first, work_1 = sidecar("1.json", "/tmp/w1", "2024-01-01T00:00:00Z", 9.5, 0.91)
    second, work_2 = sidecar("2.json", "/tmp/w2", "2025-06-01T12:00:00Z", 12.0, 0.91)
    changed, work_3 = sidecar("3.json", "/tmp/w3", "2024-01-01T00:00:00Z", 9.5, 0.92)
    assert json_digest(first, {work_1: "<work>"}) == json_digest(second, {work_2: "<work>"})
    assert json_digest(changed, {work_3: "<work>"}) != json_digest(first, {work_1: "<work>"})


def test_commands_adapt_to_an_older_refine(tmp_path: Path) -> None:
    cases = {case.name: case for case in CASES}
    every = {"-o", "--mesh", "--spacing", "--fine-inputs", "--device", "--threads", "--seed", "--guidance"}
    args, note = command_args(cases["fine_refine"], tmp_path / "in", tmp_path / "out", every - {"--fine-inputs"})
    assert args is not None and "--fine-inputs" not in args and "refine" not in args and "dropped" in note
    args, note = command_args(cases["guidance0"], tmp_path / "in", tmp_path / "out", every - {"--guidance"})
    assert args is None and note.startswith("skipped: --guidance")
    args, _ = command_args(cases["guidance0"], tmp_path / "in", tmp_path / "out", every)
    assert args is not None and args[args.index("--guidance") + 1] == "0" and str(tmp_path / "in") in args[0]
