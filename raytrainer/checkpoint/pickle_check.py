"""The pickles that DeepSpeed and torch.distributed.checkpoint (DCP) read on resume, checked first.

raytrainer's own files load with `torch.load(weights_only=True)`, but DeepSpeed's checkpoint engine
calls `torch.load(weights_only=False)` on `global_step*/*.pt`, and DCP unpickles `<dir>/.metadata` with
plain pickle: a crafted file in a shared bucket would run code on every worker. Before either library
opens a checkpoint, each of those files is read here with an unpickler that builds only the classes
those formats hold (DeepSpeed: tensors, containers and its loss scaler; DCP: its metadata dataclasses,
torch sizes and dtypes, paths). Anything else is refused, naming the file.
"""

from __future__ import annotations

import glob
import os
import pickle
import re
import zipfile

import torch

# the objects DeepSpeed's ZeRO optimizer states pickle besides tensors (fp32 and bf16 runs included)
_DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                      "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                      "deepspeed.runtime.zero.config.ZeroStageEnum",
                      "deepspeed.utils.tensor_fragment.fragment_address")
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_DCP_OTHER = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
              ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
              ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}


class UnsafeCheckpointError(ValueError):
    pass


def check_checkpoint_pickles(checkpoint_dir: str) -> None:
    """Raise UnsafeCheckpointError if a DeepSpeed or DCP pickle under checkpoint_dir holds other objects."""
    for path in sorted(glob.glob(os.path.join(checkpoint_dir, "global_step*", "*.pt"))):
        _check_deepspeed_file(path)
    for path in sorted(glob.glob(os.path.join(checkpoint_dir, "*", ".metadata"))):
        _check_dcp_metadata(path)


def _refuse(path: str, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path} holds {what}, which a checkpoint written by raytrainer does not: it is not unpickled (a crafted "
        "file would run code). Resume from a checkpoint you trust."
    )


def _check_deepspeed_file(path: str) -> None:
    allowed = []
    for dotted in _DEEPSPEED_GLOBALS:
        module, name = dotted.rsplit(".", 1)
        try:
            allowed.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):  # no DeepSpeed here: then nothing may name its classes
            pass
    try:
        with torch.serialization.safe_globals(allowed):
            # mmap: tensors stay on disk (a torch zip); a legacy/plain pickle is read as is
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        named = re.search(r"Unsupported global: (GLOBAL [\w.]+)", str(e))
        raise _refuse(path, named.group(1) if named else "pickle data that weights-only loading refuses") from None


class _DcpUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _DCP_OTHER or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if module in _DCP_MODULES:  # only the classes DCP defines there (not the functions it imports)
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:
                return found
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def _check_dcp_metadata(path: str) -> None:
    with open(path, "rb") as f:
        try:
            _DcpUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise _refuse(path, str(e)) from None
