"""Every TrainingArguments field is honoured or refused (raytrainer/fields.py), never silently ignored.

A refused field set away from its default is accepted at construction (a config shared with
evaluation scripts keeps working) and refused when training starts: `args.check_supported()`, run
by `Trainer.train()`, raises a ValueError naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import re
import runpy
import signal

import pytest
from accelerate import ParallelismConfig

import raytrainer
from raytrainer import TrainingArguments
from raytrainer.fields import HONOURED, REFUSED, REFUSED_ACCELERATOR_OPTIONS
from tests.helpers import lm_examples, tiny_gpt2

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIELDS = [f.name for f in dataclasses.fields(TrainingArguments)]

# a representative non-default value of each refused field
REFUSED_VALUES = {
    "accelerator_config": {"split_batches": True},
    "parallelism_config": ParallelismConfig(),
    "dataloader_in_order": False,
}


def make(tmp_path, **overrides) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=2,
                             save_strategy="no", disable_tqdm=True, **overrides)


@pytest.fixture
def keep_sigterm():
    """enable_jit_checkpoint makes Trainer() install a SIGTERM handler (transformers' JITCheckpointCallback)."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def test_every_field_is_honoured_or_refused():
    for name in FIELDS:
        assert (name in HONOURED) + (name in REFUSED) == 1, f"{name}: in neither or both of HONOURED/REFUSED"
    assert set(HONOURED) | set(REFUSED) == set(FIELDS), "fields.py names a field that does not exist"
    assert all(isinstance(v, str) and v.strip() for v in list(HONOURED.values()) + list(REFUSED.values()))
    assert set(REFUSED_VALUES) == set(REFUSED)


def test_defaults_are_supported(tmp_path):
    TrainingArguments(output_dir=str(tmp_path)).check_supported()
    # falsy spellings of the refused fields' defaults are not refused either
    make(tmp_path, fsdp="", fsdp_config={}, deepspeed=None, dataloader_in_order=True,
         accelerator_config={"gradient_accumulation_kwargs": {"num_steps": 1}}).check_supported()


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_field_constructs_and_check_supported_names_it(tmp_path, name):
    args = make(tmp_path, **{name: REFUSED_VALUES[name]})
    with pytest.raises(ValueError, match=re.escape(name)) as caught:
        args.check_supported()
    message = str(caught.value)
    assert "is not supported by raytrainer: " in message
    assert REFUSED[name] in message  # the fix


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_field_raises_at_train(tmp_path, name, keep_sigterm):
    args = make(tmp_path, **{name: REFUSED_VALUES[name]})
    with pytest.raises(ValueError, match=re.escape(name) + ".*is not supported by raytrainer"):
        trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8))
        trainer.train()
    assert trainer.state.global_step == 0  # refused before the model was touched


def test_accelerator_config_refused_only_for_options_raytrainer_replaces(tmp_path):
    for option, default in REFUSED_ACCELERATOR_OPTIONS.items():
        value = {"split_batches": True, "dispatch_batches": True, "even_batches": False,
                 "use_seedable_sampler": False, "non_blocking": True,
                 "gradient_accumulation_kwargs": {"sync_each_batch": True}}[option]
        assert value != default
        with pytest.raises(ValueError, match=re.escape(f"accelerator_config.{option}=")):
            make(tmp_path, accelerator_config={option: value}).check_supported()
    # num_steps is honoured: transformers maps it onto gradient_accumulation_steps
    make(tmp_path, accelerator_config={"gradient_accumulation_kwargs": {"num_steps": 2}}).check_supported()


def test_every_refused_field_is_named_at_once(tmp_path):
    args = make(tmp_path, dataloader_in_order=False, enable_jit_checkpoint=True, num_workers=2,
                accelerator_config={"even_batches": False})
    with pytest.raises(ValueError) as caught:
        args.check_supported()
    for name in ("dataloader_in_order=False", "accelerator_config.even_batches=False"):
        assert name in str(caught.value)
    # enable_jit_checkpoint with Ray workers is honoured (Ray Train's preemption notice, preemption.py)
    assert "enable_jit_checkpoint" not in str(caught.value)


def test_refused_field_set_after_construction_is_refused_at_train(tmp_path):
    args = make(tmp_path)
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8))
    args.dataloader_in_order = False
    with pytest.raises(ValueError, match="dataloader_in_order"):
        trainer.train()


def test_shared_config_still_evaluates(tmp_path):
    """A config with a refused field serves evaluate()/predict() (transformers' own); only train() refuses."""
    args = make(tmp_path, accelerator_config={"split_batches": True}, dataloader_in_order=False)
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8),
                                 eval_dataset=lm_examples(8))
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0
    assert trainer.predict(lm_examples(4)).predictions is not None
    with pytest.raises(ValueError, match="accelerator_config.split_batches"):
        trainer.train()


def test_readme_table_is_generated_from_fields():
    table = runpy.run_path(os.path.join(ROOT, "scripts", "fields_table.py"))["table"]()
    with open(os.path.join(ROOT, "docs", "fields.md"), encoding="utf-8") as f:  # the docs site's page
        readme = f.read()
    heading = table.splitlines()[0]
    assert heading in readme, f"docs/fields.md lacks the section {heading!r}: python scripts/fields_table.py"
    start = readme.index(heading)
    end = readme.find("\n## ", start + len(heading))
    section = readme[start:] if end < 0 else readme[start:end + 1]
    assert section.strip() == table.strip(), "docs/fields.md table is stale: paste `python scripts/fields_table.py`"


def test_auto_find_batch_size_with_several_workers_is_refused_on_the_driver(tmp_path):
    args = make(tmp_path, auto_find_batch_size=True, num_workers=2)
    with pytest.raises(ValueError, match="auto_find_batch_size=True with num_workers=2"):
        args.check_supported()
    make(tmp_path, auto_find_batch_size=True, num_workers=1).check_supported()
