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

Divergence: each Langevin step multiplies y's distance from the mode of the tether term by about
1 - step_size / (2 sigma_{t+1}^2), so a step size above 4 sigma_{t+1}^2 makes the chain grow geometrically
(the shipped schedule: sigma_1^2 = 0.0061, so step sizes from about 0.025 up diverge in the last reverse step).
A chain whose latent becomes non-finite or leaves the prior's region (:data:`LATENT_RMS_LIMIT`) is stopped
and its row returned as NaN (:func:`diverged`); refine keeps the input for that vertebra.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np

from .conventions import is_whole_number
from .schedule import DiffusionSchedule

EnergyAndGrad = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""(z [B, *Z] float32, t [B] int64) -> (energy [B], dE/dz [B, *Z])."""
Guide = Callable[[np.ndarray, float], np.ndarray]
"""(z [B, *Z], weight) -> z after one data-consistency step."""

LATENT_RMS_LIMIT = 4.0
"""A chain whose latent's root mean square exceeds this many times max(1, its starting latent's RMS) has left
the region the decoder was trained on: the latent prior is N(0, I) (RMS 1). Measured with the shipped bundle
on examples/verse010_sag5mm.nii.gz: encoder means have RMS 0.2 and a healthy chain ends near 0.45 (any step
size up to 0.03, 100 Langevin steps, guidance 1); step sizes 0.04 / 0.05 / 0.1 end at RMS 4.8 / 90 / 6e5
and t_refine 20 (the schedule's last step is almost pure noise) at 12, all of which decode to shapes the
plausibility checks reject."""


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
    guidance: float = field(default=0.0, metadata={"manifest": "optional"})
    """Weight gamma of the data-consistency step after each guided reverse step (0 = none; --guidance)."""
    guidance_steps: int = field(default=1000, metadata={"manifest": "optional"})
    """How many of the last reverse steps are guided (all by default)."""

    # The forward diffusion's noise scale is the schedule's (DiffusionSchedule.noise_scale): it is fixed by
    # training, so it is no sampler setting. Earlier manifests repeat it in ``sampler_defaults`` as
    # ``diffusion_noise_scale``; :meth:`from_manifest` ignores that key (export always wrote the schedule's).

    @classmethod
    def manifest_keys(cls) -> tuple[str, ...]:
        """The fields a bundle manifest's ``sampler_defaults`` must hold (guidance may be left out: none)."""
        return tuple(f.name for f in fields(cls) if f.metadata.get("manifest") != "optional")

    @classmethod
    def from_manifest(cls, defaults: dict, **overrides: float | int | str | None) -> SamplerSettings:
        """Settings from a bundle's ``sampler_defaults``, with the non-None ``overrides`` on top (other keys of
        ``defaults``, such as the LEBM's posterior settings and the threshold, are not sampler settings)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in defaults.items() if k in names}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def __post_init__(self) -> None:
        if self.init not in ("previous", "noise"):
            raise ValueError(f"init must be 'previous' or 'noise', got {self.init!r}")
        for name in ("t_refine", "langevin_steps", "guidance_steps"):
            value = getattr(self, name)
            if not is_whole_number(value):
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        if not self.step_size > 0:
            raise ValueError(f"step_size must be > 0, got {self.step_size!r}")
        if not 0.0 <= self.guidance <= 1.0:
            raise ValueError(f"guidance must be in [0, 1], got {self.guidance!r}")


def diverged(z: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """bool [B]: the rows of ``z`` [B, *Z] whose chain diverged: a non-finite value, or an RMS over
    :data:`LATENT_RMS_LIMIT` times max(1, the RMS of the row of ``start`` [B, *Z], the chain's first latent)."""
    mean_square = _mean_square(z)
    limit = np.full(len(z), LATENT_RMS_LIMIT**2)
    if start is not None:
        limit *= np.maximum(1.0, _mean_square(start))
    return ~(mean_square <= limit)  # NaN compares False: diverged


def _mean_square(z: np.ndarray) -> np.ndarray:
    """float64 [B]: the mean square of each row of ``z`` (inf where it overflows, NaN where non-finite)."""
    flat = np.ascontiguousarray(z).reshape(len(z), -1)
    if flat.shape[1] == 0:
        return np.zeros(len(z))
    with np.errstate(over="ignore", invalid="ignore"):
        return np.einsum("ij,ij->i", flat, flat, dtype=np.float64) / flat.shape[1]


def _stop_diverged(z: np.ndarray, start: np.ndarray) -> np.ndarray:
    """``z`` with its diverged rows (:func:`diverged`) set to NaN, which later steps keep (NaN stays NaN)."""
    gone = diverged(z, start)
    if gone.any():
        z = z.copy()
        z[gone] = np.nan
    return z


def diffuse(z0: np.ndarray, t: int, schedule: DiffusionSchedule, rng: np.random.Generator) -> np.ndarray:
    """z_t ~ q(z_t | z_0) = N(a_s_cum[t] z_0, (noise_scale sigmas_cum[t])^2 I) for every row of ``z0`` [B, *Z]
    (float32; ``noise_scale`` is the schedule's, as in training)."""
    noise = rng.standard_normal(z0.shape).astype(np.float32)
    return (schedule.a_s_cum[t] * z0 + schedule.noise_scale * schedule.sigmas_cum[t] * noise).astype(np.float32)


def reverse_step(
    energy_and_grad: EnergyAndGrad,
    z_next: np.ndarray,
    t: int,
    schedule: DiffusionSchedule,
    settings: SamplerSettings,
    rng: np.random.Generator,
) -> np.ndarray:
    """z_t from z_{t+1} [B, *Z]: Langevin on E(y, t) + ||z_{t+1} - y||^2 / (2 sigma_{t+1}^2), then / a_s[t+1].

    A row that overflows on the way (a diverging chain) becomes inf or NaN without numpy warnings; the
    caller tells it by :func:`diverged`.
    """
    sigma2 = float(schedule.sigmas[t + 1]) ** 2
    steps = np.full(z_next.shape[0], t, dtype=np.int64)
    y = z_next.copy() if settings.init == "previous" else rng.standard_normal(z_next.shape).astype(np.float32)
    half_step = np.float32(0.5 * settings.step_size)
    noise_std = np.float32(np.sqrt(settings.step_size) * settings.noise_scale)
    with np.errstate(over="ignore", invalid="ignore"):
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
    step t < ``settings.guidance_steps``. Rows whose chain diverged (:func:`diverged`, checked after every
    reverse and guidance step) are returned as NaN; the other rows are unaffected (rows never mix).
    """
    if settings.t_refine > schedule.timesteps:
        raise ValueError(f"t_refine {settings.t_refine} exceeds the schedule's {schedule.timesteps} steps")
    z0 = np.asarray(z0, dtype=np.float32)
    z = diffuse(z0, settings.t_refine, schedule, rng)
    for t in range(settings.t_refine - 1, -1, -1):
        z = _stop_diverged(reverse_step(energy_and_grad, z, t, schedule, settings, rng), z0)
        if guide is not None and settings.guidance > 0 and t < settings.guidance_steps:
            z = _stop_diverged(guide(z, settings.guidance).astype(np.float32), z0)
    return _stop_diverged(z, z0)
