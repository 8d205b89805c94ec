"""Model bundles: the manifest schema, its checks and the sha256 verification (no torch here).

A bundle is a folder holding ``manifest.json`` and single-file ONNX models (DESIGN.md section 4):
``encoder.onnx`` and ``decoder.onnx`` always, ``energy.onnx`` for the LEBM and LSD-EBM. Refine and
``vertrefine info`` read bundles through this module; ``vertrefine.train.export`` writes them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .conventions import MODEL_KINDS, PATCH_SIZE
from .errors import InputError
from .sampler import SamplerSettings
from .schedule import DiffusionSchedule

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
FILES = {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "energy": "energy.onnx"}
RANGED_OPTIONS = ("t_refine", "langevin_steps", "step_size", "guidance", "guidance_steps")
"""Sampler settings a manifest's ``validated.ranges`` may bound (refine's --t-refine, --langevin-steps,
--step-size, --guidance; export's defaults, also --guidance-steps)."""
ORIENTATION = "LPS, identity direction; array [z,y,x]"
MAX_FILE_BYTES = 16_000_000  # 16 MB (decimal): the most one ONNX file of a bundle may weigh
BATCH = "B"  # name of the dynamic batch dimension in every model input and output

_REDO = "re-export it (`vertrefine export RUN_DIR -o DIR`) or re-download it"


def model_names(kind: str) -> tuple[str, ...]:
    """The models a bundle of ``kind`` holds: encoder and decoder, plus the energy for lebm and lsd-ebm."""
    return ("encoder", "decoder") if kind == "vae" else ("encoder", "decoder", "energy")


def io_spec(
    name: str, latent: int | tuple[int, ...] | list[int], patch: int = PATCH_SIZE, conditioned: bool = False
) -> dict[str, dict[str, dict[str, Any]]]:
    """Inputs and outputs of model ``name``: {"inputs"|"outputs": {tensor: {"shape", "dtype"}}}, batch "B".

    ``latent`` is the shape of one latent: an int L (a vector [L]) or a grid (C, g, g, g). A
    ``conditioned`` decoder also takes the input patch ``x`` [B, 1, P, P, P] (what the encoder was given).
    """
    volume = {"shape": [BATCH, 1, patch, patch, patch], "dtype": "float32"}
    shape = [latent] if isinstance(latent, int) else [int(n) for n in latent]
    code = {"shape": [BATCH, *shape], "dtype": "float32"}
    specs = {
        "encoder": ({"x": volume}, {"mu": code, "logvar": code}),
        "decoder": ({"z": code, "x": volume} if conditioned else {"z": code}, {"probability": volume}),
        "energy": (
            {"z": code, "t": {"shape": [BATCH], "dtype": "int64"}},
            {"energy": {"shape": [BATCH], "dtype": "float32"}, "grad": code},
        ),
    }
    inputs, outputs = specs[name]
    return {"inputs": inputs, "outputs": outputs}


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def derived_ranges(schedule: DiffusionSchedule) -> dict[str, list[float]]:
    """Sampler ranges that follow from the diffusion schedule alone (for bundles nobody has measured).

    - step_size <= 2 sigma_1^2: each Langevin step of the last reverse step multiplies the distance to its
      mode by 1 - step_size / (2 sigma_1^2); above 4 sigma_1^2 the chain diverges, and up to 2 sigma_1^2 it
      never even oscillates (the energy's own curvature is left a margin).
    - t_refine <= T - 1: the schedule's last step jumps to almost pure noise (a_s[T] is about 0.15), so a
      chain started there has forgotten the input.
    - guidance in [0, 1] (a fraction of the correction) and guidance_steps <= T (more guide every step).
    Langevin steps are not bounded: with a stable step size, more steps only converge further.
    """
    sigma2 = float(schedule.sigmas[1]) ** 2
    return {
        "t_refine": [0, schedule.timesteps - 1],
        "step_size": [0.0, float(f"{2 * sigma2:.3g}")],
        "guidance": [0.0, 1.0],
        "guidance_steps": [0, schedule.timesteps],
    }


def out_of_range(ranges: dict[str, list[float]], values: dict[str, Any]) -> tuple[str, Any, list[float]] | None:
    """The first of ``values`` (sampler setting -> value; None: not given) outside its inclusive range in
    ``ranges``, as (setting, value, [low, high]); None when every value is in range."""
    for key, value in values.items():
        bounds = ranges.get(key)
        if value is not None and bounds is not None and not bounds[0] <= value <= bounds[1]:
            return key, value, list(bounds)
    return None


def bundle_search_dirs() -> list[Path]:
    """Folders searched for model bundles: $VERTREFINE_WEIGHTS, then the shipped weights.

    The shipped bundles are the repository's ``weights/`` folder, installed as ``vertrefine/weights``
    by ``pip install .`` (a source checkout or editable install finds them beside the package).
    """
    dirs = [Path(p) for p in os.environ.get("VERTREFINE_WEIGHTS", "").split(os.pathsep) if p]
    package = Path(__file__).resolve().parent
    shipped = [package / "weights", package.parent / "weights"]
    dirs += [d for d in shipped if d.is_dir()] or shipped[-1:]
    return dirs


