"""The training loop: data, model, objective and Adam; validation, CSV log, checkpoints, resume, DDP, export.

``train(config, on_event=...)`` runs a whole training run in ``config.out`` (the run folder)::

    config.json          the TrainConfig (resumes read it back)
    log.csv              one row per epoch: losses averaged over the epoch, validation Dice and recon loss
    checkpoints/last.pt  every epoch; checkpoints/epoch_NNNN.pt every ``checkpoint_every`` epochs
    bundle/              the exported ONNX bundle, at the end
    data/, cache/        synthetic spines (preset tiny without --data) and the patch cache, by default

Reproducibility and resume. Nothing depends on global random state or wall-clock time: the model is
initialised from ``torch.manual_seed(seed)``, the epoch's patch order from a generator seeded with
``(seed, epoch)``, each item's augmentation from ``(seed, epoch, patch)`` (see ``data.PatchDataset``) and each
step's objective randomness (reparameterisation noise, diffusion step, Langevin noise) from a generator
seeded with ``(seed, epoch, step, rank)``. A checkpoint holds the weights, Adam's state and the epoch, so on
the CPU a resumed run reproduces the uninterrupted run bit for bit.

Multi-GPU. Under ``torchrun`` (``WORLD_SIZE``/``RANK`` in the environment) every process trains on its own
shard of each epoch's order with ``batch_size`` patches per step. Instead of wrapping modules in
DistributedDataParallel, the loop averages every parameter's gradient across processes after
``backward()`` (one flattened all-reduce), which is what DDP's reducer does: the objectives call the
networks through several entry points (``forward_lowres``, ``logits_lowres``, ``energy_and_grad`` inside
Langevin loops, autograd through the decoder), and a DDP wrapper only synchronises calls of its
``forward``. Initial weights are broadcast from rank 0, only rank 0 writes files, validation is sharded
and its sums all-reduced.

Torch is imported here, but no CLI library (progress goes through ``on_event``) and, at module level, no
reading of medical images (the patch cache is built by ``data`` and can be built beforehand on another
machine: pass ``cache_dir`` without ``data_dir``).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..atomic import atomic_path
from ..errors import InputError, VertrefineError
from ..schedule import DiffusionSchedule
from .config import RESUME_OVERRIDABLE, TINY_SYNTH_SEED, TrainConfig
from .models import ModelConfig, VertebraModel, count_parameters
from .objectives import LangevinConfig, make_objective

EventCallback = Callable[[str, dict[str, Any]], None]

CHECKPOINT_FORMAT = 1
T_REFINE = 6
"""Default refinement depth t_refine written into the bundle (the paper: 6 of T = 20)."""
GUIDANCE = 0.5
"""Default data-consistency weight written into the bundle (`vertrefine export --guidance` sets another)."""
_ORDER, _STEP = 1, 2  # seed-sequence tags of the two random streams

# Options whose change on resume cannot alter the numbers (paths may move with the run folder).
_RESUME_FREE = RESUME_OVERRIDABLE | {"out", "resume"}


# --------------------------------------------------------------------------------------------------
# Seeds, devices, processes
# --------------------------------------------------------------------------------------------------


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence hashing: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


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


@dataclass
class _Processes:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False
    """A process group is in use: gradients and validation sums are all-reduced."""
    owned: bool = False
    """The process group was created here (and is destroyed at the end)."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "RANK" in os.environ


