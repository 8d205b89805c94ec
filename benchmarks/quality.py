"""Quality on held-out synthetic spines: the degraded input against refine with each model (patch protocol).

    python -m benchmarks.quality                                   # 20 spines, 5 mm sagittal, vae + lsd-ebm
    python -m benchmarks.lebm_baseline --cache CACHE --out results/lebm_prior.pt      # the LEBM row's prior
    python -m benchmarks.quality --spines 20 --slice-mm 5 3 7 --axis sagittal axial \\
        --models vae lebm=results/lebm_prior.pt lsd-ebm \\
        --json results/quality.json --markdown results/quality.md --figure docs/quality_dsc.png

Spines use seeds from --first-seed (default 100000; the shipped bundles were trained on seeds 1000-1499),
each degraded with `degrade` at the given slice thickness and axis (degrade seed = spine seed). Every
vertebra is scored inside the 128^3 1 mm patch around the true vertebra (the paper's protocol) with the
paper's six metrics plus HD95 and ASSD; the tables give mean +- std over vertebrae, and the paired
difference of each model's DSC from the VAE's (mean and 95 % interval over vertebrae).

Models: ``KIND`` or ``KIND=BUNDLE_DIR`` for vae and lsd-ebm (run as `vertrefine refine` runs them), and
``lebm=PRIOR.pt`` for the LEBM baseline (benchmarks/lebm_baseline.py: the shipped encoder and decoder with a
latent EBM prior, posterior Langevin through the torch decoder); ``posterior`` is that row with E = 0 (the
VAE's N(0, I) prior), which tells how much of the LEBM row comes from its prior. The last line is
`quality: input DSC a  VAE b  LEBM c  LSD-EBM d` for the first thickness and axis (n/a: model not run).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

from vertrefine.degrade import degrade
from vertrefine.refine import Refiner
from vertrefine.score import METRIC_KEYS, score_case, summarize
from vertrefine.spatial import crop_instances
from vertrefine.synth import synth_spine
from vertrefine.volume import Volume

NAMES = {"input": "input", "vae": "VAE", "lebm": "LEBM", "lsd-ebm": "LSD-EBM", "posterior": "posterior, N(0, I)"}
LEBM_POSTERIOR_STEPS = 20
"""The paper's LEBM row uses 20 sampling steps."""


class LebmModel:
    """The LEBM row: the shipped lsd-ebm bundle's ONNX encoder/decoder around a torch posterior chain."""

    def __init__(self, prior: Path | None, threads: int, step_size: float) -> None:
        from benchmarks.lebm_baseline import LebmRefiner  # torch: only when the LEBM row is asked for

        shipped = Refiner.from_bundle(model="lsd-ebm", device="cpu", threads=threads, fine_inputs="refine")
        self.refiner = shipped.with_options(sampler=None)  # its latents come from the posterior chain below
        self.posterior = LebmRefiner(shipped.bundle.dir, prior, LEBM_POSTERIOR_STEPS, step_size)

    def refine(self, volume: Volume, seed: int) -> Volume:
        prepared = self.refiner.prepare(volume)
        patches = np.stack([p for _, _, p in crop_instances(prepared.instance_array, prepared.instances)])
        z = self.posterior.posterior(prepared.mu, patches, seed)
        return self.refiner.finish(prepared, z[None]).labels


class BundleModel:
    """A vae or lsd-ebm bundle, run as `vertrefine refine` runs it."""

    def __init__(self, refiner: Refiner) -> None:
        self.refiner = refiner

    def refine(self, volume: Volume, seed: int) -> Volume:
        return self.refiner(volume, seed=seed).labels


