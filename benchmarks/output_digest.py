"""Digest of `vertrefine refine`'s outputs for a fixed set of commands: are two commits' outputs identical?

    python -m benchmarks.output_digest --out digest.txt              # about 2 minutes on 2 cores
    python -m benchmarks.output_digest --keep /tmp/digest-files      # also keep the inputs and outputs

It makes small inputs with fixed seeds (three `vertrefine synth` phantoms degraded by `vertrefine degrade
--native` to 5 mm sagittal slices, and a DICOM image series of the real example written with pydicom),
copies two of the repository's examples, runs the refine commands below in-process (typer's CliRunner, on
the CPU with 2 ONNX Runtime threads, so the figures do not depend on the machine's cores or GPU) and prints
one line per input and output file: its name relative to the work folder and a SHA-256 of its content:

- NIfTI: the stored voxel bytes, data type and shape, the scaling, the qform and sform with their codes,
  the voxel sizes and units (not the gzip header, whose time stamp changes on every write);
- JSON sidecars: the JSON without the keys that change from run to run or name places (created_utc,
  seconds, command, input, output, the vertrefine version, the bundle's path), and with the work folder
  and the repository written as <work> and <repo> in the strings that remain;
- DICOM (the SEG output, the input series): every element but UIDs, dates, times and software versions,
  and the pixel data;
- STL meshes: the triangles (not the 80-byte header); anything else: its bytes.

Commands (each with ``--device cpu --threads 2 --seed 0``):

    thick5mm       examples/verse010_sag5mm.nii.gz (1 x 1 x 5 mm sagittal), defaults, --mesh
    spacing_input  the same with --spacing input
    fine_refine    examples/verse010_ct.nii.gz (1 mm) with --fine-inputs refine
    folder         a folder of three degraded 5 mm phantoms
    samples3       the 5 mm example, --samples 3 --save-prob --uncertainty --labels 21-23
    vae            the 5 mm example, --model vae
    seg            the 5 mm example as a DICOM image series, written as a DICOM SEG (-o NAME.dcm)
    guidance0      the 5 mm example, --guidance 0

It runs on older commits too (copy it into their checkout and put that first on PYTHONPATH; the line on
stderr says which vertrefine ran): a command using an option the commit's refine lacks prints
"skipped: ..." instead, except --fine-inputs refine, which is dropped where it is missing (before it
existed every fine input was refined). Compare two commits with ``diff``; the input lines show whether
synth and degrade (and the examples) still make the same inputs, so a changed output of an unchanged input
comes from refine. ``--inputs DIR`` reuses the inputs of an earlier ``--keep DIR`` run, to compare refine
alone on identical inputs. Exit code 1 when a command failed (its line says how).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

COMMON = ("--device", "cpu", "--threads", "2", "--seed", "0")
VOLATILE_JSON_KEYS = frozenset({"created_utc", "seconds", "command", "input", "output", "vertrefine"})
VOLATILE_DICOM_VRS = frozenset({"UI", "DA", "TM", "DT"})
VOLATILE_DICOM_KEYWORDS = frozenset({"SoftwareVersions", "ImplementationVersionName", "ContentCreatorName"})
SYNTH_SEED = 4242
DICOM_ENTROPY = "vertrefine benchmarks.output_digest"


# ----------------------------------------------------------------------------------------- digests


def _sha(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def nifti_digest(path: Path) -> str:
    """SHA-256 of a NIfTI file's voxels and geometry, independent of compression and the gzip header.

    Covers the stored (unscaled) voxel bytes in C order of nibabel's (i, j, k) array, the on-disk data type
    and shape, scl_slope/scl_inter, the qform and sform matrices with their codes, the voxel sizes
    (pixdim) and xyzt_units. Not covered: descrip, aux_file and other free-text header fields.
    """
    import nibabel as nib

    image = nib.load(str(path))
    header = image.header
    raw = np.ascontiguousarray(np.asanyarray(image.dataobj.get_unscaled()))
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    meta = {
        "dtype": header.get_data_dtype().str,
        "shape": [int(n) for n in raw.shape],
        "zooms": [float(z) for z in header.get_zooms()],
        "xyzt_units": int(header["xyzt_units"]),
        "scl": [str(float(header["scl_slope"])), str(float(header["scl_inter"]))],
        "qform_code": int(qcode),
        "sform_code": int(scode),
    }
    affines = [np.zeros(0) if m is None else np.asarray(m, dtype="<f8") for m in (qform, sform)]
    return _sha(json.dumps(meta, sort_keys=True).encode(), *(a.tobytes() for a in affines), raw.tobytes())


def _without_volatile(value: Any, replacements: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in VOLATILE_JSON_KEYS or (key == "path" and isinstance(item, str)):
                continue
            out[key] = _without_volatile(item, replacements)
        return out
    if isinstance(value, list):
        return [_without_volatile(item, replacements) for item in value]
    if isinstance(value, str):
        for old, new in replacements.items():
            value = value.replace(old, new)
    return value


def json_digest(path: Path, replacements: dict[str, str]) -> str:
    """SHA-256 of a JSON file without its volatile keys (VOLATILE_JSON_KEYS and string 'path' values at any
    depth), folders in the remaining strings replaced as ``replacements`` says; keys sorted."""
    data = json.loads(path.read_text(encoding="utf-8"))
    text = json.dumps(_without_volatile(data, replacements), sort_keys=True, separators=(",", ":"))
    return _sha(text.encode())


def _dicom_elements(dataset: Any, out: list[str]) -> None:
    for element in dataset:
        if element.keyword == "PixelData" or element.VR in VOLATILE_DICOM_VRS:
            continue
        if element.keyword in VOLATILE_DICOM_KEYWORDS:
            continue
        if element.VR == "SQ":
            out.append(f"{element.tag} [")
            for item in element.value:
                _dicom_elements(item, out)
                out.append("/")
            out.append("]")
        else:
            value = element.value
            out.append(f"{element.tag} {value.hex() if isinstance(value, bytes) else value!s}")


def dicom_digest(path: Path) -> str:
    """SHA-256 of a DICOM file's elements (UIDs, dates, times, software versions and the file meta left out)
    and its pixel data."""
    import pydicom

    dataset = pydicom.dcmread(str(path))
    elements: list[str] = []
    _dicom_elements(dataset, elements)
    pixels = bytes(dataset.PixelData) if "PixelData" in dataset else b""
    return _sha("\n".join(elements).encode(), pixels)


def stl_digest(path: Path) -> str:
    """SHA-256 of an STL's triangles: a binary STL without its 80-byte header, an ASCII STL whole."""
    data = path.read_bytes()
    return _sha(data if data[:5].lower() == b"solid" and b"facet" in data[:1000] else data[80:])


