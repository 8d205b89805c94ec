"""The training loop: data, model, objective and Adam; validation, CSV log, resume and export.

``train(config, on_event=...)`` runs a whole training run in ``config.out`` (the run folder)::

    config.json          the TrainConfig (resumes read it back)
    log.csv              one row per epoch: losses averaged over the epoch, validation Dice and recon loss
    checkpoints/last.pt  every epoch; checkpoints/epoch_NNNN.pt every ``checkpoint_every`` epochs
    bundle/              the exported ONNX bundle, at the end
    data/, cache/        synthetic spines (preset tiny without --data) and the patch cache, by default

Reproducibility and resume. Nothing depends on global random state or wall-clock time: the model is
initialised from ``torch.manual_seed(seed)``, the epoch's patch order from a generator seeded with
``(seed, epoch)``, each item's augmentation from ``(seed, epoch, patch)`` (see ``dataset.PatchDataset``) and each
step's objective randomness (reparameterisation noise, diffusion step, Langevin noise) from a generator
seeded with ``(seed, epoch, step, rank)``. A checkpoint holds the weights, Adam's state and the epoch, so on
the CPU a resumed run reproduces the uninterrupted run bit for bit.

Multi-GPU. Under ``torchrun`` (``WORLD_SIZE``/``RANK`` in the environment) every process trains on its own
shard of each epoch's order with ``batch_size`` patches per step, the model and objective wrapped in torch's
DistributedDataParallel (see :mod:`.distributed`); only rank 0 writes files, validation is sharded and its
sums all-reduced. Checkpoints: :mod:`.checkpoints`.

Torch is imported here, but no CLI library (progress goes through ``on_event``) and, at module level, no
reading of medical images (the patch cache is built by ``data`` and can be built beforehand on another
machine: pass ``cache_dir`` without ``data_dir``).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..atomic import atomic_path
from ..errors import InputError, VertrefineError
from .checkpoints import CHECKPOINT_FORMAT, checkpoint_dir, load_checkpoint, restore_rng, rng_state, save_checkpoint
from .config import RESUME_OVERRIDABLE, TINY_SYNTH_SEED, TrainConfig
from .distributed import (
    ORDER,
    STEP,
    Processes,
    TrainingStep,
    all_reduce_sum,
    data_parallel,
    derive_seed,
    epoch_order,
    start_processes,
)
from .models import ModelConfig, VertebraModel, count_parameters
from .objectives import LangevinConfig, make_objective

EventCallback = Callable[[str, dict[str, Any]], None]

# Options whose change on resume cannot alter the numbers (paths may move with the run folder).
_RESUME_FREE = RESUME_OVERRIDABLE | {"out", "resume"}


# --------------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------------


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when available else CPU; 'cuda' without a usable GPU is an error."""
    if name == "cpu":
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise InputError(None, f"unknown device {name!r}", "use auto, cpu or cuda")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "cuda":
        raise VertrefineError(
            "--device cuda: torch sees no CUDA GPU (CPU-only torch build, or no driver); "
            "use --device cpu, or install a CUDA build of torch"
        )
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def _has_cache(path: Path) -> bool:
    return (path / "index.json").is_file()


def _prepare_cache(config: TrainConfig, emit: EventCallback) -> None:
    """Rank 0: make the tiny preset's synthetic spines if needed and build (or update) the patch cache."""
    from . import patch_cache

    def on_progress(event: Any) -> None:
        emit("cache", {k: getattr(event, k) for k in ("done", "total", "case", "status", "patches", "message")})

    cache_path = config.cache_path
    data_path = config.data_path
    data_paths = config.data_paths
    if config.data_dir is None:
        if _has_cache(cache_path):
            return  # a cache built beforehand (maybe on another machine) is used as it is
        if config.preset != "tiny":
            raise InputError(cache_path, "holds no patch cache", "pass --data with the CT segmentations")
        _make_synthetic_data(data_path, config.synth_cases, emit)
    emit("cache_start", {"data": str(data_path), "cache": str(cache_path)})
    try:
        patch_cache.build_patch_cache(
            data_paths,
            cache_path,
            degraded_variants=config.degraded_variants,
            clean_variants=config.clean_variants,
            variant_errors=config.variant_errors,
            seed=config.seed,
            drop_cut=config.drop_cut,
            workers=max(1, config.num_workers),
            on_progress=on_progress,
        )
    except ImportError as exc:  # a bare GPU machine without the medical-image stack
        if not _has_cache(cache_path):
            raise VertrefineError(
                f"building the patch cache needs {exc.name or 'the vertrefine image readers'} ({exc}); "
                "build it on a machine with the full install and pass --cache"
            ) from None
        emit("warning", {"message": f"cannot check {data_path} for changes ({exc}); using the cache as it is"})


