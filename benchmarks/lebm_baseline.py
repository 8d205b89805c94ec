"""The LEBM baseline of the benchmarks: Pang et al.'s latent EBM prior on the shipped autoencoder.

vertrefine ships no LEBM (refine cannot run it: its posterior Langevin needs the decoder's gradient), so the
quality benchmark trains one here. The shipped VAE and LSD-EBM bundles share one encoder and decoder; the
LEBM gets the same pair, frozen, and only its prior is learned. The three rows of the benchmark then differ
in the prior alone: N(0, I) (VAE, decode the mean), an unconditional EBM (LEBM) and the diffusion EBM
(LSD-EBM).

Training (prior only, on latents): positives are z ~ q(z | x) of the clean training patches (the amortised
posterior of the frozen encoder); negatives are prior Langevin chains from N(0, I) on
E(z) + ||z||^2 / 2 with Pang et al.'s settings (60 steps of step size s = 0.4, i.e. z <- z - s^2/2 grad +
s noise); loss E(pos) - E(neg) + 1e-3 (E(pos)^2 + E(neg)^2), Adam.

Refinement (the paper's LEBM baseline): posterior Langevin on U(z) = BCE(decoder(z), x) + E(z) + ||z||^2 / 2
given the input patch x, from the encoder's mean, through the torch decoder (autograd), then the decoder.

    python -m benchmarks.lebm_baseline --cache /work/data/cache500 --out results/lebm_prior.pt
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vertrefine.bundle import load_bundle
from vertrefine.refine import Refiner
from vertrefine.runtime import BundleSessions
from vertrefine.train.from_bundle import model_from_bundle
from vertrefine.train.models import EnergyMLP, ModelConfig, VertebraModel
from vertrefine.train.patch_cache import PatchCache, block_mean, split_indices

PRIOR_STEPS = 60
PRIOR_STEP = 0.4
"""Pang et al.'s prior Langevin: 60 steps, z <- z - s^2/2 grad + s noise with s = 0.4."""


def clean_latents(sessions: BundleSessions, cache: PatchCache, indices: list[int]) -> np.ndarray:
    """(mu, logvar) [n, 2, L] of the cached clean 1 mm patches, from the bundle's ONNX encoder."""
    out = []
    for start in range(0, len(indices), 8):
        patches = np.stack([cache.mask(i).astype(np.float32) for i in indices[start : start + 8]])
        mu, logvar = sessions.encode(patches)
        out.append(np.stack([mu, logvar], axis=1))
    return np.concatenate(out)


def prior_langevin(energy: EnergyMLP, n: int, latent: int, generator: torch.Generator) -> torch.Tensor:
    """Samples of p(z) ∝ exp(-E(z)) N(z; 0, I) by short-run Langevin from N(0, I)."""
    t = torch.zeros(n, dtype=torch.long)
    z = torch.randn(n, latent, generator=generator)
    with torch.no_grad():
        for _ in range(PRIOR_STEPS):
            _, grad = energy.energy_and_grad(z, t)
            z = z - 0.5 * PRIOR_STEP**2 * (grad + z) + PRIOR_STEP * torch.randn(z.shape, generator=generator)
    return z