def file_digest(path: Path, replacements: dict[str, str]) -> str:
    """The digest this module prints for ``path``, chosen by its name (see the module docstring)."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return nifti_digest(path)
    if name.endswith(".json"):
        return json_digest(path, replacements)
    if name.endswith((".dcm", ".dicom", ".ima")):
        return dicom_digest(path)
    if name.endswith(".stl"):
        return stl_digest(path)
    return _sha(path.read_bytes())


# ------------------------------------------------------------------------------------------ inputs


def write_dicom_series(source: Path, folder: Path) -> None:
    """Write a NIfTI label map as a single-frame DICOM image series (uint16 labels, right-handed slice
    order), with UIDs derived from DICOM_ENTROPY and fixed dates, so the files are the same on every run."""
    import SimpleITK as sitk
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    image = sitk.ReadImage(str(source))
    array = sitk.GetArrayFromImage(image)  # (k, j, i)
    spacing = np.array(image.GetSpacing(), dtype=float)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)  # columns: i, j, k in LPS
    origin = np.array(image.GetOrigin(), dtype=float)
    normal = np.cross(direction[:, 0], direction[:, 1])
    if float(normal @ direction[:, 2]) < 0:  # DICOM slices run along row x column: flip k
        origin = origin + (array.shape[0] - 1) * spacing[2] * direction[:, 2]
        array, direction = array[::-1], np.column_stack([direction[:, 0], direction[:, 1], -direction[:, 2]])

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=[DICOM_ENTROPY, *map(str, parts)])

    folder.mkdir(parents=True, exist_ok=True)
    sop_class = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    for k in range(array.shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid("image", k)
        ds.SOPClassUID = sop_class
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Digest^Phantom", "D1", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
        ds.FrameOfReferenceUID = uid("frame of reference")
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 3, k + 1
        ds.SeriesDescription = "sagittal 5 mm labels"
        ds.ImageOrientationPatient = [float(v) for v in np.r_[direction[:, 0], direction[:, 1]]]
        ds.ImagePositionPatient = [float(v) for v in origin + k * spacing[2] * direction[:, 2]]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(array[k].astype("<u2")).tobytes()
        ds.save_as(folder / f"slice_{k + 1:03d}.dcm", enforce_file_format=True)


# ---------------------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Case:
    """One refine command: ``args`` after ``refine`` (``{in}`` and ``{out}`` name the input and output
    folders); options in ``optional`` are dropped where the commit's refine lacks them (their absence
    meant the same then)."""

    name: str
    args: tuple[str, ...]
    optional: frozenset[str] = field(default_factory=frozenset)


CASES = (
    Case("thick5mm", ("{in}/verse010_sag5mm.nii.gz", "-o", "{out}/result.nii.gz", "--mesh", "{out}/mesh")),
    Case("spacing_input", ("{in}/verse010_sag5mm.nii.gz", "-o", "{out}/result.nii.gz", "--spacing", "input")),
    Case(
        "fine_refine",
        ("{in}/verse010_ct.nii.gz", "-o", "{out}/result.nii.gz", "--fine-inputs", "refine"),
        optional=frozenset({"--fine-inputs"}),
    ),
    Case("folder", ("{in}/thick", "-o", "{out}")),
    Case(
        "samples3",
        (
            "{in}/verse010_sag5mm.nii.gz",
            "-o",
            "{out}/result.nii.gz",
            "--samples",
            "3",
            "--save-prob",
            "{out}/prob.nii.gz",
            "--uncertainty",
            "{out}/std.nii.gz",
            "--labels",
            "21-23",
        ),
    ),
    Case("vae", ("{in}/verse010_sag5mm.nii.gz", "-o", "{out}/result.nii.gz", "--model", "vae")),
    Case("seg", ("{in}/dicom_sag5mm", "-o", "{out}/result.dcm")),
    Case("guidance0", ("{in}/verse010_sag5mm.nii.gz", "-o", "{out}/result.nii.gz", "--guidance", "0")),
)


def refine_options(app: Any) -> set[str]:
    """Every option string (``--samples``, ``-o``, ``--no-pose``...) of this vertrefine's refine command."""
    import typer

    command = typer.main.get_command(app).commands["refine"]  # type: ignore[attr-defined]
    return {name for param in command.params for name in (*param.opts, *param.secondary_opts)}


