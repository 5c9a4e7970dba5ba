"""Every pickle a resume reads from a checkpoint is loaded by an unpickler that cannot run code.

transformers' own files (optimizer.pt, scheduler.pt, rng_state*.pth) and raytrainer's raytrainer_run.pt load
with `torch.load(weights_only=True)`; weights are safetensors. Two libraries unpickle freely, so they are
fenced here:

* DeepSpeed calls `torch.load(weights_only=False)` and, without `tag=`, follows the folder's `latest` file
  anywhere. `deepspeed_tag` gives the one tag a resume may load (`global_step<N>` directly inside the
  checkpoint; `latest`, if present, must name it), every file under it is checked first, and
  `safe_deepspeed_load` replaces the engine's loader (weights_only with DeepSpeed's few classes).
* DCP unpickles `.metadata` with plain pickle and every non-tensor item of the `.distcp` files with
  `torch.load(weights_only=False)`. `.metadata` is read by `_DcpUnpickler` (DCP's dataclasses, sizes,
  dtypes, paths), every byte item is checked weights-only before loading, and `SafeFileSystemReader` /
  `SafeLoadPlanner` do the same inside `dcp.load`.

A refused file is one `UnsafeCheckpointError` naming the file, the global it tried to build and the fix;
nothing of it is built.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import zipfile

import torch
from .layout import checkpoint_step

# the objects DeepSpeed's ZeRO optimizer states pickle besides tensors (fp32 and bf16 runs included)
_DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                      "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                      "deepspeed.runtime.zero.config.ZeroStageEnum",
                      "deepspeed.utils.tensor_fragment.fragment_address")
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_DCP_OTHER = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
              ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
              ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}
DEEPSPEED_TAG = re.compile(r"^global_step\d+$")
_UNIVERSAL_TAG = re.compile(r"^global_step\d+_universal$")  # ds_to_universal's output, with load_universal
_FIX = "Resume from a checkpoint you trust (one this run or raytrainer wrote)."


class UnsafeCheckpointError(ValueError):
    pass


def check_checkpoint_pickles(checkpoint_dir: str, universal: bool = False) -> None:
    """Raise UnsafeCheckpointError if a DeepSpeed or DCP pickle under checkpoint_dir holds other objects."""
    tag = deepspeed_tag(checkpoint_dir, universal)
    if tag is not None:
        for path in _files_under(os.path.join(checkpoint_dir, tag)):
            if path.endswith(".pt"):
                _check_deepspeed_file(path)
    for name in sorted(os.listdir(checkpoint_dir)):
        folder = os.path.join(checkpoint_dir, name)
        if os.path.isfile(os.path.join(folder, ".metadata")):
            check_dcp_folder(folder)


def _refuse(path: str, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path} holds {what}, which a checkpoint written by raytrainer does not: it is not unpickled (a crafted "
        f"file would run code). {_FIX}"
    )


def _files_under(folder: str) -> list[str]:
    """Every file below folder; a symlink (which could lead out of the checkpoint) is refused."""
    found = []
    for root, dirs, names in os.walk(folder):
        for name in sorted(dirs + names):
            path = os.path.join(root, name)
            if os.path.islink(path):
                raise UnsafeCheckpointError(f"{path} is a symbolic link; a checkpoint's files must be inside it. {_FIX}")
            if name in names:
                found.append(path)
    return sorted(found)


# ------------------------------------------------------------------------------------------ DeepSpeed
def deepspeed_tag(checkpoint_dir: str, universal: bool = False, fs=None) -> str | None:
    """The DeepSpeed tag a resume loads, passed as `tag=` so DeepSpeed never follows `latest` itself: a
    `global_step<N>` folder directly inside checkpoint_dir. `latest` (or `latest_universal`), when present,
    must name such a folder; without it the folder of the checkpoint's own step, or the only one. None: no
    DeepSpeed state. `fs`: a pyarrow filesystem (checkpoint_dir a path in it); local disk when None."""
    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()
    root = checkpoint_dir.rstrip("/") if not isinstance(fs, pafs.LocalFileSystem) else os.path.abspath(checkpoint_dir)
    pattern = _UNIVERSAL_TAG if universal else DEEPSPEED_TAG
    entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    tags = sorted(os.path.basename(e.path) for e in entries
                  if e.type == pafs.FileType.Directory and pattern.match(os.path.basename(e.path)))
    latest = f"{root}/{'latest_universal' if universal else 'latest'}"
    kind = fs.get_file_info(latest).type
    if kind != pafs.FileType.NotFound:
        if kind != pafs.FileType.File or (isinstance(fs, pafs.LocalFileSystem) and os.path.islink(latest)):
            raise UnsafeCheckpointError(f"{latest} is not a plain file (a folder or a symbolic link); DeepSpeed's "
                                        f"latest must be a file naming a tag. {_FIX}")
        with fs.open_input_stream(latest) as f:
            named = f.read(200).decode("utf-8", errors="replace").strip()
        if not pattern.match(named) or named not in tags:
            raise UnsafeCheckpointError(
                f"{latest} names the DeepSpeed tag {named!r}; raytrainer loads only a {pattern.pattern} folder "
                f"directly inside the checkpoint (here: {tags or 'none'}), so it does not follow it. Write the "
                f"tag's folder name into {os.path.basename(latest)}, or {_FIX[0].lower() + _FIX[1:]}")
        tag = named
    else:
        own = f"global_step{checkpoint_step(root)}" + ("_universal" if universal else "")
        tag = own if own in tags else (tags[0] if len(tags) == 1 else None)
        if tag is None and tags:
            raise UnsafeCheckpointError(f"{root} holds several DeepSpeed tags {tags} and no latest file naming one. "
                                        f"Remove the others, or write the tag to load into {latest}.")
    if tag is not None and isinstance(fs, pafs.LocalFileSystem) and os.path.islink(f"{root}/{tag}"):
        raise UnsafeCheckpointError(f"{root}/{tag} is a symbolic link; a checkpoint's files must be inside it. {_FIX}")
    return tag


def _deepspeed_globals() -> list:
    allowed = []
    for dotted in _DEEPSPEED_GLOBALS:
        module, name = dotted.rsplit(".", 1)
        try:
            allowed.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):  # no DeepSpeed here: then nothing may name its classes
            pass
    return allowed


def safe_deepspeed_load(path, map_location=None):
    """DeepSpeed's checkpoint_engine.load, weights-only: installed on the engine before load_checkpoint."""
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            # mmap: tensors stay on disk (a torch zip); a legacy/plain pickle is read as is
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=isinstance(path, (str, os.PathLike)) and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise _refuse(str(path), _global_of(e)) from None


