"""How much any latent prior could add on top of the shipped encoder: the headroom behind the quality tables.

    python -m benchmarks.prior_headroom --spines 20 --cache /work/data/cache500

On held-out spines (seeds from 100000, degraded like benchmarks/quality.py), per vertebra on its 128^3 1 mm
patch (the box refine crops from the degraded input), DSC against the truth of decoding:
- the encoder's mean of the degraded patch (what `--model vae` does);
- the encoder's mean of the TRUE patch: the autoencoder's ceiling, the best any latent could do;
- the LSD-EBM reverse chain from t_refine = 1..6 (the shipped energy; refine's default is 6);
- the same chain with an oracle Gaussian energy: the exact diffused density of a Gaussian fitted to the
  clean training latents (with --cache: the training patches of the shipped weights), i.e. a prior that is
  right about the first two moments, to tell a weak energy from a chain that cannot gain;
- the mean probability of 8 chains (what `--samples 8` does).
Rows also give the root-mean-square distance of each latent to the true patch's latent.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from vertrefine.degrade import degrade
from vertrefine.refine import Refiner
from vertrefine.runtime import BundleSessions
from vertrefine.sampler import SamplerSettings, refine_latents
from vertrefine.schedule import DiffusionSchedule
from vertrefine.spatial import find_instances, resample_labels
from vertrefine.synth import synth_spine


def held_out(refiner: Refiner, spines: int, first_seed: int, slice_mm: float, axis: str):
    """Degraded-patch latents [n, L], true-patch latents [n, L] and true masks [n, P, P, P] in the same boxes
    (``refiner``: its first stage crops and encodes the degraded vertebrae)."""
    sessions = refiner.sessions
    mu_degraded, truths = [], []
    for seed in range(first_seed, first_seed + spines):
        truth = synth_spine(seed)
        prepared = refiner.prepare(degrade(truth, slice_mm=slice_mm, axis=axis, seed=seed))
        true_ids, true_instances = find_instances(resample_labels(truth, prepared.working))
        by_label = {i.label: i for i in true_instances}
        for instance, box in zip(prepared.instances, prepared.boxes, strict=True):
            patch = np.zeros((sessions.bundle.patch,) * 3, bool)
            inside, part = box.slices(true_ids.shape)
            patch[part] = true_ids[inside] == by_label[instance.label].instance_id
            truths.append(patch)
        mu_degraded.append(prepared.mu)
    truths_array = np.stack(truths)
    mu_true, _ = sessions.encode(truths_array.astype(np.float32))
    return np.concatenate(mu_degraded), mu_true, truths_array


def dice(sessions: BundleSessions, latents: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """Per-vertebra DSC of the mean decoded probability over samples; ``latents`` is [samples, n, L]."""
    total = np.zeros(truths.shape, np.float32)
    for z in latents:
        for start, probability in sessions.decode_chunks(z):
            total[start : start + len(probability)] += probability
    masks = total / len(latents) >= 0.5
    overlap = (masks & truths).sum(axis=(1, 2, 3))
    return 2 * overlap / (masks.sum(axis=(1, 2, 3)) + truths.sum(axis=(1, 2, 3)))


def gaussian_energy(mu: np.ndarray, logvar: np.ndarray, schedule: DiffusionSchedule):
    """energy_and_grad of the exact diffused density of the Gaussian fitted to z0 ~ q(z0 | x) of clean patches.

    ``mu``, ``logvar`` [n, L]: the encoder's posteriors; the samples' covariance is that of the means plus
    the mean posterior variance (which also keeps it well conditioned).
    """
    mean, cov = mu.mean(0), np.cov(mu.T) + np.diag(np.exp(logvar).mean(0))
    levels = {}
    for t in range(schedule.timesteps):
        a, a_cum, s_cum = schedule.a_s[t + 1], schedule.a_s_cum[t], schedule.sigmas_cum[t]
        diffused = a * a * (a_cum * a_cum * cov + s_cum * s_cum * np.eye(len(mean)))
        levels[t] = (np.linalg.inv(diffused).astype(np.float32), (a * a_cum * mean).astype(np.float32))

    def energy_and_grad(z: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        precision, centre = levels[int(t[0])]
        d = z - centre
        grad = d @ precision
        return 0.5 * (d * grad).sum(1), grad

    return energy_and_grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spines", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=100000)
    parser.add_argument("--slice-mm", type=float, default=5.0)
    parser.add_argument("--axis", default="sagittal", choices=["sagittal", "axial", "coronal"])
    parser.add_argument("--cache", type=Path, help="training patch cache: adds the oracle Gaussian rows")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    shipped = Refiner.from_bundle(model="lsd-ebm", device="cpu", threads=args.threads, fine_inputs="refine")
    encoder_mean = shipped.with_options(sampler=None)  # its encoding; the chains below run on the latents
    sessions = shipped.sessions
    schedule = sessions.bundle.diffusion_schedule()
    defaults = sessions.bundle.sampler
    mu_degraded, mu_true, truths = held_out(encoder_mean, args.spines, args.first_seed, args.slice_mm, args.axis)
    print(f"{args.spines} spines, {len(truths)} vertebrae, {args.axis} {args.slice_mm:g} mm")
    print(f"{'latent decoded':46s} {'DSC':>14s} {'rms to true latent':>19s}")

    def row(name: str, latents: np.ndarray) -> None:
        scores = dice(sessions, latents, truths)
        rms = np.sqrt(((latents - mu_true[None]) ** 2).mean())
        print(f"{name:46s} {scores.mean():.4f} ± {scores.std():.3f} {rms:19.3f}", flush=True)

    row("encoder mean of the degraded patch (VAE)", mu_degraded[None])
    row("encoder mean of the true patch (ceiling)", mu_true[None])
    energies = {"LSD-EBM": sessions.energy_and_grad}
    if args.cache:
        from benchmarks.lebm_baseline import clean_latents  # torch: only with --cache
        from vertrefine.train.patch_cache import PatchCache, split_indices

        cache = PatchCache.open(args.cache)
        latents = clean_latents(sessions, cache, split_indices(cache, 0.1, 0)[0])
        energies["oracle Gaussian"] = gaussian_energy(latents[:, 0], latents[:, 1], schedule)
    for name, energy in energies.items():
        for t_refine in (1, 2, 3, 6):
            settings = SamplerSettings.from_manifest(defaults, t_refine=t_refine)
            z = refine_latents(energy, mu_degraded, schedule, settings, np.random.default_rng(0))
            row(f"{name} chain, t_refine {t_refine}", z[None])
        settings = SamplerSettings.from_manifest(defaults)
        rngs = [np.random.default_rng(k) for k in range(8)]
        chains = np.stack([refine_latents(energy, mu_degraded, schedule, settings, rng) for rng in rngs])
        row(f"{name} chain, t_refine {settings.t_refine}, mean of 8", chains)
    print(f"{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
