"""Which data-consistency form is better: the gradient-free encoder step, or the likelihood's gradient?

    python -m benchmarks.guidance_forms --data /work/shared/data/real-ct --run runs/real \\
        --bundle weights/lsd-ebm --json docs/results/guidance_forms.json --markdown docs/results/guidance_forms.md

Both forms guide the same LSD-EBM chain (the bundle's sampler defaults: t_refine, Langevin steps) after each
reverse step, for thick-slice inputs made from TRAINING individuals (``--cases``, default the real training
individuals of the split in weights/README.md; the validation individuals are never used here, because
this benchmark picks the guidance form and weight):

- ``gradient-free`` (what refine ships, :class:`vertrefine.guidance.DataConsistency`):
  z <- z + gamma (Enc(P_y(D(z))) - Enc(D(z))), for each gamma of ``--gammas``; ONNX Runtime only.
- ``likelihood gradient`` (DESIGN.md section 3): z <- z + eta grad_z (1/|K|) sum_k [y_k log pi_k +
  (1 - y_k) log(1 - pi_k)], pi_k = eps + (1 - 2 eps) sigmoid(kappa (A D(z))_k - kappa / 2) over the observed
  slabs k (the same slabs and labels as the gradient-free form), for each eta of ``--etas``. The
  vector-Jacobian product J_D^T A^T r is taken by torch autograd through the run's decoder (a refine
  without torch would need it exported as an explicit graph; this benchmark measures whether that is worth it).
  Scale: on a 5 mm vertebra of sub-verse007 the mean log-likelihood's gradient has a norm of about 0.002
  where one gradient-free step with gamma 1 moves the latent by about 5 (|z| is about 35), so etas of a few
  thousand make the two steps comparable.

Per form and weight: mean DSC and HD95 at 1 mm against the ground truth (patch protocol), the worst
per-vertebra DSC change from the input, and seconds per vertebra for the guidance steps.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.real import case_seed, condition_key, dsc_change, find_case_paths, load_ground_truth
from vertrefine.degrade import degrade
from vertrefine.guidance import DataConsistency, SlabObservation
from vertrefine.refine import Refiner
from vertrefine.sampler import refine_latents
from vertrefine.score import score_case, summarize
from vertrefine.spatial import resample_labels
from vertrefine.train.export import load_checkpoint_model
from vertrefine.volume import Volume

TRAINING_CASES: tuple[str, ...] = ("verse__sub-verse007", "verse__sub-verse009", "miruna__patient13_ct2")
EPSILON = 0.05
"""Label-noise rate of the likelihood (a slab's label is wrong with this probability)."""
KAPPA = 20.0
"""Sharpness of the slab likelihood's sigmoid."""


class LikelihoodGradient:
    """``z <- z + weight * eta * grad_z mean_k log p(y_k | z)`` through a torch decoder (autograd VJP)."""

    def __init__(self, decoder: torch.nn.Module, observations: Sequence[SlabObservation | None], eta: float) -> None:
        self.decoder = decoder
        self.observations = list(observations)
        self.eta = float(eta)

    def log_likelihood(self, probability: torch.Tensor, observation: SlabObservation) -> torch.Tensor:
        """Mean over the observed slabs of log p(y_k | x) for one decoded patch [P, P, P]."""
        slab = torch.from_numpy(observation.slab.reshape(-1).astype(np.int64))
        valid = slab >= 0
        sums = torch.zeros(observation.slabs, dtype=probability.dtype).index_add(
            0, slab[valid], probability.reshape(-1)[valid]
        )
        means = sums / torch.from_numpy(np.maximum(observation.counts, 1.0))
        pi = EPSILON + (1 - 2 * EPSILON) * torch.sigmoid(KAPPA * means - KAPPA / 2)
        inside, outside = torch.from_numpy(observation.inside), torch.from_numpy(observation.outside)
        terms = torch.cat([torch.log(pi[inside]), torch.log1p(-pi[outside])])
        return terms.mean() if terms.numel() else probability.sum() * 0

    def __call__(self, z: np.ndarray, weight: float) -> np.ndarray:
        out = z.copy()
        for row, observation in enumerate(self.observations):
            if observation is None:
                continue
            z_row = torch.from_numpy(z[row : row + 1]).requires_grad_(True)
            probability = self.decoder(z_row)[0, 0]
            (grad,) = torch.autograd.grad(self.log_likelihood(probability, observation), z_row)
            out[row] += np.float32(weight * self.eta) * grad[0].numpy()
        return out


def refine_with(native: Volume, refiner: Refiner, make_guide, seed: int) -> tuple[Volume, float]:
    """(1 mm labels, seconds in the chain) of ``native`` refined by ``refiner``'s sampler with the guide
    ``make_guide(prepared)`` in place of refine's own."""
    sessions, settings = refiner.sessions, refiner.options.sampler
    prepared = refiner.prepare(native)
    guide = make_guide(prepared) if make_guide is not None else None
    start = time.perf_counter()
    z = refine_latents(
        sessions.energy_and_grad, prepared.mu, sessions.bundle.diffusion_schedule(), settings,
        np.random.default_rng(seed), guide,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    result = refiner.finish(prepared, z[None])
    return result.working_labels, seconds


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    refiner = Refiner.from_bundle(args.bundle, device="cpu", threads=args.threads, fine_inputs="refine")
    sessions, base = refiner.sessions, refiner.options.sampler
    decoder = load_checkpoint_model(args.run)[0].decoder.eval()
    paths = find_case_paths(args.data, args.cases)

    def chain(guidance: float) -> Refiner:
        """The bundle's sampler defaults with the guidance weight ``guidance``."""
        return refiner.with_options(sampler=replace(base, guidance=guidance))

    forms: dict[str, tuple[Refiner, Any]] = {"none": (chain(guidance=0.0), None)}
    for gamma in args.gammas:
        forms[f"gradient-free gamma={gamma:g}"] = (
            chain(guidance=gamma),
            lambda p: DataConsistency(
                lambda x: sessions.encode(x)[0], lambda z, _rows: sessions.decode_chunks(z), p.observations
            ),
        )
    for eta in args.etas:
        forms[f"likelihood gradient eta={eta:g}"] = (
            chain(guidance=1.0),
            lambda p, eta=eta: LikelihoodGradient(decoder, p.observations, eta),
        )
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in ["input", *forms]}
    seconds: dict[str, float] = {name: 0.0 for name in forms}
    vertebrae = 0
    for case, path in paths.items():
        gt = load_ground_truth(path)
        for slice_mm in args.slice_mm:
            for axis in args.axis:
                seed = case_seed(case, slice_mm, axis)
                native = degrade(gt, slice_mm=slice_mm, axis=axis, seed=seed, native=True)
                name = f"{case} {condition_key('degrade', slice_mm, axis, 'native')}"
                rows["input"] += score_case(name, resample_labels(native, gt.geometry, method="nearest"), gt)
                vertebrae += len(gt.labels)
                for form, (form_refiner, make_guide) in forms.items():
                    labels, took = refine_with(native, form_refiner, make_guide, seed)
                    seconds[form] += took
                    rows[form] += score_case(name, resample_labels(labels, gt.geometry, method="nearest"), gt)
                print(name, {f: round(rows[f][-1]["dsc"], 3) for f in rows}, flush=True)
    summary = {}
    for form, form_rows in rows.items():
        stats = summarize(form_rows)["overall"]
        summary[form] = {
            "dsc": stats["dsc"]["mean"],
            "hd95_mm": stats["hd95_mm"]["mean"],
            "change": None if form == "input" else dsc_change(form_rows, rows["input"]),
            "chain_seconds_per_vertebra": None if form == "input" else seconds[form] / max(vertebrae, 1),
        }
    return {
        "cases": list(paths),
        "slice_mm": args.slice_mm,
        "axis": args.axis,
        "sampler": base.__dict__,
        "summary": summary,
    }


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"Training individuals {', '.join(doc['cases'])}; {', '.join(f'{s:g} mm' for s in doc['slice_mm'])} "
        f"{', '.join(doc['axis'])}; chain: the bundle's sampler defaults.",
        "",
        "| form | DSC | HD95 (mm) | ΔDSC vs input mean / worst | chain s per vertebra |",
        "|---|---|---|---|---|",
    ]
    for form, s in doc["summary"].items():
        change = s["change"]
        delta = "—" if change is None else f"{change['mean']:+.4f} / {change['worst']:+.4f}"
        secs = "—" if s["chain_seconds_per_vertebra"] is None else f"{s['chain_seconds_per_vertebra']:.2f}"
        lines.append(f"| {form} | {s['dsc']:.4f} | {s['hd95_mm']:.2f} | {delta} | {secs} |")
    return "\n".join(lines) + "\n"


def report(doc: dict[str, Any], render, json_path: Path | None, markdown_path: Path | None) -> None:
    """Print ``render(doc)`` and write it and the JSON document where asked."""
    text = render(doc)
    print(text)
    if json_path:
        json_path.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    if markdown_path:
        markdown_path.write_text(text)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True, help="training run folder (its decoder, for autograd)")
    parser.add_argument("--bundle", type=Path, required=True, help="the run's exported bundle")
    parser.add_argument("--cases", nargs="+", default=list(TRAINING_CASES))
    parser.add_argument("--slice-mm", nargs="+", type=float, default=[5.0])
    parser.add_argument("--axis", nargs="+", default=["sagittal"])
    parser.add_argument("--gammas", nargs="+", type=float, default=[0.25, 0.5, 1.0])
    parser.add_argument("--etas", nargs="+", type=float, default=[1000.0, 4000.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    report(run(args), markdown, args.json, args.markdown)


if __name__ == "__main__":
    main()
