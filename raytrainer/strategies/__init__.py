"""Strategies by name: the loop asks the registry and never branches on which one it got."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from .base import Strategy
from .ddp import DDPStrategy
from .dp import DataParallelStrategy

logger = logging.getLogger("raytrainer")


def ddp_kwargs(args, model=None) -> dict:
    """DistributedDataParallel's keyword arguments, decided as transformers' _build_accelerator_args decides them."""
    if args.ddp_find_unused_parameters is not None:
        find_unused = args.ddp_find_unused_parameters
    elif model is not None and isinstance(model, _pretrained_model_cls()):
        # transformers: find_unused_parameters breaks activation checkpointing (its PR #4659)
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        find_unused = not (checkpointing or getattr(args, "activation_checkpointing", False)
                           or args.gradient_checkpointing)
    else:
        find_unused = True  # transformers' choice for a plain nn.Module: it may have unused parameters
    kwargs = {"find_unused_parameters": find_unused}
    for name in ("bucket_cap_mb", "broadcast_buffers", "static_graph"):
        value = getattr(args, f"ddp_{name}", None)
        if value is not None:
            kwargs[name] = value
    return kwargs


def build_strategy(args, device, model=None, world_size: int | None = None) -> Strategy:
    distributed = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if distributed else 1
    if args.strategy in ("fsdp", "deepspeed"):
        if distributed:
            if args.strategy == "fsdp":
                from .fsdp import FSDPStrategy

                return FSDPStrategy(device, args.mixed_precision, fsdp_config=args.fsdp_config)
            from .deepspeed import DeepSpeedStrategy

            return DeepSpeedStrategy(device, args.mixed_precision, args=args)
        logger.warning("raytrainer: strategy=%r needs a process group (num_workers >= 1); training in this process "
                       "without sharding", args.strategy)
    if world_size == 1:
        if args.n_gpu > 1 and torch.cuda.device_count() > 1:
            # one process, several GPUs, no process group: transformers' nn.DataParallel
            return DataParallelStrategy(device, args.mixed_precision)
        return Strategy(device, args.mixed_precision)
    if args.strategy == "ddp":
        return DDPStrategy(device, args.mixed_precision, **ddp_kwargs(args, model))
    raise NotImplementedError(f"strategy={args.strategy!r} is unknown; use 'ddp', 'fsdp' or 'deepspeed'.")


def check_strategy(args, model=None) -> None:
    """Driver-side checks of a sharded strategy against the model, before any worker starts."""
    if args.strategy == "fsdp":
        from .fsdp import check_wrap_policy

        check_wrap_policy(model, args.fsdp_config)
    elif args.strategy == "deepspeed":
        from .deepspeed_config import deepspeed_config

        deepspeed_config(args, max(1, args.num_workers))


def check_resume(args, checkpoint: str | None, fs=None) -> None:
    """Driver-side, before any worker starts: can `num_workers` workers load `checkpoint`'s sharded state?
    FSDP's DCP state reshards to any worker count; DeepSpeed ZeRO's partitioned optimizer state does not.
    `checkpoint` is a path inside the pyarrow filesystem `fs`, or a local path when fs is None."""
    if checkpoint is None or args.strategy != "deepspeed":
        return
    from .deepspeed_config import check_checkpoint_world_size

    check_checkpoint_world_size(args, checkpoint, max(1, args.num_workers), fs)


def _pretrained_model_cls():
    from transformers import PreTrainedModel

    return PreTrainedModel


__all__ = ["Strategy", "DDPStrategy", "DataParallelStrategy", "build_strategy", "check_strategy", "check_resume",
           "ddp_kwargs"]