def default_bundle_dir(kind: str) -> Path:
    """The first bundle folder named ``kind`` (e.g. lsd-ebm) in the search folders; InputError if none."""
    dirs = bundle_search_dirs()
    for folder in dirs:
        if (folder / kind / "manifest.json").is_file():
            return folder / kind
    raise InputError(
        dirs[-1] / kind,
        f"no {kind} model bundle found (searched {', '.join(str(d) for d in dirs)})",
        "pass --weights DIR, set VERTREFINE_WEIGHTS, or reinstall vertrefine (the wheel ships weights/)",
    )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_fields(path: Path, manifest: dict) -> None:
    """Refuse a manifest whose fields refine relies on are missing or of the wrong type."""

    def bad(problem: str) -> InputError:
        return InputError(
            path, f"invalid manifest: {problem}", f"the bundle is damaged or not a vertrefine bundle; {_REDO}"
        )

    version = manifest.get("format_version")
    if version != MANIFEST_VERSION:
        raise InputError(
            path,
            f"manifest format_version {version!r} is not supported (this vertrefine reads version {MANIFEST_VERSION})",
            "use the vertrefine version that exported the bundle, or re-export it with this one",
        )
    kind = manifest.get("kind")
    if kind not in MODEL_KINDS:
        raise bad(f"unknown model kind {kind!r} (expected one of {', '.join(MODEL_KINDS)})")
    for key in ("latent_size", "patch_size"):
        if not _positive_int(manifest.get(key)):
            raise bad(f"{key} must be a positive integer, got {manifest.get(key)!r}")
    shape = manifest.get("latent_shape", [manifest["latent_size"]])
    if (
        not isinstance(shape, list)
        or not shape
        or not all(_positive_int(n) for n in shape)
        or math.prod(shape) != manifest["latent_size"]
    ):
        raise bad(f"latent_shape must be a list of positive integers whose product is latent_size, got {shape!r}")
    if not _positive_number(manifest.get("spacing_mm")):
        raise bad(f"spacing_mm must be a positive number, got {manifest.get('spacing_mm')!r}")
    schedule = manifest.get("schedule")
    try:
        DiffusionSchedule(**schedule)
    except (TypeError, ValueError) as exc:
        raise bad(f"schedule {schedule!r} is not a valid diffusion schedule ({exc})") from None
    sampler = manifest.get("sampler_defaults")
    if not isinstance(sampler, dict):
        raise bad("sampler_defaults must be an object")
    missing = [k for k in SamplerSettings.manifest_keys() if k not in sampler]
    if kind != "vae" and missing:
        raise bad(f"sampler_defaults lacks {', '.join(missing)}")
    _check_validated(manifest, bad)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise bad("files must be an object")
    for name in model_names(kind):
        entry = files.get(name)
        if not isinstance(entry, dict):
            raise bad(f"no entry for the {name} model in files")
        file_name = entry.get("path")
        if not isinstance(file_name, str) or Path(file_name).name != file_name or file_name in ("", ".", ".."):
            raise bad(f"files.{name}.path must be a file name inside the bundle, got {file_name!r}")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64:
            raise bad(f"files.{name}.sha256 must be a 64-character hex digest")
        if not isinstance(entry.get("bytes"), int):
            raise bad(f"files.{name}.bytes must be an integer")


def _check_validated(manifest: dict, bad) -> None:
    """The optional ``validated`` section: {"ranges": {setting: [low, high]}, "basis": text}, holding the
    bundle's own sampler defaults."""
    if "validated" not in manifest:
        return
    validated = manifest["validated"]
    ranges = validated.get("ranges") if isinstance(validated, dict) else None
    if not isinstance(ranges, dict) or not isinstance(validated.get("basis"), str):
        raise bad("validated must be an object with ranges (setting -> [low, high]) and basis (text)")
    for key, bounds in ranges.items():
        if key not in RANGED_OPTIONS:
            raise bad(f"validated.ranges.{key} is not a sampler setting ({', '.join(RANGED_OPTIONS)})")
        numbers = isinstance(bounds, list) and len(bounds) == 2
        numbers = numbers and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
        if not numbers or not math.isfinite(bounds[0]) or not math.isfinite(bounds[1]) or bounds[0] > bounds[1]:
            raise bad(f"validated.ranges.{key} must be [low, high] with low <= high, got {bounds!r}")
    outside = out_of_range(ranges, {k: v for k, v in manifest["sampler_defaults"].items() if k in RANGED_OPTIONS})
    if outside is not None:
        key, value, (low, high) = outside
        raise bad(f"sampler_defaults.{key} {value} lies outside its validated range {low:g}..{high:g}")


