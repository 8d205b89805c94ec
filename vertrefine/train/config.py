"""Training configuration: one JSON-serialisable dataclass, the presets, and the CLI merge rule.

``TrainConfig.from_options(preset, **explicit)`` is what the CLI calls: it starts from ``PRESETS[preset]``
and applies the options the user gave explicitly (``None`` means "not given"). With ``resume=True`` the
saved ``RUN_DIR/config.json`` is the base instead, and only :data:`RESUME_OVERRIDABLE` options may change.

Torch is not imported here, so the CLI can build and validate a config before paying for torch's import.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..conventions import DEVICES, MODEL_KINDS
from ..errors import InputError
from ..sampler import SamplerSettings
from ..schedule import DiffusionSchedule

T_REFINE = 6
"""Default refinement depth t_refine written into the bundle (the paper: 6 of T = 20)."""
GUIDANCE = 0.5
"""Default data-consistency weight written into the bundle (`vertrefine export --guidance` sets another)."""
CHAIN_OPTIONS = {
    "langevin_steps": "langevin_steps",
    "langevin_step_size": "step_size",
    "langevin_noise_scale": "noise_scale",
    "langevin_init": "init",
}
"""Training's options for its Langevin chain (``train --langevin-steps``; presets; run folders' config.json
before the chain was one field) -> the :class:`vertrefine.sampler.SamplerSettings` field each sets."""
DEFAULT_CHAIN = SamplerSettings(t_refine=T_REFINE, langevin_steps=20, guidance=GUIDANCE)
TINY_SYNTH_SEED = 500_000
"""First synthetic spine seed of ``--preset tiny`` (disjoint from the seeds tests and benchmarks use)."""

RESUME_OVERRIDABLE = frozenset(
    {"epochs", "device", "num_workers", "checkpoint_every", "command", "export", "data_dir", "cache_dir"}
)
"""Options that may differ on ``--resume``; everything else comes from the run's saved config. (Moved data
or cache folders may be given anew; a cache whose contents changed is reported by the loop.)"""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved as ``RUN_DIR/config.json`` and in every checkpoint."""

    out: str
    """The run folder: config.json, log.csv, checkpoints/, bundle/ (and data/, cache/ by default)."""
    data_dir: str | None = None
    """CT segmentations (NIfTI / DICOM SEG / a VerSe BIDS tree); several folders are joined with
    ``os.pathsep``. None: use the built ``cache_dir`` as it is, or with preset 'tiny' and no cache_dir,
    make synthetic spines in RUN_DIR/data."""
    data_repeat: tuple[int, ...] = ()
    """Copies per epoch of each data folder's patches (one per folder; () = 1 each), e.g. to weigh a few
    real CT vertebrae against many phantoms. Each copy gets its own augmentation."""
    drop_cut: bool = True
    """Leave out vertebrae within 2 mm of the edge of a scan with several vertebrae (often cut by the field of
    view). Off (``--keep-cut``) for data whose files were cropped tightly around whole vertebrae."""
    val_groups: tuple[str, ...] = ()
    """Validation individuals (split groups or case names); () = a ``val_fraction`` of the groups by hash."""
    cache_dir: str | None = None
    """Patch cache folder; None = RUN_DIR/cache. Point several runs at one cache to build it once."""
    model: str = "lsd-ebm"
    preset: str = "default"
    epochs: int = 200
    batch_size: int = 8
    """Per process: under torchrun the global batch is batch_size x world size."""
    lr: float = 3e-4
    """Adam learning rate of the encoder and decoder. The papers used 2e-5 (:data:`PAPER_LR`); measured on
    this CPU it learns too slowly (docs/TRAINING.md), so the default is 3e-4."""
    energy_lr: float = 1e-4
    """Adam learning rate of the energy MLP (unused by the VAE)."""
    latent: int = 8
    """Latent channels (spatial latent) or latent size (flat latent, ``latent_grid`` 0)."""
    latent_grid: int = 16
    """Side of the spatial latent grid (16: 8 mm cells in a 128 mm patch); 0 = a flat latent vector."""
    res_blocks: int = 2
    energy_widths: tuple[int, ...] = (16, 32, 32)
    timesteps: int = 20
    """Diffusion steps T (CLI --steps)."""
    diffusion_noise_scale: float = 1.0
    """Multiplies the noise of q(z_t | z_0); 1 = the equations, 0.1 = the paper's code (the schedule's
    ``noise_scale``, :meth:`schedule`)."""
    chain: SamplerSettings = DEFAULT_CHAIN
    """The reverse chain: training draws the energy's negative samples with its Langevin fields
    (``langevin_steps``, ``step_size``, ``noise_scale``, ``init``; set by :data:`CHAIN_OPTIONS`), and the
    exported bundle's sampler defaults are this chain (t_refine at most T - 1, every reverse step guided)."""
    posterior_steps: int = 5
    """LEBM: posterior Langevin steps through the decoder."""
    posterior_step_size: float = 1e-4
    kl_weight: float = 1.0
    """Weight of the KL term of the ELBO (1 = the ELBO; lower keeps more detail in the latent)."""
    init_from: str | None = None
    """A checkpoint (or run folder) whose model weights start this run (same model configuration); the
    optimizer, epochs and data order start afresh. For fine-tuning, e.g. with another --kl-weight."""
    conditioned: bool = False
    """The decoder also sees the input patch (spatial latent; :class:`vertrefine.train.models.ConditionedDecoder`):
    it keeps what a thick-slice input shows and the latent adds what it hides (issue 19)."""
    decoder_input_dropout: float = 0.0
    """Conditioned decoder: probability that a training item's decoder sees an empty input, so that the
    latent alone must carry the shape (and the prior on it matters)."""
    energy_on_clean: bool = True
    """LSD-EBM: the energy learns the latents of clean targets, not of (possibly thick-slice) inputs."""
    encoder_widths: tuple[int, ...] = (16, 32)
    decoder_widths: tuple[int, ...] = (32, 16)
    energy_hidden: int = 1000
    """Flat latent only: hidden units of the energy MLP."""
    device: str = "auto"
    seed: int = 0
    val_fraction: float = 0.1
    checkpoint_every: int = 10
    num_workers: int = 0
    degraded_variants: int = 0
    """Degraded (thick-slice-like) copies per patch stored in the cache; 0 = clean training only."""
    clean_variants: int = 0
    """How many of the degraded variants are clean thick slices (partial volume only, no other error)."""
    variant_errors: str = "degrade"
    """The other variants' errors: 'degrade' (the thick-slice simulator's) or 'families' (a random draw of the
    training corruption families, :mod:`vertrefine.corruptions`; the held-out families are never drawn)."""
    degraded_prob: float = 0.0
    """Probability that a training item's input is one of its degraded variants (target stays clean)."""
    synth_cases: int = 3
    """Synthetic spines made when ``data_dir`` is None (preset 'tiny' only)."""
    export: bool = True
    """Export the ONNX bundle into RUN_DIR/bundle at the end (``vertrefine export`` can do it later)."""
    resume: bool = False
    command: str | None = None
    """The exact command line, recorded in the bundle's training recipe."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_widths", tuple(int(w) for w in self.encoder_widths))
        object.__setattr__(self, "decoder_widths", tuple(int(w) for w in self.decoder_widths))
        object.__setattr__(self, "energy_widths", tuple(int(w) for w in self.energy_widths))
        object.__setattr__(self, "data_repeat", tuple(int(r) for r in self.data_repeat))
        object.__setattr__(self, "val_groups", tuple(str(g) for g in self.val_groups))
        problems = []
        if self.model not in MODEL_KINDS:
            problems.append(f"model must be one of {', '.join(MODEL_KINDS)} (got {self.model!r})")
        if self.preset not in PRESET_NAMES:
            problems.append(f"preset must be one of {', '.join(PRESET_NAMES)} (got {self.preset!r})")
        if self.device not in DEVICES:
            problems.append(f"device must be one of {', '.join(DEVICES)} (got {self.device!r})")
        if not isinstance(self.chain, SamplerSettings):
            problems.append(f"chain must be sampler settings (got {type(self.chain).__name__})")
        for name in ("epochs", "batch_size", "latent", "energy_hidden", "checkpoint_every", "synth_cases"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        for name in ("posterior_steps", "num_workers", "degraded_variants", "seed"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative (got {getattr(self, name)})")
        if not self.kl_weight >= 0:
            problems.append(f"kl_weight must not be negative (got {self.kl_weight})")
        for name in ("lr", "energy_lr", "posterior_step_size"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be positive (got {getattr(self, name)})")
        if not 2 <= self.timesteps <= 500:
            problems.append(f"timesteps (--steps) must be in 2..500 (got {self.timesteps})")
        elif self.model == "lsd-ebm" and isinstance(self.chain, SamplerSettings):
            from ..bundle import derived_ranges  # refine's chain runs with this step size: it must be stable

            most = derived_ranges(self.schedule())["step_size"][1]
            if self.chain.step_size > most:
                problems.append(
                    f"langevin_step_size {self.chain.step_size:g} is over {most:g}, where the Langevin chain of "
                    f"the first of {self.timesteps} diffusion steps stays stable (2 sigma_1^2): use fewer --steps"
                )
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"val_fraction must be between 0 and 1 (got {self.val_fraction})")
        if not 0.0 <= self.decoder_input_dropout < 1.0:
            problems.append(f"decoder_input_dropout must be in [0, 1) (got {self.decoder_input_dropout})")
        if self.conditioned and (not self.latent_grid or self.model == "lebm"):
            problems.append("--conditioned needs a spatial latent (--latent-grid > 0) and --model vae or lsd-ebm")
        if not 0.0 <= self.degraded_prob <= 1.0:
            problems.append(f"degraded_prob must be in [0, 1] (got {self.degraded_prob})")
        if self.variant_errors not in ("degrade", "families"):
            problems.append(f"variant_errors must be degrade or families (got {self.variant_errors!r})")
        if not 0 <= self.clean_variants <= self.degraded_variants:
            problems.append("clean_variants must be from 0 to degraded_variants")
        if self.degraded_prob > 0 and self.degraded_variants == 0:
            problems.append("degraded_prob > 0 needs degraded_variants >= 1")
        if self.data_repeat and (len(self.data_repeat) != len(self.data_paths) or min(self.data_repeat) < 1):
            problems.append(f"data_repeat needs one count >= 1 per data folder (got {list(self.data_repeat)})")
        if self.latent_grid < 0 or self.res_blocks < 0:
            problems.append("latent_grid and res_blocks must not be negative")
        if self.data_dir is None and self.preset != "tiny" and self.cache_dir is None:
            problems.append("--data is required (or a built --cache; only --preset tiny makes its own data)")
        if problems:
            raise InputError(None, "invalid training options: " + "; ".join(problems))

    # ---- paths ---------------------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else self.run_dir / "cache"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir) if self.data_dir else self.run_dir / "data"

    @property
    def data_paths(self) -> list[Path]:
        """The data folders (``data_dir`` split at ``os.pathsep``), or [RUN_DIR/data]."""
        if not self.data_dir:
            return [self.run_dir / "data"]
        return [Path(p) for p in self.data_dir.split(os.pathsep) if p]

    # ---- (de)serialisation ---------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        data = asdict(self)
        for name in ("encoder_widths", "decoder_widths", "energy_widths", "data_repeat", "val_groups"):
            data[name] = list(getattr(self, name))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The config saved by :meth:`as_dict` (also the flat ``langevin_*`` keys of earlier run folders)."""
        data = _with_chain(dict(data), DEFAULT_CHAIN)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(None, f"unknown training options: {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            return cls.from_json(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(path, f"cannot read the training config ({exc})", "check the run folder") from None

    def schedule(self) -> DiffusionSchedule:
        """The run's latent diffusion schedule (``timesteps``, ``diffusion_noise_scale``)."""
        return DiffusionSchedule(timesteps=self.timesteps, noise_scale=self.diffusion_noise_scale)

    def sampler_defaults(self) -> SamplerSettings:
        """The sampler settings the exported bundle gives refine: :attr:`chain` with t_refine below the
        schedule's last step (almost pure noise) and no more guided steps than reverse steps."""
        t_refine = min(self.chain.t_refine, self.timesteps - 1)
        return replace(self.chain, t_refine=t_refine, guidance_steps=min(self.chain.guidance_steps, t_refine))

    def model_config_dict(self) -> dict[str, Any]:
        """The keyword arguments of :class:`vertrefine.train.models.ModelConfig` for this run."""
        return {
            "kind": self.model,
            "latent": self.latent,
            "encoder_widths": self.encoder_widths,
            "decoder_widths": self.decoder_widths,
            "energy_hidden": self.energy_hidden,
            "timesteps": self.timesteps,
            "latent_grid": self.latent_grid,
            "res_blocks": self.res_blocks,
            "energy_widths": self.energy_widths,
            "conditioned": self.conditioned,
        }

    # ---- the CLI's merge rule ------------------------------------------------------------------------

    @classmethod
    def from_options(
        cls, preset: str | None = None, *, out: str | Path, resume: bool = False, **options: Any
    ) -> TrainConfig:
        """Preset values, then the explicitly given ``options`` (``None`` = not given) on top.

        With ``resume``, the base is ``out/config.json`` of the interrupted run; options outside
        :data:`RESUME_OVERRIDABLE` that differ from the saved value are refused (they would change the run).
        """
        if isinstance(options.get("data_dir"), (list, tuple)):
            options["data_dir"] = os.pathsep.join(str(p) for p in options["data_dir"]) or None
        given = {
            k: (str(v) if k in ("data_dir", "cache_dir", "init_from") and v is not None else v)
            for k, v in options.items()
        }
        given = {k: v for k, v in given.items() if v is not None}
        known = {f.name for f in fields(cls)} | set(CHAIN_OPTIONS)
        unknown = sorted(set(given) - known)
        if unknown:
            raise InputError(None, f"unknown training options: {', '.join(unknown)}")
        if resume:
            saved_path = Path(out) / "config.json"
            if not saved_path.is_file():
                raise InputError(
                    out, "no config.json to resume from", "train without --resume first, or check the --out folder"
                )
            saved = cls.load(saved_path)
            if preset is not None and preset != saved.preset:
                given["preset"] = preset
            changed = sorted(
                k
                for k, v in given.items()
                if k not in RESUME_OVERRIDABLE and _normalise(v) != _normalise(_saved_value(saved, k))
            )
            if changed:
                raise InputError(
                    out,
                    f"--resume cannot change {', '.join(changed)} of the saved run",
                    f"only {', '.join(sorted(RESUME_OVERRIDABLE - {'command'}))} may change; or start a new --out",
                )
            return replace(
                saved, out=str(out), resume=True, **{k: v for k, v in given.items() if k in RESUME_OVERRIDABLE}
            )
        name = preset or "default"
        if name not in PRESETS:
            raise InputError(None, f"unknown preset {name!r}", f"use one of {', '.join(PRESET_NAMES)}")
        base = dict(PRESETS[name])
        per_model = base.pop("per_model", {})
        base.update(per_model.get(given.get("model", base.get("model", cls.model)), {}))
        values = _with_chain(base, DEFAULT_CHAIN, given)
        return cls(**{**values, "out": str(out), "preset": name, "resume": False})


def _saved_value(saved: TrainConfig, option: str) -> Any:
    """The value of training option ``option`` (a field, or one of :data:`CHAIN_OPTIONS`) in ``saved``."""
    if option in CHAIN_OPTIONS:
        return getattr(saved.chain, CHAIN_OPTIONS[option])
    return getattr(saved, option)


def _with_chain(values: dict[str, Any], default: SamplerSettings, more: dict[str, Any] | None = None) -> dict[str, Any]:
    """``values`` updated by ``more`` with its chain options (:data:`CHAIN_OPTIONS`, a ``chain`` dict of
    config.json) folded into one ``chain`` :class:`SamplerSettings` (``default`` where none is given).

    Raises InputError (one line) for chain settings SamplerSettings refuses."""
    merged = {**values, **(more or {})}
    chain = merged.get("chain", default)
    flat = {CHAIN_OPTIONS[k]: merged.pop(k) for k in list(merged) if k in CHAIN_OPTIONS}
    try:
        chain = SamplerSettings(**chain) if isinstance(chain, dict) else chain
        merged["chain"] = replace(chain, **flat) if flat else chain
    except (TypeError, ValueError) as exc:
        raise InputError(None, f"invalid training options: Langevin chain: {exc}") from None
    return merged


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


PAPER_LR = {"vae": 2e-5, "lebm": 1e-4, "lsd-ebm": 2e-5}
"""The papers' learning rates (LSD-EBM paper: 2e-5; Pang et al.'s LEBM: 1e-4), for ``--lr`` to reproduce them.

Measured with the full-size VAE on 45 synthetic training patches (batch 8, 6 steps per epoch), validation
BCE after 10 epochs: 0.520 at 2e-5, 0.387 at 1e-4, 0.227 at 3e-4, 0.079 at 1e-3; after 30 epochs 3e-4 and
1e-3 both reach validation Dice 0.76-0.77 (BCE 0.072 / 0.038). The default is 3e-4, the more conservative of
the two for long runs without a learning-rate schedule (neither was run beyond 30 epochs here)."""

PRESETS: dict[str, dict[str, Any]] = {
    # A smoke test of the whole pipeline: 3 synthetic spines (15 patches: 10 train, 5 validation), a narrow
    # model, few Langevin steps and a high learning rate. Measured end to end on 2 idle CPU cores: vae 26 s,
    # lsd-ebm 27 s, lebm 43 s; validation Dice rises from 0 to 0.5-0.65 (one held-out spine).
    "tiny": {
        "synth_cases": 3,
        "epochs": 30,
        "batch_size": 2,
        "lr": 3e-3,
        "energy_lr": 1e-3,
        "latent": 2,
        "latent_grid": 16,
        "res_blocks": 1,
        "encoder_widths": (8, 16),
        "decoder_widths": (16, 8),
        "energy_widths": (8, 8, 8),
        "langevin_steps": 20,
        "posterior_steps": 3,
        "val_fraction": 0.3,
        "checkpoint_every": 10,
        # Measured: at energy_lr 1e-3 the LEBM's positive energies run away from the prior samples'
        # (mean gap ~400 after 30 epochs); at 1e-4 the gap stays ~4.
        "per_model": {"lebm": {"energy_lr": 1e-4}},
    },
    # The shipped model: a spatial latent (8 channels on a 16^3 grid of 8 mm cells), the energy CNN, lr 3e-4.
    "default": {},
    # The paper's form: a flat latent of 100 through one linear layer, the energy MLP with 1000 hidden units,
    # 60 Langevin steps per reverse step (the earlier shipped model; it cannot hold a real vertebra).
    "paper": {
        "latent": 100,
        "latent_grid": 0,
        "encoder_widths": (16, 32, 64, 128),
        "decoder_widths": (128, 64, 32, 16),
        "langevin_steps": 60,
    },
}
PRESET_NAMES = tuple(PRESETS)

__all__ = ["CHAIN_OPTIONS", "PAPER_LR", "MODEL_KINDS", "PRESETS", "PRESET_NAMES", "RESUME_OVERRIDABLE", "TrainConfig"]