@contextlib.contextmanager
def refusal_named(where: str):
    """torch's weights-only refusal raised again, the same type and words, plus the checkpoint it came from
    (transformers' load of the best model names no file)."""
    try:
        yield
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(
            f"{e}\nraytrainer: refused while loading the best model from {where}: a file there holds pickle data "
            "that raytrainer and transformers do not write (a crafted file would run code). Remove that checkpoint, "
            "or set load_best_model_at_end=False.") from None


def _global_of(error: Exception) -> str:
    named = re.search(r"(?:Unsupported global|Trying to load unsupported GLOBAL).*?(GLOBAL [\w.]+)", str(error)) or \
        re.search(r"(GLOBAL [\w.]+)", str(error))
    return named.group(1) if named else "pickle data that weights-only loading refuses"


def _check_deepspeed_file(path: str) -> None:
    safe_deepspeed_load(path, map_location="cpu")


# ------------------------------------------------------------------------------------------ DCP
class _DcpUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _DCP_OTHER or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if module in _DCP_MODULES:  # only the classes DCP defines there (not the functions it imports)
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:
                return found
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def read_dcp_metadata(path: str):
    """A DCP `.metadata` file, unpickled with DCP's own classes only."""
    with open(path, "rb") as f:
        try:
            return _DcpUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise _refuse(path, str(e)) from None


def load_dcp_bytes(data: io.BytesIO, where: str):
    """One DCP byte item (torch.save'd: optimizer param_groups values...), weights-only."""
    try:
        return torch.load(data, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refuse(where, _global_of(e)) from None


def check_dcp_folder(folder: str) -> None:
    """`.metadata`, and every byte item of the `.distcp` files it lists, before DCP reads any of it."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    metadata = read_dcp_metadata(os.path.join(folder, ".metadata"))
    for info in (metadata.storage_data or {}).values():
        _check_relative(folder, info.relative_path)
    for fqn, item in metadata.state_dict_metadata.items():
        if not isinstance(item, BytesStorageMetadata):
            continue
        info = metadata.storage_data.get(MetadataIndex(fqn))
        if info is None or getattr(info, "transform_descriptors", None):
            continue  # none listed / compressed: SafeLoadPlanner checks it as DCP reads it
        path = os.path.join(folder, info.relative_path)
        with open(path, "rb") as f:
            f.seek(info.offset)
            load_dcp_bytes(io.BytesIO(f.read(info.length)), f"{path} (item {fqn})")


def _check_relative(folder: str, relative: str) -> None:
    if os.path.basename(relative) != relative or relative in ("", ".", ".."):
        raise UnsafeCheckpointError(f"{folder}/.metadata names the data file {relative!r}, which is not a file "
                                    f"directly inside {folder}. {_FIX}")
    if os.path.islink(os.path.join(folder, relative)):
        raise UnsafeCheckpointError(f"{folder}/{relative} is a symbolic link; a checkpoint's files must be "
                                    f"inside it. {_FIX}")


def safe_dcp_load(state_dict: dict, folder: str, no_dist: bool = False) -> None:
    """`dcp.load` with the metadata read by _DcpUnpickler and byte items loaded weights-only (no_dist: this
    process reads what state_dict asks for alone, whatever process group exists)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state_dict, storage_reader=_safe_reader(folder), planner=_safe_planner(folder), no_dist=no_dist)
    except CheckpointException as e:  # DCP gathers each rank's error: ours is raised as itself, once
        for failure in e.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else getattr(failure, "exc", failure)
            if isinstance(inner, UnsafeCheckpointError):
                raise UnsafeCheckpointError(str(inner)) from None
        raise


def _safe_reader(folder: str):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_dcp_metadata(os.path.join(folder, ".metadata"))
            for info in (metadata.storage_data or {}).values():
                _check_relative(folder, info.relative_path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(folder)


def _safe_planner(folder: str):
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            info = (self.metadata.storage_data or {}).get(read_item.storage_index)
            path = os.path.join(folder, info.relative_path) if info is not None else folder
            loaded = load_dcp_bytes(value, f"{path} (item {read_item.storage_index.fqn})")
            if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes, without its weights_only=False
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafeLoadPlanner()
