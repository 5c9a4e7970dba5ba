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
import posixpath

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


def check_trainer_state_text(text: str, where: str, run_dir: str | None = None, local: bool = True) -> dict:
    """The parsed state, or ValueError naming `where` (the file) and what is wrong. `run_dir`: the folder
    best_model_checkpoint must sit directly in (default: the folder holding the checked checkpoint);
    `local`: paths on this machine (relative ones resolve against the working directory), else storage paths."""
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
    if run_dir is None:  # <run>/checkpoint-N/trainer_state.json
        run_dir = os.path.dirname(os.path.dirname(where)) if local else posixpath.dirname(posixpath.dirname(where))
    if best is not None and not checkpoint_in_run(best, run_dir, local):
        raise ValueError(f"{where}: best_model_checkpoint={best!r} must be the path of a checkpoint-<step> "
                         f"folder directly inside this run's folder {run_dir!r} (not an absolute path elsewhere, "
                         f"'..', or another bucket); set it to {_join(run_dir, 'checkpoint-<step>', local)!r} or "
                         f"null{fix}")
    return state


def checkpoint_in_run(path: str | None, run_dir: str, local: bool = True) -> bool:
    """True when `path` names a `checkpoint-<step>` folder directly inside `run_dir` (no '..' anywhere, no
    other scheme or bucket). `local`: both are paths on this machine; else paths in a storage filesystem."""
    if not isinstance(path, str) or checkpoint_step(path) is None or "\x00" in path:
        return False
    parts = path.replace("\\", "/").split("/")
    if ".." in parts or "://" in path:
        return False
    if local:
        return os.path.dirname(os.path.abspath(path)) == os.path.abspath(run_dir)
    return posixpath.dirname(posixpath.normpath(path)) == posixpath.normpath(run_dir.rstrip("/"))


def _join(run_dir: str, name: str, local: bool) -> str:
    return os.path.join(run_dir, name) if local else posixpath.join(run_dir, name)


def check_checkpoint_state(checkpoint_dir: str, run_dir: str | None = None, local: bool = True) -> dict:
    """Check `<checkpoint_dir>/trainer_state.json` on local disk (absent: transformers' own message later).
    `run_dir` / `local`: where best_model_checkpoint must be (a downloaded copy: its folder in storage)."""
    path = os.path.join(checkpoint_dir, TRAINER_STATE)
    if not os.path.isfile(path):
        return {}
    if run_dir is None:
        run_dir = os.path.dirname(os.path.abspath(checkpoint_dir))
    with open(path, encoding="utf-8") as f:
        return check_trainer_state_text(f.read(), path, run_dir, local)


def check_state_in_storage(fs, checkpoint: str) -> None:
    """The same check for a checkpoint in storage (a pyarrow filesystem path, e.g. a bucket)."""
    import pyarrow.fs as pafs

    path = f"{checkpoint}/{TRAINER_STATE}"
    if fs.get_file_info(path).type.name != "File":
        raise ValueError(f"{checkpoint}: no {TRAINER_STATE}, so not a complete checkpoint; resume from another one.")
    with fs.open_input_stream(path) as f:
        text = f.read().decode("utf-8", errors="replace")
    local = isinstance(fs, pafs.LocalFileSystem)
    check_trainer_state_text(text, path, posixpath.dirname(checkpoint.rstrip("/")), local)
