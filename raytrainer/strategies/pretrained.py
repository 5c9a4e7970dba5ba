"""Sharded loading: a model_init's `from_pretrained(folder)` under fsdp or ZeRO-3, each rank reading its slices.

Without this, rank 0 builds the whole model (reading every weight) and broadcasts it into the shards
(build.py): at 70B more memory than a node has. Here every rank builds the same meta skeleton, FSDP2 shards
it, and each rank reads its own slices of each tensor from the safetensors files (torch's DCP
`HuggingFaceStorageReader`: `safe_open(...).get_slice(name)[rows]`). No rank reads or holds a full tensor.

The skeleton comes from transformers' own `from_pretrained`, run with its weight reading swapped for the
files' headers (`pretrained_on_meta`): the class, config, dtype, `_keep_in_fp32_modules`, tied weights,
attention implementation and non-persistent buffers (rotary `inv_freq`) are exactly what from_pretrained
gives; only the parameters stay on the meta device. transformers' loader still matches the headers' keys to
the model's, so its report (missing, unexpected, mismatched keys) is known before any weight is read.

Sharded loading applies when it can give from_pretrained's weights bit for bit: one from_pretrained call
whose model model_init returns as is, safetensors files in one folder, every state-dict entry found in
them under its own name with its shape (a tied entry through the tensor it shares), nothing for
from_pretrained to initialise. Otherwise `sharded_source` says why, and build.py falls back to rank 0's
full build with one warning.

ZeRO-3 partitions a parameter by its flattened elements (rank r holds [r*size, (r+1)*size), the last padded),
not by rows: every rank builds under zero.Init with from_pretrained reading nothing (`pretrained_without_weights`),
then `load_zero3_partitions` reads the rows that hold its range (at most one partial row more at each end) and
copies the range into the partition zero.Init allocated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os

import torch

logger = logging.getLogger("raytrainer")


@dataclasses.dataclass
class PretrainedSource:
    """Where a skeleton's weights are: the safetensors files from_pretrained resolved (one folder)."""

    folder: str
    files: list[str]


@dataclasses.dataclass
class _Call:
    model: torch.nn.Module | None = None
    files: list[str] | None = None
    loading_info: object = None


@contextlib.contextmanager
def pretrained_on_meta():
    """While active, `PreTrainedModel.from_pretrained` returns its model with every parameter on the meta
    device, having read only the checkpoint's headers. Yields the list of calls made (a `_Call` each).

    from_pretrained refuses a meta device context (it wants to load weights), so it runs under a CPU one;
    it builds on meta by itself and its loader (`_load_pretrained_model`) gets header-only meta tensors and
    a meta device map: the keys are matched and reported as usual, nothing is read or allocated."""
    from transformers import PreTrainedModel

    calls: list[_Call] = []
    from_pretrained = PreTrainedModel.__dict__["from_pretrained"]
    load = PreTrainedModel.__dict__["_load_pretrained_model"]

    def meta_from_pretrained(cls, *args, **kwargs):
        call = _Call()
        calls.append(call)
        with torch.device("cpu"):  # the innermost device context wins over the caller's meta one
            model = from_pretrained.__func__(cls, *args, **kwargs)
        call.model = model[0] if isinstance(model, tuple) else model  # output_loading_info=True
        return model

    def meta_load(model, state_dict, checkpoint_files, load_config, expected_keys=None):
        call = calls[-1] if calls else _Call()
        call.files = list(checkpoint_files or [])
        if state_dict is None and call.files and all(f.endswith(".safetensors") for f in call.files):
            state_dict = header_tensors(call.files)
        else:
            call.files = None  # .bin / gguf / a given state dict: no lazy slices to read; not sharded-loadable
        meta = dataclasses.replace(load_config, device_map={"": torch.device("meta")})
        info = load.__func__(model, state_dict, checkpoint_files, meta, expected_keys)
        call.loading_info = info[0]
        return info

    PreTrainedModel.from_pretrained = classmethod(meta_from_pretrained)
    PreTrainedModel._load_pretrained_model = staticmethod(meta_load)
    try:
        yield calls
    finally:
        PreTrainedModel.from_pretrained = from_pretrained
        PreTrainedModel._load_pretrained_model = load


