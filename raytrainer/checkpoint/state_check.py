"""trainer_state.json of a checkpoint about to be resumed, checked before anything reads it.

transformers builds `TrainerState(**json.load(f))`: an unknown key is a TypeError from a dataclass, a
string step fails deep in the loop, and `best_model_checkpoint` is a path that `load_best_model_at_end`
opens later. A checkpoint may come from elsewhere (a shared bucket, a download), so each value is
checked against its field, and the best-checkpoint path must name a `checkpoint-<step>` folder without
climbing out of its run folder. Errors name the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from transformers import TrainerState

from .layout import TRAINER_STATE, checkpoint_step

_FIELDS = {f.name: f for f in dataclasses.fields(TrainerState)}
# JSON types each field may hold (None only where transformers allows it)
_INT, _NUM = (int,), (int, float)
_EXPECTED: dict[str, tuple] = {
    "epoch": _NUM + (type(None),), "global_step": _INT, "max_steps": _INT, "logging_steps": _NUM,
    "eval_steps": _NUM, "save_steps": _NUM, "train_batch_size": _INT + (type(None),), "num_train_epochs": _NUM,
    "num_input_tokens_seen": _INT, "total_flos": _NUM, "log_history": (list,), "best_metric": _NUM + (type(None),),
    "best_global_step": _INT + (type(None),), "best_model_checkpoint": (str, type(None)),
    "is_local_process_zero": (bool,), "is_world_process_zero": (bool,), "is_hyper_param_search": (bool,),
    "trial_name": (str, type(None)), "trial_params": (dict, type(None)), "stateful_callbacks": (dict, list, type(None)),
}
_NON_NEGATIVE = ("global_step", "max_steps", "num_input_tokens_seen", "train_batch_size", "best_global_step")


def check_trainer_state_text(text: str, where: str) -> dict:
    """The parsed state, or ValueError naming `where` (the file) and what is wrong."""
    fix = "; resume from another checkpoint, or restore this file from the run that wrote it."
    try:
        state = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where} is not valid JSON ({e}){fix}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{where} must hold a JSON object, not {type(state).__name__}{fix}")
    unknown = sorted(set(state) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; transformers' TrainerState has "
                         f"{sorted(_FIELDS)}{fix}")
    if "global_step" not in state:
        raise ValueError(f"{where}: no global_step{fix}")
    for key, value in state.items():
        expected = _EXPECTED.get(key)
        if expected is None:  # a field added by a newer transformers: its own dataclass checks it
            continue
        ok = isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)
        if ok and isinstance(value, float) and not math.isfinite(value) and key != "best_metric":
            ok = False
        if ok and key in _NON_NEGATIVE and value is not None and value < 0:
            ok = False
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in expected)
            raise ValueError(f"{where}: {key}={value!r} must be {names}"
                             f"{' >= 0' if key in _NON_NEGATIVE else ''}{fix}")
    if not all(isinstance(entry, dict) for entry in state.get("log_history", [])):
        raise ValueError(f"{where}: log_history must be a list of objects{fix}")
    best = state.get("best_model_checkpoint")
    if best is not None and (checkpoint_step(best) is None or ".." in best.replace("\\", "/").split("/")):
        raise ValueError(f"{where}: best_model_checkpoint={best!r} must be the path of a checkpoint-<step> "
                         f"folder of this run{fix}")
    return state


def check_checkpoint_state(checkpoint_dir: str) -> dict:
    """Check `<checkpoint_dir>/trainer_state.json` on local disk (absent: transformers' own message later)."""
    path = os.path.join(checkpoint_dir, TRAINER_STATE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return check_trainer_state_text(f.read(), path)


def check_state_in_storage(fs, checkpoint: str) -> None:
    """The same check for a checkpoint in storage (a pyarrow filesystem path, e.g. a bucket)."""
    path = f"{checkpoint}/{TRAINER_STATE}"
    if fs.get_file_info(path).type.name != "File":
        raise ValueError(f"{checkpoint}: no {TRAINER_STATE}, so not a complete checkpoint; resume from another one.")
    with fs.open_input_stream(path) as f:
        check_trainer_state_text(f.read().decode("utf-8", errors="replace"), path)
