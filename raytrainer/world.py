"""This process's (rank, world size): the process group Ray Train made, or (0, 1) in-process."""

from __future__ import annotations

import torch.distributed as dist


def world_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
