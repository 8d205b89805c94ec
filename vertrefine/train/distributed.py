"""Multi-process training under ``torchrun``: the process group, DistributedDataParallel and epoch shards.

Under ``torchrun`` (``WORLD_SIZE``/``RANK`` in the environment) :func:`start_processes` joins the process
group (NCCL on GPUs, gloo on CPUs), and :func:`data_parallel` wraps the training step in torch's
:class:`~torch.nn.parallel.DistributedDataParallel`, which broadcasts rank 0's initial weights and
averages every gradient across processes during ``backward()``. The objectives call the networks through
several entry points (``forward_lowres``, ``logits_lowres``, ``energy_and_grad`` inside Langevin loops,
autograd through the decoder), so DDP wraps a :class:`TrainingStep` module whose ``forward`` is the whole
objective: every use of the parameters happens inside one DDP forward. Each process trains on its shard of
the epoch's order (:func:`epoch_order`, as ``DistributedSampler`` splits it).
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..errors import VertrefineError

ORDER, STEP = 1, 2
"""Seed-sequence tags of the two random streams (epoch order, per-step objective randomness)."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence hashing: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass
class Processes:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False
    """A process group is in use: gradients and validation sums are all-reduced."""
    owned: bool = False
    """The process group was created here (and is destroyed by :meth:`close`)."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if :func:`start_processes` created it."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "RANK" in os.environ


def start_processes(device_name: str) -> Processes:
    """Join (or reuse) the torchrun process group; a single :class:`Processes` without torchrun.

    Raises :class:`VertrefineError` under torchrun with a torch build without ``torch.distributed``.
    """
    if dist.is_available() and dist.is_initialized():
        return Processes(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True, False)
    if not launched_by_torchrun():
        return Processes()
    if not dist.is_available():
        raise VertrefineError("launched by torchrun, but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    # Rank 0 may build the patch cache while the others wait at a barrier: allow hours, not minutes.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=6))
    return Processes(dist.get_rank(), dist.get_world_size(), local_rank, True, True)


Objective = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, dict[str, Any]]]


class TrainingStep(torch.nn.Module):
    """The model and its objective as one module: ``forward(x, target, generator) -> (loss, logs)``."""

    def __init__(self, model: torch.nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(
        self, x: torch.Tensor, target: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.objective(x, target, generator)


def data_parallel(step: TrainingStep, procs: Processes, device: torch.device) -> torch.nn.Module:
    """``step`` wrapped in DistributedDataParallel when a process group is active, else ``step`` itself.

    Every objective uses every parameter of its model in every step (VAE, LEBM and LSD-EBM; checked with
    two gloo processes), so DDP does not search the graph for unused ones.
    """
    if not procs.active:
        return step
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(step, device_ids=device_ids, find_unused_parameters=False)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64)."""
    reduced = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(reduced)
    return reduced.tolist()


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """This process's positions of the epoch: a (seed, epoch) permutation, padded to a multiple of the world
    size by wrapping around (as DistributedSampler does), then every ``world_size``-th from ``rank``."""
    generator = torch.Generator().manual_seed(derive_seed(seed, ORDER, epoch))
    order = torch.randperm(n, generator=generator).tolist()
    total = math.ceil(n / world_size) * world_size
    order = (order * math.ceil(total / max(n, 1)))[:total]
    return order[rank::world_size]
