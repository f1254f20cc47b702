"""The process's place in a torch.distributed run (torchrun), for training and certify."""

from __future__ import annotations

import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when initialised, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
