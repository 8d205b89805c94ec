"""The latent diffusion schedule of LSD-EBM (numpy), shared by training and sampling.

As the paper's code builds it (after Gao et al.'s diffusion recovery likelihood): ``betas`` = linspace(
beta_start, beta_end, 1000) with a final 1.0 appended; the ``T`` diffusion steps are an index subsequence
of those 1000; ``a_s[t]`` is the product of sqrt(1 - beta) over the betas that step ``t`` spans, and

    q(z_{t+1} | z_t) = N(a_s[t+1] z_t, sigmas[t+1]^2 I),    sigmas = sqrt(1 - a_s^2)
    q(z_t | z_0)     = N(a_s_cum[t] z_0, sigmas_cum[t]^2 I)

Index ``t`` runs over 0..T: entry 0 is the first small step (z_0 -> the first noised latent is never
used on its own); training pairs are (z_t, z_{t+1}) for t in 0..T-1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class DiffusionSchedule:
    """Noise schedule over T diffusion steps; arrays have T + 1 entries (t = 0..T)."""

    timesteps: int = 20
    beta_start: float = 1e-4
    beta_end: float = 1e-2
    base_steps: int = 1000
    noise_scale: float = 1.0
    """Multiplies the noise of q; the equations say 1, the paper's code uses 0.1 (docs/TRAINING.md)."""

    def __post_init__(self) -> None:
        if self.timesteps < 2 or self.timesteps > self.base_steps // 2:
            raise ValueError(f"timesteps must be in 2..{self.base_steps // 2}, got {self.timesteps}")

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @property
    def indices(self) -> np.ndarray:
        """Positions in the 1000-step beta sequence where each of the T + 1 steps ends."""
        stride = self.base_steps // ((self.timesteps - 1) * 2)
        return np.concatenate([np.arange(self.timesteps) * stride, [self.base_steps - 1]]).astype(np.int64)

    @property
    def a_s(self) -> np.ndarray:
        """Per-step signal scale a_s[t] = prod sqrt(1 - beta) over step t's span."""
        betas = np.append(np.linspace(self.beta_start, self.beta_end, self.base_steps, dtype=np.float64), 1.0)
        sqrt_alphas = np.sqrt(1.0 - betas)
        idx = self.indices
        spans = [sqrt_alphas[: idx[0] + 1]] + [sqrt_alphas[idx[i - 1] + 1 : idx[i] + 1] for i in range(1, len(idx))]
        return np.array([np.prod(span) for span in spans])

    @property
    def sigmas(self) -> np.ndarray:
        """Per-step noise std sigma[t] = sqrt(1 - a_s[t]^2)."""
        return np.sqrt(1.0 - self.a_s**2)

    @property
    def a_s_cum(self) -> np.ndarray:
        return np.cumprod(self.a_s)

    @property
    def sigmas_cum(self) -> np.ndarray:
        return np.sqrt(1.0 - self.a_s_cum**2)

    def q_sample(self, z0: np.ndarray, t: np.ndarray | int, rng: np.random.Generator) -> np.ndarray:
        """Draw z_t ~ q(z_t | z_0) for a batch ``z0`` [B, *Z]; ``t`` is an int or one int per row."""
        t = np.broadcast_to(np.asarray(t, dtype=np.int64), (z0.shape[0],))
        rows = (-1,) + (1,) * (z0.ndim - 1)
        noise = rng.standard_normal(z0.shape).astype(z0.dtype)
        scale = (self.noise_scale * self.sigmas_cum[t]).reshape(rows).astype(z0.dtype)
        return self.a_s_cum[t].reshape(rows).astype(z0.dtype) * z0 + scale * noise