def _start_processes(device_name: str) -> _Processes:
    if dist.is_available() and dist.is_initialized():
        return _Processes(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True, False)
    if not _launched_by_torchrun():
        return _Processes()
    if not dist.is_available():
        raise VertrefineError("launched by torchrun, but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    # Rank 0 may build the patch cache while the others wait at a barrier: allow hours, not minutes.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=6))
    return _Processes(dist.get_rank(), dist.get_world_size(), local_rank, True, True)


def _average_gradients(parameters: Sequence[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce (mean) the gradients of ``parameters`` in one flat buffer, as DDP's reducer does."""
    grads = []
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _broadcast_parameters(model: torch.nn.Module) -> None:
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """This process's positions of the epoch: a (seed, epoch) permutation, padded to a multiple of the world
    size by wrapping around (as DistributedSampler does), then every ``world_size``-th from ``rank``."""
    generator = torch.Generator().manual_seed(derive_seed(seed, _ORDER, epoch))
    order = torch.randperm(n, generator=generator).tolist()
    total = math.ceil(n / world_size) * world_size
    order = (order * math.ceil(total / max(n, 1)))[:total]
    return order[rank::world_size]


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write atomically (temporary file + rename): an interrupted save leaves the previous file intact."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint, loaded safely (``weights_only``: tensors and plain containers only) on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            path, "no checkpoint to resume from", "train without --resume to start the run, or check --out"
        )
    remedy = (
        "the file is damaged: copy an intact checkpoints/epoch_NNNN.pt over it to resume from that epoch, "
        "or train without --resume"
    )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors, bad zip archives, truncated files
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise InputError(path, f"cannot be read as a checkpoint ({type(exc).__name__}: {first})", remedy) from None
    required = ("model_config", "model_state", "optimizer_state", "epoch", "global_step", "config")
    if not isinstance(state, dict) or any(k not in state for k in required):
        raise InputError(path, "is not a vertrefine training checkpoint (keys missing)", remedy)
    return state


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def _has_cache(path: Path) -> bool:
    return (path / "index.json").is_file()


def _prepare_cache(config: TrainConfig, emit: EventCallback) -> None:
    """Rank 0: make the tiny preset's synthetic spines if needed and build (or update) the patch cache."""
    from . import data

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
        data.build_patch_cache(
            data_paths,
            cache_path,
            degraded_variants=config.degraded_variants,
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
) -> tuple[float, float, int]:
    """Sums over clean patches ``indices``: (1 mm reconstruction Dice, recon BCE per voxel, count).

    The posterior mean is decoded (no sampling), upsampled to 1 mm and thresholded at 0.5, as refine's
    exported encoder and decoder do, and compared with the cached 1 mm mask.
    """
    from .data import reconstruction_dice, validation_masks

    was_training = model.training
    model.eval()
    dice_sum = recon_sum = 0.0
    for chunk in _batches(indices, batch_size):
        x = torch.from_numpy(np.stack([np.asarray(cache.lowres(int(i)), np.float32) for i in chunk]))[:, None]
        x = x.to(device)
        mu, _ = model.encoder.forward_lowres(x)
        logits = model.decoder.logits_lowres(mu)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).mean(1)
        dice = reconstruction_dice(logits, validation_masks(cache, chunk))
        dice_sum += float(dice.sum())
        recon_sum += float(recon.sum())
    model.train(was_training)
    return dice_sum, recon_sum, len(indices)


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
    return {
        "t_refine": min(T_REFINE, config.timesteps - 1),  # the schedule's last step is almost pure noise
        "langevin_steps": config.langevin_steps,
        "step_size": config.langevin_step_size,
        "noise_scale": config.langevin_noise_scale,
        "init": config.langevin_init,
        "diffusion_noise_scale": config.diffusion_noise_scale,
        "posterior_steps": config.posterior_steps,
        "posterior_step_size": config.posterior_step_size,
        "threshold": 0.5,
        "guidance": GUIDANCE,
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
    procs = _start_processes(config.device)
    try:
        return _train(config, procs, on_event)
    finally:
        if procs.owned and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, procs: _Processes, on_event: EventCallback | None) -> Path:
    def emit(kind: str, payload: dict[str, Any]) -> None:
        if on_event is not None and procs.main:
            on_event(kind, payload)

    from . import data  # reads the patch cache (its builder reads medical images: see the module docstring)

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
    cache = data.PatchCache.open(config.cache_path)
    try:
        train_idx, val_idx = data.split_indices(cache, config.val_fraction, config.seed, config.val_groups)
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

    schedule = DiffusionSchedule(timesteps=config.timesteps, noise_scale=config.diffusion_noise_scale)
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
        _restore_rng(dict(checkpoint.get("rng", {})))
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
    if procs.active:
        _broadcast_parameters(model)
    parameters = [p for p in model.parameters() if p.requires_grad]

    langevin = LangevinConfig(
        steps=config.langevin_steps,
        step_size=config.langevin_step_size,
        noise_scale=config.langevin_noise_scale,
        init=config.langevin_init,
        posterior_steps=config.posterior_steps,
        posterior_step_size=config.posterior_step_size,
    )
    objective = make_objective(
        model, schedule, langevin, kl_weight=config.kl_weight, energy_on_clean=config.energy_on_clean
    )
    dataset = data.PatchDataset(cache, train_idx, augment=True, degraded_prob=config.degraded_prob, seed=config.seed)
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
            generator=torch.Generator().manual_seed(derive_seed(config.seed, _ORDER, epoch, procs.rank)),
        )
        emit("epoch_start", {"epoch": epoch, "epochs": config.epochs, "steps": steps_per_epoch})
        sums: dict[str, float] = {}
        count = 0
        for step, batch in enumerate(loader):
            x = batch["x"].to(device, non_blocking=True)
            target = batch["target"].to(device, non_blocking=True)
            generator = torch.Generator(device=device)
            generator.manual_seed(derive_seed(config.seed, _STEP, epoch, step, procs.rank))
            loss, logs = objective(x, target, generator)
            if not math.isfinite(logs["loss"] if "loss" in logs else loss.detach().item()):
                raise VertrefineError(
                    f"training diverged at epoch {epoch}, step {step + 1} (loss {logs.get('loss')}); "
                    f"lower --lr (now {config.lr:g}) or resume from an earlier checkpoint"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if procs.active:
                _average_gradients(parameters, procs.world_size)
            optimizer.step()
            global_step += 1
            n = x.shape[0]
            count += n
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + float(value) * n
            emit("step", {"epoch": epoch, "step": step + 1, "steps": steps_per_epoch, "logs": dict(logs)})

        val = list(validate(model, cache, val_shard, device, config.batch_size)) if val_shard else [0.0, 0.0, 0]
        totals = [count, *val]
        keys = list(sums)  # the objective's order, the same on every process
        if procs.active:  # losses averaged over all processes' patches, validation over the whole split
            reduced = torch.tensor([*totals, *(sums[k] for k in keys)], dtype=torch.float64, device=device)
            dist.all_reduce(reduced)
            totals, sums = reduced[:4].tolist(), dict(zip(keys, reduced[4:].tolist(), strict=True))
        count, dice_sum, recon_sum, val_count = totals
        losses = {k: sums[k] / max(count, 1) for k in sums}
        val_dice = dice_sum / val_count if val_count else float("nan")
        val_recon = recon_sum / val_count if val_count else float("nan")
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
                "rng": _rng_state(),
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


__all__ = [
    "derive_seed",
    "epoch_order",
    "load_checkpoint",
    "resolve_device",
    "resume_config",
    "save_checkpoint",
    "train",
    "validate",
]
