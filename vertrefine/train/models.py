"""The networks: encoder q(z0|x), decoder p(x|z0) and the energy E(z, t) with its exact gradient.

Encoder and decoder work on a 2 mm (64^3) view of the 128^3 1 mm patch: the encoder average-pools the
patch by 2 first, and the decoder predicts 64^3 logits that are trilinearly upsampled to 128^3. Measured on
phantom patches, a 2 mm soft occupancy upsampled this way reproduces the 1 mm mask with DSC 0.986, while the
convolutions cost 8 times less than at 1 mm (see docs/TRAINING.md). Training feeds the pooled 64^3 view
directly (``Encoder.forward_lowres`` / ``Decoder.logits_lowres``); the exported models take and give 128^3.

Two latent forms (``ModelConfig.latent_grid``):

- flat (``latent_grid = 0``): z is a vector [L] (the paper's: L = 100) reached through one linear layer, and
  the energy is an MLP on [z, one-hot(t)] (1000 hidden units, GELU). Measured on real CT vertebrae this form
  cannot hold a real shape (encode-decode DSC 0.45-0.75, docs/TRAINING.md).
- spatial (``latent_grid = g > 0``): z is a grid [C, g, g, g] of latent cells (C = ``latent`` channels; for
  128^3 patches and g = 16 each cell covers 8 mm), made and read by convolutions only, so local detail
  survives. The energy is a small 3D CNN on z (:class:`EnergyCNN`) with a per-step embedding added to its
  first and last layers, ending in a linear read-out to one scalar.

Input-conditioned decoder (``ModelConfig.conditioned``, issue 19: a decoder that sees only z cannot reproduce a
clean thick-slice input): the decoder also takes the input patch x (the thick-slice input on the 1 mm
working grid, what the encoder sees). A small convolutional branch reads x at 64^3, 32^3 and 16^3 and its
features join the decoder's path at each resolution (a U-Net whose skips come from the input, so the decoder
is one self-contained graph). Its head gives two maps on the internal grid, a *trust* a = softplus(.) >= 0
and a *bias* b, and the logit is

    logit = b + a * (2 x - 1)

with x the input's 2 mm occupancy (its 2x2x2 block mean): trained on the internal grid, and at 1 mm (the
exported decoder) with a, b and x trilinearly upsampled. x is soft at a boundary, so b moves the boundary
continuously (by about b / a voxels' worth of occupancy). Where the model trusts the input (a large, b near
0) the result is the input as the 2 mm occupancy upsampled holds it (0.98 DSC of a real vertebra's 1 mm
mask); elsewhere b (the model's own shape, from z and the input's features) decides. (Tried first: a binary
1 mm x at inference. The logit then jumps by 2a across the input's boundary, b never exceeded a after two
epochs, and every result was the input itself.)

ONNX cannot export autograd, so both energies write dE/dz as their explicit backward pass
(``energy_and_grad``): transposed GEMMs for the MLP, transposed convolutions for the CNN; both are tested
against autograd.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..conventions import MODEL_KINDS


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
    latent_grid: int = 0
    """0: a flat latent vector [latent]. g > 0: a spatial latent [latent, g, g, g] (latent = channels)."""
    res_blocks: int = 1
    """Spatial latent: residual blocks at the latent grid in the encoder and in the decoder."""
    energy_widths: tuple[int, ...] = (16, 32, 32)
    """Spatial latent: channels of the energy CNN's convolutions (the first keeps the grid, the others halve it)."""
    conditioned: bool = False
    """Spatial latent only: the decoder also takes the input patch (:class:`ConditionedDecoder`)."""
    input_widths: tuple[int, ...] = (8, 16, 32)
    """Conditioned decoder: channels of its input branch at the internal grid and each halving down to the
    latent grid (one more than ``decoder_widths``)."""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        object.__setattr__(self, "encoder_widths", tuple(self.encoder_widths))
        object.__setattr__(self, "decoder_widths", tuple(self.decoder_widths))
        object.__setattr__(self, "energy_widths", tuple(self.energy_widths))
        object.__setattr__(self, "input_widths", tuple(self.input_widths))
        if self.conditioned and (not self.latent_grid or self.kind == "lebm"):
            raise ValueError("a conditioned decoder needs a spatial latent (latent_grid > 0) and a vae or lsd-ebm")
        if self.conditioned and len(self.input_widths) != len(self.decoder_widths) + 1:
            raise ValueError("a conditioned decoder needs one input width more than decoder widths")
        if self.latent_grid:
            stages = self.lowres // self.latent_grid
            if self.lowres % self.latent_grid or stages & (stages - 1) or stages < 2:
                raise ValueError(f"latent_grid must be {self.lowres} / 2^k with k >= 1, got {self.latent_grid}")
            k = stages.bit_length() - 1
            if len(self.encoder_widths) != k or len(self.decoder_widths) != k:
                raise ValueError(f"a {self.latent_grid}^3 latent grid needs {k} encoder and decoder widths")
            if self.latent_grid % 2 ** (len(self.energy_widths) - 1) or not self.energy_widths:
                raise ValueError("the latent grid must be divisible by 2 ** (number of energy widths - 1)")
        elif self.lowres % 2 ** len(self.encoder_widths) or self.lowres % 2 ** len(self.decoder_widths):
            raise ValueError("patch / downsample must be divisible by 2 ** (number of stages)")

    @property
    def lowres(self) -> int:
        """Side of the internal grid (64 for 128^3 patches downsampled by 2)."""
        return self.patch // self.downsample

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent: (L,) flat, or (C, g, g, g) spatial."""
        if self.latent_grid:
            return (self.latent, self.latent_grid, self.latent_grid, self.latent_grid)
        return (self.latent,)

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


def make_encoder(config: ModelConfig) -> nn.Module:
    return SpatialEncoder(config) if config.latent_grid else Encoder(config)


def make_decoder(config: ModelConfig) -> nn.Module:
    if config.conditioned:
        return ConditionedDecoder(config)
    return SpatialDecoder(config) if config.latent_grid else Decoder(config)


def make_energy(config: ModelConfig) -> nn.Module:
    return EnergyCNN(config) if config.latent_grid else EnergyMLP(config)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, max(1, channels // 4)), channels)


def _stage(cin: int, cout: int, *, up: bool) -> nn.Sequential:
    """One resolution stage: a stride-2 (transposed) convolution, then a 3^3 convolution."""
    resample = nn.ConvTranspose3d(cin, cout, 4, 2, 1) if up else nn.Conv3d(cin, cout, 4, 2, 1)
    return nn.Sequential(resample, _norm(cout), nn.GELU(), nn.Conv3d(cout, cout, 3, 1, 1), _norm(cout), nn.GELU())


def _down_stages(config: ModelConfig) -> tuple[list[nn.Module], int]:
    """The encoder's stride-2 stages (``encoder_widths``) from one input channel, and the last width."""
    stages, channels = [], 1
    for width in config.encoder_widths:
        stages.append(_stage(channels, width, up=False))
        channels = width
    return stages, channels


