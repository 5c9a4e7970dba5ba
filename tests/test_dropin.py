"""Drop-in without exceptions (issue 18, items 1-4), in-process: one script, run by transformers.Trainer and by
raytrainer, must see the same events, stop at the same step, accept the same input, resume to the same
global_step and weights, and fail with transformers' words.

Tolerance: in-process raytrainer vs transformers, logged values within rtol 1e-5 (test_parity.py's).
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers

import raytrainer
from tests.helpers import StopAt, assert_logs_close, lm_examples, make_args, tiny_gpt2, train_logs

BOTH = [transformers, raytrainer]
EVENTS = sorted(n for n in dir(transformers.TrainerCallback) if n.startswith("on_"))


class Recorder(transformers.TrainerCallback):
    """Every event with its global_step; optionally stops the run from on_save at one step."""

    def __init__(self, stop_in_on_save_at=None):
        self.events = []
        self.stop_at = stop_in_on_save_at

    def _record(self, name, state, control):
        self.events.append((name, state.global_step))
        if name == "on_save" and state.global_step == self.stop_at:
            control.should_training_stop = True


for _name in EVENTS:
    setattr(Recorder, _name, (lambda n: lambda self, args, state, control, **kw: self._record(n, state, control))(_name))


def checkpoints(out) -> list[str]:
    return sorted(p for p in os.listdir(out) if p.startswith("checkpoint-"))


# ------------------------------------------------------------------ item 1: on_save's place and its control flags
def run_save_script(mod, out, stop_at=None):
    args = make_args(mod.TrainingArguments, out, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                     save_strategy="steps", save_steps=2, num_train_epochs=2)
    recorder = Recorder(stop_at)
    trainer = mod.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(24), callbacks=[recorder])
    trainer.train()
    return trainer, recorder


@pytest.mark.parametrize("stop_at", [None, 6], ids=["full", "stop-in-on_save-at-6"])
def test_on_save_order_and_stop_step_match_transformers(tmp_path, stop_at):
    """24 samples / batch 4: 6 steps an epoch, save_steps=2. Step 6 saves and ends epoch 0: on_save comes before
    on_epoch_end, as in transformers; a stop set in on_save at step 6 stops there and checkpoint-6 is the last."""
    (hf, hf_rec), (rt, rt_rec) = (run_save_script(m, tmp_path / m.__name__, stop_at) for m in BOTH)
    assert rt.args.save_in_background  # the background writer is on: the loop waits because on_save is observed
    assert rt_rec.events == hf_rec.events
    assert rt.state.global_step == hf.state.global_step == (stop_at or 12)
    assert checkpoints(tmp_path / "raytrainer") == checkpoints(tmp_path / "transformers")
    saves = [e for e in rt_rec.events if e[0] in ("on_save", "on_epoch_end")]
    assert saves[:4] == [("on_save", 2), ("on_save", 4), ("on_save", 6), ("on_epoch_end", 6)]


def test_without_an_on_save_callback_the_write_stays_in_the_background(tmp_path):
    """No callback implements on_save: nothing observable depends on when it fires, so the loop does not wait
    for the writer at the step (what the benchmark's blocked/write ratio measures)."""
    args = make_args(raytrainer.TrainingArguments, tmp_path, per_device_train_batch_size=4,
                     gradient_accumulation_steps=1, save_strategy="steps", save_steps=2, num_train_epochs=1)
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(24))
    assert not trainer.callback_handler.on_save_observed(args)
    trainer.add_callback(Recorder())
    assert trainer.callback_handler.on_save_observed(args)
    trainer.pop_callback(Recorder)
    trainer.train()
    assert checkpoints(tmp_path) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


