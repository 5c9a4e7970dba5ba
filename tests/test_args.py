"""TrainingArguments validation (ours and transformers'), optimizers and weight-decay grouping, scheduler names.

Fields the loop does not honour are refused by train(), not here: tests/test_fields.py.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers

import raytrainer
from raytrainer import TrainingArguments
from tests.helpers import lm_examples, make_args, tiny_bert, tiny_gpt2, train_logs

# (overrides, the field the error must name). Values transformers trains with (max_steps=0, a negative
# weight_decay, save_total_limit=0...) warn instead: tests/test_dropin_registry.py (raytrainer/added_checks.py)
BAD = [
    (dict(per_device_train_batch_size=0), "per_device_train_batch_size"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
    (dict(learning_rate=-1e-3), "learning_rate"),
    (dict(warmup_steps=-2), "warmup_steps"),
    (dict(warmup_ratio=1.5), "warmup_ratio"),
    (dict(optim="adamm"), "optim"),
    (dict(optim="adamw_torch_fusd"), "adamw_torch_fused"),  # the closest name is suggested
    (dict(lr_scheduler_type="cosin"), "lr_scheduler_type"),
    (dict(strategy="horovod"), "strategy"),
    (dict(save_strategy="best"), "metric_for_best_model"),
    (dict(load_best_model_at_end=True, eval_strategy="epoch", save_strategy="steps"), "save_strategy"),
    (dict(bf16=True, fp16=True), "fp16"),
    (dict(resources_per_worker={"CPU": -1}), "resources_per_worker"),
    (dict(resources_per_worker="2 CPUs"), "resources_per_worker"),
    (dict(resources_per_worker={"CPU": "two"}), "resources_per_worker"),
    (dict(num_workers=-1), "num_workers"),
    (dict(num_workers=1.5), "num_workers"),
    (dict(max_failures=-2), "max_failures"),
    (dict(storage_path="gs://bucket/x"), "storage_path"),
]


@pytest.mark.parametrize("overrides,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_argument_raises_value_error_naming_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        TrainingArguments(output_dir=str(tmp_path), report_to="none", **overrides)


# transformers' own checks in TrainingArguments.__post_init__ still run: (overrides, transformers' message)
TRANSFORMERS_CHECKS = [
    (dict(fp16_full_eval=True, bf16_full_eval=True), "At most one of fp16 and bf16 can be True for full eval"),
    (dict(fp16=True, bf16=True), "At most one of fp16 and bf16 can be True, but not both"),
    (dict(logging_steps=0), "requires non-zero --logging_steps"),
    (dict(logging_steps=2.5), "--logging_steps must be an integer"),
    (dict(dataloader_prefetch_factor=2), "--dataloader_prefetch_factor can only be set"),
    (dict(lr_scheduler_type="reduce_lr_on_plateau"), "reduce_lr_on_plateau requires an eval strategy"),
    (dict(lr_scheduler_type="greedy"), "greedy requires an eval strategy"),
    (dict(load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps", eval_steps=3, save_steps=5),
     "multiple of the evaluation"),
    (dict(torch_empty_cache_steps=0), "torch_empty_cache_steps"),
]


@pytest.mark.parametrize("overrides,message", TRANSFORMERS_CHECKS,
                         ids=[m[:30] for _, m in TRANSFORMERS_CHECKS])
def test_transformers_checks_still_run(tmp_path, overrides, message):
    # use_cpu: past transformers' "this process has no bf16 GPU" check, which raytrainer leaves to the workers
    with pytest.raises(ValueError, match=re.escape(message)):
        transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainingArguments(output_dir=str(tmp_path), report_to="none", **overrides)


def test_driver_hardware_checks_are_left_to_the_workers(tmp_path):
    """bf16, bf16_full_eval, tf32 and a deepspeed config describe the workers, not a CPU-only driver.

    transformers refuses them in a process without a bf16 / Ampere GPU (or without the deepspeed
    package); raytrainer's driver accepts them and keeps the values for the workers.
    """
    cases = [dict(bf16=True), dict(bf16_full_eval=True), dict(tf32=True),
             dict(deepspeed={"train_micro_batch_size_per_gpu": 8})]
    for overrides in cases:
        args = TrainingArguments(output_dir=str(tmp_path), report_to="none", **overrides)
        for name, value in overrides.items():
            assert getattr(args, name) == value
    if not torch.cuda.is_available():  # what transformers itself does here
        for overrides in cases[:3]:
            with pytest.raises(ValueError):
                transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", **overrides)
    assert TrainingArguments(output_dir=str(tmp_path), bf16=True).mixed_precision == "bf16"


def test_fields_the_loop_honours_construct(tmp_path):
    """Fields once refused at construction, now honoured (raytrainer/fields.py): accepted and not refused."""
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", torch_compile=True,
                             use_liger_kernel=True, auto_find_batch_size=True, optim="lion_8bit",
                             include_num_input_tokens_seen=True, debug="underflow_overflow",
                             train_sampling_strategy="group_by_length")
    args.check_supported()
    assert args.torch_compile_backend == "inductor"  # transformers' default, derived at construction


def test_validate_rechecks_after_mutation(tmp_path):
    """validate() runs again in Trainer/train(): a value changed after construction is caught there."""
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    args.gradient_accumulation_steps = 0
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8))
    args.gradient_accumulation_steps = 1
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8))
    args.num_workers = -3
    with pytest.raises(ValueError, match="num_workers"):
        trainer.train()
    args.num_workers = 0
    args.optim = "adamw_torch_fusd"  # validate() checks a name set after construction too
    with pytest.raises(ValueError, match="adamw_torch_fused"):
        trainer.train()


def test_transformers_args_are_accepted(tmp_path):
    hf_args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", learning_rate=1e-3,
                                             gradient_accumulation_steps=3)
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=hf_args, train_dataset=lm_examples(8))
    assert isinstance(trainer.args, TrainingArguments)
    assert trainer.args.learning_rate == 1e-3 and trainer.args.gradient_accumulation_steps == 3


def test_defaults_match_transformers(tmp_path):
    ours = TrainingArguments(output_dir=str(tmp_path))
    theirs = transformers.TrainingArguments(output_dir=str(tmp_path))
    for name in ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
                 "num_train_epochs", "max_steps", "lr_scheduler_type", "warmup_steps", "logging_steps",
                 "save_steps", "save_strategy", "eval_strategy", "seed", "optim",
                 "per_device_train_batch_size", "gradient_accumulation_steps", "save_total_limit"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.num_workers == 0 and ours.strategy == "ddp"


# ------------------------------------------------------------------------------ optimizers
OPTIMIZERS = {
    "adamw_torch": 5e-3,
    "adamw_torch_fused": 5e-3,
    "adafactor": 5e-3,
    "sgd": 0.5,
    "adagrad": 5e-2,
}


@pytest.mark.parametrize("optim", list(OPTIMIZERS))
def test_supported_optimizers_train(tmp_path, optim):
    args = make_args(TrainingArguments, tmp_path, optim=optim, learning_rate=OPTIMIZERS[optim],
                     lr_scheduler_type="constant", warmup_steps=0, num_train_epochs=4, gradient_accumulation_steps=1,
                     per_device_train_batch_size=8)
    trainer = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(32))
    trainer.train()
    losses = [e["loss"] for e in train_logs(trainer)]
    assert len(losses) == 16
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.05, (optim, losses)


def test_no_weight_decay_on_bias_and_layernorm(tmp_path):
    model = tiny_bert()
    trainer = raytrainer.Trainer(model=model, args=make_args(TrainingArguments, tmp_path, weight_decay=0.01),
                                 train_dataset=lm_examples(8))
    opt = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = set(), set()
    for group in opt.param_groups:
        target = decay if group["weight_decay"] == 0.01 else no_decay
        assert group["weight_decay"] in (0.01, 0.0)
        target.update(names[id(p)] for p in group["params"])
    assert decay | no_decay == set(names.values())  # every trainable parameter is in a group
    assert decay and no_decay and not decay & no_decay
    for n in names.values():
        if n.endswith(".bias") or "LayerNorm" in n:
            assert n in no_decay, n
    assert "bert.encoder.layer.0.attention.self.query.weight" in decay
    assert "bert.embeddings.LayerNorm.weight" in no_decay and "classifier.bias" in no_decay
    # the same grouping as transformers
    hf = transformers.Trainer(model=tiny_bert(), args=make_args(transformers.TrainingArguments, tmp_path / "hf",
                                                                weight_decay=0.01))
    hf_opt = hf.create_optimizer()
    hf_names = {id(p): n for n, p in hf.model.named_parameters()}
    hf_decay = {hf_names[id(p)] for g in hf_opt.param_groups if g["weight_decay"] == 0.01 for p in g["params"]}
    assert hf_decay == decay


# ------------------------------------------------------------------------------ schedulers
SCHEDULER_KWARGS = {
    "cosine_with_min_lr": {"min_lr": 1e-5},
    "cosine_warmup_with_min_lr": {"min_lr": 1e-5},
    "warmup_stable_decay": {"num_decay_steps": 3},
}


@pytest.mark.parametrize("name", [s.value for s in transformers.SchedulerType])
def test_every_scheduler_type_accepted(tmp_path, name):
    kwargs = SCHEDULER_KWARGS.get(name, {})
    extra = dict(eval_strategy="steps", eval_steps=2) if name in ("reduce_lr_on_plateau", "greedy") else {}
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", lr_scheduler_type=name,
                             lr_scheduler_kwargs=kwargs, warmup_steps=2, **extra)
    assert str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) == name
    evals = lm_examples(4) if extra else None
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8), eval_dataset=evals)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert trainer.lr_scheduler is not None
    # the same schedule object type as transformers builds
    hf = transformers.Trainer(model=tiny_gpt2(), args=transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), report_to="none", lr_scheduler_type=name, lr_scheduler_kwargs=kwargs,
        warmup_steps=2, **extra), eval_dataset=evals)
    hf.create_optimizer_and_scheduler(num_training_steps=10)
    assert type(trainer.lr_scheduler) is type(hf.lr_scheduler)


def test_scheduler_lrs_match_transformers_during_training(tmp_path):
    for name in ("cosine_with_restarts", "polynomial", "inverse_sqrt"):
        lrs = []
        for cls, args_cls in ((raytrainer.Trainer, TrainingArguments),
                              (transformers.Trainer, transformers.TrainingArguments)):
            args = make_args(args_cls, tmp_path / name / cls.__module__, lr_scheduler_type=name, num_train_epochs=1,
                             gradient_accumulation_steps=1, warmup_steps=1)
            t = cls(model=tiny_gpt2(), args=args, train_dataset=lm_examples(20))
            t.train()
            lrs.append([e["learning_rate"] for e in train_logs(t)])
        assert len(lrs[0]) == 5 and lrs[0] == lrs[1], name


def test_optimizers_tuple_used(tmp_path):
    model = tiny_gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    trainer = raytrainer.Trainer(model=model, args=make_args(TrainingArguments, tmp_path, num_train_epochs=1),
                                 train_dataset=lm_examples(16), optimizers=(opt, sched))
    trainer.train()
    assert trainer.optimizer is opt and trainer.lr_scheduler is sched
    assert [e["learning_rate"] for e in train_logs(trainer)] == [0.05] * 2
