"""Loop features beyond parity: gradient checkpointing, fp16 on CPU, max_steps across epochs,
epoch logging/saving, include_for_metrics, batch_eval_metrics, the tqdm progress bar,
a dataloader with worker processes, and the background checkpoint writer."""

from __future__ import annotations

import os

import numpy as np
import torch

from raytrainer import Trainer, TrainingArguments

try:
    from tests.helpers import cls_examples, lm_examples, make_args, state_dicts_equal, tiny_bert, tiny_gpt2, train_logs
except ImportError:
    from helpers import cls_examples, lm_examples, make_args, state_dicts_equal, tiny_bert, tiny_gpt2, train_logs


def _losses(trainer):
    return [e["loss"] for e in train_logs(trainer)]


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    runs = []
    for gc in (False, True):
        trainer = Trainer(model=tiny_gpt2(dropout=0.0), args=make_args(TrainingArguments, tmp_path / str(gc),
                                                                        gradient_checkpointing=gc),
                          train_dataset=lm_examples())
        trainer.train()
        runs.append(trainer)
    assert runs[1].model.is_gradient_checkpointing
    np.testing.assert_allclose(_losses(runs[0]), _losses(runs[1]), rtol=1e-5)


def test_fp16_on_cpu_trains_with_a_scaler_and_saves_it(tmp_path):
    seen = []

    class Spy(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            seen.append(out[1].logits.dtype)
            return out if return_outputs else out[0]

    args = make_args(TrainingArguments, tmp_path, fp16=True, num_train_epochs=4, save_strategy="epoch",
                     learning_rate=1e-2)
    trainer = Spy(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples())
    trainer.train()
    trainer.wait_for_checkpoints()
    assert torch.float16 in seen  # autocast to fp16 on the CPU
    losses = _losses(trainer)
    assert losses[-1] < losses[0] * 0.9
    assert os.path.isfile(tmp_path / "checkpoint-16" / "scaler.pt")
    assert torch.load(tmp_path / "checkpoint-16" / "scaler.pt", weights_only=True)["scale"] > 0


def test_max_steps_runs_across_epochs(tmp_path):
    # 26 rows / (4 x 2) = 4 updates per epoch; 10 steps take 3 epochs
    trainer = Trainer(model=tiny_gpt2(), args=make_args(TrainingArguments, tmp_path, max_steps=10),
                      train_dataset=lm_examples())
    out = trainer.train()
    assert out.global_step == trainer.state.global_step == 10
    assert 2 < trainer.state.epoch <= 3


def test_epoch_logging_and_saving(tmp_path):
    args = make_args(TrainingArguments, tmp_path, logging_strategy="epoch", save_strategy="epoch")
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples())
    trainer.train()
    trainer.wait_for_checkpoints()
    assert [e["epoch"] for e in trainer.state.log_history if "loss" in e] == [1.0, 2.0]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-8"]


def test_include_for_metrics_and_batch_eval_metrics(tmp_path):
    calls = []

    def metrics(pred, compute_result=False):
        calls.append((pred.inputs is not None, compute_result))
        return {"n": float(len(pred.label_ids))}

    args = make_args(TrainingArguments, tmp_path, include_for_metrics=["inputs"], batch_eval_metrics=True,
                     per_device_eval_batch_size=4)
    trainer = Trainer(model=tiny_bert(), args=args, eval_dataset=cls_examples(10), compute_metrics=metrics)
    result = trainer.evaluate()
    assert calls == [(True, False), (True, False), (True, True)]  # 3 batches of <= 4; the last computes
    assert result["eval_n"] == 2.0  # the last batch's size


def test_progress_bar_is_shown(tmp_path, capsys):
    args = make_args(TrainingArguments, tmp_path, disable_tqdm=False, num_train_epochs=1)
    Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples()).train()
    err = capsys.readouterr().err
    assert "4/4" in err and ("it/s" in err or "s/it" in err)


def test_dataloader_worker_processes_give_the_same_run(tmp_path):
    runs = []
    for workers in (0, 2):
        trainer = Trainer(model=tiny_gpt2(), args=make_args(TrainingArguments, tmp_path / str(workers),
                                                            dataloader_num_workers=workers),
                          train_dataset=lm_examples())
        trainer.train()
        runs.append(trainer)
    assert _losses(runs[0]) == _losses(runs[1])
    assert state_dicts_equal(runs[0].model, runs[1].model)


def test_background_and_foreground_checkpoints_are_identical(tmp_path):
    folders = []
    for background in (True, False):
        out = tmp_path / str(background)
        args = make_args(TrainingArguments, out, save_strategy="steps", save_steps=1, save_in_background=background)
        trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples())
        trainer.train()
        trainer.wait_for_checkpoints()
        folders.append(out)
    from safetensors.torch import load_file

    for step in range(1, 9):
        a = load_file(folders[0] / f"checkpoint-{step}" / "model.safetensors")
        b = load_file(folders[1] / f"checkpoint-{step}" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
        oa = torch.load(folders[0] / f"checkpoint-{step}" / "optimizer.pt", weights_only=True)
        ob = torch.load(folders[1] / f"checkpoint-{step}" / "optimizer.pt", weights_only=True)
        for i in oa["state"]:
            assert all(torch.equal(oa["state"][i][k], ob["state"][i][k]) for k in oa["state"][i]), step


def test_args_changed_after_construction_take_effect(tmp_path):
    """The Chinese docs' performance tips set fields on an existing TrainingArguments."""
    import pytest

    args = make_args(TrainingArguments, tmp_path, num_train_epochs=1)
    args.gradient_checkpointing = True
    args.bf16 = True
    args.per_device_train_batch_size = 2
    args.optim = "adamw_torch_fused"
    with pytest.warns(UserWarning, match="dataloader_pin_memory"):
        args.datloader_pin_memory = True  # the docs' typo: nothing reads it, and we say so
    dtypes = []

    class Spy(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            dtypes.append(out.logits.dtype)
            return (loss, out) if return_outputs else loss

    trainer = Spy(model=tiny_gpt2(), args=args, train_dataset=lm_examples())
    trainer.train()
    assert trainer.model.is_gradient_checkpointing
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert trainer.state.global_step == 7  # 26 rows / (2 x 2) per update