def command_args(case: Case, inputs: Path, output: Path, options: set[str]) -> tuple[list[str] | None, str]:
    """The refine arguments of ``case`` for a refine with ``options``: (args, note) or (None, why skipped)."""
    args: list[str] = []
    note = ""
    tokens = [token.replace("{in}", str(inputs)).replace("{out}", str(output)) for token in case.args]
    index = 0
    while index < len(tokens):
        token = tokens[index]
        takes_value = index + 1 < len(tokens) and not tokens[index + 1].startswith("-")
        if token.startswith("-") and token not in options:
            if token not in case.optional:
                return None, f"skipped: {token} is not an option of this vertrefine's refine"
            note = f"{token} dropped (not an option of this vertrefine's refine)"
            index += 2 if takes_value else 1
            continue
        args.append(token)
        index += 1
    return [*args, *COMMON], note


def make_inputs(runner: Any, app: Any, repo: Path, inputs: Path, log: Callable[[str], None]) -> None:
    """The inputs every command reads, into ``inputs``: two examples, three degraded phantoms, a DICOM series."""
    inputs.mkdir(parents=True)
    for name in ("verse010_sag5mm.nii.gz", "verse010_ct.nii.gz"):
        shutil.copyfile(repo / "examples" / name, inputs / name)
    for argv in (
        ["synth", str(inputs / "phantoms"), "--cases", "3", "--seed", str(SYNTH_SEED)],
        [
            "degrade",
            str(inputs / "phantoms"),
            "-o",
            str(inputs / "thick"),
            "--native",
            "--slice-mm",
            "5",
            "--axis",
            "sagittal",
            "--seed",
            str(SYNTH_SEED),
        ],
    ):
        result = runner.invoke(app, argv)
        if result.exit_code != 0:
            raise SystemExit(f"vertrefine {argv[0]} failed (exit {result.exit_code}): {result.output.strip()[-500:]}")
    write_dicom_series(inputs / "verse010_sag5mm.nii.gz", inputs / "dicom_sag5mm")
    log(f"inputs made in {inputs}")


