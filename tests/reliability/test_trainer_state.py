"""A checkpoint's trainer_state.json is checked before a resume reads it: each malformed value is named
(file, key, fix) on the driver, and best_model_checkpoint cannot point outside the run."""

from __future__ import annotations

import json
import os

import pytest
from pyarrow import fs as pafs

import raytrainer
from raytrainer.checkpoint.state_check import check_state_in_storage

try:
    from tests.helpers import lm_examples, tiny_gpt2
except ImportError:
    from helpers import lm_examples, tiny_gpt2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("state") / "run"
    args = raytrainer.TrainingArguments(output_dir=str(out), max_steps=2, save_steps=2, per_device_train_batch_size=4,
                                        report_to="none", disable_tqdm=True)
    raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8)).train()
    return os.path.join(out, "checkpoint-2")


CORRUPTIONS = [
    (lambda s: {**s, "global_step": "2"}, r"global_step='2' must be int >= 0"),
    (lambda s: {**s, "global_step": -1}, r"global_step=-1 must be int >= 0"),
    (lambda s: {k: v for k, v in s.items() if k != "global_step"}, "no global_step"),
    (lambda s: {**s, "steps_done": 2}, r"unknown key\(s\) \['steps_done'\]"),
    (lambda s: {**s, "log_history": ["loss 1.0"]}, "log_history must be a list of objects"),
    (lambda s: {**s, "best_model_checkpoint": "../../../etc"}, "best_model_checkpoint='../../../etc' must be"),
    (lambda s: {**s, "best_model_checkpoint": "/x/checkpoint-2/../../../etc/checkpoint-1"}, "must be the path"),
    (lambda s: [s], "must hold a JSON object"),
]


@pytest.mark.parametrize("corrupt,message", CORRUPTIONS)
def test_resume_names_what_is_wrong_in_trainer_state(checkpoint, tmp_path, corrupt, message):
    import shutil

    bad = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(checkpoint, bad)
    state = json.loads((bad / "trainer_state.json").read_text())
    (bad / "trainer_state.json").write_text(json.dumps(corrupt(state)))
    args = raytrainer.TrainingArguments(output_dir=str(tmp_path / "next"), max_steps=4, per_device_train_batch_size=4,
                                        report_to="none", disable_tqdm=True)
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8))
    with pytest.raises(ValueError, match=message) as info:
        trainer.train(resume_from_checkpoint=str(bad))
    assert "trainer_state.json" in str(info.value) and trainer.state.global_step == 0


def test_not_json_and_a_checkpoint_in_storage(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, bad)
    (bad / "trainer_state.json").write_text('{"global_step": 2,')
    local = pafs.LocalFileSystem()
    with pytest.raises(ValueError, match="is not valid JSON"):
        check_state_in_storage(local, str(bad))
    check_state_in_storage(local, checkpoint)  # the intact one passes
    (bad / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        check_state_in_storage(local, str(bad))