class _Encoding(nn.Module):
    """What both encoders share: 128^3 input pooled to the internal grid; log-variance clamped."""

    config: ModelConfig

    def forward_lowres(self, x_low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the pooled view [B, 1, P/d, P/d, P/d] (soft occupancy in [0, 1])."""
        mu, logvar = self.moments(x_low).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 6.0)

    def moments(self, x_low: torch.Tensor) -> torch.Tensor:
        """[mu, logvar] stacked along dimension 1."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_lowres(F.avg_pool3d(x, self.config.downsample))


class _Decoding(nn.Module):
    """What both decoders share: logits on the internal grid, upsampled trilinearly, sigmoid."""

    config: ModelConfig

    def logits_lowres(self, z: torch.Tensor) -> torch.Tensor:
        """Logits on the internal grid [B, 1, P/d, P/d, P/d]."""
        raise NotImplementedError

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Logits upsampled (trilinear) to the patch grid [B, 1, P, P, P]."""
        return F.interpolate(
            self.logits_lowres(z), scale_factor=self.config.downsample, mode="trilinear", align_corners=False
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(z))


class Encoder(_Encoding):
    """x [B, 1, P, P, P] in {0, 1} -> (mu [B, L], logvar [B, L])."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        stages, channels = _down_stages(config)
        self.features = nn.Sequential(*stages)
        side = config.lowres // 2 ** len(config.encoder_widths)
        self.head = nn.Linear(channels * side**3, 2 * config.latent)

    def moments(self, x_low: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_low).flatten(1))


class Decoder(_Decoding):
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
        h = F.gelu(self.fc(z)).view(-1, self.config.decoder_widths[0], self.side, self.side, self.side)
        return self.out(self.features(h))


class _ResBlock(nn.Module):
    """x + conv(gelu(norm(conv(gelu(norm(x)))))) at constant width and grid."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(channels), nn.GELU(), nn.Conv3d(channels, channels, 3, 1, 1),
            _norm(channels), nn.GELU(), nn.Conv3d(channels, channels, 3, 1, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SpatialEncoder(_Encoding):
    """x [B, 1, P, P, P] in {0, 1} -> (mu, logvar), each [B, C, g, g, g] (fully convolutional)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        stages, channels = _down_stages(config)
        stages += [_ResBlock(channels) for _ in range(config.res_blocks)]
        self.features = nn.Sequential(*stages)
        self.head = nn.Sequential(_norm(channels), nn.GELU(), nn.Conv3d(channels, 2 * config.latent, 1))

    def moments(self, x_low: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_low))