def _is_dicom_series(folder: Path) -> bool:
    members = list(folder.iterdir())
    return len(members) > 1 and all(p.is_file() and p.suffix.lower() == ".dcm" for p in members)


def digest_lines(folder: Path, work: Path, replacements: dict[str, str]) -> list[str]:
    """``name  sha256`` for every file under ``folder``, names relative to ``work``, sorted. A folder holding
    only DICOM files (an image series) is one line: the SHA-256 of its files' names and digests."""
    lines = []
    series: set[Path] = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.parent in series or (path.suffix.lower() == ".dcm" and _is_dicom_series(path.parent)):
            series.add(path.parent)
            continue
        lines.append(f"{path.relative_to(work).as_posix()}  {file_digest(path, replacements)}")
    for members in (sorted(s.iterdir()) for s in series):
        digest = _sha(*(f"{p.name} {file_digest(p, replacements)}".encode() for p in members))
        lines.append(f"{members[0].parent.relative_to(work).as_posix()}/*.dcm ({len(members)} files)  {digest}")
    return sorted(lines)


def run(work: Path, reuse_inputs: Path | None, log: Callable[[str], None]) -> tuple[list[str], int]:
    """Make or copy the inputs into ``work``, run every case; return the digest lines and the failure count."""
    from typer.testing import CliRunner

    import vertrefine
    from vertrefine.cli import app

    repo = Path(vertrefine.__file__).resolve().parent.parent
    log(f"vertrefine {getattr(vertrefine, '__version__', '?')} from {Path(vertrefine.__file__).resolve().parent}")
    runner = CliRunner()
    inputs = work / "in"
    if reuse_inputs is not None:
        shutil.copytree(reuse_inputs / "in", inputs)
    else:
        make_inputs(runner, app, repo, inputs, log)
    replacements = {str(work): "<work>", str(repo): "<repo>"}
    lines = digest_lines(inputs, work, replacements)
    options = refine_options(app)
    failures = 0
    for case in CASES:
        output = work / "out" / case.name
        args, note = command_args(case, inputs, output, options)
        if args is None:
            lines.append(f"out/{case.name}/  {note}")
            log(f"{case.name}: {note}")
            continue
        if note:
            log(f"{case.name}: {note}")
        output.mkdir(parents=True)  # older commits refuse an output file in a missing folder
        start = time.perf_counter()
        result = runner.invoke(app, ["refine", *args])
        log(f"{case.name}: exit {result.exit_code}, {time.perf_counter() - start:.1f} s")
        if result.exit_code != 0:
            failures += 1
            last = (result.output.strip().splitlines() or [repr(result.exception)])[-1]
            lines.append(f"out/{case.name}/  failed: exit {result.exit_code}: {last.strip()}")
            continue
        lines.extend(digest_lines(output, work, replacements))
    return lines, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="Also write the lines to this file.")
    parser.add_argument("--keep", type=Path, help="Work in this new folder and keep it (default: a temporary one).")
    parser.add_argument("--inputs", type=Path, help="Reuse the inputs of an earlier --keep folder.")
    args = parser.parse_args(argv)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    start = time.perf_counter()
    if args.keep is not None:
        args.keep.mkdir(parents=True)
        lines, failures = run(args.keep.resolve(), args.inputs, log)
    else:
        with tempfile.TemporaryDirectory(prefix="vertrefine-digest-") as folder:
            lines, failures = run(Path(folder).resolve(), args.inputs, log)
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    log(f"{len(lines)} lines, {failures} failed, {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
