"""Property-based: random TrainingArguments values and malformed datasets at the driver.

Each example either trains (in-process, 2 steps: fast, and never a hang) or raises a ValueError /
TypeError whose message names the offending field; never another exception from deep inside
transformers, accelerate or torch.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import raytrainer

try:
    from tests.helpers import lm_examples, tiny_gpt2
except ImportError:
    from helpers import lm_examples, tiny_gpt2

ODD_NUMBERS = st.sampled_from([0, -1, -3, 1, 2, 3, 10**9, 0.5, -0.5, 1e-12, math.nan, math.inf, -math.inf])
ODD_VALUES = st.one_of(ODD_NUMBERS, st.none(), st.booleans(), st.text(max_size=6), st.just([]), st.just({}))

# field -> values a user might write (valid, off-by-one, wrong type, NaN...)
FIELDS = {
    "per_device_train_batch_size": st.one_of(st.integers(-2, 4), ODD_VALUES),
    "per_device_eval_batch_size": st.one_of(st.integers(-2, 4), ODD_VALUES),
    "gradient_accumulation_steps": st.one_of(st.integers(-2, 3), ODD_VALUES),
    "learning_rate": st.one_of(st.floats(-1, 1, allow_nan=False), ODD_VALUES),
    "weight_decay": st.one_of(st.floats(-1, 1, allow_nan=False), ODD_VALUES),
    "adam_beta1": st.one_of(st.floats(-1, 2, allow_nan=False), ODD_VALUES),
    "adam_epsilon": ODD_VALUES,
    "max_grad_norm": ODD_VALUES,
    "warmup_steps": ODD_VALUES,
    "logging_steps": st.one_of(st.integers(-2, 3), ODD_VALUES),
    "eval_steps": st.one_of(st.integers(-2, 3), ODD_VALUES),
    "save_steps": st.one_of(st.integers(-2, 3), ODD_VALUES),
    "save_total_limit": st.one_of(st.integers(-2, 3), ODD_VALUES),
    "eval_strategy": st.one_of(st.sampled_from(["no", "steps", "epoch", "best", "sometimes"]), ODD_VALUES),
    "save_strategy": st.one_of(st.sampled_from(["no", "steps", "epoch", "best", "sometimes"]), ODD_VALUES),
    "lr_scheduler_type": st.one_of(st.sampled_from(["linear", "cosine", "constant", "cosinus"]), ODD_VALUES),
    "optim": st.one_of(st.sampled_from(["adamw_torch", "sgd", "adafactor", "adamw_tourch"]), ODD_VALUES),
    "seed": st.one_of(st.integers(-5, 2**32 + 5), ODD_VALUES),
    "dataloader_num_workers": st.one_of(st.integers(-2, 1), ODD_VALUES),
    "load_best_model_at_end": st.one_of(st.booleans(), ODD_VALUES),
    "metric_for_best_model": st.one_of(st.sampled_from(["loss", "eval_loss", "accuracy"]), ODD_VALUES),
    "num_workers": st.one_of(st.integers(-2, 0), ODD_VALUES),
    "resources_per_worker": st.one_of(st.just({"CPU": -1}), st.just({"CPU": "one"}), ODD_VALUES),
    "strategy": st.one_of(st.sampled_from(["ddp", "fsdp", "deepspeed", "horovod"]), ODD_VALUES),
    "max_failures": st.one_of(st.integers(-3, 2), ODD_VALUES),
    "storage_path": st.one_of(st.sampled_from(["", "s3://", "ftp://x/y"]), ODD_VALUES),
    "report_to": st.one_of(st.sampled_from(["none", "all", "nonsense"]), ODD_VALUES),
    "label_smoothing_factor": ODD_VALUES,
    "neftune_noise_alpha": ODD_VALUES,
}


def _names_field(message: str, kwargs: dict) -> bool:
    return any(name in message for name in kwargs) or any(name in message for name in FIELDS)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kwargs=st.dictionaries(st.sampled_from(sorted(FIELDS)), st.nothing(), max_size=0).flatmap(
    lambda _: st.fixed_dictionaries({}, optional=FIELDS)))
def test_random_arguments_train_or_name_the_field(tmp_path_factory, kwargs):
    out = tmp_path_factory.mktemp("fuzz")
    try:
        args = raytrainer.TrainingArguments(output_dir=str(out), max_steps=2, report_to="none", disable_tqdm=True,
                                            **kwargs)
        trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8),
                                     eval_dataset=lm_examples(4, seed=1))
        if args.num_workers == 0:  # Ray runs are the other tests' job: here the driver's checks and the loop
            trainer.train()
    except (ValueError, TypeError) as error:
        assert _names_field(str(error), kwargs), f"{type(error).__name__} names no field: {error}"


MALFORMED = [
    [],                                                      # empty
    [{"input_ids": [1, 2, 3]}, {"input_ids": [1, 2]}],       # ragged, no labels
    [{"text": "no ids here"}] * 4,                           # no model input at all
    [{"input_ids": "abc", "labels": "abc"}] * 4,             # strings where ids belong
    [{"input_ids": [10**9] * 4, "labels": [1] * 4}] * 4,     # ids outside the vocabulary
    [None, None],
]


@pytest.mark.parametrize("rows", MALFORMED, ids=["empty", "ragged", "no_inputs", "strings", "out_of_vocab", "nones"])
def test_malformed_datasets_give_a_clear_error(tmp_path, rows):
    args = raytrainer.TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to="none", disable_tqdm=True)
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=rows)
    with pytest.raises((ValueError, TypeError)) as caught:
        trainer.train()
    assert "train_dataset" in str(caught.value), caught.value


@pytest.mark.parametrize("run_name", ["../outside", "a/b", "..", "/abs"])
def test_a_run_name_cannot_lead_out_of_the_storage_root(tmp_path, run_name):
    with pytest.raises(ValueError, match="run_name=.*one folder name"):
        raytrainer.TrainingArguments(output_dir=str(tmp_path), storage_path=str(tmp_path / "store"), run_name=run_name)


def test_a_sweep_name_cannot_lead_out_of_the_storage_root(tmp_path):
    args = raytrainer.TrainingArguments(output_dir=str(tmp_path), report_to="none")
    trainer = raytrainer.Trainer(model_init=lambda trial=None: tiny_gpt2(), args=args, train_dataset=lm_examples(8))
    with pytest.raises(ValueError, match="name='../x'.*one folder name"):
        trainer.hyperparameter_search(hp_space={}, n_trials=1, name="../x")
