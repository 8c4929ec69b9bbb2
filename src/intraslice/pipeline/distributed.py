"""Several GPUs or processes through torch.distributed (``torchrun --nproc-per-node N``).

Data parallelism over the calibration windows: each rank takes the windows ``rank::world``,
runs the same layer on them, and every statistic a method accumulates (float64 Grams,
channel moments, mask gradients) is summed over the ranks before the math. Every rank then
holds the same statistics and solves the same float64 problem; rank 0's compressed layer is
broadcast so that all ranks go on with bit-identical weights, and rank 0 alone writes.
Outside ``torchrun`` (no process group) every function here is a no-op.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from torch import nn


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str | None) -> str | None:
    """Join the process group ``torchrun`` describes (env ``WORLD_SIZE`` > 1); returns the device.

    NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return device
    use_cuda = (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    # Rank 0 alone evaluates and writes while the others wait at a barrier: a long timeout.
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=12))
    return device


def shard(tokens: torch.Tensor) -> torch.Tensor:
    """This rank's calibration windows (``rank::world``)."""
    return tokens[rank() :: world_size()] if active() else tokens


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place (float64 statistics stay float64)."""
    if active():
        torch.distributed.all_reduce(t)
    return t


def all_reduce_int(n: int, device: torch.device | str = "cpu") -> int:
    if not active():
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t)
    return int(t.item())


@torch.no_grad()
def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank ``src``'s."""
    if not active():
        return
    for t in [*module.parameters(), *module.buffers()]:
        torch.distributed.broadcast(t.data, src)


def barrier() -> None:
    if active():
        torch.distributed.barrier()
