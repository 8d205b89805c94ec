"""Pick refine's sampler defaults on TRAINING individuals: quality against time for a small grid of settings.

    python -m benchmarks.tune_defaults --data /work/shared/data/real-ct --bundle weights/lsd-ebm \\
        --json docs/results/tune_defaults.json --markdown docs/results/tune_defaults.md

Each setting (t_refine, Langevin steps per reverse step, guidance weight, guided reverse steps) refines the
same thick-slice inputs made from training individuals (``--cases``; default the real training individuals
of the split in weights/README.md, never the validation ones) at 5 mm sagittal and axial; per setting the
mean DSC and HD95 at 1 mm against the ground truth (patch protocol), the worst per-vertebra DSC change from
the input and the chain's seconds per vertebra. The bundle's defaults are then set with
``vertrefine export RUN -o DIR --t-refine T --langevin-steps K --guidance G``.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.guidance_forms import TRAINING_CASES, report
from benchmarks.real import case_seed, condition_key, dsc_change, find_case_paths, load_ground_truth
from vertrefine.degrade import degrade
from vertrefine.refine import Refiner
from vertrefine.sampler import SamplerSettings
from vertrefine.score import score_case, summarize
from vertrefine.spatial import resample_labels
from vertrefine.volume import Volume


def thick_inputs(
    data: Path, cases: Sequence[str], slice_mm: float, axes: Sequence[str]
) -> list[tuple[str, Volume, Volume, int]]:
    """(name, ground truth at 1 mm, thick-slice input on its native grid, seed) per case and slice axis."""
    inputs = []
    for case, path in find_case_paths(data, cases).items():
        gt = load_ground_truth(path)
        for axis in axes:
            seed = case_seed(case, slice_mm, axis)
            native = degrade(gt, slice_mm=slice_mm, axis=axis, seed=seed, native=True)
            inputs.append((f"{case} {condition_key('degrade', slice_mm, axis, 'native')}", gt, native, seed))
    return inputs


def input_rows(inputs: Sequence[tuple[str, Volume, Volume, int]]) -> list[dict[str, Any]]:
    """The per-vertebra scores of the thick-slice inputs themselves (on the truth's grid)."""
    rows: list[dict[str, Any]] = []
    for name, gt, native, _ in inputs:
        rows += score_case(name, resample_labels(native, gt.geometry, method="nearest"), gt)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    refiner = Refiner.from_bundle(args.bundle, device="cpu", threads=args.threads, fine_inputs="refine")
    defaults = refiner.bundle.sampler
    settings: dict[str, Refiner] = {"vae (encoder mean)": refiner.with_options(sampler=None)}
    for t_refine, steps, guidance, guided in itertools.product(
        args.t_refine, args.langevin_steps, args.guidance, args.guidance_steps
    ):
        if guidance == 0 and guided != args.guidance_steps[0]:
            continue  # the guided-step count means nothing without guidance
        name = f"t={t_refine} K={steps} gamma={guidance:g} guided={guided if guided < 1000 else 'all'}"
        sampler = SamplerSettings.from_manifest(
            defaults, t_refine=t_refine, langevin_steps=steps, guidance=guidance, guidance_steps=guided
        )
        settings[name] = refiner.with_options(sampler=sampler)  # the grid may leave the validated ranges
    inputs = thick_inputs(args.data, args.cases, args.slice_mm, args.axis)
    rows: dict[str, list[dict[str, Any]]] = {"input": input_rows(inputs)}
    vertebrae = len(rows["input"])
    summary: dict[str, Any] = {}
    for setting, setting_refiner in settings.items():
        rows[setting], seconds = [], 0.0
        for name, gt, native, seed in inputs:
            start = time.perf_counter()
            result = setting_refiner(native, seed=seed)
            seconds += time.perf_counter() - start
            rows[setting] += score_case(name, resample_labels(result.working_labels, gt.geometry, method="nearest"), gt)
        overall = summarize(rows[setting])["overall"]
        summary[setting] = {
            "dsc": overall["dsc"]["mean"],
            "hd95_mm": overall["hd95_mm"]["mean"],
            "change": dsc_change(rows[setting], rows["input"]),
            "seconds_per_vertebra": seconds / max(vertebrae, 1),
        }
        print(
            f"{setting}: DSC {summary[setting]['dsc']:.4f}  {summary[setting]['seconds_per_vertebra']:.2f} s",
            flush=True,
        )
    overall = summarize(rows["input"])["overall"]
    summary = {"input": {"dsc": overall["dsc"]["mean"], "hd95_mm": overall["hd95_mm"]["mean"]}, **summary}
    return {
        "cases": args.cases,
        "slice_mm": args.slice_mm,
        "axis": args.axis,
        "vertebrae": vertebrae,
        "summary": summary,
    }


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"Training individuals {', '.join(doc['cases'])}; {doc['slice_mm']:g} mm {', '.join(doc['axis'])}; "
        f"{doc['vertebrae']} vertebrae.",
        "",
        "| setting | DSC | HD95 (mm) | ΔDSC vs input mean / worst | s per vertebra (whole refine) |",
        "|---|---|---|---|---|",
    ]
    for name, s in doc["summary"].items():
        change = s.get("change")
        delta = "—" if change is None else f"{change['mean']:+.4f} / {change['worst']:+.4f}"
        secs = s.get("seconds_per_vertebra")
        lines.append(
            f"| {name} | {s['dsc']:.4f} | {s['hd95_mm']:.2f} | {delta} | {'—' if secs is None else f'{secs:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--cases", nargs="+", default=list(TRAINING_CASES))
    parser.add_argument("--slice-mm", type=float, default=5.0)
    parser.add_argument("--axis", nargs="+", default=["sagittal", "axial"])
    parser.add_argument("--t-refine", nargs="+", type=int, default=[2, 4, 6])
    parser.add_argument("--langevin-steps", nargs="+", type=int, default=[10, 20])
    parser.add_argument("--guidance", nargs="+", type=float, default=[0.0, 0.5, 1.0])
    parser.add_argument("--guidance-steps", nargs="+", type=int, default=[2, 1000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    report(run(args), markdown, args.json, args.markdown)


if __name__ == "__main__":
    main()