def _make_synthetic_data(folder: Path, cases: int, emit: EventCallback) -> None:
    from ..synth import write_synth_dataset  # numpy/scipy phantoms; NIfTI writing needs the io stack

    folder.mkdir(parents=True, exist_ok=True)
    emit("synth_start", {"folder": str(folder), "cases": cases})
    done = 0

    def on_case() -> None:
        nonlocal done
        done += 1
        emit("synth", {"done": done, "total": cases})

    write_synth_dataset(folder, cases, TINY_SYNTH_SEED, on_case=on_case)


def _repeated(cache: Any, indices: list[int], config: TrainConfig) -> list[int]:
    """``indices`` with each patch repeated by its data folder's ``data_repeat`` count."""
    if not config.data_repeat or set(config.data_repeat) == {1}:
        return indices
    folders = [p.resolve() for p in config.data_paths]

    def repeat(i: int) -> int:
        source = Path(cache.entries[i].source)
        for folder, count in zip(folders, config.data_repeat, strict=True):
            if source == folder or folder in source.parents:
                return count
        return 1

    return [i for i in indices for _ in range(repeat(i))]


def _batches(indices: Sequence[int], size: int) -> list[Sequence[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


@torch.no_grad()
def validate(
    model: VertebraModel, cache: Any, indices: Sequence[int], device: torch.device, batch_size: int
) -> tuple[float, float, int, float]:
    """Sums over validation patches ``indices``: (1 mm reconstruction Dice of the clean patch, its recon BCE
    per voxel, count, 1 mm Dice from a thick-slice input).

    The posterior mean is decoded (no sampling), upsampled to 1 mm and thresholded at 0.5, as refine's
    exported encoder and decoder do, and compared with the cached 1 mm mask. The thick-slice Dice encodes
    (and, for a conditioned decoder, decodes with) a degraded variant of the patch instead (variant
    ``i % k`` of patch ``i``, its 2 mm occupancy); it equals the
    clean Dice for a cache without variants.
    """
    from .validation import validation_masks

    was_training = model.training
    model.eval()
    dice_sum = recon_sum = thick_sum = 0.0
    conditioned = model.config.conditioned
    for chunk in _batches(indices, batch_size):
        x = torch.from_numpy(np.stack([np.asarray(cache.lowres(int(i)), np.float32) for i in chunk]))[:, None]
        x = x.to(device)
        masks = validation_masks(cache, chunk)
        mu, _ = model.encoder.forward_lowres(x)
        logits = model.decoder.logits_lowres(mu, x) if conditioned else model.decoder.logits_lowres(mu)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).mean(1)
        dice = _dice_1mm(model, mu, x, logits, masks)
        dice_sum += float(dice.sum())
        recon_sum += float(recon.sum())
        if cache.n_variants:
            thick = [np.asarray(cache.degraded_lowres(int(i), int(i) % cache.n_variants), np.float32) for i in chunk]
            x_thick = torch.from_numpy(np.stack(thick))[:, None].to(device)
            mu, _ = model.encoder.forward_lowres(x_thick)
            low = model.decoder.logits_lowres(mu, x_thick) if conditioned else model.decoder.logits_lowres(mu)
            dice = _dice_1mm(model, mu, x_thick, low, masks)
        thick_sum += float(dice.sum())
    model.train(was_training)
    return dice_sum, recon_sum, len(indices), thick_sum


def _dice_1mm(
    model: VertebraModel, mu: torch.Tensor, x_low: torch.Tensor, logits_lowres: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """Dice [B] at 1 mm of the decoded means against ``masks``: a conditioned decoder decodes at 1 mm from the
    input's internal-grid occupancy ``x_low`` as its exported form does, the others' logits are upsampled."""
    from .validation import reconstruction_dice

    if model.config.conditioned:
        return reconstruction_dice(model.decoder.logits_from_lowres(mu, x_low), masks, upsample=False)
    return reconstruction_dice(logits_lowres, masks)


# --------------------------------------------------------------------------------------------------
# Logging, recipe
# --------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or what platform knows of it elsewhere."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _hardware(device: torch.device, world_size: int) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device.type,
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processes": world_size,
        "torch": str(torch.__version__),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


class _CsvLog:
    """log.csv: header from the first row's keys; on resume, rows after the checkpoint's epoch are dropped."""

    def __init__(self, path: Path, *, keep_through_epoch: int) -> None:
        self.path = path
        self.fieldnames: list[str] | None = None
        rows: list[dict[str, str]] = []
        if keep_through_epoch > 0 and path.is_file():
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                self.fieldnames = list(reader.fieldnames or []) or None
                rows = [r for r in reader if r.get("epoch", "").isdigit() and int(r["epoch"]) <= keep_through_epoch]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
            if self.fieldnames:
                writer = csv.DictWriter(handle, self.fieldnames)
                writer.writeheader()
                writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        new = self.fieldnames is None
        if new:
            self.fieldnames = list(row)
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, self.fieldnames, extrasaction="ignore", restval="")
            if new:
                writer.writeheader()
            writer.writerow({k: _csv_value(v) for k, v in row.items()})


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def _metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    if not history:
        return {}
    last = history[-1]
    scored = [h for h in history if not math.isnan(h["val_dice"])]
    best = max(scored, key=lambda h: h["val_dice"]) if scored else None
    return {
        "val_dice": last["val_dice"],
        "val_recon": last["val_recon"],
        "best_val_dice": best["val_dice"] if best else float("nan"),
        "best_epoch": best["epoch"] if best else None,
        "epoch": last["epoch"],
        "train_loss": last["losses"].get("loss", float("nan")),
        "dice_definition": "clean validation patches: posterior mean decoded, 1 mm, threshold 0.5",
    }


def _sampler_defaults(config: TrainConfig) -> dict[str, Any]:
    """The bundle's sampler defaults (:meth:`TrainConfig.sampler_defaults`, the chain the energy was trained
    with), plus the LEBM posterior settings and the threshold."""
    return {
        **asdict(config.sampler_defaults()),
        "posterior_steps": config.posterior_steps,
        "posterior_step_size": config.posterior_step_size,
        "threshold": 0.5,
    }


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def _check_resumable(config: TrainConfig, saved: TrainConfig, path: Path) -> None:
    changed = [
        f.name
        for f in fields(TrainConfig)
        if f.name not in _RESUME_FREE and getattr(config, f.name) != getattr(saved, f.name)
    ]
    if changed:
        free = ", ".join(sorted(RESUME_OVERRIDABLE - {"command"}))
        raise InputError(
            path,
            f"--resume with different {', '.join(changed)} than the checkpoint's run",
            f"resume with the run's own options (only {free} may change)",
        )


def _optimizer(model: VertebraModel, config: TrainConfig) -> torch.optim.Adam:
    groups = model.parameter_groups()
    param_groups = [{"params": groups["autoencoder"], "lr": config.lr, "name": "autoencoder"}]
    if "energy" in groups:
        param_groups.append({"params": groups["energy"], "lr": config.energy_lr, "name": "energy"})
    return torch.optim.Adam(param_groups)


def train(config: TrainConfig, *, on_event: EventCallback | None = None) -> Path:
    """Run (or, with ``config.resume``, continue) a training run; returns the run folder.

    ``on_event(kind, payload)`` reports progress on rank 0 (payloads are dicts of plain values):

    - 'synth_start' {folder, cases}, 'synth' {done, total}: the tiny preset's synthetic spines
    - 'cache_start' {data, cache}, 'cache' {done, total, case, status, patches, message}: the patch cache
    - 'setup' {cases, patches, train_patches, val_patches, device, world_size, model, parameters,
      start_epoch, epochs, steps_per_epoch, ...}
    - 'epoch_start' {epoch, epochs, steps}; 'step' {epoch, step, steps, logs}
    - 'epoch_end' {epoch, epochs, losses, val_dice, val_recon, best_val_dice, seconds, checkpoints}
    - 'export_start' {path}, 'export_end' {path}, 'warning' {message}, 'done' {run_dir, bundle, metrics}

    Raises :class:`InputError` for unusable data, run folders and checkpoints, :class:`VertrefineError`
    when the loss diverges or a CUDA device is missing.
    """
    procs = start_processes(config.device)
    try:
        return _train(config, procs, on_event)
    finally:
        procs.close()


def _train(config: TrainConfig, procs: Processes, on_event: EventCallback | None) -> Path:
    def emit(kind: str, payload: dict[str, Any]) -> None:
        if on_event is not None and procs.main:
            on_event(kind, payload)

    from . import dataset, patch_cache  # the cache's builder reads medical images: see patch_cache's docstring

    device = resolve_device(config.device, procs.local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 64^3 shapes: let cuDNN pick its fastest 3D kernels
    run_dir = config.run_dir
    ckpt_dir = checkpoint_dir(run_dir)
    last_path = ckpt_dir / "last.pt"

    checkpoint = None
    if config.resume:
        checkpoint = load_checkpoint(last_path)
        try:
            saved = TrainConfig.from_dict(dict(checkpoint["config"]))
        except (InputError, TypeError) as exc:
            raise InputError(
                last_path, f"holds an unusable training config ({exc})", "train without --resume"
            ) from None
        _check_resumable(config, saved, last_path)
    elif last_path.exists():
        raise InputError(
            run_dir,
            "already holds a training run (checkpoints/last.pt)",
            "add --resume to continue it, or pick a new --out",
        )

    if procs.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_dir.mkdir(exist_ok=True)
        with atomic_path(run_dir / "config.json") as tmp:
            tmp.write_text(config.to_json())
        _prepare_cache(config, emit)
    procs.barrier()
    cache = patch_cache.PatchCache.open(config.cache_path)
    try:
        train_idx, val_idx = patch_cache.split_indices(cache, config.val_fraction, config.seed, config.val_groups)
    except ValueError as exc:
        raise InputError(config.cache_path, str(exc), "check --val-groups against the case names") from None
    train_idx = _repeated(cache, train_idx, config)
    if not train_idx:
        raise InputError(
            config.cache_path, "leaves no patch for training", "add cases, or name fewer individuals in --val-groups"
        )
    if not val_idx:
        emit("warning", {"message": "only one case: no validation split, val_dice is not measured"})
    if checkpoint is not None and checkpoint.get("cache_fingerprint") not in (None, cache.fingerprint):
        emit("warning", {"message": "the patch cache changed since the checkpoint: the resumed run sees other data"})

    schedule = config.schedule()
    model_config = ModelConfig(**config.model_config_dict())
    torch.manual_seed(config.seed)
    model = VertebraModel(model_config).to(device)
    optimizer = _optimizer(model, config)
    start_epoch, global_step, elapsed = 1, 0, 0.0
    history: list[dict[str, Any]] = []
    if checkpoint is not None:
        if dict(checkpoint["model_config"]) != model_config.as_dict():
            raise InputError(last_path, "was written for another model configuration", "train without --resume")
        model.load_state_dict(checkpoint["model_state"])
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        start_epoch = int(checkpoint["epoch"]) + 1
        global_step = int(checkpoint["global_step"])
        elapsed = float(checkpoint.get("elapsed", 0.0))
        history = [dict(h) for h in checkpoint.get("history", [])]
        restore_rng(dict(checkpoint.get("rng", {})))
        del checkpoint
    elif config.init_from:
        from .export import load_checkpoint_model  # weights-only loading and its checks, in one place

        start_model, _, _ = load_checkpoint_model(config.init_from)
        if start_model.config != model_config:
            raise InputError(
                config.init_from,
                "was trained with another model configuration",
                "start from a checkpoint of the same architecture (latent, widths, timesteps)",
            )
        model.load_state_dict(start_model.state_dict())
        model.to(device)

    langevin = LangevinConfig(
        config.chain,
        posterior_steps=config.posterior_steps,
        posterior_step_size=config.posterior_step_size,
    )
    objective = make_objective(
        model,
        schedule,
        langevin,
        kl_weight=config.kl_weight,
        energy_on_clean=config.energy_on_clean,
        input_dropout=config.decoder_input_dropout,
    )
    step_module = data_parallel(TrainingStep(model, objective), procs, device)  # DDP under torchrun
    dataset = dataset.PatchDataset(cache, train_idx, augment=True, degraded_prob=config.degraded_prob, seed=config.seed)
    val_shard = val_idx[procs.rank :: procs.world_size]
    steps_per_epoch = math.ceil(
        len(epoch_order(len(train_idx), config.seed, 1, procs.rank, procs.world_size)) / config.batch_size
    )
    groups = {e.group for e in cache.entries}
    data_summary = {
        "data_dir": config.data_dir or (str(config.data_path) if config.preset == "tiny" else None),
        "cache": str(config.cache_path),
        "cases": len(groups),
        "patches": len(cache),
        "train_patches": len(train_idx),
        "val_patches": len(val_idx),
        "skipped_cases": len(cache.skipped),
    }
    hardware = _hardware(device, procs.world_size)
    emit(
        "setup",
        {
            **data_summary,
            "device": str(device),
            "world_size": procs.world_size,
            "model": config.model,
            "parameters": count_parameters(model),
            "start_epoch": start_epoch,
            "epochs": config.epochs,
            "steps_per_epoch": steps_per_epoch,
        },
    )

    csv_log = _CsvLog(run_dir / "log.csv", keep_through_epoch=start_epoch - 1) if procs.main else None
    model.train()
    for epoch in range(start_epoch, config.epochs + 1):
        started = time.perf_counter()
        dataset.set_epoch(epoch)
        order = epoch_order(len(train_idx), config.seed, epoch, procs.rank, procs.world_size)
        loader = DataLoader(
            dataset,
            batch_size=config.batch_size,
            sampler=order,
            num_workers=config.num_workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(derive_seed(config.seed, ORDER, epoch, procs.rank)),
        )
        emit("epoch_start", {"epoch": epoch, "epochs": config.epochs, "steps": steps_per_epoch})
        sums: dict[str, float] = {}
        count = 0
        for step, batch in enumerate(loader):
            x = batch["x"].to(device, non_blocking=True)
            target = batch["target"].to(device, non_blocking=True)
            generator = torch.Generator(device=device)
            generator.manual_seed(derive_seed(config.seed, STEP, epoch, step, procs.rank))
            loss, logs = step_module(x, target, generator)
            if not math.isfinite(logs["loss"] if "loss" in logs else loss.detach().item()):
                raise VertrefineError(
                    f"training diverged at epoch {epoch}, step {step + 1} (loss {logs.get('loss')}); "
                    f"lower --lr (now {config.lr:g}) or resume from an earlier checkpoint"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # under DDP, also averages the gradients over the processes
            optimizer.step()
            global_step += 1
            n = x.shape[0]
            count += n
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + float(value) * n
            emit("step", {"epoch": epoch, "step": step + 1, "steps": steps_per_epoch, "logs": dict(logs)})

        val = list(validate(model, cache, val_shard, device, config.batch_size)) if val_shard else [0.0, 0.0, 0, 0.0]
        totals = [count, *val]
        keys = list(sums)  # the objective's order, the same on every process
        if procs.active:  # losses averaged over all processes' patches, validation over the whole split
            reduced = all_reduce_sum([*totals, *(sums[k] for k in keys)], device)
            totals, sums = reduced[:5], dict(zip(keys, reduced[5:], strict=True))
        count, dice_sum, recon_sum, val_count, thick_sum = totals
        losses = {k: sums[k] / max(count, 1) for k in sums}
        val_dice = dice_sum / val_count if val_count else float("nan")
        val_recon = recon_sum / val_count if val_count else float("nan")
        val_dice_thick = thick_sum / val_count if val_count else float("nan")
        seconds = time.perf_counter() - started
        elapsed += seconds
        record = {"epoch": epoch, "losses": losses, "val_dice": val_dice, "val_recon": val_recon, "seconds": seconds}
        history.append(record)

        if procs.main:
            csv_log.append(
                {
                    "epoch": epoch,
                    "step": global_step,
                    "time": round(elapsed, 3),
                    "lr": config.lr,
                    "energy_lr": config.energy_lr if model.energy is not None else "",
                    **losses,
                    "val_dice": val_dice,
                    "val_recon": val_recon,
                    "val_dice_thick": val_dice_thick,
                    "seconds": round(seconds, 3),
                }
            )
            recipe = _recipe(config, data_summary, hardware, history, elapsed, procs.world_size)
            state = {
                "format": CHECKPOINT_FORMAT,
                "model_config": model_config.as_dict(),
                "schedule": schedule.as_dict(),
                "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer_state": optimizer.state_dict(),
                "epoch": epoch,
                "global_step": global_step,
                "elapsed": elapsed,
                "history": history,
                "rng": rng_state(),
                "config": config.as_dict(),
                "cache_fingerprint": cache.fingerprint,
                "sampler_defaults": _sampler_defaults(config),
                "recipe": recipe,
                "metrics": _metrics(history),
            }
            save_checkpoint(state, last_path)
            paths = [str(last_path)]
            if epoch % config.checkpoint_every == 0:
                save_checkpoint(state, ckpt_dir / f"epoch_{epoch:04d}.pt")
                paths.append(str(ckpt_dir / f"epoch_{epoch:04d}.pt"))
            emit(
                "epoch_end",
                {
                    "epoch": epoch,
                    "epochs": config.epochs,
                    "losses": losses,
                    "val_dice": val_dice,
                    "val_recon": val_recon,
                    "best_val_dice": _metrics(history)["best_val_dice"],
                    "seconds": seconds,
                    "checkpoints": paths,
                },
            )

    if procs.main:
        if start_epoch > config.epochs:
            emit("warning", {"message": f"the run already reached epoch {start_epoch - 1}: only exporting"})
        bundle = run_dir / "bundle" if config.export else None
        if bundle is not None:
            emit("export_start", {"path": str(bundle)})
            try:
                from .export import export_bundle

                export_bundle(
                    model,
                    bundle,
                    schedule=schedule,
                    sampler_defaults=_sampler_defaults(config),
                    recipe=_recipe(config, data_summary, hardware, history, elapsed, procs.world_size),
                    metrics=_metrics(history),
                    seed=config.seed,
                )
                emit("export_end", {"path": str(bundle)})
                if config.model == "lebm":
                    from .export import LEBM_NOTE

                    emit("warning", {"message": LEBM_NOTE})
            except ImportError as exc:  # e.g. a GPU machine without onnxruntime: the checkpoint is safe
                emit(
                    "warning",
                    {
                        "message": f"no bundle exported ({exc}); run `vertrefine export {run_dir} -o {bundle}` "
                        "where the full vertrefine install is"
                    },
                )
                bundle = None
        emit("done", {"run_dir": str(run_dir), "bundle": bundle and str(bundle), "metrics": _metrics(history)})
    procs.barrier()
    return run_dir


def _recipe(
    config: TrainConfig,
    data_summary: dict[str, Any],
    hardware: dict[str, Any],
    history: list[dict[str, Any]],
    elapsed: float,
    world_size: int,
) -> dict[str, Any]:
    return {
        "command": config.command,
        "model": config.model,
        "preset": config.preset,
        "data": data_summary,
        "epochs": history[-1]["epoch"] if history else 0,
        "batch_size": config.batch_size,
        "global_batch_size": config.batch_size * world_size,
        "lr": config.lr,
        "energy_lr": config.energy_lr,
        "seed": config.seed,
        "seconds": round(elapsed, 1),
        "seconds_per_epoch": round(elapsed / len(history), 2) if history else None,
        "hardware": hardware,
        "config": config.as_dict(),
    }


def resume_config(run_dir: str | Path, **changes: Any) -> TrainConfig:
    """The saved config of ``run_dir`` with ``resume=True`` and the allowed ``changes`` (e.g. epochs)."""
    saved = TrainConfig.load(Path(run_dir) / "config.json")
    bad = sorted(set(changes) - RESUME_OVERRIDABLE)
    if bad:
        raise InputError(run_dir, f"--resume cannot change {', '.join(bad)}")
    return replace(saved, out=str(run_dir), resume=True, **changes)


__all__ = ["resolve_device", "resume_config", "train", "validate"]
