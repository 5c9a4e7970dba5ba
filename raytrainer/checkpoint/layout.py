"""Names and discovery of checkpoint folders (`checkpoint-<step>/`, as transformers writes them).

A checkpoint is written under `tmp-checkpoint-<step>` and renamed when complete, so a folder named
`checkpoint-<step>` is whole. Folders written by transformers.Trainer (not renamed atomically) count
only when their trainer_state.json, written last, is present.
"""

from __future__ import annotations

import os
import re

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

TRAINER_STATE = "trainer_state.json"
FINAL_MODEL = "final_model"  # a Ray run's final weights and state in its run folder (launch.load_results reads it)
TMP_PREFIX = "tmp-" + PREFIX_CHECKPOINT_DIR
_NAME = re.compile(r"^" + PREFIX_CHECKPOINT_DIR + r"-(\d+)$")
_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
            "adapter_model.safetensors", "adapter_model.bin",  # a PEFT model's checkpoint holds its adapters only
            "model_dcp",  # fsdp's shards, without a consolidated copy (checkpoint/consolidate.py)
            "latest")  # ZeRO-3's state without its gathered weights (DeepSpeed's tag file; consolidate_ds.py)


def has_weights_file(path: str) -> bool:
    """A file transformers' _load_from_checkpoint reads weights from (model.safetensors, pytorch_model.bin, an
    index, a PEFT adapter): a sharded checkpoint without one is read by consolidate.py / consolidate_ds.py."""
    return any(n.startswith(("model.safetensors", "pytorch_model.bin", "adapter_model")) for n in os.listdir(path))


def checkpoint_step(path: str) -> int | None:
    m = _NAME.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def is_complete(path: str) -> bool:
    files = set(os.listdir(path)) if os.path.isdir(path) else set()
    return TRAINER_STATE in files and any(w in files for w in _WEIGHTS)


def complete_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoint folders under run_dir, oldest step first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        step = checkpoint_step(name)
        path = os.path.join(run_dir, name)
        if step is not None and is_complete(path):
            found.append((step, path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str) -> str | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None
