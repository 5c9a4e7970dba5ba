"""Rank 0's observable state after a Ray run, poured back into the driver's own objects.

Callbacks run on every rank, as under torchrun (TrainerControl works, and rank-gated callbacks such as
MLflow's act once). At the end rank 0 pickles its callbacks, its compute_metrics and the user attributes
(`final_state`); the driver pours that state *into its own objects* (`apply_final_state`: same objects,
updated in place), so a recorder callback or a compute_metrics closure that appends to a list holds what it
would hold after transformers' train(). `restore_callback_states` is the driver's side of
restore_callback_states_from_checkpoint.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import transformers

from .spec import is_display_callback, user_attributes

logger = logging.getLogger("raytrainer")


def final_state(trainer) -> dict:
    """Rank 0's observable state after a run, as picklable as we can make it."""
    import ray.cloudpickle as cloudpickle

    payload: dict[str, Any] = {"callbacks": [], "user_attrs": {}, "compute_metrics": None}
    for cb in trainer.callback_handler.callbacks:
        payload["callbacks"].append(_try_pickle(cb, f"callback {type(cb).__name__}", cloudpickle))
    for key, value in user_attributes(trainer).items():
        payload["user_attrs"][key] = _try_pickle(value, f"trainer.{key}", cloudpickle)
    payload["compute_metrics"] = _try_pickle(trainer.compute_metrics, "compute_metrics", cloudpickle)
    return payload


_UNPICKLABLE = object()


def _try_pickle(value, what, cloudpickle):
    try:
        cloudpickle.dumps(value)
        return value
    except Exception as e:  # noqa: BLE001 - the driver keeps its own copy of this one
        logger.warning("raytrainer: %s's final state stays on the worker (%s: %s)", what, type(e).__name__, e)
        return _UNPICKLABLE


def restore_callback_states(trainer, state_json: str) -> None:
    """resume with restore_callback_states_from_checkpoint=True: transformers' own restore, on the driver.

    transformers replaces each ExportableState callback (EarlyStoppingCallback...) by one rebuilt from the
    checkpoint's trainer_state.json, and warns about saved states without a callback. Done here, before
    the blueprint is taken, the driver holds the restored callbacks (in transformers' order) and the
    warning is printed where the user sees it; the workers restore the same state again (idempotent)."""
    import json

    saved = trainer.state
    trainer.state = transformers.TrainerState(**json.loads(state_json))
    try:
        transformers.Trainer._load_callback_state(trainer)
    finally:
        trainer.state = saved


def apply_final_state(trainer, payload: dict) -> None:
    """Pour rank 0's state into the driver's own callback objects, closures and attributes."""
    mine = [cb for cb in trainer.callback_handler.callbacks if not is_display_callback(cb)]
    theirs = [cb for cb in payload["callbacks"] if cb is not _UNPICKLABLE and not is_display_callback(cb)]
    # matched by type, in order: a callback rank 0 could not send back, or one that moved, shifts no other
    unmatched = list(mine)
    for src in theirs:
        dst = next((cb for cb in unmatched if type(cb) is type(src)), None)
        if dst is not None:
            unmatched.remove(dst)
            merge_into(dst, src)
    for key, value in payload["user_attrs"].items():
        if value is _UNPICKLABLE:
            continue
        if key in trainer.__dict__ and merge_into(trainer.__dict__[key], value):
            continue
        trainer.__dict__[key] = value
    if payload["compute_metrics"] is not _UNPICKLABLE and trainer.compute_metrics is not None:
        merge_into(trainer.compute_metrics, payload["compute_metrics"])


def merge_into(dst, src, depth: int = 0) -> bool:
    """Update dst in place from src (same shape); True when done. Identity of dst is kept, so every
    reference the user holds (a list passed to a callback, a closure's cell) sees the new contents."""
    if depth > 4 or dst is src:
        return False
    if isinstance(dst, list) and isinstance(src, list):
        dst[:] = src
        return True
    if isinstance(dst, dict) and isinstance(src, dict):
        dst.clear()
        dst.update(src)
        return True
    if isinstance(dst, set) and isinstance(src, set):
        dst.clear()
        dst.update(src)
        return True
    if isinstance(dst, types.MethodType) and isinstance(src, types.MethodType):
        return merge_into(dst.__self__, src.__self__, depth + 1)
    if isinstance(dst, types.FunctionType) and isinstance(src, types.FunctionType):
        for d_cell, s_cell in zip(dst.__closure__ or (), src.__closure__ or ()):
            try:
                d_val, s_val = d_cell.cell_contents, s_cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if not merge_into(d_val, s_val, depth + 1) and _is_plain(s_val):
                d_cell.cell_contents = s_val  # a counter rebound with `nonlocal`
        return True
    if isinstance(dst, (types.ModuleType, type, transformers.PreTrainedModel)) or not hasattr(dst, "__dict__"):
        return False
    if type(dst) is not type(src):
        return False
    for key, value in vars(src).items():
        current = vars(dst).get(key)
        if current is not None and merge_into(current, value, depth + 1):
            continue
        vars(dst)[key] = value
    return True


def _is_plain(value) -> bool:
    return isinstance(value, (int, float, str, bool, bytes, type(None), tuple))