def _models(args: argparse.Namespace) -> dict[str, BundleModel | LebmModel]:
    models: dict[str, BundleModel | LebmModel] = {}
    for spec in args.models:
        kind, _, path = spec.partition("=")
        if kind == "posterior":  # ablation: the LEBM row's posterior Langevin with E = 0
            models[kind] = LebmModel(None, args.threads, args.lebm_step_size)
            continue
        if kind == "lebm":
            if not path:
                raise SystemExit("quality: the LEBM row needs lebm=PRIOR.pt (python -m benchmarks.lebm_baseline)")
            models[kind] = LebmModel(Path(path), args.threads, args.lebm_step_size)
            continue
        sampling = {}  # the command line's sampler settings: for the sampling lsd-ebm only, as refine takes them
        if kind != "vae":
            sampling = dict(t_refine=args.t_refine, langevin_steps=args.langevin_steps, step_size=args.step_size)
            sampling["samples"] = args.samples
        bundle = Path(path) if path else None
        refiner = Refiner.from_bundle(
            bundle, model=kind, device="cpu", threads=args.threads, fine_inputs="refine", **sampling
        )
        models[kind] = BundleModel(refiner)
    return models


def paired_difference(rows: list[dict], baseline: list[dict], metric: str = "dsc") -> dict[str, float]:
    """Mean of (row - baseline) per vertebra with a normal 95 % interval, and the fraction of wins."""
    key = lambda r: (r["case"], r["label"])  # noqa: E731
    base = {key(r): r[metric] for r in baseline if not r.get("extra") and r[metric] is not None}
    diffs = np.array([r[metric] - base[key(r)] for r in rows if not r.get("extra") and key(r) in base])
    half = 1.96 * diffs.std(ddof=1) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return {"mean": float(diffs.mean()), "ci95": float(half), "wins": float((diffs > 0).mean()), "n": len(diffs)}


def run(args: argparse.Namespace) -> dict:
    models = _models(args)
    results: dict[str, dict] = {}
    for axis in args.axis:
        for slice_mm in args.slice_mm:
            key = f"{axis} {slice_mm:g} mm"
            rows: dict[str, list] = {"input": [], **{kind: [] for kind in models}}
            seconds: dict[str, float] = {kind: 0.0 for kind in models}
            for n in range(args.spines):
                seed = args.first_seed + n
                truth = synth_spine(seed)
                thick = degrade(truth, slice_mm=slice_mm, axis=axis, seed=seed)
                case = f"spine_{seed}"
                rows["input"] += score_case(case, thick, truth)
                for kind, model in models.items():
                    start = time.perf_counter()
                    refined = model.refine(thick, seed)
                    seconds[kind] += time.perf_counter() - start
                    rows[kind] += score_case(case, refined, truth)
            results[key] = {method: {"summary": summarize(r)["overall"], "rows": r} for method, r in rows.items()}
            for kind in models:
                results[key][kind]["seconds_per_spine"] = seconds[kind] / args.spines
                if "vae" in rows and kind != "vae":
                    results[key][kind]["dsc_minus_vae"] = paired_difference(rows[kind], rows["vae"])
            print(table_text(key, results[key], args.spines))
    return results


