"""What `vertrefine info` reports: versions, working ONNX Runtime providers, model bundles found."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .bundle import bundle_search_dirs, read_manifest
from .errors import VertrefineError
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
