"""TrainerCallback events: raytrainer calls the same events, in the same order, at the same
global steps, as transformers.Trainer for the same run (in-process, no Ray)."""

from __future__ import annotations

import inspect
from collections import Counter

import transformers

import raytrainer
from tests.helpers import clone, cls_examples, make_args, tiny_bert

EVENTS = [name for name, _ in inspect.getmembers(transformers.TrainerCallback, inspect.isfunction)
          if name.startswith("on_")]


class Recorder(transformers.TrainerCallback):
    def __init__(self):
        self.events: list[tuple[str, int]] = []


def _record(name):
    def handler(self, args, state, control, **kwargs):
        self.events.append((name, state.global_step))
    return handler


for _name in EVENTS:
    setattr(Recorder, _name, _record(_name))


def _run(cls, args_cls, out, model, **extra):
    args = make_args(args_cls, out, eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3,
                     num_train_epochs=2, **extra)
    rec = Recorder()
    trainer = cls(model=model, args=args, train_dataset=cls_examples(26), eval_dataset=cls_examples(16, seed=5),
                  callbacks=[rec])
    trainer.train()
    if hasattr(trainer, "wait_for_checkpoints"):
        trainer.wait_for_checkpoints()
    trainer.evaluate()
    trainer.predict(cls_examples(8, seed=6))
    return rec.events


def test_event_sequence_identical_to_transformers(tmp_path):
    model = tiny_bert()
    hf = _run(transformers.Trainer, transformers.TrainingArguments, tmp_path / "hf", clone(model))
    # foreground writes: on_save at transformers' very place (background: see test_background_on_save_order)
    rt = _run(raytrainer.Trainer, raytrainer.TrainingArguments, tmp_path / "rt", clone(model),
              save_in_background=False)
    counts = Counter(name for name, _ in rt)
    # 26 examples / batch 4 = 7 micro-batches per epoch, 2 accumulated per step -> 4 steps per epoch
    assert counts["on_init_end"] == 1
    assert counts["on_train_begin"] == counts["on_train_end"] == 1
    assert counts["on_epoch_begin"] == counts["on_epoch_end"] == 2
    assert counts["on_step_begin"] == counts["on_step_end"] == 8
    assert counts["on_pre_optimizer_step"] == counts["on_optimizer_step"] == 8
    assert counts["on_substep_end"] == 6  # 14 micro-batches - 8 that end a step
    assert counts["on_save"] == 3  # steps 3, 6 and 8 (the last)
    assert counts["on_evaluate"] == 4  # steps 3, 6, 8 (the end of training) + the evaluate() call
    assert counts["on_predict"] == 1
    assert counts["on_log"] >= 8
    assert set(counts) <= set(EVENTS)
    assert rt == hf


def test_background_on_save_order(tmp_path):
    """With background writes on_save fires once the folder is complete: the same events with the same
    states, each on_save moved at most to the start of a later step (never before its checkpoint exists)."""
    model = tiny_bert()
    hf = _run(transformers.Trainer, transformers.TrainingArguments, tmp_path / "hf", clone(model))
    rt = _run(raytrainer.Trainer, raytrainer.TrainingArguments, tmp_path / "rt", clone(model))
    assert [e for e in rt if e[0] != "on_save"] == [e for e in hf if e[0] != "on_save"]
    assert [e for e in rt if e[0] == "on_save"] == [e for e in hf if e[0] == "on_save"]
    for i, (name, step) in enumerate(rt):
        if name == "on_save":  # after its own step ended, before training ended
            assert rt.index(("on_step_end", step)) < i < rt.index(("on_train_end", 8))