def header_tensors(files: list[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files as an empty meta tensor of its shape and dtype (headers only)."""
    from safetensors import safe_open
    from safetensors.torch import _getdtype

    out = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                view = f.get_slice(key)
                out[key] = torch.empty(view.get_shape(), dtype=_getdtype(view.get_dtype()), device="meta")
    return out


def meta_build(build):
    """`build()` on the meta device, a model_init calling from_pretrained included (the driver's skeleton,
    a worker's __init__-time build, the fsdp skeleton)."""
    with torch.device("meta"), pretrained_on_meta() as calls:
        model = build()
    return model, calls


def sharded_source(model, calls: list[_Call]) -> tuple[PretrainedSource | None, str]:
    """(where to read `model`'s weights slice by slice, "") or (None, why it cannot be)."""
    if not calls:
        return None, "model_init does not call from_pretrained"
    if len(calls) > 1:
        return None, f"model_init calls from_pretrained {len(calls)} times"
    call = calls[0]
    if call.model is not model:
        return None, "model_init returns another model than from_pretrained's (wrapped or changed)"
    if not call.files:
        return None, "the checkpoint is not safetensors files"
    info = call.loading_info
    for field in ("missing_keys", "unexpected_keys", "mismatched_keys", "conversion_errors"):
        if getattr(info, field, None):
            return None, f"from_pretrained reports {field.replace('_', ' ')}: {sorted(getattr(info, field))[:5]}"
    folder = os.path.dirname(os.path.abspath(call.files[0]))
    files = sorted(os.path.abspath(f) for f in call.files)
    # DCP's reader takes a folder and reads every .safetensors file in it
    if sorted(os.path.abspath(f) for f in glob.glob(os.path.join(folder, "*.safetensors"))) != files:
        return None, f"{folder} holds other .safetensors files than the checkpoint's"
    headers = header_tensors(files)
    state = model.state_dict(keep_vars=True)
    in_file = {id(t) for k, t in state.items() if k in headers}
    for key, tensor in state.items():
        if key in headers:
            if tuple(headers[key].shape) != tuple(tensor.shape):
                return None, f"{key}: shape {tuple(headers[key].shape)} in the file, {tuple(tensor.shape)} in the model"
        elif id(tensor) not in in_file:  # a tied entry (lm_head.weight) is filled through the tensor it shares
            return None, f"{key} is not in the checkpoint under that name (renamed or converted on load)"
    return PretrainedSource(folder, files), ""


def load_fsdp_shards(model, source: PretrainedSource, device: torch.device) -> dict:
    """After fully_shard on the skeleton: allocate this rank's shards and read exactly their slices.
    Returns {"bytes_read": ..., "bytes_total": ...} for this rank (the files' tensors it read)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    # non-persistent buffers are real on the skeleton (from_pretrained computed them); to_empty drops them
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    state = get_model_state_dict(model)  # this rank's DTensor shards, plus the (unsharded) persistent buffers
    reader = SliceReader(source.folder)
    # a tied entry is not in the files: partial, and sharded_source checked it shares a tensor that is
    dcp.load(state, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(model, state)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in buffers:
                buf.copy_(buffers[name].to(buf.device))
    total = sum(t.numel() * t.element_size() for t in header_tensors(source.files).values())
    logger.info("raytrainer: fsdp sharded loading: this rank read %.1f of the %.1f MB in %s", reader.bytes_read / 2**20,
                total / 2**20, source.folder)
    return {"bytes_read": reader.bytes_read, "bytes_total": total}


def _reader_base():
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    return HuggingFaceStorageReader


class SliceReader(_reader_base()):
    """torch's safetensors reader (each request one `get_slice(name)[rows]`), reading with pread instead of
    mmap: a rank's memory then holds its shards and one slice in transit, not the mapped pages of every slice
    it read (mmap's pages count in its RSS until the file is closed). Counts the bytes this rank reads."""

    def __init__(self, path: str):
        super().__init__(path)
        self.bytes_read = 0

    def read_data(self, plan, planner):
        from torch.futures import Future

        from safetensors import safe_open

        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in per_file.items():
            with _open(safe_open, name) as f:
                for item in items:
                    self._process_read_request(f, item, planner)
        done: Future = Future()
        done.set_result(None)
        return done

    def _process_read_request(self, f, req, planner):
        self.bytes_read += _nbytes(req.lengths, self.storage_data[req.storage_index].dtype)
        super()._process_read_request(f, req, planner)


def _open(safe_open, name: str):
    try:
        return safe_open(name, framework="pt", backend="pread")
    except TypeError:  # safetensors < 0.7 has mmap only
        return safe_open(name, framework="pt")


def _nbytes(lengths, dtype) -> int:
    n = 1
    for length in lengths:
        n *= int(length)
    return n * torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------------ ZeRO-3
@contextlib.contextmanager
def pretrained_without_weights():
    """While active, `PreTrainedModel.from_pretrained` under ZeRO-3 (transformers' zero.Init path) builds its
    partitioned model and reads no weight: every entry is marked initialised (so nothing is drawn or gathered
    to initialise it) and `load_zero3_partitions` fills the partitions from the files afterwards.
    Yields the list of models built."""
    from transformers import PreTrainedModel
    from transformers.utils.loading_report import LoadStateDictInfo

    built: list = []
    load = PreTrainedModel.__dict__["_load_pretrained_model"]

    def no_load(model, state_dict, checkpoint_files, load_config, expected_keys=None):
        built.append(model)
        for tensor in model.state_dict(keep_vars=True).values():
            tensor._is_hf_initialized = True
        # sharded_source read the same files' headers on the skeleton: no key missing, unexpected or mismatched
        return LoadStateDictInfo(missing_keys=set(), unexpected_keys=set(), mismatched_keys=set(), error_msgs=[],
                                 conversion_errors={}, skipped_pp_keys=set()), None

    PreTrainedModel._load_pretrained_model = staticmethod(no_load)
    try:
        yield built
    finally:
        PreTrainedModel._load_pretrained_model = load


def load_zero3_partitions(model, source: PretrainedSource, skeleton) -> dict:
    """Into every ZeRO-3 parameter's partition (`ds_tensor`: elements [rank*size, (rank+1)*size) of the
    flattened tensor), exactly its slice of the files: the rows that hold it (`get_slice(name)[r0:r1]`, at most
    one partial row more at each end). Persistent buffers are read whole (ZeRO-3 does not partition them);
    non-persistent ones are the skeleton's (from_pretrained computed them). Returns this rank's bytes read."""
    from deepspeed import comm
    from safetensors import safe_open

    state = model.state_dict(keep_vars=True)
    file_of = _file_of_keys(source.files)
    key_of: dict[int, str] = {}  # a tied parameter is read once, through a name the files hold
    for key, tensor in state.items():
        if key in file_of:
            key_of.setdefault(id(tensor), key)
    reads: dict[str, list] = {}
    for _, param in model.named_parameters():
        reads.setdefault(file_of[key_of[id(param)]], []).append((key_of[id(param)], param))
    skeleton_buffers = dict(skeleton.named_buffers())
    buffers = []
    for name, buf in model.named_buffers():
        if name in file_of:
            reads.setdefault(file_of[name], []).append((name, buf))
        else:
            buffers.append((name, buf))
    bytes_read = 0
    with torch.no_grad():
        for path, items in reads.items():
            with _open(safe_open, path) as f:
                for key, tensor in items:
                    if hasattr(tensor, "ds_tensor"):
                        rank = comm.get_rank(group=tensor.ds_process_group)
                        bytes_read += _read_partition(f, key, tensor.ds_tensor, tensor.ds_numel, rank)
                    else:
                        value = f.get_tensor(key)
                        bytes_read += value.numel() * value.element_size()
                        tensor.copy_(value)
        for name, buf in buffers:
            buf.copy_(skeleton_buffers[name])
    total = sum(t.numel() * t.element_size() for t in header_tensors(source.files).values())
    logger.info("raytrainer: ZeRO-3 sharded loading: this rank read %.1f of the %.1f MB in %s", bytes_read / 2**20,
                total / 2**20, source.folder)
    return {"bytes_read": bytes_read, "bytes_total": total}


def _read_partition(f, key: str, partition: torch.Tensor, numel: int, rank: int) -> int:
    """Elements [rank*size, rank*size + size) of `key` flattened (size = the partition's; the last rank's is
    padded past numel) into `partition`, reading only the rows that hold them. Returns the bytes read."""
    size = partition.numel()
    start, end = rank * size, min((rank + 1) * size, numel)
    if end <= start:
        return 0  # more ranks than elements: this partition is padding only
    view = f.get_slice(key)
    shape = view.get_shape()
    if not shape:
        flat, offset = f.get_tensor(key).reshape(-1), start
    else:
        row = 1
        for length in shape[1:]:
            row *= int(length)
        first, last = start // row, -(-end // row)
        flat, offset = view[first:last].reshape(-1), start - first * row
    partition[: end - start].copy_(flat[offset: offset + end - start])
    return flat.numel() * flat.element_size()


def _file_of_keys(files: list[str]) -> dict[str, str]:
    from safetensors import safe_open

    out = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), path))
    return out
