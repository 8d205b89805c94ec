"""Measure the ranges of refine's sampler options a bundle is safe in, on TRAINING individuals.

    python -m benchmarks.sampler_ranges --data /work/shared/data/real-ct --bundle weights/lsd-ebm \\
        --json docs/results/sampler_ranges.json --markdown docs/results/sampler_ranges.md [--write-manifest]

One option at a time (the others at the bundle's defaults; step sizes also at the most Langevin steps swept),
each swept value refines the same thick-slice inputs made from training individuals (``--cases``, never the
validation ones) at 5 mm sagittal and axial with refine's checks on, as ``vertrefine refine`` runs. A value
is *safe* when no chain diverged (``vertrefine.sampler.diverged``), no more vertebrae were kept as input
than with the defaults, and the mean DSC against the ground truth (1 mm, patch protocol) is at least the
input's. An option's validated range is the run of safe swept values around its default.
``--write-manifest`` records the ranges in the bundle's manifest.json (its ``validated`` section, which
``vertrefine refine`` enforces); the ONNX files and the sha256s the manifest holds for them do not change.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.guidance_forms import report
from benchmarks.real import dsc_change
from benchmarks.tune_defaults import input_rows, thick_inputs
from vertrefine.bundle import MANIFEST_NAME, RANGED_OPTIONS, read_manifest, sha256_file
from vertrefine.refine import Refiner
from vertrefine.sampler import SamplerSettings
from vertrefine.score import score_case, summarize
from vertrefine.spatial import resample_labels

CASES = ("verse__sub-verse007", "miruna__patient13_ct2")
"""Training individuals of the shipped weights (weights/README.md), as benchmarks.tune_defaults uses."""
SWEEPS: dict[str, list[float]] = {
    "step_size": [1e-4, 3e-4, 1e-3, 3e-3, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.1, 0.5, 1.0],
    "langevin_steps": [0, 1, 2, 5, 10, 20, 50, 100],
    "t_refine": list(range(21)),
    "guidance": [0.0, 0.1, 0.25, 0.5, 0.75, 1.0],
    "guidance_steps": [0, 1, 2, 3, 6, 20],
}


def _settings(bundle_sampler: dict, option: str, value: float, extra: dict[str, Any]) -> SamplerSettings:
    cast = int if option in ("t_refine", "langevin_steps", "guidance_steps") else float
    return SamplerSettings.from_manifest(bundle_sampler, **{**extra, option: cast(value)})


def run(args: argparse.Namespace) -> dict[str, Any]:
    # the sweeps leave the validated ranges on purpose: each swept sampler goes in by Refiner.with_options
    refiner = Refiner.from_bundle(args.bundle, device="cpu", threads=args.threads, fine_inputs="refine")
    bundle = refiner.bundle
    inputs = thick_inputs(args.data, args.cases, args.slice_mm, args.axis)
    baseline = input_rows(inputs)
    input_dsc = summarize(baseline)["overall"]["dsc"]["mean"]

    measured: dict[SamplerSettings, dict[str, Any]] = {}

    def measure(sampler: SamplerSettings) -> dict[str, Any]:
        if sampler not in measured:
            measured[sampler] = _measure(sampler)
        return measured[sampler]

    def _measure(sampler: SamplerSettings) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        decisions: dict[str, int] = {}
        swept = refiner.with_options(sampler=sampler)
        start = time.perf_counter()
        for name, gt, native, seed in inputs:
            result = swept(native, seed=seed)
            rows += score_case(name, resample_labels(result.labels, gt.geometry, method="nearest"), gt)
            for v in result.vertebrae:
                key = "diverged" if v.reason.startswith("sampler diverged") else v.decision
                decisions[key] = decisions.get(key, 0) + 1
        overall = summarize(rows)["overall"]
        return {
            "dsc": overall["dsc"]["mean"],
            "hd95_mm": overall["hd95_mm"]["mean"],
            "change": dsc_change(rows, baseline),
            "decisions": decisions,
            "seconds_per_vertebra": (time.perf_counter() - start) / max(len(baseline), 1),
        }

    default = measure(SamplerSettings.from_manifest(bundle.sampler))
    kept_default = default["decisions"].get("kept input", 0)
    print(f"defaults: DSC {default['dsc']:.4f} {default['decisions']}", flush=True)
    sweeps: dict[str, list[dict[str, Any]]] = {}
    ranges: dict[str, list[float]] = {}

    def sweep(option: str, extra: dict[str, Any]) -> list[float]:
        label = option + "".join(f" ({k} {v:g})" for k, v in extra.items())
        rows = sweeps[label] = []
        for value in SWEEPS[option]:
            row = {"value": value, **measure(_settings(bundle.sampler, option, value, extra))}
            row["safe"] = bool(
                not row["decisions"].get("diverged")
                and row["decisions"].get("kept input", 0) <= kept_default
                and row["dsc"] >= input_dsc
            )
            rows.append(row)
            print(f"{label} = {value:g}: DSC {row['dsc']:.4f} {row['decisions']} safe={row['safe']}", flush=True)
        return _safe_run(rows, bundle.sampler.get(option))

    # the options that others depend on first: step sizes are then checked at the most Langevin steps in
    # range, and the number of guided steps at the strongest guidance in range
    ranges["langevin_steps"] = sweep("langevin_steps", {})
    ranges["step_size"] = _common_range(
        [sweep("step_size", {}), sweep("step_size", {"langevin_steps": ranges["langevin_steps"][1]})]
    )
    ranges["t_refine"] = sweep("t_refine", {})
    ranges["guidance"] = sweep("guidance", {})
    ranges["guidance_steps"] = _common_range(
        [sweep("guidance_steps", {}), sweep("guidance_steps", {"guidance": ranges["guidance"][1]})]
    )
    assert set(ranges) == set(RANGED_OPTIONS)
    return {
        "bundle": str(args.bundle),
        "cases": list(args.cases),
        "slice_mm": args.slice_mm,
        "axis": list(args.axis),
        "vertebrae": len(baseline),
        "input_dsc": input_dsc,
        "defaults": {"sampler": bundle.sampler, **default},
        "sweeps": sweeps,
        "ranges": ranges,
    }


def _safe_run(rows: list[dict[str, Any]], default: float | None) -> list[float]:
    """[lowest, highest] swept value of the contiguous safe values that hold the default (or the safe ones)."""
    values = [r["value"] for r in rows]
    start = min(range(len(values)), key=lambda i: abs(values[i] - (default if default is not None else values[0])))
    if not rows[start]["safe"]:
        raise RuntimeError(f"the default {values[start]} is not safe: {rows[start]}")
    lo = hi = start
    while lo > 0 and rows[lo - 1]["safe"]:
        lo -= 1
    while hi + 1 < len(rows) and rows[hi + 1]["safe"]:
        hi += 1
    return [values[lo], values[hi]]


def _common_range(runs: list[list[float]]) -> list[float]:
    return [max(r[0] for r in runs), min(r[1] for r in runs)]


def basis(doc: dict[str, Any]) -> str:
    """One sentence for the manifest: how the ranges were measured."""
    return (
        f"measured by benchmarks/sampler_ranges.py on training individuals {', '.join(doc['cases'])} "
        f"({doc['vertebrae']} vertebrae, {doc['slice_mm']:g} mm {' and '.join(doc['axis'])}), one option at a "
        "time with the others at the defaults (step sizes also with the most Langevin steps in range, guided "
        "steps also with the strongest guidance in range): every swept value in range kept every chain "
        "finite, kept no more vertebrae as input than the defaults and scored a mean DSC at least the input's"
    )


def write_manifest(bundle_dir: Path, doc: dict[str, Any]) -> dict[str, str]:
    """Record the measured ranges in ``bundle_dir``'s manifest.json; returns its sha256 before and after."""
    path = bundle_dir / MANIFEST_NAME
    before = sha256_file(path)
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["validated"] = {"ranges": doc["ranges"], "basis": basis(doc)}
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    read_manifest(bundle_dir)  # the ranges hold the defaults and are well formed
    return {"before": before, "after": sha256_file(path)}


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"Training individuals {', '.join(doc['cases'])}; {doc['slice_mm']:g} mm {', '.join(doc['axis'])}; "
        f"{doc['vertebrae']} vertebrae; input DSC {doc['input_dsc']:.4f}; defaults DSC {doc['defaults']['dsc']:.4f} "
        f"({doc['defaults']['decisions']}).",
        "",
        "| option | value | DSC | ΔDSC vs input mean / worst | vertebrae by decision | safe |",
        "|---|---|---|---|---|---|",
    ]
    for label, rows in doc["sweeps"].items():
        for r in rows:
            decisions = ", ".join(f"{k} {n}" for k, n in sorted(r["decisions"].items()))
            change = r["change"]
            lines.append(
                f"| {label} | {r['value']:g} | {r['dsc']:.4f} | {change['mean']:+.4f} / {change['worst']:+.4f} | "
                f"{decisions} | {'yes' if r['safe'] else '**no**'} |"
            )
    lines += ["", "Validated ranges: " + ", ".join(f"{k} {v[0]:g}..{v[1]:g}" for k, v in doc["ranges"].items())]
    if "manifest_sha256" in doc:
        sha = doc["manifest_sha256"]
        lines.append(f"manifest.json sha256 {sha['before']} -> {sha['after']} (ONNX files unchanged)")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--slice-mm", type=float, default=5.0)
    parser.add_argument("--axis", nargs="+", default=["sagittal", "axial"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write-manifest", action="store_true", help="record the ranges in the bundle's manifest")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    doc = run(args)
    if args.write_manifest:
        doc["manifest_sha256"] = write_manifest(args.bundle, doc)
    report(doc, markdown, args.json, args.markdown)


if __name__ == "__main__":
    main()
