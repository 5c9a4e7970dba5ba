"""DeepSpeed's configuration and checkpoint layout, read without building an engine.

The driver runs these (a contradiction between the config and TrainingArguments is a ValueError before any
worker starts; a ZeRO checkpoint of another worker count is refused), and so do the workers' strategy
(deepspeed.py) and sharded build (build.py).
"""

from __future__ import annotations

import copy
import json
import os
import re

from ..checkpoint.pickle_check import deepspeed_tag


class _ArgsWithWorld:
    """TrainingArguments as seen by the workers: transformers reads args.world_size (the driver's is 1)."""

    def __init__(self, args, world_size: int):
        self._args, self.world_size = args, world_size

    def __getattr__(self, name):
        if name == "_args":  # unpickling looks attributes up before __dict__ is filled: no endless recursion
            raise AttributeError(name)
        return getattr(self._args, name)


def load_config(value) -> dict:
    if isinstance(value, dict):
        return copy.deepcopy(value)
    if isinstance(value, str):
        if not os.path.isfile(value):
            raise ValueError(f"deepspeed={value!r}: no such file; pass a ZeRO config dict or the path of a JSON file.")
        with open(value, encoding="utf-8") as f:
            return json.load(f)
    raise ValueError(f"deepspeed= must be a dict or the path of a JSON file (got {type(value).__name__}).")


def deepspeed_config(args, world_size: int, model=None, max_steps: int | None = None,
                     batch_size: int | None = None) -> dict:
    """The DeepSpeed config the workers run: transformers' "auto" filling, our defaults, and a
    ValueError listing every value that contradicts TrainingArguments. batch_size: the size an
    auto_find_batch_size attempt runs with (transformers' _update_auto_batch_size: "auto" batch values follow
    it, and a batch value set in the config is not a mismatch)."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    config = load_config(args.deepspeed)
    hf = HfTrainerDeepSpeedConfig(config)
    try:
        view = _ArgsWithWorld(args, world_size)
        if batch_size is not None:
            view.per_device_train_batch_size = batch_size
        hf.trainer_config_process(view, auto_find_batch_size=batch_size is not None)
        if max_steps is not None:
            hf.trainer_config_finalize(view, model, max_steps)  # raises on mismatches
        elif hf.mismatches:
            raise ValueError(
                "Please correct the following DeepSpeed config values that mismatch TrainingArguments values:\n"
                + "\n".join(hf.mismatches)
                + f"\n(num_workers={world_size}.) The easiest method is to set these DeepSpeed config values to 'auto'."
            )
        config = hf.config
    finally:
        # transformers keeps a global reference that makes from_pretrained use zero.Init; not for us
        unset_hf_deepspeed_config()
    micro = config.setdefault("train_micro_batch_size_per_gpu",
                              args.per_device_train_batch_size if batch_size is None else batch_size)
    steps = config.setdefault("gradient_accumulation_steps", args.gradient_accumulation_steps)
    config.setdefault("train_batch_size", micro * steps * world_size)  # DeepSpeed asserts the product
    config.setdefault("gradient_clipping", args.max_grad_norm or 0.0)
    config.setdefault("steps_per_print", 10**9)  # the loop logs; DeepSpeed's own progress lines are noise
    zero = config.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed zero_optimization.stage={stage!r} must be 0, 1, 2 or 3.")
    if "optimizer" not in config:
        config.setdefault("zero_allow_untested_optimizer", True)
        offload = (zero.get("offload_optimizer") or {}).get("device", "none")
        if str(offload).lower() == "cpu":
            config.setdefault("zero_force_ds_cpu_optimizer", False)
    return config


# one optimizer partition per data-parallel rank (bf16_ prefix for ZeRO-1/2 with bf16)
_PARTITION = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def checkpoint_world_size(folder: str, fs=None, universal: bool = False) -> tuple[int | None, str | None]:
    """(data-parallel world size, tag) of the DeepSpeed state in `folder` (a pyarrow filesystem path, or a
    local path when fs is None): the number of ranks with an optimizer partition in the tag a resume loads
    (pickle_check.deepspeed_tag, which refuses a `latest` naming anything else). (None, tag) when the
    state is not partitioned (ZeRO-0) or absent."""
    import pyarrow.fs as pafs

    if fs is None:
        fs, folder = pafs.LocalFileSystem(), os.path.abspath(folder)
    folder = folder.rstrip("/")
    tag = deepspeed_tag(folder, universal, fs)
    if not tag:
        return None, None
    files = fs.get_file_info(pafs.FileSelector(f"{folder}/{tag}", allow_not_found=True))
    ranks = {int(m.group(1)) for e in files if (m := _PARTITION.match(os.path.basename(e.path)))}
    return (len(ranks) or None), tag


def check_checkpoint_world_size(args, folder: str, world_size: int, fs=None) -> None:
    """ValueError when `folder`'s ZeRO optimizer partitions were written by another number of ranks."""
    config = load_config(args.deepspeed)
    if _universal(config):
        deepspeed_tag(folder, True, fs)  # a `latest_universal` naming another folder is refused here too
        return  # DeepSpeed's universal format loads on any world size
    saved, tag = checkpoint_world_size(folder, fs)
    if saved is None or saved == world_size:
        return
    raise ValueError(
        f"resume_from_checkpoint={folder}: its DeepSpeed ZeRO optimizer state is partitioned over {saved} "
        f"data-parallel ranks ({saved} zero_pp_rank_*_optim_states.pt files in {tag}/) and this run has "
        f"{world_size} (num_workers={args.num_workers}); DeepSpeed cannot re-partition it on load. Resume with "
        f"num_workers={saved} (gradient_accumulation_steps keeps the global batch), or convert the checkpoint to "
        f"DeepSpeed's universal format, `python -m deepspeed.checkpoint.ds_to_universal --input_folder "
        f"{folder}/{tag} --output_folder {folder}/{tag}_universal --inject_missing_state`, and add "
        '"checkpoint": {"load_universal": true} to the deepspeed config.'
    )


def gather_16bit_on_save(args) -> bool:
    """ZeRO-3's `stage3_gather_16bit_weights_on_model_save` (also accepted under its old name), default false."""
    zero = load_config(args.deepspeed).get("zero_optimization", {})
    value = zero.get("stage3_gather_16bit_weights_on_model_save", zero.get("stage3_gather_fp16_weights_on_model_save"))
    return str(value).lower() in ("true", "1") if not isinstance(value, bool) else value


def zero_stage(args) -> int:
    return int(load_config(args.deepspeed).get("zero_optimization", {}).get("stage", 0))


def _universal(config: dict) -> bool:
    return bool((config.get("checkpoint") or {}).get("load_universal"))
