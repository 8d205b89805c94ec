"""Measure the reverse-chain choices where the paper's code and its equations differ.

For held-out patches of a training run's cache (their thick-slice variants as input, the clean 1 mm mask as
truth): encode (posterior mean), diffuse to t_refine, run the reverse Langevin chain back to 0, decode, and
report the Dice against the clean mask, for each combination of chain start (z_{t+1} as the equations, or
fresh N(0, I) noise as the code) and diffusion noise scale (1 as the equations, 0.1 as the code). The VAE
row decodes the encoder's mean directly; the input row scores the thick-slice input itself.

    python benchmarks/reverse_chain_choices.py RUN_DIR [--patches 60] [--t-refine 6] [--steps 60]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from vertrefine.sampler import SamplerSettings
from vertrefine.train.export import load_checkpoint_model
from vertrefine.train.objectives import LangevinConfig, reverse_step_langevin
from vertrefine.train.patch_cache import PatchCache, split_indices
from vertrefine.train.validation import validation_masks


def dice(probability: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    pred = probability > 0.5
    inter = (pred & masks).flatten(1).sum(1).double()
    return (2 * inter / (pred.flatten(1).sum(1) + masks.flatten(1).sum(1)).double()).numpy()


def reverse_chain(model, schedule, z0, t_refine, noise_scale, langevin, generator):
    a_s = torch.as_tensor(schedule.a_s, dtype=torch.float32)
    sigmas = torch.as_tensor(schedule.sigmas, dtype=torch.float32)
    a_cum = float(schedule.a_s_cum[t_refine])
    s_cum = float(schedule.sigmas_cum[t_refine])
    z = a_cum * z0 + noise_scale * s_cum * torch.randn(z0.shape, generator=generator)
    for t in range(t_refine - 1, -1, -1):
        tt = torch.full((z.shape[0],), t, dtype=torch.long)
        # As the paper's code: only the forward noise is scaled; the reverse step keeps sigma_{t+1}.
        y = reverse_step_langevin(model.energy, z, tt, sigmas[t + 1], langevin, generator)
        z = y / a_s[t + 1]
    return z


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--patches", type=int, default=60)
    parser.add_argument("--t-refine", type=int, default=6)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, schedule, meta = load_checkpoint_model(args.run_dir)
    checkpoint_config = torch.load(meta["checkpoint"], map_location="cpu", weights_only=True)["config"]
    cache = PatchCache.open(checkpoint_config["cache_dir"])
    _, val = split_indices(cache, checkpoint_config["val_fraction"], checkpoint_config["seed"])
    val = val[: args.patches]
    masks = validation_masks(cache, val)
    variant = torch.from_numpy(np.stack([cache.degraded_lowres(i, 0) for i in val]).astype(np.float32))[:, None]
    started = time.perf_counter()
    rows = {}
    with torch.no_grad():
        input_up = F.interpolate(variant, scale_factor=2, mode="trilinear", align_corners=False)
        rows["thick-slice input"] = dice(input_up, masks)
        mu, _ = model.encoder.forward_lowres(variant)
        rows["VAE (decode the mean)"] = dice(model.decoder(mu), masks)
        for init in ("previous", "noise"):
            for noise_scale in (1.0, 0.1):
                langevin = LangevinConfig(SamplerSettings(langevin_steps=args.steps, init=init))
                generator = torch.Generator().manual_seed(args.seed)
                z = reverse_chain(model, schedule, mu, args.t_refine, noise_scale, langevin, generator)
                rows[f"LSD-EBM start={init} q-noise={noise_scale}"] = dice(model.decoder(z), masks)
    print(f"{len(val)} validation patches, t_refine {args.t_refine}, {args.steps} Langevin steps per reverse step")
    print(f"{'method':44s} {'mean DSC':>9s} {'std':>7s}")
    for name, values in rows.items():
        print(f"{name:44s} {values.mean():9.4f} {values.std():7.4f}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
