"""How a Ray worker builds model_init's model under a sharded strategy: only its shard.

transformers calls model_init twice in a training run (in `Trainer.__init__` and again in `train()`).
On a worker that trains, the first is a meta-device skeleton (model_init.py `call_model_init`), and the
second is the one real build, done here when the strategy shards the weights:

* fsdp, a model_init that calls `from_pretrained(folder)` of safetensors files: every rank builds the same meta
  skeleton through from_pretrained (headers only), and FSDPStrategy.prepare fills each rank's shards with
  its slices of the files, read lazily (pretrained.py): no rank reads or holds the whole model. Where that
  cannot give from_pretrained's weights bit for bit (pretrained.py's `sharded_source` says why), one warning
  and the path below.
* fsdp: every rank builds a meta skeleton; rank 0 also builds the real model on the CPU (the
  *reference*, with the RNG state transformers' set_seed left: the weights an unsharded build gets).
  FSDPStrategy.prepare shards the skeleton (`fully_shard`), allocates its shards (`to_empty`) and fills
  them from rank 0's reference (`set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`,
  buffers broadcast too). Rank 0 holds one full copy until then; the other ranks never hold more than
  their shard.
* ZeRO-3, a model_init that calls `from_pretrained(folder)` of safetensors files: the same meta skeleton decides
  (`sharded_source`); then every rank builds under `deepspeed.zero.Init` with from_pretrained's weight reading
  swapped out (nothing read, nothing initialised), and fills each parameter's partition with exactly the rows of
  the files that hold it (pretrained.py `load_zero3_partitions`). Otherwise one warning and the path below.
* ZeRO-3: rank 0 builds the reference as above; then every rank builds under `deepspeed.zero.Init`
  (transformers' HfDeepSpeedConfig set meanwhile, so a `from_pretrained` / `from_config` inside model_init
  takes its ZeRO-3 path), which allocates one module at a time and partitions its parameters at once.
  zero.Init alone does not give the unsharded weights: a model's `post_init` initialises parameters
  that are already partitioned (empty), so its `_init_weights` is a no-op there. The partitions are then
  filled from rank 0's reference module by module (`GatheredParameters(modifier_rank=0)`), and the
  reference dropped: the initial weights are bit for bit those of the unsharded build, on every rank.

After the build every rank takes rank 0's RNG state (torch, CUDA, Python, NumPy): the state every rank
of a DDP run has after its own model_init, so dropout and the rest of training draw the same numbers.

A checkpoint resume loads the weights after sharding (the strategy's `load_checkpoint`): from the
sharded state, or, for a checkpoint without it (transformers' or DDP's), from its model.safetensors.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from .deepspeed_config import deepspeed_config, zero_stage
from .pretrained import load_zero3_partitions, meta_build, pretrained_without_weights, sharded_source

logger = logging.getLogger("raytrainer")


def is_skeleton(model) -> bool:
    """A model whose parameters are on the meta device: names, shapes and config, no weights (the driver's
    stand-in for a sharded model, or a worker's __init__-time build; see Trainer.call_model_init)."""
    return any(p.is_meta for p in model.parameters())


@dataclasses.dataclass
class ShardedBuild:
    """Set on the trainer (`_sharded_build`) by a sharded build; the strategy reads it."""

    kind: str                                   # "fsdp" or "zero3"
    reference: torch.nn.Module | None = None    # fsdp, rank 0: the real model, until the shards are filled
    source: object = None                       # a PretrainedSource: the shards are read from its files
    loaded: dict | None = None                  # from a source: this rank's bytes read / the files' bytes


def sharded_kind(args) -> str | None:
    """"fsdp" / "zero3" when the strategy shards the weights, else None (ZeRO-0/1/2 hold all of them)."""
    if args.strategy == "fsdp":
        return "fsdp"
    if args.strategy == "deepspeed":
        return "zero3" if zero_stage(args) == 3 else None
    return None


def build_sharded(trainer, build, kind: str):
    """The model a worker trains, built as its shard (see the module's docstring). `build()` runs model_init."""
    if kind == "fsdp":
        return build_fsdp(trainer, build)
    return build_zero3(trainer, build)


# ------------------------------------------------------------------------------------------ FSDP
def build_fsdp(trainer, build):
    """The meta skeleton every rank shards; its weights come from the files slice by slice (a from_pretrained
    model_init that allows it), else from rank 0's real build."""
    rank = dist.get_rank()
    start = rng_state()  # right after transformers' set_seed
    model, calls = meta_build(build)
    source, why = sharded_source(model, calls)
    reference = None
    if source is None:
        if calls and rank == 0:
            logger.warning("raytrainer: fsdp: rank 0 reads the whole pretrained model and fills every rank's shards "
                           "from it (no sharded loading: %s)", why)
        set_rng_state(start)  # rank 0's build draws what an unsharded build draws
        reference = build() if rank == 0 else None
    rng = broadcast_object(rng_state() if rank == 0 else None)
    set_rng_state(rng)
    trainer._sharded_build = ShardedBuild("fsdp", reference, source)
    return model


def fill_fsdp(model, reference, device) -> None:
    """After fully_shard on a meta skeleton: allocate the shards and fill them from rank 0's reference."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    full = reference.state_dict() if reference is not None else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # non-persistent buffers (rotary inv_freq, attention masks) are in no state dict: rank 0's, broadcast
    broadcast_buffers(model, reference)


def load_full_weights_fsdp(model, folder: str) -> None:
    """A checkpoint without sharded state: its model.safetensors, read on rank 0, into the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = read_full_weights(folder) if dist.get_rank() == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                strict=False))


