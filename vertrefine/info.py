"""What `vertrefine info` reports: versions, working ONNX Runtime providers, model bundles found."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .bundle import read_manifest
from .errors import InputError, VertrefineError
from .runtime import cuda_usable, working_providers

PACKAGES = (
    "vertrefine",
    "numpy",
    "scipy",
    "SimpleITK",
    "nibabel",
    "pydicom",
    "highdicom",
    "onnx",
    "onnxruntime-gpu",
    "onnxruntime",
    "typer",
    "rich",
    "torch",
)


@dataclass
class InfoReport:
    packages: dict[str, str | None]
    providers: list[str]
    cuda: bool
    bundles: list[str]
    bundle_dirs: list[str]


def package_version(name: str) -> str | None:
    """Installed version of a distribution, without importing it (so torch is never imported)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
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


def describe_bundle(folder: Path) -> str:
    """'lsd-ebm (latent 8x16x16x16) at /path' from a bundle's manifest (not its checksums); else the problem."""
    try:
        manifest = read_manifest(folder)
    except VertrefineError as exc:
        return f"unusable bundle: {exc}"
    shape = manifest.get("latent_shape", [manifest["latent_size"]])
    return f"{manifest['kind']} (latent {'x'.join(str(n) for n in shape)}) at {folder}"


def find_bundles(dirs: list[Path]) -> list[str]:
    found = []
    for folder in dirs:
        candidates = [folder] + (sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else [])
        found += [describe_bundle(c) for c in candidates if (c / "manifest.json").is_file()]
    return found


def collect_info() -> InfoReport:
    dirs = bundle_search_dirs()
    packages = {name: package_version(name) for name in PACKAGES}
    # One of the two ONNX Runtime builds is installed (by platform); show the one that is.
    for build, other in (("onnxruntime-gpu", "onnxruntime"), ("onnxruntime", "onnxruntime-gpu")):
        if packages.get(build) and not packages.get(other):
            packages.pop(other, None)
    return InfoReport(
        packages=packages,
        providers=working_providers(),
        cuda=cuda_usable(),
        bundles=find_bundles(dirs),
        bundle_dirs=[str(d) for d in dirs],
    )