def read_manifest(bundle_dir: str | Path) -> dict:
    """Read and check a bundle's manifest.json (schema, kind, version, model files present); no checksums."""
    folder = Path(bundle_dir)
    if not folder.is_dir():
        raise InputError(
            folder,
            "model bundle folder not found",
            "pass the folder that holds manifest.json (`vertrefine info` lists the bundles found)",
        )
    path = folder / MANIFEST_NAME
    if not path.is_file():
        if (folder / "bundle" / MANIFEST_NAME).is_file():  # a training run folder: its bundle is inside
            remedy = f"it is a training run; pass its bundle, {folder / 'bundle'}"
            raise InputError(path, f"the folder has no {MANIFEST_NAME}", remedy)
        raise InputError(path, f"the bundle folder has no {MANIFEST_NAME}", f"it is not a complete bundle; {_REDO}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(path, "manifest is not UTF-8 text", f"the bundle is corrupt; {_REDO}") from None
    except json.JSONDecodeError as exc:
        raise InputError(
            path, f"manifest is not valid JSON ({exc.msg} at line {exc.lineno})", f"the bundle is corrupt; {_REDO}"
        ) from None
    except OSError as exc:
        raise InputError(path, f"cannot read the manifest ({exc.strerror})", "check the file's permissions") from None
    if not isinstance(manifest, dict):
        raise InputError(path, "manifest is not a JSON object", f"the bundle is corrupt; {_REDO}")
    _check_fields(path, manifest)
    for name in model_names(manifest["kind"]):
        model_path = folder / manifest["files"][name]["path"]
        if not model_path.is_file():
            raise InputError(
                model_path,
                f"the {name} model named in {MANIFEST_NAME} is missing",
                f"the bundle is incomplete; {_REDO}",
            )
    return manifest


def verify_bundle(bundle_dir: str | Path) -> dict:
    """``read_manifest`` plus the size and sha256 of every model file; a mismatch is refused in one line."""
    folder = Path(bundle_dir)
    manifest = read_manifest(folder)
    for name in model_names(manifest["kind"]):
        entry = manifest["files"][name]
        path = folder / entry["path"]
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"].lower():
            raise InputError(
                path,
                f"checksum does not match {MANIFEST_NAME}: the bundle is corrupt or was modified",
                _REDO,
            )
    return manifest


@dataclass(frozen=True)
class Bundle:
    """A checked bundle: its folder, manifest and the fields refine uses."""

    dir: Path
    manifest: dict
    kind: str
    latent: int
    """Numbers in one latent (the product of ``latent_shape``)."""
    latent_shape: tuple[int, ...]
    """Shape of one latent: (L,) for a flat latent, (C, g, g, g) for a spatial one."""
    patch: int
    spacing: float
    schedule: dict
    sampler: dict
    files: dict[str, Path]

    @property
    def conditioned(self) -> bool:
        """The decoder also takes the input patch (``model_config.conditioned`` in the manifest)."""
        return bool(self.manifest.get("model_config", {}).get("conditioned", False))

    @property
    def has_energy(self) -> bool:
        return "energy" in self.files

    def diffusion_schedule(self) -> DiffusionSchedule:
        return DiffusionSchedule(**self.schedule)

    @property
    def sampler_ranges(self) -> dict[str, list[float]]:
        """Inclusive [low, high] per sampler setting that refine accepts: the manifest's ``validated.ranges``,
        or for a bundle exported without them, :func:`derived_ranges` of its schedule."""
        validated = self.manifest.get("validated")
        return dict(validated["ranges"]) if validated else derived_ranges(self.diffusion_schedule())

    @property
    def ranges_basis(self) -> str:
        """How :attr:`sampler_ranges` were found (the manifest's ``validated.basis``)."""
        validated = self.manifest.get("validated")
        return validated["basis"] if validated else "derived from the diffusion schedule (not measured)"

    @classmethod
    def from_manifest(cls, bundle_dir: str | Path, manifest: dict) -> Bundle:
        folder = Path(bundle_dir)
        return cls(
            dir=folder,
            manifest=manifest,
            kind=manifest["kind"],
            latent=manifest["latent_size"],
            latent_shape=tuple(manifest.get("latent_shape", [manifest["latent_size"]])),
            patch=manifest["patch_size"],
            spacing=float(manifest["spacing_mm"]),
            schedule=dict(manifest["schedule"]),
            sampler=dict(manifest["sampler_defaults"]),
            files={name: folder / manifest["files"][name]["path"] for name in model_names(manifest["kind"])},
        )


def load_bundle(bundle_dir: str | Path, *, verify: bool = True) -> Bundle:
    """Open a bundle for use: the manifest checked and (by default) every file's sha256 verified."""
    manifest = verify_bundle(bundle_dir) if verify else read_manifest(bundle_dir)
    return Bundle.from_manifest(bundle_dir, manifest)
