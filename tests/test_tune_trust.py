"""A sweep trusts nothing it reads back (issue 19): BestRun's checkpoint stays inside the trial's run folder, and a
multi-worker trial's pointer folders do not pile up in /tmp. No Ray session: the functions run_trial uses."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile

import pytest

from raytrainer.tune.search import best_checkpoint_of
from raytrainer.tune.trial import CheckpointPointer


def _checkpoint(run_dir, step, best=None):
    folder = os.path.join(run_dir, f"checkpoint-{step}")
    os.makedirs(folder)
    open(os.path.join(folder, "model.safetensors"), "wb").close()
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step, "best_model_checkpoint": best}, f)
    return folder


@pytest.mark.parametrize("where", ["other_trial", "dotdot", "absolute_elsewhere"])
def test_best_run_never_names_a_checkpoint_outside_the_trial(tmp_path, where, caplog):
    run_dir = str(tmp_path / "sweep" / "trial_1")
    other = _checkpoint(str(tmp_path / "sweep" / "trial_2"), 1)  # exists: the old check (isdir) took it
    best = {"other_trial": other, "dotdot": os.path.join(run_dir, "..", "trial_2", "checkpoint-1"),
            "absolute_elsewhere": other.replace(str(tmp_path), str(tmp_path / "elsewhere"))}[where]
    if where == "absolute_elsewhere":
        shutil.copytree(other, best)
    latest = _checkpoint(run_dir, 4, best=best)
    assert os.path.isdir(best)
    assert best_checkpoint_of(run_dir) == latest
    assert "not a checkpoint-<step> folder directly inside the trial's run folder" in caplog.text


def test_best_run_names_the_trials_own_best(tmp_path):
    run_dir = str(tmp_path / "trial_1")
    best = _checkpoint(run_dir, 2)
    _checkpoint(run_dir, 4, best=best)
    assert best_checkpoint_of(run_dir) == best


def _pointers():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "raytrainer-pointer-*")))


def test_a_pointer_folder_lives_only_while_tune_copies_it(tmp_path):
    before = _pointers()
    pointers = CheckpointPointer(str(tmp_path), None, "trial_1")
    with pointers.to_tune(f"{tmp_path}/sweep/trial_1/checkpoint-2", 2) as checkpoint:
        with open(os.path.join(checkpoint.path, CheckpointPointer.FILE)) as f:
            assert json.load(f) == {"path": f"{tmp_path}/sweep/trial_1/checkpoint-2", "step": 2, "trial": "trial_1"}
    with pytest.raises(RuntimeError, match="report failed"):
        with pointers.to_tune(f"{tmp_path}/sweep/trial_1/checkpoint-4", 4):
            raise RuntimeError("report failed")
    assert _pointers() == before
