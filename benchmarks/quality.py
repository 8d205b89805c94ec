"""Quality on held-out synthetic spines: the degraded input against refine with each bundle (patch protocol).

    python -m benchmarks.quality                                   # 20 spines, 5 mm sagittal, vae + lsd-ebm
    python -m benchmarks.quality --spines 20 --slice-mm 3 5 7 --axis sagittal axial --json q.json

Spines use seeds from --first-seed (default 100000; the shipped bundles were trained on seeds 1000-1499),
each degraded with `degrade` at the given slice thickness and axis (degrade seed = spine seed). Every
vertebra is scored inside the 128^3 1 mm patch around the true vertebra (the paper's protocol) with the
paper's six metrics plus HD95 and ASSD; the tables give mean +- std over vertebrae. The last line is
`quality: input DSC a  VAE b  LEBM c  LSD-EBM d` for the first thickness and axis (n/a: no such bundle).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vertrefine.bundle import load_bundle
from vertrefine.degrade import degrade
from vertrefine.info import default_bundle_dir
from vertrefine.refine import RefineOptions, refine_volume
from vertrefine.runtime import open_sessions
from vertrefine.sampler import SamplerSettings
from vertrefine.score import METRIC_KEYS, score_case, summarize
from vertrefine.synth import synth_spine

NAMES = {"input": "input", "vae": "VAE", "lebm": "LEBM", "lsd-ebm": "LSD-EBM"}


def _bundles(args: argparse.Namespace) -> dict[str, Path]:
    found = {}
    for spec in args.models:
        kind, _, path = spec.partition("=")
        found[kind] = Path(path) if path else default_bundle_dir(kind)
    return found


def run(args: argparse.Namespace) -> dict:
    bundles = _bundles(args)
    sessions = {kind: open_sessions(load_bundle(path), "cpu", args.threads)[0] for kind, path in bundles.items()}
    options = {}
    for kind, s in sessions.items():
        if s.bundle.kind == "vae":
            options[kind] = RefineOptions(None)
        else:
            overrides = dict(t_refine=args.t_refine, langevin_steps=args.langevin_steps, step_size=args.step_size)
            sampler = SamplerSettings.from_manifest(s.bundle.sampler, **overrides)
            options[kind] = RefineOptions(sampler, samples=args.samples)
    results: dict[str, dict] = {}
    for axis in args.axis:
        for slice_mm in args.slice_mm:
            key = f"{axis} {slice_mm:g} mm"
            rows: dict[str, list] = {"input": [], **{kind: [] for kind in sessions}}
            seconds: dict[str, float] = {kind: 0.0 for kind in sessions}
            for n in range(args.spines):
                seed = args.first_seed + n
                truth = synth_spine(seed)
                thick = degrade(truth, slice_mm=slice_mm, axis=axis, seed=seed)
                case = f"spine_{seed}"
                rows["input"] += score_case(case, thick, truth)
                for kind, s in sessions.items():
                    start = time.perf_counter()
                    refined = refine_volume(thick, s, options[kind], seed=seed)
                    seconds[kind] += time.perf_counter() - start
                    rows[kind] += score_case(case, refined.labels, truth)
            results[key] = {method: {"summary": summarize(r)["overall"], "rows": r} for method, r in rows.items()}
            for kind in sessions:
                results[key][kind]["seconds_per_spine"] = seconds[kind] / args.spines
            print_table(key, results[key], args.spines)
    return results


def print_table(key: str, block: dict, spines: int) -> None:
    print(f"\n{key}: {spines} spines, mean +- std per vertebra (patch protocol)")
    header = f"{'method':8s} {'n':>4s} " + " ".join(f"{m:>15s}" for m in METRIC_KEYS)
    print(header)
    for method, entry in block.items():
        summary = entry["summary"]
        cells = []
        for metric in METRIC_KEYS:
            stat = summary[metric]
            cells.append(f"{stat['mean']:7.3f} +- {stat['std']:5.3f}" if stat["mean"] is not None else f"{'n/a':>15s}")
        print(f"{NAMES.get(method, method):8s} {summary['n']:4d} " + " ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spines", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=100000)
    parser.add_argument("--slice-mm", type=float, nargs="+", default=[5.0])
    parser.add_argument("--axis", nargs="+", default=["sagittal"], choices=["sagittal", "axial", "coronal"])
    parser.add_argument("--models", nargs="+", default=["vae", "lsd-ebm"], help="KIND or KIND=BUNDLE_DIR")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--t-refine", type=int)
    parser.add_argument("--langevin-steps", type=int)
    parser.add_argument("--step-size", type=float)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write every row and summary here")
    args = parser.parse_args()
    start = time.perf_counter()
    results = run(args)
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))
    first = results[f"{args.axis[0]} {args.slice_mm[0]:g} mm"]

    def dsc(method: str) -> str:
        return f"{first[method]['summary']['dsc']['mean']:.4f}" if method in first else "n/a"

    print(f"quality: input DSC {dsc('input')}  VAE {dsc('vae')}  LEBM {dsc('lebm')}  LSD-EBM {dsc('lsd-ebm')}")


if __name__ == "__main__":
    main()
