"""Loop parity: raytrainer.Trainer vs transformers.Trainer, in-process (num_workers=0), CPU fp32.

Same model weights, data, seed and arguments (gradient_accumulation_steps=2, cosine schedule with
warmup, weight_decay=0.01, max_grad_norm=1.0, 2 epochs, logging_steps=1, dropout active).

Tolerance: every logged loss, learning_rate and grad_norm, and every evaluate() metric, must be
equal within a relative tolerance of 1e-5 (absolute 1e-7 for values near zero). predict() must
return a PredictionOutput with the same shape and values (same tolerance).
"""

from __future__ import annotations

import numpy as np
import pytest
import transformers

import raytrainer
from tests.helpers import (
    accuracy, assert_logs_close, clone, cls_examples, cls_hf_dataset, lm_examples, make_args,
    tiny_bert, tiny_gpt2, train_logs,
)

RTOL = 1e-5


def _pair(tmp_path, model, train, eval_ds=None, compute_metrics=None, **overrides):
    """Build and train transformers' Trainer, then raytrainer's, one after the other.

    Both seed the global RNG (dropout) in __init__ only, so each is built right before it trains.
    Returns (hf_trainer, rt_trainer, hf_train_output, rt_train_output).
    """
    hf = transformers.Trainer(
        model=clone(model), args=make_args(transformers.TrainingArguments, tmp_path / "hf", **overrides),
        train_dataset=train, eval_dataset=eval_ds, compute_metrics=compute_metrics,
    )
    out_hf = hf.train()
    rt = raytrainer.Trainer(
        model=clone(model), args=make_args(raytrainer.TrainingArguments, tmp_path / "rt", **overrides),
        train_dataset=train, eval_dataset=eval_ds, compute_metrics=compute_metrics,
    )
    out_rt = rt.train()
    return hf, rt, out_hf, out_rt


def test_gpt2_train_parity(tmp_path):
    hf, rt, out_hf, out_rt = _pair(tmp_path, tiny_gpt2(), lm_examples(26))
    logs_hf, logs_rt = train_logs(hf), train_logs(rt)
    # 26 examples / batch 4 = 7 batches -> 4 updates per epoch (the last one with a single batch)
    assert len(logs_rt) == 8
    assert all({"loss", "learning_rate", "grad_norm"} <= e.keys() for e in logs_rt)
    assert_logs_close(logs_rt, logs_hf, rtol=RTOL)
    assert rt.state.global_step == hf.state.global_step == 8
    assert np.isclose(out_rt.training_loss, out_hf.training_loss, rtol=RTOL)
    assert logs_rt[-1]["loss"] < logs_rt[0]["loss"]


def test_bert_classifier_parity_train_evaluate_predict(tmp_path):
    train, evals = cls_examples(26), cls_examples(20, seed=7)
    hf, rt, _, _ = _pair(tmp_path, tiny_bert(), train, evals, compute_metrics=accuracy,
                         eval_strategy="epoch")
    assert_logs_close(train_logs(rt), train_logs(hf), rtol=RTOL)
    # the per-epoch evaluations logged during training match too
    ev_hf = [e for e in hf.state.log_history if "eval_loss" in e]
    ev_rt = [e for e in rt.state.log_history if "eval_loss" in e]
    assert len(ev_rt) == len(ev_hf) == 2
    for a, b in zip(ev_rt, ev_hf):
        assert np.isclose(a["eval_loss"], b["eval_loss"], rtol=RTOL)
        assert a["eval_accuracy"] == b["eval_accuracy"]

    m_hf, m_rt = hf.evaluate(), rt.evaluate()
    assert {"eval_loss", "eval_accuracy", "epoch"} <= m_rt.keys()
    for k in ("eval_loss", "eval_accuracy", "epoch"):
        assert np.isclose(m_rt[k], m_hf[k], rtol=RTOL), (k, m_rt[k], m_hf[k])

    p_hf, p_rt = hf.predict(evals), rt.predict(evals)
    assert isinstance(p_rt, transformers.trainer_utils.PredictionOutput)
    assert isinstance(p_rt, raytrainer.PredictionOutput)
    assert p_rt.predictions.shape == p_hf.predictions.shape == (20, 2)
    np.testing.assert_allclose(p_rt.predictions, p_hf.predictions, rtol=RTOL, atol=1e-6)
    np.testing.assert_array_equal(p_rt.label_ids, p_hf.label_ids)
    assert np.isclose(p_rt.metrics["test_loss"], p_hf.metrics["test_loss"], rtol=RTOL)
    assert p_rt.metrics["test_accuracy"] == p_hf.metrics["test_accuracy"]


def test_hf_datasets_dataset_parity(tmp_path):
    """A `datasets.Dataset` (unused columns removed, default collator) trains like transformers."""
    ds = cls_hf_dataset(26)
    ds = ds.add_column("text_unused", ["x"] * len(ds))  # removed by remove_unused_columns
    hf, rt, _, _ = _pair(tmp_path, tiny_bert(), ds, num_train_epochs=1)
    assert_logs_close(train_logs(rt), train_logs(hf), rtol=RTOL)


def test_bf16_on_cpu_loss_falls(tmp_path):
    import torch

    args = make_args(raytrainer.TrainingArguments, tmp_path, bf16=True, num_train_epochs=6,
                     learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0)
    assert args.bf16
    trainer = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(26))
    with trainer.autocast_smart_context_manager():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    trainer.train()
    losses = [e["loss"] for e in train_logs(trainer)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
