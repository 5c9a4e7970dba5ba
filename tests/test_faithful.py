"""Faithful everywhere: what a transformers user does to the Trainer holds in-process and under Ray.

One scenario, run three ways: transformers.Trainer in-process (the expected outcome), raytrainer
in-process, raytrainer with 2 Ray workers. After construction the script sets train_dataset,
data_collator (it shifts the labels, so ignoring it changes every loss), compute_metrics (a closure
that counts its calls), a subclass attribute read by an overridden `_save`, and adds a recorder
callback and an EarlyStoppingCallback with add_callback(); it trains with ignore_keys_for_eval.
The best eval is at step 2 (compute_metrics' "earliness") with save_total_limit=1 and
load_best_model_at_end: transformers keeps checkpoint-2 (best) and the latest while training, only the
best after it, and ends on step 2's weights. EarlyStoppingCallback(patience=2) stops at step 6.

Tolerance: 2 workers vs 1 process with the same global batch: logged values within rtol 1e-4
(gloo sums in another order); in-process raytrainer vs transformers: rtol 1e-5. The model is GPT-2: its
loss is normalised by num_items_in_batch, so transformers' DDP scaling (loss x world size) is exact;
a BERT classifier's CrossEntropy mean is not, and transformers 5.23 logs (and steps) 2x its loss
under 2-rank DDP: raytrainer does the same as transformers there, so it is not used for parity.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers.data.data_collator import default_data_collator

import raytrainer

try:
    from tests.helpers import VOCAB, accuracy, lm_examples, tiny_gpt2
except ImportError:
    from helpers import VOCAB, accuracy, lm_examples, tiny_gpt2

ON_SAVE_FILE = "written_in_on_save.txt"
MARKER = "marker.txt"
VALUE_KEYS = ("loss", "learning_rate", "grad_norm", "eval_loss", "eval_accuracy", "eval_earliness")


class MarkerMixin:
    """A subclass as users write them: its own _save, an evaluate that records its arguments."""

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            with open(os.path.join(output_dir, MARKER), "w") as f:
                f.write(self.marker_text)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        self.seen_ignore_keys.append(ignore_keys)
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)


class HFMarked(MarkerMixin, transformers.Trainer):
    pass


class RTMarked(MarkerMixin, raytrainer.Trainer):
    pass


class Recorder(transformers.TrainerCallback):
    """Records on_log entries and, in on_save, whether checkpoint-<step> is complete; writes a file there."""

    def __init__(self, relative_file=None):
        self.logs: list[dict] = []
        self.saves: list[tuple[int, bool]] = []
        self.relative_file = relative_file  # written at the end, relative to the working directory
        self.process_group = None  # (backend, timeout seconds) of the default process group, if any

    def on_train_begin(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_initialized():
            backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
            self.process_group = (dist.get_backend(), backend.options._timeout.total_seconds())

    def on_train_end(self, args, state, control, **kwargs):
        if self.relative_file and state.is_world_process_zero:
            with open(self.relative_file, "w") as f:
                f.write("done")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            self.logs.append(dict(logs, step=state.global_step))

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        complete = os.path.isfile(os.path.join(folder, "trainer_state.json"))
        self.saves.append((state.global_step, complete))
        if state.is_world_process_zero and complete:
            with open(os.path.join(folder, ON_SAVE_FILE), "w") as f:
                f.write(str(state.global_step))


def shift_labels(features):
    batch = default_data_collator(features)
    batch["labels"] = (batch["labels"] + 1) % VOCAB  # another (learnable) target: ignoring it changes every loss
    return batch


def counting_metrics():
    calls: list[int] = []

    def compute_metrics(eval_pred):
        calls.append(1)
        # "earliness" is best at the first evaluation (step 2) under greater_is_better
        return {**accuracy(eval_pred), "earliness": -len(calls)}

    return compute_metrics, calls


def run_scenario(kind: str, out, workers: int = 0, recorder=None, **rt_extra):
    trainer_cls, args_cls = (HFMarked, transformers.TrainingArguments) if kind == "hf" else \
        (RTMarked, raytrainer.TrainingArguments)
    extra = {"report_to": "none", "num_workers": workers, **rt_extra} if kind == "rt" else {"report_to": "none"}
    args = args_cls(
        output_dir=str(out), per_device_train_batch_size=4 // max(workers, 1), per_device_eval_batch_size=4,
        num_train_epochs=2, learning_rate=5e-3, logging_steps=1, eval_strategy="steps", eval_steps=2,
        save_strategy="steps", save_steps=2, save_total_limit=1, load_best_model_at_end=True,
        metric_for_best_model="earliness", greater_is_better=True, seed=42,
        disable_tqdm=True, use_cpu=True, **extra,
    )
    trainer = trainer_cls(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(8),
                          eval_dataset=lm_examples(8, seed=5))
    # --- everything below happens after construction ---
    trainer.train_dataset = lm_examples(32)  # 8 steps per epoch; the constructor's dataset had 2
    trainer.data_collator = shift_labels
    trainer.compute_metrics, calls = counting_metrics()
    trainer.marker_text = "set after construction"
    trainer.seen_ignore_keys = []
    recorder = recorder or Recorder()
    trainer.add_callback(recorder)
    trainer.add_callback(transformers.EarlyStoppingCallback(early_stopping_patience=2))
    trainer.train(ignore_keys_for_eval=["hidden_states"])
    return trainer, recorder, calls


def checkpoint_folders(folder) -> set[str]:
    return {n for n in os.listdir(folder) if n.startswith("checkpoint-")}


def values(logs):
    return [(e["step"], {k: e[k] for k in VALUE_KEYS if k in e}) for e in logs]


def assert_values_close(a, b, rtol):
    assert [s for s, _ in a] == [s for s, _ in b]
    for (step, x), (_, y) in zip(a, b):
        assert x.keys() == y.keys(), (step, x, y)
        for k in x:
            assert np.isclose(x[k], y[k], rtol=rtol, atol=1e-7), (step, k, x[k], y[k])


def assert_faithful(trainer, recorder, calls, expected, rtol):
    """`trainer` ended as transformers.Trainer's `expected` run did."""
    hf, hf_recorder, hf_calls = expected
    out = trainer.args.output_dir
    # EarlyStoppingCallback added after construction stopped at the same step; the dataset set after
    # construction decided max_steps (2 epochs x 8 steps)
    assert trainer.state.global_step == hf.state.global_step == 6
    assert trainer.state.max_steps == hf.state.max_steps == 16
    # the recorder callback (a driver object) holds the same on_log entries; compute_metrics' closure
    # counted the same calls; train(ignore_keys_for_eval=...) reached evaluate()
    assert_values_close(values(recorder.logs), values(hf_recorder.logs), rtol)
    assert len(calls) == len(hf_calls) == 3
    assert trainer.seen_ignore_keys == hf.seen_ignore_keys == [["hidden_states"]] * 3
    # retention: the newest plus the best, and the best weights loaded at the end
    assert checkpoint_folders(out) == checkpoint_folders(hf.args.output_dir) == {"checkpoint-2"}
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = load_file(os.path.join(out, "checkpoint-2", "model.safetensors"))
    for k, v in trainer.model.state_dict().items():
        if k in best:  # lm_head is tied to the embedding and saved once
            assert torch.equal(v.cpu(), best[k]), k
    # on_save found the folder complete, and the file it wrote there is kept; the overridden _save ran
    assert [s for s, _ in recorder.saves] == [s for s, _ in hf_recorder.saves] == [2, 4, 6]
    assert all(done for _, done in recorder.saves)
    for name in ("checkpoint-2",):
        files = set(os.listdir(os.path.join(out, name)))
        assert {ON_SAVE_FILE, MARKER} <= files, (name, files)
        with open(os.path.join(out, name, MARKER)) as f:
            assert f.read() == "set after construction"


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    return run_scenario("hf", tmp_path_factory.mktemp("hf") / "run")


