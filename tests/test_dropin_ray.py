"""Drop-in under Ray (issue 18, item 6): what transformers.Trainer does to stateful callbacks on resume, the
driver's Trainer does after a Ray run too.

transformers' restore_callback_states_from_checkpoint=True rebuilds each ExportableState callback
(EarlyStoppingCallback) from the checkpoint's trainer_state.json, and warns about a saved state with no
callback. One checkpoint (transformers, in-process) is resumed by transformers, by raytrainer in-process and
by raytrainer on 1 Ray worker (the same batch) and on 2 (the same global batch); each ends with the checkpoint's patience in its callback list
and the warning printed in the driver's process.
"""

from __future__ import annotations

import logging

import pytest
import transformers
from transformers.trainer_callback import ExportableState

import raytrainer
from tests.helpers import lm_examples, make_args, tiny_gpt2

ARGS = dict(per_device_train_batch_size=4, gradient_accumulation_steps=1, eval_strategy="steps", eval_steps=2,
            save_strategy="steps",
            save_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss")


class GoneCallback(transformers.TrainerCallback, ExportableState):
    """Saved with the checkpoint, absent from the resumed run: transformers warns about it."""

    def state(self):
        return {"args": {}, "attributes": {}}


@pytest.fixture(scope="module")
def checkpoint2(tmp_path_factory):
    out = tmp_path_factory.mktemp("first")
    args = make_args(transformers.TrainingArguments, out, max_steps=2, **ARGS)
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(16),
                                   eval_dataset=lm_examples(4, seed=3),
                                   callbacks=[transformers.EarlyStoppingCallback(early_stopping_patience=5),
                                              GoneCallback()])
    trainer.train()
    return str(out / "checkpoint-2")


class ShouldSaveCounter(transformers.TrainerCallback):
    """What callbacks see of the control flags: should_save in on_step_end and on_epoch_end."""

    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(("step_end", state.global_step, control.should_save))

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seen.append(("epoch_end", state.global_step, control.should_save))


def resume(mod, out, checkpoint, **extra):
    args = make_args(mod.TrainingArguments, out, max_steps=4, restore_callback_states_from_checkpoint=True,
                     **{**ARGS, **extra})
    trainer = mod.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(16),
                          eval_dataset=lm_examples(4, seed=3),
                          callbacks=[ShouldSaveCounter(), transformers.EarlyStoppingCallback()])
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer


def restored(trainer):
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, transformers.EarlyStoppingCallback)]
    assert len(found) == 1
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    return found[0].early_stopping_patience, names


def counter(trainer) -> ShouldSaveCounter:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ShouldSaveCounter))


class Captured(logging.Handler):
    """transformers' loggers do not propagate to the root logger (caplog): captured on theirs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def warned(self) -> list[str]:
        return [m for m in self.messages if "Checkpoint included callbacks not included" in m]


@pytest.fixture
def transformers_log(monkeypatch):
    handler = Captured()
    logger = logging.getLogger("transformers")
    # warnings reach the handler whatever an earlier test left: transformers' verbosity, a dedup filter (log_filter.py)
    monkeypatch.setattr(logger, "filters", [])
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    transformers.logging.set_verbosity(verbosity)


@pytest.mark.ray
def test_callback_states_restore_on_the_driver_as_in_transformers(ray_cluster, checkpoint2, tmp_path,
                                                                   transformers_log, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hf = resume(transformers, tmp_path / "hf", checkpoint2)
    assert transformers_log.warned() and "GoneCallback" in transformers_log.warned()[0]
    expected = restored(hf)
    assert expected[0] == 5
    # 2 workers take half the batch each: the same global batch (the saved global_step places the resume)
    for extra in ({}, {"num_workers": 1}, {"num_workers": 2, "per_device_train_batch_size": 2}):
        transformers_log.messages.clear()
        rt = resume(raytrainer, tmp_path / f"rt{extra.get('num_workers', 0)}", checkpoint2, **extra)
        assert rt.state.global_step == hf.state.global_step == 4
        assert restored(rt)[0] == 5, extra
        # transformers' order: the restored callback last; display callbacks stay where they were on the driver
        assert restored(rt)[1] == expected[1], (extra, restored(rt)[1], expected[1])
        assert transformers_log.warned() and "GoneCallback" in transformers_log.warned()[0], extra
        # the driver's callbacks hold rank 0's state: the control flags each event saw, as under transformers
        assert counter(rt).seen == counter(hf).seen, extra
