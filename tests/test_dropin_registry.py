"""The rule "add, never take away", entry by entry: every check raytrainer adds (raytrainer/added_checks.py).

A REFUSED_TOO entry's input fails under transformers.Trainer too (at TrainingArguments or within 2 training
steps), and raytrainer's error holds the entry's message; a WARN_ONLY entry's input trains under both, and
raytrainer logs the entry's message once; an OURS entry's input sets a field transformers does not have;
a NOT_HONOURED entry is refused by train() with its message.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import transformers

import raytrainer
from raytrainer.added_checks import ADDED_CHECKS, NOT_HONOURED, OURS, REFUSED_TOO, WARN_ONLY, table
from raytrainer.field_types import TRAINING_FIELDS
from tests.helpers import lm_examples, tiny_gpt2

HF_FIELDS = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
BASE = dict(max_steps=2, per_device_train_batch_size=4, report_to="none", use_cpu=True, disable_tqdm=True,
            save_strategy="no", logging_steps=1)


def kwargs(tmp_path, example, name):
    kw = dict(BASE, output_dir=str(tmp_path / name))
    kw.update(example)
    return kw


def train(mod, tmp_path, example, rows=None, name=None):
    args = mod.TrainingArguments(**kwargs(tmp_path, example, name or mod.__name__))
    trainer = mod.Trainer(model=tiny_gpt2(), args=args, train_dataset=rows if rows is not None else lm_examples(16),
                          eval_dataset=lm_examples(4))
    trainer.train()
    return trainer


def transformers_fails(tmp_path, example, rows=None) -> str:
    with pytest.raises(Exception) as caught:
        train(transformers, tmp_path, example, rows)
    return str(caught.value)


def raytrainer_refuses(tmp_path, example, message, rows=None) -> str:
    with pytest.raises(ValueError) as caught:
        train(raytrainer, tmp_path, example, rows)
    assert message in str(caught.value), (message, str(caught.value))
    return str(caught.value)


def runs_in_both_with_one_warning(tmp_path, example, message, caplog):
    train(transformers, tmp_path, example)
    with caplog.at_level(logging.WARNING, logger="raytrainer"):
        trainer = train(raytrainer, tmp_path, example)
    said = [r.getMessage() for r in caplog.records if message in r.getMessage()]
    assert len(said) == 1, (message, [r.getMessage() for r in caplog.records])
    return trainer


# ------------------------------------------------------------------ scenarios for the entries without an example
def rows_scenario(rows):
    def check(tmp_path, entry, caplog):
        transformers_fails(tmp_path, {}, rows)
        raytrainer_refuses(tmp_path, {}, entry.message, rows)
    return check


def no_checkpoint(tmp_path, entry, caplog):
    for mod in (transformers, raytrainer):
        args = mod.TrainingArguments(**kwargs(tmp_path, {}, mod.__name__))
        with pytest.raises(ValueError, match="No valid checkpoint found in output directory"):
            mod.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8)).train(resume_from_checkpoint=True)


def missing_path(tmp_path, entry, caplog):
    for mod in (transformers, raytrainer):
        args = mod.TrainingArguments(**kwargs(tmp_path, {}, mod.__name__))
        with pytest.raises(ValueError, match="Can't find a valid checkpoint at"):
            mod.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8)).train(
                resume_from_checkpoint=str(tmp_path / "nowhere"))


class Features(torch.nn.Module):
    """A custom model without main_input_name: only the "no input column" check applies to it."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, features, labels=None):
        return {"loss": self.linear(features).pow(2).mean()}


def no_input_column(tmp_path, entry, caplog):
    rows = [{"text": [1.0, 2.0], "foo": 1.0}] * 8
    for mod in (transformers, raytrainer):
        args = mod.TrainingArguments(**kwargs(tmp_path, {}, mod.__name__))
        trainer = mod.Trainer(model=Features(), args=args, train_dataset=rows)
        with pytest.raises(ValueError) as caught:
            trainer.train()
    assert entry.message in str(caught.value)


SCENARIOS = {
    "empty train_dataset": rows_scenario([]),
    "row is not a dict": rows_scenario(list(range(8))),
    "main input column missing": rows_scenario([{"labels": [1] * 8, "attention_mask": [1] * 8}] * 8),
    "no model input column": no_input_column,
    "token ids not integers": rows_scenario([{"input_ids": [0.5] * 8, "labels": [1] * 8}] * 8),
    "token id outside the vocabulary": rows_scenario([{"input_ids": [500] * 8, "labels": [1] * 8}] * 8),
    "ragged rows": rows_scenario([{"input_ids": [1] * (4 + i % 3), "labels": [1] * (4 + i % 3)} for i in range(8)]),
    "no checkpoint to resume": no_checkpoint,
    "checkpoint path missing": missing_path,
    # WARN_ONLY, with its parity against transformers (same global_step and weights):
    "data position cannot be placed":
        "tests/test_dropin.py::test_resume_with_another_dataset_size_and_batch_resumes_by_global_step",
}


@pytest.mark.parametrize("entry", ADDED_CHECKS, ids=[c.name for c in ADDED_CHECKS])
def test_added_check_refuses_only_what_transformers_fails_on(tmp_path, entry, caplog):
    if entry.name in SCENARIOS:
        scenario = SCENARIOS[entry.name]
        if isinstance(scenario, str):
            assert entry.outcome == WARN_ONLY  # tested there, with transformers' run beside it
            return
        scenario(tmp_path, entry, caplog)
        return
    assert entry.example is not None, f"{entry.name}: needs an example or a scenario"
    if entry.outcome == REFUSED_TOO:
        transformers_fails(tmp_path, entry.example)
        raytrainer_refuses(tmp_path, entry.example, entry.message)
    elif entry.outcome == WARN_ONLY:
        runs_in_both_with_one_warning(tmp_path, entry.example, entry.message, caplog)
    elif entry.outcome == OURS:
        assert set(entry.example) - HF_FIELDS, entry.example
        raytrainer_refuses(tmp_path, entry.example, entry.message)
    else:
        assert entry.outcome == NOT_HONOURED
        raytrainer_refuses(tmp_path, entry.example, entry.message)


@pytest.mark.parametrize("field", sorted(TRAINING_FIELDS))
def test_a_mistyped_training_field_fails_in_transformers_too(tmp_path, field):
    """field_types refuses another type only for the fields where transformers fails on one too."""
    wrong = {field: TRAINING_FIELDS[field]}
    transformers_fails(tmp_path, wrong)
    with pytest.raises(ValueError, match=field):
        raytrainer.TrainingArguments(**kwargs(tmp_path, wrong, "rt"))


def test_the_registry_covers_every_check_and_the_docs_print_it():
    names = [c.name for c in ADDED_CHECKS]
    assert len(names) == len(set(names))
    assert all(c.outcome in (REFUSED_TOO, WARN_ONLY, OURS, NOT_HONOURED) for c in ADDED_CHECKS)
    with open("docs/compatibility.md") as f:
        assert table() in f.read(), "regenerate the table: python -c 'from raytrainer.added_checks import table; print(table())'"
