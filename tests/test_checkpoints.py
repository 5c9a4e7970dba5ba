"""Checkpoints: transformers' folder layout, rotation, save_only_model, exact O(1) resume, torn
checkpoints, and resuming across transformers.Trainer <-> raytrainer. In-process, CPU, no Ray.

"Exact" means bit for bit: the resumed run's remaining logged losses are `==` the uninterrupted
run's and the final weights are `torch.equal`, with dropout active. Across the two trainers the
remaining losses must agree within rtol 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

import raytrainer
from raytrainer.data.checks import SAMPLE_ROWS
from raytrainer import TrainerCallback
from tests.helpers import (
    CountingDataset, assert_logs_close, cls_examples, lm_examples, make_args, state_dicts_equal, tiny_bert,
    tiny_gpt2, train_logs,
)

LAYOUT = {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
          "trainer_state.json", "training_args.bin"}


def _rt(tmp_path, model=None, train=None, eval_ds=None, **kw):
    args = make_args(raytrainer.TrainingArguments, tmp_path, **kw)
    return raytrainer.Trainer(model=model if model is not None else tiny_gpt2(), args=args,
                              train_dataset=train if train is not None else lm_examples(26), eval_dataset=eval_ds)


def _losses(trainer, after_step=0):
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e and e["step"] > after_step]


# ------------------------------------------------------------------------------ layout
def test_checkpoint_folder_layout(tmp_path):
    trainer = _rt(tmp_path, save_strategy="steps", save_steps=3)
    trainer.train()
    trainer.wait_for_checkpoints()
    names = sorted(os.listdir(tmp_path))
    assert names == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]  # every 3 steps + the last (8)
    for name in names:
        files = set(os.listdir(tmp_path / name))
        assert LAYOUT <= files, LAYOUT - files
        assert not any(f.startswith("tmp-") for f in files)
    state = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["max_steps"] == 8
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4, 5, 6]
    # the weights are the model's at step 6, loadable with transformers
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "checkpoint-8")
    assert state_dicts_equal(model, trainer.model)
    sd = load_file(tmp_path / "checkpoint-6" / "model.safetensors")
    assert set(sd) <= set(trainer.model.state_dict())
    opt = torch.load(tmp_path / "checkpoint-6" / "optimizer.pt", weights_only=True)
    assert {"state", "param_groups"} <= opt.keys()
    sched = torch.load(tmp_path / "checkpoint-6" / "scheduler.pt", weights_only=True)
    assert sched["last_epoch"] == 6
    args = torch.load(tmp_path / "checkpoint-6" / "training_args.bin", weights_only=False)
    assert args.save_steps == 3


def test_save_only_model(tmp_path):
    trainer = _rt(tmp_path, save_strategy="epoch", save_only_model=True)
    trainer.train()
    trainer.wait_for_checkpoints()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-8"]
    files = set(os.listdir(tmp_path / "checkpoint-4"))
    assert {"model.safetensors", "config.json", "trainer_state.json"} <= files
    assert not files & {"optimizer.pt", "scheduler.pt", "rng_state.pth"}


def test_save_total_limit_never_deletes_best(tmp_path):
    scores = iter([0.1, 0.9, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])  # the best evaluation is step 2

    def compute_metrics(_):
        return {"score": next(scores)}

    args = make_args(raytrainer.TrainingArguments, tmp_path, eval_strategy="steps", eval_steps=1,
                     save_strategy="steps", save_steps=1, save_total_limit=2, metric_for_best_model="score",
                     load_best_model_at_end=True)
    trainer = raytrainer.Trainer(model=tiny_bert(), args=args, train_dataset=cls_examples(26),
                                 eval_dataset=cls_examples(8, seed=5), compute_metrics=compute_metrics)
    trainer.train()
    trainer.wait_for_checkpoints()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-8"]
    best = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    final = trainer.model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in best.items())  # load_best_model_at_end


# ------------------------------------------------------------------------------ exact resume
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """2 epochs of tiny GPT-2 with dropout, a checkpoint every 2 steps (epoch = 4 steps)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    data = CountingDataset(lm_examples(26))
    trainer = _rt(out, train=data, save_strategy="steps", save_steps=2)
    trainer.train()
    trainer.wait_for_checkpoints()
    return out, trainer, list(data.fetched)


