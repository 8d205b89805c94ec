"""Training checkpoints: where they live, atomic saving, safe loading, and the random state they carry.

A checkpoint (``checkpoints/last.pt`` every epoch, ``checkpoints/epoch_NNNN.pt`` every ``checkpoint_every``)
is a ``torch.save`` dict of tensors and plain containers: the model and Adam state, the epoch and step,
the training config, the history, the torch random state (so a resumed CPU run reproduces the
uninterrupted one bit for bit), the sampler defaults and the recipe that ``export`` writes into a bundle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path
from ..errors import InputError

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = ("model_config", "model_state", "optimizer_state", "epoch", "global_step", "config")


def checkpoint_dir(run_dir: str | Path) -> Path:
    """The checkpoints folder of a run folder."""
    return Path(run_dir) / "checkpoints"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write atomically (temporary file + rename): an interrupted save leaves the previous file intact."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint, loaded safely (``weights_only``: tensors and plain containers only) on the CPU.

    Raises :class:`InputError` (one line naming the file) when it is missing, unreadable or not a
    vertrefine checkpoint.
    """
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
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise InputError(path, "is not a vertrefine training checkpoint (keys missing)", remedy)
    return state


def rng_state() -> dict[str, Any]:
    """torch's global random state (and CUDA's, where there is a GPU), for a checkpoint."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set torch's global random state back to a checkpoint's :func:`rng_state` (CUDA only on as many GPUs)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
