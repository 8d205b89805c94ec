"""Training objectives: VAE (ELBO), LEBM (Pang et al. 2020) and LSD-EBM (the paper's Algorithm 1).

Every objective maps a batch of 64^3 soft occupancies to one scalar loss to backpropagate and a dict of
floats to log. The parameter groups never mix: the ELBO reaches only the encoder and decoder, the energy
terms only the energy (latents are detached before they meet it). All randomness comes from the
``torch.Generator`` passed in, so a run is reproducible and resumable.

Choices (measured or argued in docs/TRAINING.md):
- The encoder's regulariser is the KL to N(0, I), as in the VAE. Algorithm 1's update of the encoder by the
  entropy term alone has no bound on the posterior variance; the KL keeps z_0 on the unit scale that the
  diffusion (z_T ~ N(0, I)) assumes, and the energy then learns the structure of the latent distribution.
- Reverse-step Langevin uses the energy's explicit gradient (the one exported to ONNX), starts at
  z_{t+1} (the paper's equations; ``init="noise"`` reproduces its code) and returns z~_t / a_s[t+1].
- Positives are z~_t = a_s[t+1] z_t, the variable the conditional EBM of Eq. 2 models; the energy loss is
  weighted by sigma_1 / sigma_{t+1} as in the paper's code, plus a small L2 on the energies for stability.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..sampler import SamplerSettings
from ..schedule import DiffusionSchedule
from .models import EnergyMLP, VertebraModel


@dataclass(frozen=True)
class LangevinConfig:
    """Training's Langevin dynamics: the reverse diffusion step's chain, with the very settings refine's
    sampler runs (:class:`vertrefine.sampler.SamplerSettings`: ``langevin_steps``, ``step_size``,
    ``noise_scale``, ``init``; the LEBM's prior chain uses them too), and the LEBM's posterior chain."""

    chain: SamplerSettings = field(default_factory=SamplerSettings)
    posterior_steps: int = 5
    """LEBM only: posterior Langevin steps through the decoder (each costs a decoder pass)."""
    posterior_step_size: float = 1e-4

    def as_dict(self) -> dict:
        return asdict(self)


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row values [B] shaped to broadcast over latents ``like`` [B, *Z] (flat or spatial)."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def _randn(shape: torch.Size | tuple[int, ...], like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def reverse_step_langevin(
    energy: EnergyMLP,
    z_next: torch.Tensor,
    t: torch.Tensor,
    sigma: torch.Tensor,
    langevin: LangevinConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Sample z~_t from p(z~_t | z_{t+1}) ∝ exp(-E(z~_t, t) - ||z_{t+1} - z~_t||^2 / (2 sigma^2)) (Eqs. 2-4).

    ``sigma`` is sigma_{t+1} per row, shaped to broadcast over ``z_next`` [B, *Z]. Returns z~_t (divide by
    a_s[t+1] for z_t), detached.
    """
    with torch.no_grad():
        chain = langevin.chain
        y = z_next.clone() if chain.init == "previous" else _randn(z_next.shape, z_next, generator)
        noise_std = math.sqrt(chain.step_size) * chain.noise_scale
        for _ in range(chain.langevin_steps):
            _, grad_energy = energy.energy_and_grad(y, t)
            grad = grad_energy + (y - z_next) / sigma**2
            y = y - 0.5 * chain.step_size * grad + noise_std * _randn(y.shape, y, generator)
    return y


def decoder_input(x: torch.Tensor, dropout: float, generator: torch.Generator) -> torch.Tensor:
    """What a conditioned decoder sees of the inputs ``x`` [B, 1, p, p, p]: each row emptied with probability
    ``dropout`` (so the latent alone must hold its shape), else ``x`` itself."""
    if dropout <= 0:
        return x
    keep = torch.rand(x.shape[0], generator=generator, device=x.device) >= dropout
    return x * _rows(keep.to(x.dtype), x)


def _elbo_terms(
    model: VertebraModel,
    x: torch.Tensor,
    target: torch.Tensor,
    generator: torch.Generator,
    input_dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z0 sample, mu, reconstruction BCE per voxel, KL per voxel), both terms averaged over the batch.

    A conditioned decoder (:class:`vertrefine.train.models.ConditionedDecoder`) also gets the input ``x``
    (:func:`decoder_input`: rows emptied with probability ``input_dropout``)."""
    mu, logvar = model.encoder.forward_lowres(x)
    z0 = mu + torch.exp(0.5 * logvar) * _randn(mu.shape, mu, generator)
    if model.config.conditioned:
        logits = model.decoder.logits_lowres(z0, decoder_input(x, input_dropout, generator))
    else:
        logits = model.decoder.logits_lowres(z0)
    recon = F.binary_cross_entropy_with_logits(logits, target)
    voxels = target[0].numel()
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1).mean() / voxels
    return z0, mu, recon, kl


class Objective:
    """Base: the VAE's ELBO (per-voxel binary cross-entropy + KL to N(0, I) per voxel)."""

    def __init__(
        self,
        model: VertebraModel,
        schedule: DiffusionSchedule,
        langevin: LangevinConfig,
        *,
        kl_weight: float = 1.0,
        energy_l2: float = 1e-3,
        input_dropout: float = 0.0,
    ) -> None:
        self.model = model
        self.schedule = schedule
        self.langevin = langevin
        self.kl_weight = kl_weight
        self.energy_l2 = energy_l2
        self.input_dropout = input_dropout

    def __call__(
        self, x: torch.Tensor, target: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        _, _, recon, kl = _elbo_terms(self.model, x, target, generator, self.input_dropout)
        loss = recon + self.kl_weight * kl
        return loss, {"loss": loss.item(), "recon": recon.item(), "kl": kl.item()}

    def _energy_loss(self, e_pos: torch.Tensor, e_neg: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        contrast = (weight * (e_pos - e_neg)).mean()
        return contrast + self.energy_l2 * (e_pos.pow(2) + e_neg.pow(2)).mean()


class LsdEbmObjective(Objective):
    """Algorithm 1: ELBO for encoder/decoder; conditional-EBM contrast on a random pair (z_t, z_{t+1}).

    With ``energy_on_clean`` (default), the diffusion pairs start from the latent of the clean target
    rather than of the training input, which is a thick-slice copy when denoising training is on: the
    prior then learns the distribution of CT-quality shapes only, which is what refine pulls towards.
    """

    def __init__(self, *args, energy_on_clean: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.energy_on_clean = energy_on_clean
        s = self.schedule
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        self._a_s, self._sigmas = as_tensor(s.a_s), as_tensor(s.sigmas)
        self._a_s_cum, self._sigmas_cum = as_tensor(s.a_s_cum), as_tensor(s.sigmas_cum)

    def __call__(
        self, x: torch.Tensor, target: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        z0, _, recon, kl = _elbo_terms(self.model, x, target, generator, self.input_dropout)
        elbo_loss = recon + self.kl_weight * kl

        if self.energy_on_clean and x is not target and not torch.equal(x, target):
            with torch.no_grad():
                mu_clean, logvar_clean = self.model.encoder.forward_lowres(target)
                z0 = mu_clean + torch.exp(0.5 * logvar_clean) * _randn(mu_clean.shape, mu_clean, generator)
        z0 = z0.detach()
        device, batch = z0.device, z0.shape[0]
        a_s, sigmas = self._a_s.to(device), self._sigmas.to(device)
        t = torch.randint(0, self.schedule.timesteps, (batch,), generator=generator, device=device)
        noise_scale = self.schedule.noise_scale
        a_cum, sigma_cum = _rows(self._a_s_cum.to(device)[t], z0), _rows(self._sigmas_cum.to(device)[t], z0)
        z_t = a_cum * z0 + noise_scale * sigma_cum * _randn(z0.shape, z0, generator)
        a_next, sigma_next = _rows(a_s[t + 1], z0), _rows(sigmas[t + 1], z0)
        z_next = a_next * z_t + noise_scale * sigma_next * _randn(z0.shape, z0, generator)

        energy = self.model.energy
        positive = a_next * z_t
        # The reverse step keeps sigma_{t+1} whatever the forward noise scale, as the paper's code does.
        negative = reverse_step_langevin(energy, z_next, t, sigma_next, self.langevin, generator)
        e_pos, e_neg = energy(positive, t), energy(negative, t)
        weight = sigmas[1] / sigmas[t + 1]
        energy_loss = self._energy_loss(e_pos, e_neg, weight)
        loss = elbo_loss + energy_loss
        return loss, {
            "loss": loss.item(),
            "recon": recon.item(),
            "kl": kl.item(),
            "energy_pos": e_pos.mean().item(),
            "energy_neg": e_neg.mean().item(),
        }


class LebmObjective(Objective):
    """Pang et al.'s latent EBM prior p(z) ∝ exp(-E(z)) N(z; 0, I), learned by posterior/prior Langevin.

    The encoder is an amortised start for the posterior chains (trained by the ELBO); the decoder also learns
    from the posterior samples, and the energy from posterior (positive) against prior (negative) samples.
    """

    def _prior_langevin(self, shape: torch.Size, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        energy, cfg = self.model.energy, self.langevin.chain
        t = torch.zeros(shape[0], dtype=torch.long, device=like.device)
        with torch.no_grad():
            z = _randn(shape, like, generator)
            noise_std = math.sqrt(cfg.step_size) * cfg.noise_scale
            for _ in range(cfg.langevin_steps):
                _, grad = energy.energy_and_grad(z, t)
                z = z - 0.5 * cfg.step_size * (grad + z) + noise_std * _randn(z.shape, z, generator)
        return z

    def _posterior_langevin(self, z: torch.Tensor, target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Langevin on U(z) = -log p(x|z) + E(z) + ||z||^2 / 2 per row, through the decoder (autograd)."""
        energy, decoder, cfg = self.model.energy, self.model.decoder, self.langevin
        t = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
        step = cfg.posterior_step_size
        for _ in range(cfg.posterior_steps):
            z = z.detach().requires_grad_(True)
            nll = F.binary_cross_entropy_with_logits(decoder.logits_lowres(z), target, reduction="sum")
            potential = nll + (energy(z, t) + 0.5 * z.pow(2).flatten(1).sum(1)).sum()
            (grad,) = torch.autograd.grad(potential, z)
            z = z - 0.5 * step * grad + math.sqrt(step) * cfg.chain.noise_scale * _randn(z.shape, z, generator)
        return z.detach()

    def __call__(
        self, x: torch.Tensor, target: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        z0, mu, recon, kl = _elbo_terms(self.model, x, target, generator)
        positive = self._posterior_langevin(mu.detach(), target, generator)
        recon_post = F.binary_cross_entropy_with_logits(self.model.decoder.logits_lowres(positive), target)
        negative = self._prior_langevin(positive.shape, positive, generator)
        t = torch.zeros(positive.shape[0], dtype=torch.long, device=positive.device)
        e_pos, e_neg = self.model.energy(positive, t), self.model.energy(negative, t)
        energy_loss = self._energy_loss(e_pos, e_neg, torch.ones_like(e_pos))
        loss = recon + self.kl_weight * kl + recon_post + energy_loss
        return loss, {
            "loss": loss.item(),
            "recon": recon.item(),
            "kl": kl.item(),
            "recon_posterior": recon_post.item(),
            "energy_pos": e_pos.mean().item(),
            "energy_neg": e_neg.mean().item(),
        }


def make_objective(
    model: VertebraModel,
    schedule: DiffusionSchedule,
    langevin: LangevinConfig,
    *,
    kl_weight: float = 1.0,
    energy_l2: float = 1e-3,
    energy_on_clean: bool = True,
    input_dropout: float = 0.0,
) -> Objective:
    """The objective of ``model.config.kind`` (``energy_on_clean``: see :class:`LsdEbmObjective`;
    ``input_dropout``: a conditioned decoder's, :func:`decoder_input`)."""
    common = dict(kl_weight=kl_weight, energy_l2=energy_l2, input_dropout=input_dropout)
    if model.config.kind == "lsd-ebm":
        return LsdEbmObjective(model, schedule, langevin, energy_on_clean=energy_on_clean, **common)
    cls = {"vae": Objective, "lebm": LebmObjective}[model.config.kind]
    return cls(model, schedule, langevin, **common)
