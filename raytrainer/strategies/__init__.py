"""Strategies by name: the loop asks the registry and never branches on which one it got."""

from __future__ import annotations

import torch.distributed as dist

from .base import Strategy
from .ddp import DDPStrategy


def build_strategy(args, device) -> Strategy:
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        return Strategy(device, args.mixed_precision)
    if args.strategy == "ddp":
        return DDPStrategy(
            device,
            args.mixed_precision,
            find_unused_parameters=args.ddp_find_unused_parameters,
            bucket_cap_mb=args.ddp_bucket_cap_mb,
            broadcast_buffers=args.ddp_broadcast_buffers,
            static_graph=args.ddp_static_graph,
        )
    raise NotImplementedError(
        f"strategy={args.strategy!r} is not available yet in this raytrainer build; use strategy='ddp'."
    )


__all__ = ["Strategy", "DDPStrategy", "build_strategy"]