def _cell(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat["mean"] is not None else "n/a"


def table_text(key: str, block: dict, spines: int) -> str:
    lines = [f"\n{key}: {spines} spines, mean +- std per vertebra (patch protocol)"]
    lines.append(f"{'method':8s} {'n':>4s} " + " ".join(f"{m:>15s}" for m in METRIC_KEYS))
    for method, entry in block.items():
        cells = " ".join(f"{_cell(entry['summary'][m]):>15s}" for m in METRIC_KEYS)
        lines.append(f"{NAMES.get(method, method):8s} {entry['summary']['n']:4d} {cells}")
    for method, entry in block.items():
        if "dsc_minus_vae" in entry:
            d = entry["dsc_minus_vae"]
            name = NAMES.get(method, method)
            lines.append(f"{name} - VAE DSC: {d['mean']:+.4f} ± {d['ci95']:.4f} (95 %), better on {d['wins']:.0%}")
    return "\n".join(lines)


def table_markdown(key: str, block: dict, spines: int) -> str:
    heads = [m.upper().replace("_MM", " (mm)") for m in METRIC_KEYS]
    lines = [
        f"### {key} ({spines} spines, {block['input']['summary']['n']} vertebrae)",
        "",
        "| method | " + " | ".join(heads) + " | s / spine | DSC − VAE (95 %) |",
        "|---|" + "---|" * (len(heads) + 2),
    ]
    for method, entry in block.items():
        cells = " | ".join(_cell(entry["summary"][m]) for m in METRIC_KEYS)
        secs = f"{entry['seconds_per_spine']:.2f}" if "seconds_per_spine" in entry else ""
        diff = entry.get("dsc_minus_vae")
        diff_text = f"{diff['mean']:+.4f} ± {diff['ci95']:.4f}" if diff else ""
        lines.append(f"| {NAMES.get(method, method)} | {cells} | {secs} | {diff_text} |")
    return "\n".join(lines) + "\n"


def write_figure(results: dict, args: argparse.Namespace, path: Path) -> None:
    """DSC (mean ± std over vertebrae) against slice thickness, one panel per slice axis, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thicknesses = sorted(args.slice_mm)
    fig, axes = plt.subplots(1, len(args.axis), figsize=(5 * len(args.axis), 4), sharey=True, squeeze=False)
    methods = list(next(iter(results.values())).keys())
    for panel, axis in zip(axes[0], args.axis, strict=True):
        for offset, method in enumerate(methods):
            stats = [results[f"{axis} {mm:g} mm"][method]["summary"]["dsc"] for mm in thicknesses]
            x = np.array(thicknesses) + 0.08 * (offset - (len(methods) - 1) / 2)
            means, stds = [s["mean"] for s in stats], [s["std"] for s in stats]
            panel.errorbar(x, means, yerr=stds, marker="o", capsize=3, label=NAMES.get(method, method))
        panel.set_title(f"{axis} slices")
        panel.set_xlabel("slice thickness (mm)")
        panel.set_xticks(thicknesses)
        panel.grid(alpha=0.3)
    axes[0][0].set_ylabel("DSC per vertebra (mean ± std)")
    axes[0][-1].legend(loc="lower left")
    fig.suptitle(f"{args.spines} held-out synthetic spines, patch protocol")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spines", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=100000)
    parser.add_argument("--slice-mm", type=float, nargs="+", default=[5.0])
    parser.add_argument("--axis", nargs="+", default=["sagittal"], choices=["sagittal", "axial", "coronal"])
    parser.add_argument("--models", nargs="+", default=["vae", "lsd-ebm"], help="KIND, KIND=BUNDLE_DIR, lebm=PRIOR")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--t-refine", type=int)
    parser.add_argument("--langevin-steps", type=int)
    parser.add_argument("--step-size", type=float)
    parser.add_argument("--lebm-step-size", type=float, default=1e-4, help="posterior Langevin step (LEBM row)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write every row and summary here")
    parser.add_argument("--markdown", type=Path, help="write the tables as markdown here")
    parser.add_argument("--figure", type=Path, help="write the DSC-against-thickness PNG here")
    args = parser.parse_args()
    start = time.perf_counter()
    results = run(args)
    total = time.perf_counter() - start
    print(f"\n{total:.0f} s in all")
    if args.json:
        meta = {"args": {k: str(v) for k, v in vars(args).items()}, "seconds": total, "cpu": platform.processor()}
        args.json.write_text(json.dumps({**meta, "results": results}))
    if args.markdown:
        args.markdown.write_text("\n".join(table_markdown(k, b, args.spines) for k, b in results.items()))
    if args.figure:
        write_figure(results, args, args.figure)
    first = results[f"{args.axis[0]} {args.slice_mm[0]:g} mm"]

    def dsc(method: str) -> str:
        return f"{first[method]['summary']['dsc']['mean']:.4f}" if method in first else "n/a"

    print(f"quality: input DSC {dsc('input')}  VAE {dsc('vae')}  LEBM {dsc('lebm')}  LSD-EBM {dsc('lsd-ebm')}")


if __name__ == "__main__":
    main()