# ------------------------------------------------------------------------------------------ ZeRO-3
def zero3_config(args) -> dict:
    """The run's DeepSpeed config for zero.Init: values left "auto" (filled from the model at
    deepspeed.initialize) are dropped; zero.Init reads the stage, parameter offload and dtype."""
    def no_auto(value):
        if isinstance(value, dict):
            return {k: no_auto(v) for k, v in value.items() if v != "auto"}
        return value

    return no_auto(deepspeed_config(args, dist.get_world_size()))


def build_zero3(trainer, build):
    """Every rank's partitions, read from the pretrained files slice by slice (a from_pretrained model_init that
    allows it), else filled from rank 0's real build."""
    rank = dist.get_rank()
    start = rng_state()  # right after transformers' set_seed
    skeleton, calls = meta_build(build)  # headers only: is the model sharded-loadable?
    source, why = sharded_source(skeleton, calls)
    offload = ((zero3_config(trainer.args).get("zero_optimization") or {}).get("offload_param") or {}).get("device")
    if source is not None and str(offload).lower() == "nvme":
        source, why = None, "parameters are offloaded to NVMe"
    if source is not None:
        with pretrained_without_weights() as built:
            model = zero3_build(trainer.args, build)
        if built != [model]:  # the skeleton's build made one from_pretrained call returned as is; this one must too
            raise RuntimeError(f"model_init built {len(built)} pretrained models under ZeRO-3, its skeleton one")
        loaded = load_zero3_partitions(model, source, skeleton)
        set_rng_state(start)  # from_pretrained of complete files draws nothing
        set_rng_state(broadcast_object(rng_state() if rank == 0 else None))
        trainer._sharded_build = ShardedBuild("zero3", source=source, loaded=loaded)
        return model
    if calls and rank == 0:
        logger.warning("raytrainer: ZeRO-3: rank 0 reads the whole pretrained model and fills every rank's partitions "
                       "from it (no sharded loading: %s)", why)
    del skeleton
    set_rng_state(start)
    reference = build() if rank == 0 else None  # right after transformers' set_seed, as an unsharded build
    rng = broadcast_object(rng_state() if rank == 0 else None)
    model = zero3_build(trainer.args, build)
    fill_zero3(model, reference)
    set_rng_state(rng)
    trainer._sharded_build = ShardedBuild("zero3")
    return model


def zero3_build(args, build):
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    # zero.Init reads the world size from deepspeed.comm: wrap the process group Ray made (as deepspeed.initialize will)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    config = zero3_config(args)
    hf_config = HfDeepSpeedConfig(config)  # noqa: F841 - transformers keeps a weak reference while it lives
    try:
        with deepspeed.zero.Init(config_dict_or_path=config):
            return build()
    finally:
        unset_hf_deepspeed_config()  # as on the driver: the rest of the run does not take transformers' ZeRO-3 paths


def fill_zero3(model, reference) -> None:
    """rank 0's reference values into every rank's partitions, one module's parameters at a time."""
    import deepspeed

    ref = dict(reference.named_parameters()) if reference is not None else {}
    names = {id(p): n for n, p in model.named_parameters()}  # a tied parameter once, under its first name
    done = set()
    with torch.no_grad():
        for module in model.modules():
            params = [p for p in module.parameters(recurse=False) if id(p) not in done]
            if not params:
                continue
            done.update(id(p) for p in params)
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if reference is not None:
                    for p in params:
                        p.data.copy_(ref[names[id(p)]].data.to(p.device))
    broadcast_buffers(model, reference)


def load_full_weights_zero3(model, folder: str) -> None:
    """A checkpoint without DeepSpeed state: its model.safetensors, read on rank 0, into the partitions."""
    import deepspeed

    full = read_full_weights(folder) if dist.get_rank() == 0 else None
    with torch.no_grad():
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if full is not None and name in full:
                    p.data.copy_(full[name].to(p.device, p.dtype))


def read_full_weights(folder: str) -> dict:
    from safetensors.torch import load_file
    from transformers.utils import SAFE_WEIGHTS_NAME

    path = os.path.join(folder, SAFE_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"resume_from_checkpoint={folder}: no sharded state and no {SAFE_WEIGHTS_NAME} to load the weights "
            "from. A model built shard by shard (model_init under fsdp / ZeRO-3) resumes from the strategy's "
            "sharded state or from consolidated weights; pass model= instead of model_init= to resume from this "
            "checkpoint."
        )
    return load_file(path, device="cpu")


# ------------------------------------------------------------------------------------------ collectives
def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(value):
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_buffers(model, reference) -> None:
    """Every buffer of `model` from rank 0's `reference` (same names)."""
    ref = dict(reference.named_buffers()) if reference is not None else {}
    device = _comm_device()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if buf.is_meta:
                continue
            tmp = (ref[name] if reference is not None else buf).detach().to(device, buf.dtype).clone()
            dist.broadcast(tmp, src=0)
            buf.copy_(tmp.to(buf.device))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