def test_in_process_matches_transformers(hf_run, tmp_path):
    assert_faithful(*run_scenario("rt", tmp_path / "run"), hf_run, rtol=1e-5)


@pytest.mark.ray
def test_two_ray_workers_match_transformers(ray_cluster, hf_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative paths below mean tmp_path on the driver, and on the workers
    trainer, recorder, calls = run_scenario("rt", "run", workers=2, recorder=Recorder("recorder_done.txt"),
                                            report_to=["tensorboard"], logging_dir="tb_logs", ddp_timeout=1234)
    assert_faithful(trainer, recorder, calls, hf_run, rtol=1e-4)
    assert recorder.process_group == ("gloo", 1234)  # ddp_backend (None: gloo on CPU) and ddp_timeout reach Ray
    assert (tmp_path / "recorder_done.txt").read_text() == "done"
    assert list((tmp_path / "tb_logs").glob("events.out.tfevents.*"))  # logging_dir honoured, relative to the driver
    # the driver printed each training log line once (PrinterCallback, fed by rank 0's event stream)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{'loss'")]
    assert len(printed) == 6, printed


# ---------------------------------------------------------------------------------------------- PEFT
def lora_trainer(trainer_cls, args_cls, out, **extra):
    import peft

    model = peft.get_peft_model(tiny_gpt2(dropout=0.0), peft.LoraConfig(r=4, target_modules=["c_attn"]))
    args = args_cls(
        output_dir=str(out), per_device_train_batch_size=4 // max(extra.get("num_workers", 0), 1),
        per_device_eval_batch_size=4, max_steps=6, learning_rate=1e-2, logging_steps=1, eval_strategy="steps",
        eval_steps=2, save_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
        greater_is_better=True, seed=42, report_to="none", disable_tqdm=True, use_cpu=True, **extra,
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=lm_examples(24), eval_dataset=lm_examples(8, seed=3))
    trainer.add_callback(Recorder())
    return trainer


def adapter_weights(model) -> dict:
    import peft

    return {k: v.detach().cpu().clone() for k, v in peft.get_peft_model_state_dict(model).items()}


def assert_adapter_checkpoints(folder, best_adapter):
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6"):
        files = set(os.listdir(os.path.join(folder, name)))
        assert {"adapter_config.json", "adapter_model.safetensors", ON_SAVE_FILE} <= files, files
        assert "model.safetensors" not in files
    saved = load_file(os.path.join(folder, "checkpoint-2", "adapter_model.safetensors"))
    assert saved.keys() == best_adapter.keys()
    for k in saved:
        assert torch.equal(saved[k], best_adapter[k]), k


def test_peft_adapter_checkpoints_and_best_adapter_in_process(tmp_path):
    hf = lora_trainer(transformers.Trainer, transformers.TrainingArguments, tmp_path / "hf")
    hf.train()
    rt = lora_trainer(raytrainer.Trainer, raytrainer.TrainingArguments, tmp_path / "rt")
    rt.train()
    assert set(os.listdir(tmp_path / "rt" / "checkpoint-2")) >= set(os.listdir(tmp_path / "hf" / "checkpoint-2")) - {
        ON_SAVE_FILE}
    # the best (step 2) adapter is loaded at the end, as transformers does
    assert_adapter_checkpoints(tmp_path / "rt", adapter_weights(rt.model))
    for k, v in adapter_weights(hf.model).items():
        torch.testing.assert_close(adapter_weights(rt.model)[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.ray
def test_peft_under_ray_with_a_separate_storage_path(ray_cluster, tmp_path):
    """Checkpoints staged in output_dir for on_save, persisted to storage_path/<run>, staging removed."""
    trainer = lora_trainer(raytrainer.Trainer, raytrainer.TrainingArguments, tmp_path / "out", num_workers=2,
                           storage_path=str(tmp_path / "storage"), run_name="lora")
    before = adapter_weights(trainer.model)
    trainer.train()
    persisted = tmp_path / "storage" / "lora"
    assert_adapter_checkpoints(persisted, adapter_weights(trainer.model))
    assert any(not torch.equal(before[k], v) for k, v in adapter_weights(trainer.model).items())
    assert not checkpoint_folders(tmp_path / "out")  # staging copies are gone once persisted
    assert trainer.state.global_step == 6 and trainer.state.best_model_checkpoint.endswith("lora/checkpoint-2")


# ---------------------------------------------------------------------------------------------- the Hub
def test_push_to_hub_without_network_says_so_once_and_keeps_the_card(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = raytrainer.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                                        push_to_hub=True, hub_model_id="someone/tiny", report_to="none",
                                        disable_tqdm=True, save_strategy="no")
    with caplog.at_level("WARNING", logger="raytrainer"):
        trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8))
        trainer.train()
        trainer.save_model()  # transformers pushes here: the model stays on disk, the card is written
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("push_to_hub")]
    assert len(lines) == 2 and "unreachable" in lines[0], lines
    assert (tmp_path / "out" / "model.safetensors").is_file()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "someone/tiny" in card or "tiny" in card
