"""torchrun / DDP helpers: init from the environment, device choice, rank-0 checks, reductions."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 logs and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world > 1


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA exists, else CPU; otherwise as given."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job described by the environment (``WORLD_SIZE`` > 1), if any.

    Uses NCCL on CUDA devices and gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local), dev


def shutdown() -> None:
    """Leave the process group (no-op outside DDP)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average scalar tensors over ranks (one all_reduce) and return floats."""
    if not values:
        return {}
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= dist.get_world_size()
    return dict(zip(values, stacked.tolist(), strict=True))


def barrier() -> None:
    """Synchronise ranks (no-op outside DDP)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


__all__ = ["DistInfo", "barrier", "init_distributed", "mean_over_ranks", "pick_device", "shutdown"]
