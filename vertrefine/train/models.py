"""The networks: encoder q(z0|x), decoder p(x|z0) and the energy E(z, t) with its exact gradient.

Encoder and decoder work on a 2 mm (64^3) view of the 128^3 1 mm patch: the encoder average-pools the
patch by 2 first, and the decoder predicts 64^3 logits that are trilinearly upsampled to 128^3. Measured on
phantom patches, a 2 mm soft occupancy upsampled this way reproduces the 1 mm mask with DSC 0.986, while the
convolutions cost 8 times less than at 1 mm (see docs/TRAINING.md). Training feeds the pooled 64^3 view
directly (``Encoder.forward_lowres`` / ``Decoder.logits_lowres``); the exported models take and give 128^3.

The energy is an MLP on [z, one-hot(t)] (the paper's: latent 100, 1000 hidden units, GELU). ONNX cannot
export autograd, so ``EnergyMLP.energy_and_grad`` writes dE/dz as the MLP's explicit backward pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

MODEL_KINDS = ("vae", "lebm", "lsd-ebm")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a vertrefine model; stored in checkpoints and bundle manifests."""

    kind: str = "lsd-ebm"
    latent: int = 100
    patch: int = 128
    downsample: int = 2
    encoder_widths: tuple[int, ...] = (16, 32, 64, 128)
    decoder_widths: tuple[int, ...] = (128, 64, 32, 16)
    energy_hidden: int = 1000
    timesteps: int = 20
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        object.__setattr__(self, "encoder_widths", tuple(self.encoder_widths))
        object.__setattr__(self, "decoder_widths", tuple(self.decoder_widths))
        if self.lowres % 2 ** len(self.encoder_widths) or self.lowres % 2 ** len(self.decoder_widths):
            raise ValueError("patch / downsample must be divisible by 2 ** (number of stages)")

    @property
    def lowres(self) -> int:
        """Side of the internal grid (64 for 128^3 patches downsampled by 2)."""
        return self.patch // self.downsample

    @property
    def has_energy(self) -> bool:
        return self.kind != "vae"

    @property
    def energy_timesteps(self) -> int:
        """Number of time embeddings: T for LSD-EBM, 1 for the LEBM's unconditional prior."""
        return self.timesteps if self.kind == "lsd-ebm" else 1

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return cls(**data)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, max(1, channels // 4)), channels)


def _stage(cin: int, cout: int, *, up: bool) -> nn.Sequential:
    """One resolution stage: a stride-2 (transposed) convolution, then a 3^3 convolution."""
    resample = nn.ConvTranspose3d(cin, cout, 4, 2, 1) if up else nn.Conv3d(cin, cout, 4, 2, 1)
    return nn.Sequential(resample, _norm(cout), nn.GELU(), nn.Conv3d(cout, cout, 3, 1, 1), _norm(cout), nn.GELU())


class Encoder(nn.Module):
    """x [B, 1, P, P, P] in {0, 1} -> (mu [B, L], logvar [B, L])."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        stages, channels = [], 1
        for width in config.encoder_widths:
            stages.append(_stage(channels, width, up=False))
            channels = width
        self.features = nn.Sequential(*stages)
        side = config.lowres // 2 ** len(config.encoder_widths)
        self.head = nn.Linear(channels * side**3, 2 * config.latent)

    def forward_lowres(self, x_low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the pooled view [B, 1, P/d, P/d, P/d] (soft occupancy in [0, 1])."""
        mu, logvar = self.head(self.features(x_low).flatten(1)).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 6.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_lowres(F.avg_pool3d(x, self.config.downsample))


class Decoder(nn.Module):
    """z [B, L] -> probability [B, 1, P, P, P]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.decoder_widths
        self.side = config.lowres // 2 ** len(widths)
        self.fc = nn.Linear(config.latent, widths[0] * self.side**3)
        stages = [_stage(a, b, up=True) for a, b in zip(widths[:-1], widths[1:], strict=False)]
        self.features = nn.Sequential(*stages)
        self.out = nn.ConvTranspose3d(widths[-1], 1, 4, 2, 1)

    def logits_lowres(self, z: torch.Tensor) -> torch.Tensor:
        """Logits on the internal grid [B, 1, P/d, P/d, P/d]."""
        h = F.gelu(self.fc(z)).view(-1, self.config.decoder_widths[0], self.side, self.side, self.side)
        return self.out(self.features(h))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Logits upsampled (trilinear) to the patch grid [B, 1, P, P, P]."""
        return F.interpolate(
            self.logits_lowres(z), scale_factor=self.config.downsample, mode="trilinear", align_corners=False
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(z))


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_derivative(a: torch.Tensor) -> torch.Tensor:
    """d/da of the exact (erf) GELU: Phi(a) + a * phi(a)."""
    return 0.5 * (1.0 + torch.erf(a * _SQRT_HALF)) + a * _INV_SQRT_2PI * torch.exp(-0.5 * a * a)


class EnergyMLP(nn.Module):
    """E(z, t) = w3 . gelu(W2 gelu(W1 z + b1 + e_t) + b2) + b3, one scalar per row.

    ``e_t`` is a learned embedding per diffusion step (the same as W1 acting on one-hot(t)); the LEBM's
    unconditional prior has a single step and always gets t = 0.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.energy_hidden
        self.inp = nn.Linear(config.latent, hidden)
        self.time = nn.Embedding(config.energy_timesteps, hidden)
        self.inner = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.time.weight)

    def _pre(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a1 = self.inp(z) + self.time(t)
        a2 = self.inner(F.gelu(a1))
        return a1, a2

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _, a2 = self._pre(z, t)
        return self.out(F.gelu(a2)).squeeze(1)

    def energy_and_grad(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Energy [B] and its exact gradient dE/dz [B, L], as plain forward operations (exportable)."""
        a1, a2 = self._pre(z, t)
        energy = self.out(F.gelu(a2)).squeeze(1)
        d_a2 = self.out.weight * gelu_derivative(a2)  # [B, H]: w3 broadcast over rows
        d_a1 = (d_a2 @ self.inner.weight) * gelu_derivative(a1)
        return energy, d_a1 @ self.inp.weight


class VertebraModel(nn.Module):
    """Encoder, decoder and (for LEBM and LSD-EBM) the energy of one model kind."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.energy = EnergyMLP(config) if config.has_energy else None

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"autoencoder": list(self.encoder.parameters()) + list(self.decoder.parameters())}
        if self.energy is not None:
            groups["energy"] = list(self.energy.parameters())
        return groups


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_flops(config: ModelConfig) -> dict[str, int]:
    """Multiply-accumulate counts x 2 (FLOPs) of one patch through encoder and decoder, by layer shapes."""
    flops = {"encoder": 0, "decoder": 0}
    side, channels = config.lowres, 1
    for width in config.encoder_widths:
        side //= 2
        flops["encoder"] += 2 * side**3 * width * channels * 4**3  # stride-2 conv, kernel 4
        flops["encoder"] += 2 * side**3 * width * width * 3**3
        channels = width
    flops["encoder"] += 2 * channels * side**3 * 2 * config.latent
    widths = config.decoder_widths
    side = config.lowres // 2 ** len(widths)
    flops["decoder"] += 2 * config.latent * widths[0] * side**3
    for a, b in zip(widths[:-1], widths[1:], strict=False):
        side *= 2
        flops["decoder"] += 2 * side**3 * b * a * 2**3  # transposed kernel 4 stride 2: 8 taps per output
        flops["decoder"] += 2 * side**3 * b * b * 3**3
    side *= 2
    flops["decoder"] += 2 * side**3 * 1 * widths[-1] * 2**3
    return flops