def train_prior(
    latents: np.ndarray, config: ModelConfig, updates: int, batch: int, lr: float, seed: int
) -> tuple[EnergyMLP, list[dict]]:
    """Learn the LEBM energy on clean latents (positives) against prior Langevin samples (negatives)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    energy = EnergyMLP(config)
    optimizer = torch.optim.Adam(energy.parameters(), lr=lr)
    mu, sigma = torch.from_numpy(latents[:, 0]), torch.from_numpy(np.exp(0.5 * latents[:, 1]))
    t = torch.zeros(batch, dtype=torch.long)
    log = []
    for step in range(updates):
        rows = torch.randint(0, len(mu), (batch,), generator=generator)
        positive = mu[rows] + sigma[rows] * torch.randn(batch, mu.shape[1], generator=generator)
        negative = prior_langevin(energy, batch, mu.shape[1], generator)
        e_pos, e_neg = energy(positive, t), energy(negative, t)
        loss = (e_pos - e_neg).mean() + 1e-3 * (e_pos.pow(2) + e_neg.pow(2)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == updates - 1:
            log.append({"update": step, "energy_pos": e_pos.mean().item(), "energy_neg": e_neg.mean().item()})
    return energy, log


def require_flat_latent(bundle_dir: Path) -> None:
    """The LEBM baseline's energy is Pang et al.'s MLP on a flat latent vector: a bundle with a spatial latent
    (the shipped one, [8, 16, 16, 16]) is refused with SystemExit naming what to pass instead."""
    shape = load_bundle(bundle_dir).manifest.get("latent_shape", [])
    if len(shape) != 1:
        raise SystemExit(
            f"{bundle_dir}: the LEBM baseline needs a flat-latent bundle (latent_shape [L]), this one is {shape}; "
            "use a flat-latent lsd-ebm bundle (a `vertrefine train --preset paper` run's) as the shipped one"
        )


class LebmRefiner:
    """Posterior Langevin through the frozen torch decoder, with the trained LEBM prior."""

    def __init__(self, bundle_dir: Path, prior_path: Path | None, steps: int, step_size: float) -> None:
        """``prior_path`` None: E = 0, the posterior under the VAE's N(0, I) prior (an ablation)."""
        require_flat_latent(bundle_dir)
        self.model: VertebraModel = model_from_bundle(bundle_dir)
        self.model.eval()
        self.steps, self.step_size = steps, step_size
        if prior_path is None:
            config = ModelConfig.from_dict({**load_bundle(bundle_dir).manifest["model_config"], "kind": "lebm"})
            self.energy = EnergyMLP(config)
            for parameter in self.energy.parameters():
                torch.nn.init.zeros_(parameter)
            self.record: dict = {"prior": "none: E = 0"}
            return
        state = torch.load(prior_path, map_location="cpu", weights_only=True)
        self.energy = EnergyMLP(ModelConfig.from_dict({**state["model_config"], "kind": "lebm"}))
        self.energy.load_state_dict(state["energy_state"])
        self.record = state["record"]

    def posterior(self, mu: np.ndarray, patches: np.ndarray, seed: int) -> np.ndarray:
        """z [n, L] after posterior Langevin on the input patches [n, 128, 128, 128] from the means ``mu``."""
        generator = torch.Generator().manual_seed(seed)
        target = torch.from_numpy(np.stack([block_mean(p) for p in patches]).astype(np.float32))[:, None]
        z = torch.from_numpy(np.asarray(mu, np.float32))
        t = torch.zeros(len(z), dtype=torch.long)
        for _ in range(self.steps):
            z = z.detach().requires_grad_(True)
            nll = F.binary_cross_entropy_with_logits(self.model.decoder.logits_lowres(z), target, reduction="sum")
            potential = nll + (self.energy(z, t) + 0.5 * z.pow(2).sum(1)).sum()
            (grad,) = torch.autograd.grad(potential, z)
            noise = torch.randn(z.shape, generator=generator)
            z = z - 0.5 * self.step_size * grad + math.sqrt(self.step_size) * noise
        return z.detach().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True, help="patch cache of the shipped weights' training")
    parser.add_argument("--bundle", type=Path, default=None, help="default: the shipped lsd-ebm bundle")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shipped = Refiner.from_bundle(args.bundle, device="cpu")  # default: the shipped lsd-ebm; its encoder is used
    bundle_dir = shipped.bundle.dir
    require_flat_latent(bundle_dir)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cache = PatchCache.open(args.cache)
    train, _ = split_indices(cache, 0.1, 0)
    start = time.perf_counter()
    latents = clean_latents(shipped.sessions, cache, train)
    encode_s = time.perf_counter() - start
    print(f"encoded {len(train)} clean training patches in {encode_s:.0f} s")
    config = ModelConfig.from_dict({**shipped.bundle.manifest["model_config"], "kind": "lebm"})
    start = time.perf_counter()
    energy, log = train_prior(latents, config, args.updates, args.batch, args.lr, args.seed)
    train_s = time.perf_counter() - start
    print(f"trained the prior: {args.updates} updates of batch {args.batch} in {train_s:.0f} s")
    print(json.dumps(log[-1]))
    record = {
        "bundle": str(bundle_dir),
        "cache": str(args.cache),
        "train_patches": len(train),
        "updates": args.updates,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "encode_seconds": round(encode_s, 1),
        "train_seconds": round(train_s, 1),
        "log": log,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"energy_state": energy.state_dict(), "model_config": config.as_dict(), "record": record}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