class SpatialDecoder(_Decoding):
    """z [B, C, g, g, g] -> probability [B, 1, P, P, P] (fully convolutional)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.decoder_widths
        layers: list[nn.Module] = [nn.Conv3d(config.latent, widths[0], 3, 1, 1)]
        layers += [_ResBlock(widths[0]) for _ in range(config.res_blocks)]
        layers += [_norm(widths[0]), nn.GELU()]
        for a, b in zip(widths[:-1], widths[1:], strict=False):
            layers.append(_stage(a, b, up=True))
        self.features = nn.Sequential(*layers)
        self.out = nn.ConvTranspose3d(widths[-1], 1, 4, 2, 1)

    def logits_lowres(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(z))


INITIAL_TRUST = 2.0
"""The conditioned decoder's trust a before training (its bias b starts at 0): the input itself, at logit +-2."""


class ConditionedDecoder(nn.Module):
    """(z [B, C, g, g, g], x [B, 1, P, P, P]) -> probability [B, 1, P, P, P]: the decoder that also sees the input.

    ``logit = b + a (2 x - 1)`` with the trust ``a = softplus(.)`` and the bias ``b`` from the decoder's
    head (see the module docstring); on the internal grid in training (:meth:`logits_lowres` with the pooled
    input), at the patch grid with a and b upsampled trilinearly and the 1 mm input in :meth:`forward`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        widths, inputs = config.decoder_widths, config.input_widths
        self.input_stem = nn.Sequential(nn.Conv3d(1, inputs[0], 3, 1, 1), _norm(inputs[0]), nn.GELU())
        self.input_down = nn.ModuleList(
            nn.Sequential(nn.Conv3d(a, b, 3, 2, 1), _norm(b), nn.GELU()) for a, b in zip(inputs[:-1], inputs[1:])
        )
        self.latent_in = nn.Conv3d(config.latent + inputs[-1], widths[0], 3, 1, 1)
        self.blocks = nn.Sequential(*[_ResBlock(widths[0]) for _ in range(config.res_blocks)], _norm(widths[0]), nn.GELU())
        # up to the internal grid: each stage a transposed convolution, then the input's features of that grid
        # joined by a 3^3 convolution (1^3 on the internal grid itself, where a 3^3 one would cost 5 G FLOPs)
        ups, fuses = [], []
        chain = [*widths, inputs[0]]
        for n in range(len(widths)):
            cin, cout = chain[n], chain[n + 1]
            ups.append(nn.ConvTranspose3d(cin, cout, 4, 2, 1))
            skip = inputs[len(inputs) - 2 - n]
            k = 1 if n == len(widths) - 1 else 3
            fuses.append(
                nn.Sequential(_norm(cout + skip), nn.GELU(), nn.Conv3d(cout + skip, cout, k, 1, k // 2), _norm(cout), nn.GELU())
            )
        self.ups, self.fuses = nn.ModuleList(ups), nn.ModuleList(fuses)
        self.head = nn.Conv3d(inputs[0], 2, 1)
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():  # start by trusting the input, mildly (p = 0.88 / 0.12): logit = 2 (2 x - 1)
            self.head.bias.copy_(torch.tensor([math.log(math.expm1(INITIAL_TRUST)), 0.0]))

    def trust_and_bias(self, z: torch.Tensor, x_low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a [B, 1, p, p, p] >= 0, b [B, 1, p, p, p]) on the internal grid (p = P / downsample)."""
        features = [self.input_stem(x_low)]
        for down in self.input_down:
            features.append(down(features[-1]))
        h = self.blocks(self.latent_in(torch.cat([z, features[-1]], dim=1)))
        for n, (up, fuse) in enumerate(zip(self.ups, self.fuses, strict=True)):
            h = fuse(torch.cat([up(h), features[len(features) - 2 - n]], dim=1))
        head = self.head(h)
        return F.softplus(head[:, :1]), head[:, 1:]

    def logits_lowres(self, z: torch.Tensor, x_low: torch.Tensor) -> torch.Tensor:
        """Logits on the internal grid [B, 1, p, p, p] from the pooled input ``x_low`` (soft occupancy)."""
        a, b = self.trust_and_bias(z, x_low)
        return b + a * (2.0 * x_low - 1.0)

    def logits(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits on the patch grid [B, 1, P, P, P] from the 1 mm input ``x`` (:meth:`logits_from_lowres` of its
        block mean, the internal grid's view of it)."""
        return self.logits_from_lowres(z, F.avg_pool3d(x, self.config.downsample))

    def logits_from_lowres(self, z: torch.Tensor, x_low: torch.Tensor) -> torch.Tensor:
        """Logits on the patch grid [B, 1, P, P, P]: ``b + a (2 s - 1)`` with a, b and the input's occupancy s all
        trilinearly upsampled from the internal grid (``x_low`` [B, 1, p, p, p], the input's block mean)."""
        a, b = self.trust_and_bias(z, x_low)
        up = lambda m: F.interpolate(m, scale_factor=self.config.downsample, mode="trilinear", align_corners=False)  # noqa: E731
        return up(b) + up(a) * (2.0 * up(x_low) - 1.0)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(z, x))


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


class EnergyCNN(nn.Module):
    """E(z, t) for a spatial latent z [B, C, g, g, g]: a 3D CNN with GELU, one scalar per row.

    a_1 = conv_1(z) + e_1(t)  (3^3, stride 1), a_k = conv_k(gelu(a_{k-1})) (3^3, stride 2) for k >= 2, with
    e_n(t) added to the last layer too; E = <w, gelu(a_n)> + b. No normalisation layer, so that the
    backward pass is a chain of transposed convolutions (:meth:`energy_and_grad`), exported to ONNX.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        widths = config.energy_widths
        convs, channels = [], config.latent
        for n, width in enumerate(widths):
            convs.append(nn.Conv3d(channels, width, 3, 1 if n == 0 else 2, 1))
            channels = width
        self.convs = nn.ModuleList(convs)
        side = config.latent_grid // 2 ** (len(widths) - 1)
        self.time_first = nn.Embedding(config.energy_timesteps, widths[0])
        self.time_last = nn.Embedding(config.energy_timesteps, widths[-1])
        self.out = nn.Linear(widths[-1] * side**3, 1)
        nn.init.zeros_(self.time_first.weight)
        nn.init.zeros_(self.time_last.weight)

    def _pre(self, z: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        """Pre-activations a_1 .. a_n."""
        pre, h = [], z
        last = len(self.convs) - 1
        for n, conv in enumerate(self.convs):
            a = conv(h)
            if n == 0:
                a = a + self.time_first(t)[:, :, None, None, None]
            if n == last:
                a = a + self.time_last(t)[:, :, None, None, None]
            pre.append(a)
            h = F.gelu(a)
        return pre

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a_last = self._pre(z, t)[-1]
        return self.out(F.gelu(a_last).flatten(1)).squeeze(1)

    def energy_and_grad(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Energy [B] and its exact gradient dE/dz [B, C, g, g, g], as plain forward operations (exportable)."""
        pre = self._pre(z, t)
        energy = self.out(F.gelu(pre[-1]).flatten(1)).squeeze(1)
        grad_h = self.out.weight.reshape(1, *pre[-1].shape[1:])  # dE/d gelu(a_n), the same for every row
        for n in range(len(self.convs) - 1, -1, -1):
            grad_a = grad_h * gelu_derivative(pre[n])
            conv = self.convs[n]
            stride = conv.stride[0]
            grad_h = F.conv_transpose3d(grad_a, conv.weight, stride=stride, padding=1, output_padding=stride - 1)
        return energy, grad_h


class VertebraModel(nn.Module):
    """Encoder, decoder and (for LEBM and LSD-EBM) the energy of one model kind."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = make_encoder(config)
        self.decoder = make_decoder(config)
        self.energy = make_energy(config) if config.has_energy else None

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"autoencoder": list(self.encoder.parameters()) + list(self.decoder.parameters())}
        if self.energy is not None:
            groups["energy"] = list(self.energy.parameters())
        return groups


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_flops(config: ModelConfig) -> dict[str, int]:
    """FLOPs (2 x multiply-accumulates) of one patch through the encoder and the decoder.

    Counted from the layer shapes of one forward pass on the internal grid (convolutions, transposed
    convolutions and linear layers; normalisation and activations are left out).
    """
    model = VertebraModel(replace(config, kind="vae"))
    x_low = torch.zeros(1, 1, *(config.lowres,) * 3)
    counts = {"encoder": 0, "decoder": 0}
    current = ["encoder"]

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            counts[current[0]] += 2 * module.in_features * module.out_features
        elif isinstance(module, nn.Conv3d):
            taps = module.in_channels // module.groups * math.prod(module.kernel_size)
            counts[current[0]] += 2 * output[0].numel() * taps
        elif isinstance(module, nn.ConvTranspose3d):
            taps = module.in_channels * math.prod(module.kernel_size)
            counts[current[0]] += 2 * inputs[0][0].numel() * taps // module.in_channels * module.out_channels

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv3d, nn.ConvTranspose3d))
    ]
    try:
        with torch.no_grad():
            mu, _ = model.encoder.forward_lowres(x_low)
            current[0] = "decoder"
            model.decoder.logits_lowres(mu, x_low) if config.conditioned else model.decoder.logits_lowres(mu)
    finally:
        for handle in handles:
            handle.remove()
    return counts
