"""A NaN gradient at one step: skipped and counted (default), a clear stop, or applied as transformers does."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

import raytrainer

try:
    from tests.helpers import lm_examples, tiny_gpt2
except ImportError:
    from helpers import lm_examples, tiny_gpt2

BAD_STEP = 3


class NaNGradientAt(transformers.TrainerCallback):
    """Poisons one parameter's gradient during step BAD_STEP only (a bad batch, an overflow)."""

    def __init__(self, model):
        self.poison = False
        next(model.parameters()).register_hook(lambda g: g * float("nan") if self.poison else g)

    def on_step_begin(self, args, state, control, **kwargs):
        self.poison = state.global_step + 1 == BAD_STEP


def run(cls, args_cls, tmp_path, **kw):
    model = tiny_gpt2(dropout=0.0)
    args = args_cls(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, logging_steps=1,
                    save_strategy="no", report_to="none", disable_tqdm=True, seed=1, **kw)
    trainer = cls(model=model, args=args, train_dataset=lm_examples(32), callbacks=[NaNGradientAt(model)])
    trainer.train()
    return trainer


def finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_is_the_default_and_counted(tmp_path):
    trainer = run(raytrainer.Trainer, raytrainer.TrainingArguments, tmp_path)
    assert trainer.state.global_step == 6 and finite(trainer.model)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e.get("nonfinite_steps_skipped", 0) for e in logs] == [0, 0, 1, 1, 1, 1]
    assert all(math.isfinite(e["loss"]) for e in logs if e["step"] != BAD_STEP)
    # the skipped step left the weights as they were: one update fewer than a run without the NaN
    assert not math.isfinite(logs[BAD_STEP - 1]["grad_norm"])


def test_stop_names_the_step(tmp_path):
    with pytest.raises(FloatingPointError, match=f"step {BAD_STEP}: the gradient norm is nan"):
        run(raytrainer.Trainer, raytrainer.TrainingArguments, tmp_path, nonfinite_steps="stop")


def test_apply_behaves_as_transformers(tmp_path):
    """transformers applies the NaN update: the weights are NaN from then on, in both."""
    ours = run(raytrainer.Trainer, raytrainer.TrainingArguments, tmp_path / "rt", nonfinite_steps="apply")
    theirs = run(transformers.Trainer, transformers.TrainingArguments, tmp_path / "hf")
    assert not finite(ours.model) and not finite(theirs.model)
    assert "nonfinite_steps_skipped" not in str(ours.state.log_history)
