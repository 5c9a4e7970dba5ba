"""Full fp32 weights from a DeepSpeed checkpoint, read without unpickling unchecked data.

A ZeRO-3 checkpoint without `stage3_gather_16bit_weights_on_model_save` holds no model.safetensors: the
weights are the fp32 partitions in each rank's `zero_pp_rank_<r>_mp_rank_00_optim_states.pt`, named and
shaped by `param_shapes` in the `*_model_states.pt` files. DeepSpeed's `zero_to_fp32.py` rebuilds them, but
`torch.load(weights_only=False)`s every file. This does the same rebuild (its layout: each parameter's
partition is the next ceil(numel / world) elements of each rank's flat fp32 groups, the last rank's padded;
frozen parameters are fragments in the model files; tied ones are listed in `shared_params`) through
pickle_check's weights-only loader (`safe_deepspeed_load`): a file that needs any other class is refused.

`consolidate_deepspeed(checkpoint_dir)` is what `raytrainer consolidate` calls for such a checkpoint, and
consolidate.py's `load_deepspeed_weights` for a resume without DeepSpeed (or of a model given whole) from one.
"""

from __future__ import annotations

import math
import os
import re

import torch

from .layout import has_weights_file
from .pickle_check import deepspeed_tag, safe_deepspeed_load

_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_(model|optim)_states\.pt$")


def has_deepspeed_state(checkpoint_dir: str) -> bool:
    return deepspeed_tag(checkpoint_dir) is not None


def only_deepspeed_weights(checkpoint_dir: str) -> bool:
    """DeepSpeed state and no file transformers loads weights from (model.safetensors, pytorch_model.bin...)."""
    return os.path.isdir(checkpoint_dir) and has_deepspeed_state(checkpoint_dir) and not has_weights_file(checkpoint_dir)


def consolidate_deepspeed(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """The full weights of the DeepSpeed state in `checkpoint_dir` (its `global_step<N>/`, never a `latest`
    naming another folder), as CPU tensors named as in the model's state_dict: fp32 for ZeRO-3 (the master
    weights), the saved module's for ZeRO-0/1/2 (whole on every rank)."""
    tag = deepspeed_tag(checkpoint_dir)
    if tag is None:
        raise ValueError(f"{checkpoint_dir}: no DeepSpeed state (a global_step<N>/ folder) to consolidate")
    folder = os.path.join(checkpoint_dir, tag)
    models, optims = _rank_files(folder, "model"), _rank_files(folder, "optim")
    if not models:
        raise ValueError(f"{folder}: no *_model_states.pt")
    first = safe_deepspeed_load(models[0], map_location="cpu")
    if "param_shapes" not in first or not optims:  # ZeRO-0/1/2: every rank saved the whole module
        return {k: v.clone() for k, v in first["module"].items() if isinstance(v, torch.Tensor)}
    model_states = [first] + [safe_deepspeed_load(p, map_location="cpu") for p in models[1:]]
    world = len(optims)
    if len(model_states) != world:
        raise ValueError(f"{folder}: {len(model_states)} model state files and {world} optimizer partitions")
    state: dict[str, torch.Tensor] = {}
    buffer_names = set(first.get("buffer_names", []))
    state.update({k: v.clone() for k, v in first["module"].items() if k in buffer_names})
    _frozen(state, model_states, world)
    _trainable(state, first["param_shapes"], _flat_groups(optims, folder), world)
    for name, source in first.get("shared_params", {}).items():  # tied weights: one tensor, two names
        if source in state:
            state[name] = state[source]
    return state


def _rank_files(folder: str, kind: str) -> list[str]:
    ranked = []
    for name in os.listdir(folder):
        m = _RANK.match(name)
        if m and m.group(2) == kind:
            ranked.append((int(m.group(1)), os.path.join(folder, name)))
    ranks = [r for r, _ in sorted(ranked)]
    if ranks != list(range(len(ranks))):
        raise ValueError(f"{folder}: {kind} state files of ranks {ranks}, not 0..{len(ranks) - 1}")
    return [p for _, p in sorted(ranked)]


def _flat_groups(optims: list[str], folder: str) -> list[torch.Tensor]:
    """Each rank's fp32 partitions, its groups concatenated (the offsets run on across groups)."""
    out = []
    for path in optims:
        inner = safe_deepspeed_load(path, map_location="cpu")["optimizer_state_dict"]
        if inner.get("zero_stage") != 3:
            raise ValueError(f"{folder}: zero_stage {inner.get('zero_stage')} partitions; ZeRO-3 expected")
        groups = inner["fp32_flat_groups"]
        out.append(torch.cat([g.reshape(-1) for g in groups]) if len(groups) > 1 else groups[0].reshape(-1))
    return out


def _trainable(state: dict, param_shapes: list, flats: list[torch.Tensor], world: int) -> None:
    offset = 0
    for group in param_shapes:
        for name, shape in group.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            pieces = [flat[offset: offset + part] for flat in flats]
            state[name] = torch.cat(pieces)[:numel].view(tuple(shape)).clone()
            offset += part
    if offset != flats[0].numel():
        raise ValueError(f"the parameter shapes account for {offset} of the {flats[0].numel()} elements per rank")


def _frozen(state: dict, model_states: list, world: int) -> None:
    shapes = model_states[0].get("frozen_param_shapes") or {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        pieces = [m["frozen_param_fragments"][name].reshape(-1) for m in model_states]
        state[name] = torch.cat(pieces)[:numel].view(tuple(shape)).clone()