# ------------------------------------------------------------------ item 2: input transformers accepts
class Regressor(torch.nn.Module):
    """A regression model that takes float features under the name input_ids (transformers' docs do this)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, input_ids, labels=None):
        pred = self.linear(input_ids).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(pred, labels), "logits": pred}


def regression_rows(n=32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return [{"input_ids": x[i].tolist(), "labels": float(y[i])} for i in range(n)]


def test_float_input_ids_on_a_custom_module_train_as_in_transformers(tmp_path):
    runs = []
    for mod in BOTH:
        args = make_args(mod.TrainingArguments, tmp_path / mod.__name__, per_device_train_batch_size=4,
                         gradient_accumulation_steps=1, num_train_epochs=2, learning_rate=0.05,
                         lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0)
        trainer = mod.Trainer(model=Regressor(), args=args, train_dataset=regression_rows())
        trainer.train()
        runs.append(trainer)
    hf, rt = runs
    assert_logs_close(train_logs(rt), train_logs(hf))
    losses = [e["loss"] for e in train_logs(rt)]
    assert losses[-1] < losses[0] / 2
    for a, b in zip(hf.model.parameters(), rt.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_float_input_ids_into_an_embedding_are_refused_as_transformers_fails(tmp_path):
    rows = [{"input_ids": [0.5] * 8, "labels": [1] * 8} for _ in range(8)]
    args = make_args(transformers.TrainingArguments, tmp_path / "hf", max_steps=1)
    with pytest.raises(RuntimeError, match="indices"):
        transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=rows).train()
    args = make_args(raytrainer.TrainingArguments, tmp_path / "rt", max_steps=1)
    with pytest.raises(ValueError, match="token ids must be integers"):
        raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=rows).train()


def test_debug_none_is_accepted_as_by_transformers(tmp_path):
    for mod in BOTH:
        args = make_args(mod.TrainingArguments, tmp_path / mod.__name__, debug=None, max_steps=2)
        assert args.debug == []
        trainer = mod.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(16))
        trainer.train()
        assert trainer.state.global_step == 2


# ------------------------------------------------------------------ item 3: resume where the position can't be placed
@pytest.fixture(scope="module")
def checkpoint3(tmp_path_factory):
    """raytrainer, 24 samples, batch 4: checkpoint-3 (12 samples into epoch 0), then stopped."""
    out = tmp_path_factory.mktemp("first")
    args = make_args(raytrainer.TrainingArguments, out, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                     save_strategy="steps", save_steps=3)
    trainer = raytrainer.Trainer(model=tiny_gpt2(seed=5), args=args, train_dataset=lm_examples(24),
                                 callbacks=[StopAt(3)])
    trainer.train()
    trainer.wait_for_checkpoints()
    return str(out / "checkpoint-3")


@pytest.mark.parametrize("n,batch", [(16, 2), (40, 2)], ids=["smaller-dataset", "larger-dataset"])
def test_resume_with_another_dataset_size_and_batch_resumes_by_global_step(tmp_path, checkpoint3, caplog, n, batch):
    """transformers resumes by global_step and skips batches; raytrainer does the same, with one warning."""
    runs = []
    for mod in BOTH:
        args = make_args(mod.TrainingArguments, tmp_path / mod.__name__, per_device_train_batch_size=batch,
                         gradient_accumulation_steps=1, num_train_epochs=2)
        trainer = mod.Trainer(model=tiny_gpt2(seed=5), args=args, train_dataset=lm_examples(n))
        with caplog.at_level("WARNING", logger="raytrainer"):
            trainer.train(resume_from_checkpoint=checkpoint3)
        runs.append(trainer)
    hf, rt = runs
    assert rt.state.global_step == hf.state.global_step == 2 * n // batch
    assert_logs_close(train_logs(rt), train_logs(hf))
    for a, b in zip(hf.model.parameters(), rt.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    warned = [r.getMessage() for r in caplog.records if "Resuming by global_step" in r.getMessage()]
    assert len(warned) == 1 and "approximate" in warned[0]


# ------------------------------------------------------------------ item 4: transformers' words in our messages
def test_best_without_metric_message_holds_transformers_words(tmp_path):
    args = make_args(transformers.TrainingArguments, tmp_path / "hf", save_strategy="best", eval_strategy="steps")
    with pytest.raises(ValueError) as hf_error:
        transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8),
                             eval_dataset=lm_examples(4)).train()
    with pytest.raises(ValueError) as rt_error:
        make_args(raytrainer.TrainingArguments, tmp_path / "rt", save_strategy="best", eval_strategy="steps")
    assert str(hf_error.value) in str(rt_error.value)
    assert str(rt_error.value).startswith(str(hf_error.value))
    assert "metric_for_best_model=\"eval_loss\"" in str(rt_error.value)  # then our guidance


def test_resume_true_without_checkpoint_message_holds_transformers_words(tmp_path):
    errors = []
    for mod in BOTH:
        args = make_args(mod.TrainingArguments, tmp_path / mod.__name__)
        with pytest.raises(ValueError) as caught:
            mod.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8)).train(resume_from_checkpoint=True)
        errors.append(str(caught.value).replace(args.output_dir, "<output_dir>"))
    hf, rt = errors
    assert rt.startswith(hf) and "checkpoint-<step>" in rt, (hf, rt)


# ------------------------------------------------------------------ item 6: a deliberate difference, tested as such
def test_enable_jit_checkpoint_is_transformers_in_process_and_rays_notice_with_workers(tmp_path):
    """docs/compatibility.md: in-process raytrainer installs transformers' JITCheckpointCallback (SIGTERM) as
    transformers does; with Ray workers the driver does not (preemption is a drained node, watched by the
    workers: preemption.py), and the driver's arguments still say enable_jit_checkpoint=True."""
    import signal

    from transformers.trainer_jit_checkpoint import JITCheckpointCallback

    before = signal.getsignal(signal.SIGTERM)
    try:
        kinds = {}
        for mod, workers in ((transformers, None), (raytrainer, 0), (raytrainer, 1)):
            extra = {} if workers is None else {"num_workers": workers}
            args = make_args(mod.TrainingArguments, tmp_path / f"{mod.__name__}{workers}", enable_jit_checkpoint=True,
                             **extra)
            trainer = mod.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8))
            kinds[(mod.__name__, workers)] = any(isinstance(cb, JITCheckpointCallback)
                                                 for cb in trainer.callback_handler.callbacks)
            assert trainer.args.enable_jit_checkpoint
        assert kinds == {("transformers", None): True, ("raytrainer", 0): True, ("raytrainer", 1): False}
    finally:
        signal.signal(signal.SIGTERM, before)


