"""The LSD-EBM latent sampler in numpy: forward diffusion and the conditional Langevin reverse chain.

It knows nothing of ONNX: it takes ``energy_and_grad(z, t) -> (E [B], dE/dz [B, *Z])`` for a batch of latents
(``*Z``: a vector [L] or a spatial grid [C, g, g, g]), so it is tested with analytic energies and driven in
production by an ONNX Runtime session. All rows of a batch (every vertebra of a case, or of several cases)
share one energy call per Langevin step.

Data consistency (optional): a ``guide(z, weight) -> z`` callable (:class:`vertrefine.guidance.DataConsistency`
in production) is applied after each of the last ``guidance_steps`` reverse steps with weight ``guidance``,
so the chain follows what the thick-slice input shows while the prior fills in what it cannot.

Reverse step (the paper's Eqs. 2-4, as the training objective samples it): given z_{t+1}, Langevin on
U(y) = E(y, t) + ||z_{t+1} - y||^2 / (2 sigma_{t+1}^2) draws y ~ p(z~_t | z_{t+1}), and z_t = y / a_s[t+1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np

from .schedule import DiffusionSchedule

EnergyAndGrad = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""(z [B, *Z] float32, t [B] int64) -> (energy [B], dE/dz [B, *Z])."""
Guide = Callable[[np.ndarray, float], np.ndarray]
"""(z [B, *Z], weight) -> z after one data-consistency step."""


@dataclass(frozen=True)
class SamplerSettings:
    """How far to diffuse and how to run the reverse chain (bundle manifests hold the defaults)."""

    t_refine: int = 6
    langevin_steps: int = 60
    step_size: float = 0.01
    noise_scale: float = 0.01
    """Multiplies the Langevin noise sqrt(step_size); 1 is exact Langevin, the paper's code uses 0.01."""
    init: str = "previous"
    """'previous': start each chain at z_{t+1} (the equations); 'noise': at fresh N(0, I) (the paper's code)."""
    diffusion_noise_scale: float = 1.0
    """Multiplies the noise of the forward diffusion to t_refine (must match training)."""
    guidance: float = 0.0
    """Weight gamma of the data-consistency step after each guided reverse step (0 = none; --guidance)."""
    guidance_steps: int = 1000
    """How many of the last reverse steps are guided (all by default)."""

    @classmethod
    def from_manifest(cls, defaults: dict, **overrides: float | int | str | None) -> SamplerSettings:
        """Settings from a bundle's ``sampler_defaults``, with the non-None ``overrides`` on top."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in defaults.items() if k in names}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def __post_init__(self) -> None:
        if self.init not in ("previous", "noise"):
            raise ValueError(f"init must be 'previous' or 'noise', got {self.init!r}")
        if self.t_refine < 0 or self.langevin_steps < 0 or not self.step_size > 0:
            raise ValueError("t_refine and langevin_steps must be >= 0 and step_size > 0")
        if not 0.0 <= self.guidance <= 1.0 or self.guidance_steps < 0:
            raise ValueError("guidance must be in [0, 1] and guidance_steps >= 0")


def diffuse(z0: np.ndarray, t: int, schedule: DiffusionSchedule, rng: np.random.Generator, noise_scale: float = 1.0):
    """z_t ~ q(z_t | z_0) for every row of ``z0`` [B, *Z] (float32)."""
    noise = rng.standard_normal(z0.shape).astype(np.float32)
    return (schedule.a_s_cum[t] * z0 + noise_scale * schedule.sigmas_cum[t] * noise).astype(np.float32)


def reverse_step(
    energy_and_grad: EnergyAndGrad,
    z_next: np.ndarray,
    t: int,
    schedule: DiffusionSchedule,
    settings: SamplerSettings,
    rng: np.random.Generator,
) -> np.ndarray:
    """z_t from z_{t+1} [B, *Z]: Langevin on E(y, t) + ||z_{t+1} - y||^2 / (2 sigma_{t+1}^2), then / a_s[t+1]."""
    sigma2 = float(schedule.sigmas[t + 1]) ** 2
    steps = np.full(z_next.shape[0], t, dtype=np.int64)
    y = z_next.copy() if settings.init == "previous" else rng.standard_normal(z_next.shape).astype(np.float32)
    half_step = np.float32(0.5 * settings.step_size)
    noise_std = np.float32(np.sqrt(settings.step_size) * settings.noise_scale)
    for _ in range(settings.langevin_steps):
        _, grad = energy_and_grad(y, steps)
        y = y - half_step * (grad + (y - z_next) / np.float32(sigma2))
        y += noise_std * rng.standard_normal(y.shape).astype(np.float32)
    return (y / np.float32(schedule.a_s[t + 1])).astype(np.float32)


def refine_latents(
    energy_and_grad: EnergyAndGrad,
    z0: np.ndarray,
    schedule: DiffusionSchedule,
    settings: SamplerSettings,
    rng: np.random.Generator,
    guide: Guide | None = None,
) -> np.ndarray:
    """Algorithm 2: diffuse z0 [B, *Z] to t_refine, then the reverse chain t_refine - 1 .. 0.

    With ``guide`` and ``settings.guidance > 0``, ``z = guide(z, settings.guidance)`` follows each reverse
    step t < ``settings.guidance_steps``.
    """
    if settings.t_refine > schedule.timesteps:
        raise ValueError(f"t_refine {settings.t_refine} exceeds the schedule's {schedule.timesteps} steps")
    z = diffuse(np.asarray(z0, dtype=np.float32), settings.t_refine, schedule, rng, settings.diffusion_noise_scale)
    for t in range(settings.t_refine - 1, -1, -1):
        z = reverse_step(energy_and_grad, z, t, schedule, settings, rng)
        if guide is not None and settings.guidance > 0 and t < settings.guidance_steps:
            z = guide(z, settings.guidance).astype(np.float32)
    return z
