"""Full weights from a sharded checkpoint, after the fact: `raytrainer consolidate CHECKPOINT`.

fsdp checkpoints hold the weights as DCP shards (`model_dcp/`) unless fsdp_config's state_dict_type asks
for FULL_STATE_DICT (ZeRO-3's, DeepSpeed's state: consolidate_ds.py). This reads them in one process, with no process group (DCP reshards to one rank),
through the checked reader of pickle_check.py, and writes `model.safetensors` next to the checkpoint's
config and tokenizer files, so `from_pretrained` loads the folder. A run resumed without fsdp reads the
shards the same way (loop_trainer's _load_from_checkpoint).
"""

from __future__ import annotations

import os
import shutil
import warnings

from .consolidate_ds import consolidate_deepspeed, only_deepspeed_weights
from .layout import has_weights_file
from .pickle_check import read_dcp_metadata, safe_dcp_load

MODEL_DCP = "model_dcp"
WEIGHTS = "model.safetensors"
# what a checkpoint holds besides the model files: left out of a consolidated copy
_TRAINING_STATE = ("optim_dcp", "optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin",
                   "raytrainer_run.pt", MODEL_DCP, "latest", "zero_to_fp32.py")


def has_dcp_weights(checkpoint_dir: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint_dir, MODEL_DCP, ".metadata"))


def only_dcp_weights(checkpoint_dir: str) -> bool:
    """Shards and no file transformers loads weights from (model.safetensors, pytorch_model.bin, an index)."""
    return has_dcp_weights(checkpoint_dir) and not has_weights_file(checkpoint_dir)


def load_dcp_weights(model, checkpoint_dir: str) -> None:
    """A whole (unsharded) model's weights from a checkpoint's shards: a run resumed without fsdp."""
    load_whole(model, dcp_model_state(checkpoint_dir), f"{checkpoint_dir}/{MODEL_DCP} does not fit the model")


def load_deepspeed_weights(model, checkpoint_dir: str) -> None:
    """A whole (unpartitioned) model's weights from a ZeRO-3 checkpoint without model.safetensors."""
    load_whole(model, consolidate_deepspeed(checkpoint_dir), f"{checkpoint_dir}: its DeepSpeed weights do not fit the model")


def load_whole(model, state: dict, misfit: str, error=ValueError) -> None:
    """A full state dict into a whole model; tied weights (saved once by save_pretrained) are tied again."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise error(f"{misfit}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def dcp_model_state(checkpoint_dir: str) -> dict:
    """The full weights in `checkpoint_dir/model_dcp`, as CPU tensors named as in the model's state_dict."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = os.path.join(checkpoint_dir, MODEL_DCP)
    metadata = read_dcp_metadata(os.path.join(folder, ".metadata"))
    state = {fqn[len("model."):]: torch.empty(meta.size, dtype=meta.properties.dtype)
             for fqn, meta in metadata.state_dict_metadata.items()
             if isinstance(meta, TensorStorageMetadata) and fqn.startswith("model.")}
    if not state:
        raise ValueError(f"{folder}: no model tensors in its DCP metadata")
    with warnings.catch_warnings():  # DCP's "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        safe_dcp_load({"model": state}, folder, no_dist=True)
    return state


def consolidate(checkpoint_dir: str, output_dir: str | None = None) -> str:
    """Write `model.safetensors` (full weights) for a sharded checkpoint into output_dir (default: the
    checkpoint itself), with the checkpoint's config and tokenizer files; returns the weights file's path."""
    from safetensors.torch import save_file

    if only_deepspeed_weights(checkpoint_dir):  # ZeRO-3 without stage3_gather_16bit_weights_on_model_save
        state, seen = {}, set()
        for name, tensor in consolidate_deepspeed(checkpoint_dir).items():
            if id(tensor) not in seen:  # a tied weight once, as save_pretrained writes it
                state[name] = tensor
                seen.add(id(tensor))
    elif not os.path.isdir(checkpoint_dir):
        raise ValueError(f"{checkpoint_dir}: no such folder; give a checkpoint-<step> folder written under fsdp or ZeRO-3")
    elif not has_dcp_weights(checkpoint_dir):
        if os.path.isfile(os.path.join(checkpoint_dir, WEIGHTS)):
            raise ValueError(f"{checkpoint_dir} holds consolidated weights already ({WEIGHTS})")
        raise ValueError(f"{checkpoint_dir}: no sharded weights to consolidate ({MODEL_DCP}/.metadata); "
                         "give a checkpoint-<step> folder written under fsdp or ZeRO-3")
    else:
        state = dcp_model_state(checkpoint_dir)
    output_dir = output_dir or checkpoint_dir
    os.makedirs(output_dir, exist_ok=True)
    if os.path.abspath(output_dir) != os.path.abspath(checkpoint_dir):
        for name in os.listdir(checkpoint_dir):
            source = os.path.join(checkpoint_dir, name)
            if os.path.isfile(source) and name not in _TRAINING_STATE and not name.startswith("rng_state"):
                shutil.copy2(source, os.path.join(output_dir, name))
    path = os.path.join(output_dir, WEIGHTS)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)  # a reader never sees a partial file
    return path