# ------------------------------------------------------------------ item 6: auto_find_batch_size, with resume
class SmallMemoryGPT2(transformers.GPT2LMHeadModel):
    """Runs out of memory above config.max_rows rows per batch, with the words a CUDA OOM has (accelerate's
    find_executable_batch_size halves the batch on them)."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if input_ids is not None and input_ids.shape[0] > self.config.max_rows:
            raise RuntimeError(f"CUDA out of memory. Tried to allocate a batch of {input_ids.shape[0]} rows")
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)


def small_memory_gpt2(max_rows: int) -> SmallMemoryGPT2:
    from tests.helpers import gpt2_config

    config = gpt2_config()
    config.max_rows = max_rows
    torch.manual_seed(0)
    return SmallMemoryGPT2(config)


AUTO_BATCH = dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, auto_find_batch_size=True,
                  save_strategy="steps", save_steps=2)


def auto_batch_run(mod, out, max_rows, resume=None, **extra):
    """batch 8 (or extra's), cut by transformers' retry (accelerate: x0.9, rounded down) until it fits max_rows; 4 steps (2 after a resume at step 2)."""
    args = make_args(mod.TrainingArguments, out, max_steps=2 if resume is None else 4, **{**AUTO_BATCH, **extra})
    recorder = Recorder()
    trainer = mod.Trainer(model=small_memory_gpt2(max_rows), args=args, train_dataset=lm_examples(32),
                          callbacks=[recorder])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


def attempts(recorder) -> int:
    """transformers' retry runs the inner loop again: one on_train_begin per attempted batch size."""
    return sum(1 for name, _ in recorder.events if name == "on_train_begin")


@pytest.fixture(scope="module")
def found_4(tmp_path_factory):
    """transformers finds batch 4 (8, 7, 6, 5 do not fit) and saves checkpoint-2 with train_batch_size=4."""
    out = tmp_path_factory.mktemp("auto")
    trainer, recorder = auto_batch_run(transformers, out, max_rows=4)
    assert trainer.state.train_batch_size == 4 and attempts(recorder) == 5
    return str(out / "checkpoint-2")


def test_auto_find_batch_size_retries_as_transformers(tmp_path):
    (hf, hf_rec), (rt, rt_rec) = (auto_batch_run(m, tmp_path / m.__name__, max_rows=2, per_device_train_batch_size=4)
                                  for m in BOTH)
    assert rt_rec.events == hf_rec.events and attempts(rt_rec) == 3  # 4, 3, then 2 fits
    assert rt.state.train_batch_size == hf.state.train_batch_size == rt._train_batch_size == 2
    assert_logs_close(train_logs(rt), train_logs(hf))


def test_auto_find_batch_size_resume_starts_from_the_checkpoints_size(tmp_path, found_4):
    """On resume transformers starts the search at the checkpoint's train_batch_size (4), not the args' 8: with
    room for 2 rows now, attempts 4, 3, 2 (not 8 down to 2)."""
    (hf, hf_rec), (rt, rt_rec) = (auto_batch_run(m, tmp_path / m.__name__, 2, resume=found_4) for m in BOTH)
    assert attempts(hf_rec) == attempts(rt_rec) == 3
    assert rt_rec.events == hf_rec.events
    assert rt.state.global_step == hf.state.global_step == 4
    assert rt._train_batch_size == hf._train_batch_size == 2  # what a second train() starts from
    # transformers' state keeps the checkpoint's train_batch_size after a resume (the next save records 4)
    assert rt.state.train_batch_size == hf.state.train_batch_size == 4