@pytest.mark.parametrize("k,where", [(2, "mid-epoch"), (4, "epoch end")])
def test_exact_resume_bit_for_bit(tmp_path, uninterrupted, k, where):
    out, full, _ = uninterrupted
    state = json.loads((out / f"checkpoint-{k}" / "trainer_state.json").read_text())
    assert np.isclose(state["epoch"], 4 / 7 if k == 2 else 1.0), where  # 7 batches per epoch
    # a fresh Trainer with different initial weights: everything must come from the checkpoint
    resumed = _rt(tmp_path, model=tiny_gpt2(seed=123), save_strategy="no")
    resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{k}"))
    assert resumed.state.global_step == full.state.global_step == 8
    rest, expected = _losses(resumed, after_step=k), _losses(full, after_step=k)
    assert [s for s, _ in rest] == list(range(k + 1, 9))
    assert rest == expected  # bit for bit
    grad_norms = lambda t: [e["grad_norm"] for e in t.state.log_history if "loss" in e and e["step"] > k]  # noqa: E731
    assert grad_norms(resumed) == grad_norms(full)
    for (name, a), (_, b) in zip(resumed.model.state_dict().items(), full.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_interrupted_by_callback_then_resumed(tmp_path, uninterrupted):
    """Stop at step 3 right after its save (control.should_training_stop), then resume with a fresh Trainer."""
    _, full, _ = uninterrupted

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                control.should_save = True
                control.should_training_stop = True

    first = _rt(tmp_path, save_strategy="steps", save_steps=100)
    first.add_callback(StopAt())
    first.train()
    first.wait_for_checkpoints()
    assert first.state.global_step == 3 and os.path.isdir(tmp_path / "checkpoint-3")
    second = _rt(tmp_path, model=tiny_gpt2(seed=7), save_strategy="no")
    second.train(resume_from_checkpoint=True)
    assert _losses(second) == _losses(full)  # steps 1-3 restored from the state, 4-8 retrained
    assert state_dicts_equal(second.model, full.model)


def test_resume_does_not_iterate_skipped_batches(tmp_path, uninterrupted):
    out, _, fetched_full = uninterrupted
    data = CountingDataset(lm_examples(26))
    resumed = _rt(tmp_path, train=data, save_strategy="no")
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    # step 2 = 2 updates x 2 accumulated batches x 4 samples = 16 samples of epoch 0 already seen; each run
    # first reads the first SAMPLE_ROWS rows on the driver (data/checks.py: a malformed dataset named early)
    checked = list(range(SAMPLE_ROWS))
    assert fetched_full[:SAMPLE_ROWS] == data.fetched[:SAMPLE_ROWS] == checked
    assert len(fetched_full) == SAMPLE_ROWS + 52
    assert data.fetched[SAMPLE_ROWS:] == fetched_full[SAMPLE_ROWS + 16:]


def test_torn_checkpoints_never_chosen(tmp_path, uninterrupted):
    out, full, _ = uninterrupted
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(out / "checkpoint-4", run / "checkpoint-4")
    # a crash during a save leaves these behind
    shutil.copytree(out / "checkpoint-6", run / "tmp-checkpoint-6")
    shutil.copytree(out / "checkpoint-8", run / "checkpoint-8")
    os.remove(run / "checkpoint-8" / "trainer_state.json")  # written last: absent when torn
    resumed = _rt(run, model=tiny_gpt2(seed=5), save_strategy="no")
    resumed.train(resume_from_checkpoint=True)
    assert _losses(resumed, after_step=4) == _losses(full, after_step=4)  # resumed from checkpoint-4
    assert state_dicts_equal(resumed.model, full.model)


def test_resume_true_without_checkpoint_raises(tmp_path):
    (tmp_path / "tmp-checkpoint-2").mkdir()
    trainer = _rt(tmp_path)
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        trainer.train(resume_from_checkpoint=True)


# ------------------------------------------------------------------------------ across trainers
def _cls_trainer(cls, args_cls, out, model, **kw):
    args = make_args(args_cls, out, save_strategy="steps", save_steps=3, **kw)
    return cls(model=model, args=args, train_dataset=cls_examples(26))


@pytest.mark.parametrize("writer,reader", [("transformers", "raytrainer"), ("raytrainer", "transformers")])
def test_resume_across_trainers(tmp_path, writer, reader):
    impl = {"transformers": (transformers.Trainer, transformers.TrainingArguments),
            "raytrainer": (raytrainer.Trainer, raytrainer.TrainingArguments)}
    full = _cls_trainer(*impl[writer], tmp_path / "full", tiny_bert())
    full.train()
    if hasattr(full, "wait_for_checkpoints"):
        full.wait_for_checkpoints()
    ckpt = tmp_path / "full" / "checkpoint-3"  # mid-epoch (4 steps per epoch)
    resumed = _cls_trainer(*impl[reader], tmp_path / "resumed", tiny_bert(seed=9))
    resumed.train(resume_from_checkpoint=str(ckpt))
    a, b = train_logs(resumed), train_logs(full)
    assert len(a) == 8
    assert_logs_close(a[3:], b[3:], rtol=1e-5)
    # the final model of the resumed run loads with the Auto class and predicts like the trainer's
    resumed.save_model(str(tmp_path / "final"))
    if hasattr(resumed, "wait_for_checkpoints"):
        resumed.wait_for_checkpoints()
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    assert state_dicts_equal(loaded, resumed.model)
    batch = torch.stack([r["input_ids"] for r in cls_examples(4, seed=3)])
    resumed.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=batch).logits, resumed.model(input_ids=batch).logits)
    final_weights = {k: v for k, v in full.model.state_dict().items()}
    for k, v in resumed.model.state_dict().items():
        np.testing.assert_allclose(v.numpy(), final_weights[k].numpy(), rtol=1e-4, atol=1e-6, err_msg=k)
