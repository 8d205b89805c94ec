"""Export a trained model as a bundle: single-file ONNX encoder, decoder, energy and manifest.json.

Each module is exported with torch's TorchScript exporter (``dynamo=False``) by default; the manifest
records which exporter wrote each file. The dynamo exporter (``exporter="dynamo"``, or ``"auto"``: dynamo,
falling back to TorchScript with the reason in the manifest) needs the ``onnxscript`` package, which the
``train`` extra does not install: measured on the shipped LSD-EBM (torch 2.13, onnxscript 0.7.2, ONNX
Runtime 1.31, 2 CPU threads), its files are 20-25 % larger with the same parity, its export takes twice
as long, and its energy model, called 60 times per refine, runs 50 % slower (36 ms against 24 ms for 5
latents; encode 4 patches 220 / 328 ms, decode 5 latents 536 / 502 ms), so a refine is no faster.

Every file is then re-saved as one self-contained ONNX file (no external ``.data`` file) with IR version at
most 10 (ONNX Runtime 1.31 refuses 14, onnx 1.23's default), its inputs and outputs are pinned
to the bundle's names and shapes with a dynamic batch "B", ``onnx.checker`` runs on it, and ONNX Runtime
must reproduce torch on a random batch.

GroupNorm is exported as explicit ops with its means taken one axis at a time (``PreciseGroupNorm``).
ONNX Runtime's InstanceNormalization (what torch.nn.GroupNorm exports to), like a single ReduceMean over
a whole group, is less accurate in float32 than torch, and in the near-constant groups of a mostly empty
patch the normalisation amplifies that rounding: measured on ball patches, encoder outputs differed from
float64 by 1e-4 (torch: 1e-6); with per-axis means, by 7e-7.

The bundle is written into a temporary folder beside ``out_dir`` and renamed at the end, so a failed
export leaves no half bundle; manifest.json (with every file's sha256) is written last.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from torch import nn

from .. import __version__
from ..atomic import current_umask, make_folder
from ..bundle import (
    BATCH,
    FILES,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    MAX_FILE_BYTES,
    ORIENTATION,
    RANGED_OPTIONS,
    derived_ranges,
    io_spec,
    model_names,
    out_of_range,
    sha256_file,
    verify_bundle,
)
from ..conventions import MODEL_KINDS, WORKING_SPACING_MM
from ..errors import InputError, OutputError
from ..sampler import SamplerSettings
from ..schedule import DiffusionSchedule
from .models import ModelConfig, VertebraModel, conv_flops, count_parameters

Exporter = Literal["torchscript", "dynamo", "auto"]
LEBM_NOTE = (
    "an LEBM bundle is for comparisons (benchmarks/): `vertrefine refine` cannot run it (its posterior "
    "Langevin needs the decoder's gradient, which ONNX bundles do not carry); for refine, export the run's "
    "autoencoder with `vertrefine export RUN -o DIR --as vae`, or train an lsd-ebm"
)
"""What `train` and `export` say when they write an LEBM bundle."""
DERIVED_BASIS = (
    "derived from the diffusion schedule at export, not measured (vertrefine.bundle.derived_ranges); "
    "benchmarks/sampler_ranges.py measures a bundle's ranges and records them here"
)

OPSET = 18
MAX_IR_VERSION = 10
CHECKPOINT_KEYS = ("model_config", "schedule", "model_state", "sampler_defaults", "recipe", "metrics")
# Export-time guard against exporter bugs (the tests hold ONNX to 1e-4 abs / 1e-5 relative): the largest
# difference to torch, relative to max(1, max |torch output|), must stay below this.
PARITY_GUARD = 1e-3

_DTYPES = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}
_log = logging.getLogger(__name__)


class _DecoderProbability(nn.Module):
    def __init__(self, model: VertebraModel) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, z: torch.Tensor, *x: torch.Tensor) -> torch.Tensor:
        return self.decoder(z, *x)  # a conditioned decoder also takes the input patch


class _EnergyAndGrad(nn.Module):
    def __init__(self, model: VertebraModel) -> None:
        super().__init__()
        self.energy = model.energy

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.energy.energy_and_grad(z, t)


class PreciseGroupNorm(nn.Module):
    """torch.nn.GroupNorm as explicit ops, its means reduced one axis at a time (accurate in float32)."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        if not norm.affine:
            raise ValueError("PreciseGroupNorm expects an affine GroupNorm")
        self.groups, self.eps = norm.num_groups, norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    @staticmethod
    def _mean(h: torch.Tensor) -> torch.Tensor:
        for axis in range(h.dim() - 1, 1, -1):
            h = h.mean(axis, keepdim=True)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        h = x.reshape(batch, self.groups, channels // self.groups, *x.shape[2:])
        centred = h - self._mean(h)
        h = centred * torch.rsqrt(self._mean(centred * centred) + self.eps)
        shape = (1, channels) + (1,) * (x.dim() - 2)
        return h.reshape(x.shape) * self.weight.reshape(shape) + self.bias.reshape(shape)


def use_precise_group_norm(module: nn.Module) -> nn.Module:
    """Replace every nn.GroupNorm inside ``module`` (in place) by a PreciseGroupNorm sharing its weights."""
    for name, child in module.named_children():
        if isinstance(child, nn.GroupNorm):
            setattr(module, name, PreciseGroupNorm(child))
        else:
            use_precise_group_norm(child)
    return module


def export_modules(model: VertebraModel) -> dict[str, nn.Module]:
    """The modules that become encoder.onnx, decoder.onnx and (lebm, lsd-ebm) energy.onnx."""
    modules: dict[str, nn.Module] = {"encoder": model.encoder, "decoder": _DecoderProbability(model)}
    if model.energy is not None:
        modules["energy"] = _EnergyAndGrad(model)
    return modules


def example_inputs(name: str, config: ModelConfig, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random inputs of model ``name``: a binary patch, a latent N(0, I), diffusion steps in range."""
    p = config.patch
    if name == "encoder":
        return ((torch.rand(batch, 1, p, p, p, generator=generator) > 0.5).float(),)
    z = torch.randn(batch, *config.latent_shape, generator=generator)
    if name == "decoder" and config.conditioned:
        return z, (torch.rand(batch, 1, p, p, p, generator=generator) > 0.5).float()
    if name == "decoder":
        return (z,)
    return z, torch.randint(0, config.energy_timesteps, (batch,), generator=generator)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' deprecation warnings and log chatter (e.g. 'torchvision is not installed')."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _export_dynamo(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]) -> None:
    batch = torch.export.Dim(BATCH, min=1, max=65536)
    with _quiet():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=inputs,
            output_names=outputs,
            opset_version=OPSET,
            dynamic_shapes=tuple({0: batch} for _ in args),
            external_data=False,
            verbose=False,
        )
        program.save(str(path), external_data=False)


def _export_torchscript(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]) -> None:
    with _quiet():
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            input_names=inputs,
            output_names=outputs,
            opset_version=OPSET,
            dynamic_axes={n: {0: BATCH} for n in inputs + outputs},
        )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def export_module(
    module: nn.Module,
    args: tuple,
    path: Path,
    inputs: list[str],
    outputs: list[str],
    exporter: Exporter = "torchscript",
) -> tuple[str, str | None]:
    """Write ``module`` to ``path`` as ONNX; returns (exporter used, why dynamo was not used or None)."""
    note = None
    if exporter in ("auto", "dynamo"):
        try:
            _export_dynamo(module, args, path, inputs, outputs)
            return "dynamo", None
        except Exception as exc:  # noqa: BLE001 - any dynamo failure falls back to the TorchScript exporter
            if exporter == "dynamo":
                raise OutputError(f"{path.name}: the dynamo ONNX exporter failed ({_one_line(exc)})") from exc
            note = f"dynamo exporter failed ({_one_line(exc)})"
            _log.info("%s: %s; using the TorchScript exporter", path.name, note)
            for leftover in path.parent.glob(path.name + "*"):
                leftover.unlink()
    try:
        _export_torchscript(module, args, path, inputs, outputs)
    except Exception as exc:
        raise OutputError(
            f"{path.name}: ONNX export failed with the TorchScript exporter ({_one_line(exc)})"
            + (f" after the {note}" if note else "")
        ) from exc
    return "torchscript", note


def _pin_io(graph_values: Any, spec: dict[str, dict], path: Path, what: str) -> None:
    """Check names and dtypes of graph inputs/outputs against the spec; write its shapes (batch "B")."""
    names = [v.name for v in graph_values]
    if names != list(spec):
        raise OutputError(f"{path.name}: exported {what} are {names}, expected {list(spec)}")
    for value in graph_values:
        want = spec[value.name]
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type != _DTYPES[want["dtype"]]:
            raise OutputError(f"{path.name}: {what[:-1]} {value.name} is not {want['dtype']}")
        shape = tensor_type.shape
        if len(shape.dim) != len(want["shape"]):
            raise OutputError(
                f"{path.name}: {what[:-1]} {value.name} has rank {len(shape.dim)}, expected {want['shape']}"
            )
        for dim, size in zip(shape.dim, want["shape"], strict=True):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size


def finalize_onnx(path: Path, spec: dict[str, dict]) -> onnx.ModelProto:
    """Re-save ``path`` as one self-contained file (IR <= 10, I/O pinned to ``spec``), checked and < 16 MB."""
    model = onnx.load(str(path), load_external_data=True)
    for side_file in path.parent.glob(path.name + ".data"):
        side_file.unlink()
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    _pin_io(model.graph.input, spec["inputs"], path, "inputs")
    _pin_io(model.graph.output, spec["outputs"], path, "outputs")
    onnx.save_model(model, str(path), save_as_external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise OutputError(f"{path.name}: weights still refer to an external data file")
    size = path.stat().st_size
    if size >= MAX_FILE_BYTES:
        raise OutputError(
            f"{path.name} would be {size / 1e6:.1f} MB, over the {MAX_FILE_BYTES / 1e6:g} MB limit of a bundle file; "
            "train with a smaller latent size or encoder/decoder widths"
        )
    return model


def parity_errors(path: Path, module: nn.Module, args: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Max |ONNX Runtime - torch| per output on ``args``, relative to max(1, max |torch output|)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})
    with torch.no_grad():
        want = module(*args)
    want = want if isinstance(want, tuple) else (want,)
    errors = {}
    for out, g, w in zip(session.get_outputs(), got, want, strict=True):
        w = w.numpy()
        errors[out.name] = float(np.abs(g - w).max() / max(1.0, float(np.abs(w).max())))
    return errors


def _jsonable(value: Any, where: str) -> Any:
    """Plain JSON types from recipe/metrics values (numpy/torch scalars, paths, tuples); NaN/inf -> null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    raise ValueError(f"{where}: {type(value).__name__} value {value!r} cannot be written to the manifest (JSON)")


def _check_destination(out_dir: Path) -> None:
    """out_dir may be new (its parent folders are created), empty, or a previous bundle (replaced); anything
    else is refused."""
    make_folder(out_dir.parent if str(out_dir.parent) else Path("."), "the bundle")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise OutputError(f"{out_dir}: exists and is not a folder; choose a new folder for the bundle")
        allowed = {MANIFEST_NAME, *FILES.values()}
        entries = list(out_dir.iterdir())
        if entries and not all(e.name in allowed and e.is_file() for e in entries):
            raise OutputError(
                f"{out_dir}: exists and holds files other than a bundle's; choose a new or empty folder for the bundle"
            )


def _install(tmp: Path, out_dir: Path) -> None:
    """Rename the finished bundle into place, replacing an earlier bundle there."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    os.replace(out_dir, old)  # an empty folder as target is replaced atomically
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _versions() -> dict[str, str | None]:
    try:
        import onnxruntime as ort

        ort_version = ort.__version__
    except ImportError:
        ort_version = None
    return {"vertrefine": __version__, "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort_version}


def export_bundle(
    model: VertebraModel,
    out_dir: str | Path,
    *,
    schedule: DiffusionSchedule,
    sampler_defaults: dict,
    recipe: dict,
    metrics: dict,
    exporter: Exporter = "torchscript",
    seed: int = 0,
    validated: dict | None = None,
) -> Path:
    """Export ``model`` as a bundle folder ``out_dir`` (new, empty, or an earlier bundle, replaced).

    ``sampler_defaults`` must hold :meth:`vertrefine.sampler.SamplerSettings.manifest_keys` for lebm and
    lsd-ebm. ``exporter``: "torchscript" (default), "dynamo" (needs onnxscript), or "auto" (dynamo, else
    TorchScript). ``validated``: the manifest's ``validated`` section ({"ranges": {setting: [low, high]},
    "basis": text}) for an lsd-ebm: the sampler ranges refine accepts; None writes the ranges derived from
    ``schedule`` (:func:`vertrefine.bundle.derived_ranges`). Raises ValueError for sampler defaults outside
    those ranges. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    config: ModelConfig = model.config
    if config.kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {config.kind!r}")
    if config.kind == "lsd-ebm" and schedule.timesteps != config.timesteps:
        raise ValueError(f"schedule has {schedule.timesteps} steps but the model was built for {config.timesteps}")
    missing = [k for k in SamplerSettings.manifest_keys() if k not in sampler_defaults]
    if config.has_energy and missing:
        raise ValueError(f"sampler_defaults lacks {', '.join(missing)}")
    sampler = _jsonable(sampler_defaults, "sampler_defaults")
    if config.kind == "lsd-ebm":
        validated = _jsonable(validated or {"ranges": derived_ranges(schedule), "basis": DERIVED_BASIS}, "validated")
        outside = out_of_range(validated["ranges"], {k: v for k, v in sampler.items() if k in RANGED_OPTIONS})
        if outside is not None:
            key, value, (low, high) = outside
            raise ValueError(f"sampler default {key} {value} is outside its range {low:g}..{high:g}")
    _check_destination(out_dir)
    recipe, metrics = _jsonable(recipe, "recipe"), _jsonable(metrics, "metrics")

    model = copy.deepcopy(model).to("cpu", torch.float32).eval()  # leave the caller's model as it was
    reference = export_modules(model)  # torch as trained: what the ONNX files must reproduce
    modules = export_modules(use_precise_group_norm(copy.deepcopy(model)))
    generator = torch.Generator().manual_seed(seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".part", dir=out_dir.parent))
    try:
        files = {}
        for name in model_names(config.kind):
            spec = io_spec(name, config.latent_shape, config.patch, config.conditioned)
            path = tmp / FILES[name]
            example = example_inputs(name, config, 2, generator)
            used, note = export_module(
                modules[name], example, path, list(spec["inputs"]), list(spec["outputs"]), exporter
            )
            onnx_model = finalize_onnx(path, spec)
            errors = parity_errors(path, reference[name], example_inputs(name, config, 2, generator))
            if max(errors.values()) > PARITY_GUARD:
                raise OutputError(f"{path.name}: ONNX Runtime differs from torch by {errors} (relative); not exported")
            files[name] = {
                "path": FILES[name],
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
                **spec,
                "exporter": used,
                **({"exporter_note": note} if note else {}),
                "opset": next(o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")),
                "ir_version": onnx_model.ir_version,
                "parity_error": errors,
            }
        unexpected = sorted({p.name for p in tmp.iterdir()} - {f["path"] for f in files.values()})
        if unexpected:
            raise OutputError(f"{out_dir}: the export left unexpected files {unexpected}; bundles are single files")
        parameters = {name: count_parameters(getattr(model, name)) for name in ("encoder", "decoder")}
        if model.energy is not None:
            parameters["energy"] = count_parameters(model.energy)
        manifest = {
            "format_version": MANIFEST_VERSION,
            "kind": config.kind,
            "latent_size": math.prod(config.latent_shape),
            "latent_shape": list(config.latent_shape),
            "patch_size": config.patch,
            "spacing_mm": WORKING_SPACING_MM,
            "orientation": ORIENTATION,
            "model_config": _jsonable(config.as_dict(), "model_config"),
            "schedule": schedule.as_dict(),
            "sampler_defaults": sampler,
            **({"validated": validated} if config.kind == "lsd-ebm" else {}),
            "files": files,
            "flops": conv_flops(config),
            "parameters": parameters,
            "recipe": recipe,
            "metrics": metrics,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            "vertrefine_version": __version__,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        verify_bundle(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())
        _install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _checkpoint_path(run_dir_or_checkpoint: str | Path) -> Path:
    path = Path(run_dir_or_checkpoint)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise InputError(
            path, "no checkpoint found", "pass a training run folder (with checkpoints/last.pt) or a .pt checkpoint"
        )
    return path


def load_checkpoint_model(run_dir_or_checkpoint: str | Path) -> tuple[VertebraModel, DiffusionSchedule, dict]:
    """Load a run's ``checkpoints/last.pt`` (or a given .pt) safely (weights only) on the CPU.

    Returns (model in eval mode, schedule, meta) with meta = {"sampler_defaults", "recipe", "metrics",
    "checkpoint": path}.
    """
    path = _checkpoint_path(run_dir_or_checkpoint)
    remedy = "pass a checkpoint written by `vertrefine train`"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors, corrupt zip, truncated file
        raise InputError(path, f"cannot be loaded as a weights-only checkpoint ({_one_line(exc)})", remedy) from None
    if not isinstance(checkpoint, dict):
        raise InputError(path, "checkpoint is not a dictionary", remedy)
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise InputError(path, f"checkpoint lacks {', '.join(missing)}", remedy)
    try:
        config = ModelConfig.from_dict(dict(checkpoint["model_config"]))
        schedule = DiffusionSchedule(**checkpoint["schedule"])
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"invalid model_config or schedule in checkpoint ({exc})", remedy) from None
    model = VertebraModel(config)
    state = {k.removeprefix("module."): v for k, v in checkpoint["model_state"].items()}  # DDP-wrapped weights
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(path, f"weights do not match the model configuration ({_one_line(exc)})", remedy) from None
    meta = {k: checkpoint[k] for k in ("sampler_defaults", "recipe", "metrics")}
    meta["checkpoint"] = str(path)
    return model.eval(), schedule, meta


def autoencoder_as_vae(model: VertebraModel) -> VertebraModel:
    """The encoder and decoder of an LEBM / LSD-EBM model as a VAE (no energy).

    In vertrefine's objectives the energy never reaches the encoder or decoder (their loss is the ELBO alone),
    so this is exactly the VAE trained alongside the prior: comparing the two bundles isolates the prior.
    """
    vae = VertebraModel(replace(model.config, kind="vae"))
    vae.encoder.load_state_dict(model.encoder.state_dict())
    vae.decoder.load_state_dict(model.decoder.state_dict())
    return vae.eval()


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    exporter: Exporter = "torchscript",
    as_kind: str | None = None,
    sampler_overrides: dict | None = None,
) -> Path:
    """`vertrefine export RUN_DIR -o OUT_DIR [--as vae]`: the bundle of a run's last checkpoint.

    ``as_kind="vae"`` exports only the autoencoder of an LEBM / LSD-EBM run (see :func:`autoencoder_as_vae`).
    ``sampler_overrides`` (e.g. ``{"guidance": 0.5, "t_refine": 3}``) replace the run's sampler defaults in
    the manifest; they are recorded in the recipe. An override outside the ranges the bundle's manifest
    will hold (:func:`vertrefine.bundle.derived_ranges` of the run's schedule) raises InputError naming it.
    """
    model, schedule, meta = load_checkpoint_model(run_dir)
    outside = out_of_range(derived_ranges(schedule), dict(sampler_overrides or {}))
    if outside is not None:
        key, value, (low, high) = outside
        raise InputError(
            run_dir,
            f"sampler default {key} {value:g} (--{key.replace('_', '-')}) is outside {low:g}..{high:g}, the range "
            "this run's diffusion schedule allows",
            "choose a value in that range",
        )
    recipe = dict(meta["recipe"], checkpoint=meta["checkpoint"])
    sampler = dict(meta["sampler_defaults"])
    sampler.pop("diffusion_noise_scale", None)  # older checkpoints repeat the schedule's noise_scale here
    if sampler_overrides:
        sampler.update(sampler_overrides)
        recipe["sampler_overrides"] = dict(sampler_overrides)
    if as_kind not in (None, model.config.kind):
        if as_kind != "vae":
            raise InputError(
                run_dir, f"a {model.config.kind} run cannot be exported as {as_kind}", "only --as vae is possible"
            )
        model = autoencoder_as_vae(model)
        recipe["exported_as"] = f"vae: the autoencoder of this {meta['recipe'].get('model', 'lsd-ebm')} run"
    return export_bundle(
        model,
        out_dir,
        schedule=schedule,
        sampler_defaults=sampler,
        recipe=recipe,
        metrics=meta["metrics"],
        exporter=exporter,
    )
