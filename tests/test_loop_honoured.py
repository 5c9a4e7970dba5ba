"""TrainingArguments fields and Trainer hooks that the raytrainer loop honours as transformers does.

Each test runs the same thing through transformers.Trainer (the expected outcome) and through
raytrainer.Trainer in-process (num_workers=0) and asserts the same outcome: logged values within
rtol 1e-5 (1e-4 under torch.compile), the same exception, the same log lines. Tiny models from
tests/helpers.py, CPU, a few seconds each.
"""

from __future__ import annotations

import logging
import os
import sys
import types

import numpy as np
import pytest
import torch
import transformers

import raytrainer
from raytrainer.loop import TrainingLoop

try:
    from tests.helpers import VOCAB, assert_logs_close, clone, lm_examples, make_args, tiny_gpt2, train_logs
except ImportError:
    from helpers import VOCAB, assert_logs_close, clone, lm_examples, make_args, tiny_gpt2, train_logs

RTOL = 1e-5


def _train_pair(tmp_path, model, train, hf_cls=transformers.Trainer, rt_cls=raytrainer.Trainer, after=None,
                trainer_kw=None, **overrides):
    """Train transformers' Trainer, then raytrainer's (each built right before it trains: both seed in __init__).

    `after(args)` changes the arguments after construction (fields a constructor would refuse on a CPU host).
    """
    out = []
    for cls, args_cls, sub in ((hf_cls, transformers.TrainingArguments, "hf"),
                               (rt_cls, raytrainer.TrainingArguments, "rt")):
        args = make_args(args_cls, tmp_path / sub, **overrides)
        if after is not None:
            after(args)
        trainer = cls(model=clone(model), args=args, train_dataset=train, **(trainer_kw or {}))
        trainer.train()
        out.append(trainer)
    return out


def varlen_examples(n=24, seed=3):
    """Causal-LM rows of 3..12 tokens (unpadded): for length grouping, padding and token counting."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 13, (1,), generator=g))
        start = int(torch.randint(0, VOCAB, (1,), generator=g))
        ids = (torch.arange(length) + start) % VOCAB
        rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": ids.clone()})
    return rows


def pad_collator(rows):
    """Right-pad to the longest row: pad id 0, mask 0, label -100."""
    width = max(len(r["input_ids"]) for r in rows)
    fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {k: torch.stack([torch.cat([torch.as_tensor(r[k]), torch.full((width - len(r[k]),), value)])
                            for r in rows]) for k, value in fill.items()}


# ----------------------------------------------------------------------------- 1. data hooks
class WeightedSampling:
    """A subclass's own sampler: later rows drawn more often (global RNG, as a user writes it)."""

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        return torch.utils.data.WeightedRandomSampler(torch.linspace(0.1, 1.0, len(ds)), num_samples=len(ds))


class HFWeighted(WeightedSampling, transformers.Trainer):
    pass


class RTWeighted(WeightedSampling, raytrainer.Trainer):
    pass


class Curriculum:
    """A subclass's own dataloader: a fixed curriculum order (rows last to first), no shuffling."""

    def get_train_dataloader(self):
        ds = self.train_dataset
        return torch.utils.data.DataLoader(ds, batch_size=self._train_batch_size, sampler=list(range(len(ds)))[::-1],
                                           collate_fn=self.data_collator)


class HFCurriculum(Curriculum, transformers.Trainer):
    pass


class RTCurriculum(Curriculum, raytrainer.Trainer):
    pass


def test_overridden_train_sampler_is_used_like_transformers(tmp_path):
    hf, rt = _train_pair(tmp_path, tiny_gpt2(), lm_examples(26), hf_cls=HFWeighted, rt_cls=RTWeighted)
    assert_logs_close(train_logs(rt), train_logs(hf), rtol=RTOL)


def test_overridden_train_dataloader_is_used_like_transformers(tmp_path):
    hf, rt = _train_pair(tmp_path, tiny_gpt2(), lm_examples(26), hf_cls=HFCurriculum, rt_cls=RTCurriculum,
                         num_train_epochs=1)
    assert_logs_close(train_logs(rt), train_logs(hf), rtol=RTOL)


@pytest.mark.parametrize("sampling", ["group_by_length", "sequential"])
def test_train_sampling_strategy_like_transformers(tmp_path, sampling):
    hf, rt = _train_pair(tmp_path, tiny_gpt2(), varlen_examples(), trainer_kw=dict(data_collator=pad_collator),
                         train_sampling_strategy=sampling, num_train_epochs=1)
    assert_logs_close(train_logs(rt), train_logs(hf), rtol=RTOL)


def test_resume_with_an_overridden_dataloader_reads_past_the_trained_batches(tmp_path, caplog):
    """Resume in the middle of an epoch: the skipped batches are read (said once), the run is the same."""
    kw = dict(save_strategy="steps", save_steps=3, save_in_background=False)
    full = RTCurriculum(model=tiny_gpt2(dropout=0.0),
                        args=make_args(raytrainer.TrainingArguments, tmp_path / "a", **kw),
                        train_dataset=lm_examples(26))
    full.train()
    resumed = RTCurriculum(model=tiny_gpt2(dropout=0.0),
                           args=make_args(raytrainer.TrainingArguments, tmp_path / "b", **kw),
                           train_dataset=lm_examples(26))
    with caplog.at_level(logging.WARNING, logger="raytrainer.loop"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    said = [r.getMessage() for r in caplog.records if "reading and discarding" in r.getMessage()]
    assert len(said) == 1 and "first 6 batches" in said[0], said  # 3 updates x 2 accumulated batches
    assert_logs_close(train_logs(resumed)[-5:], train_logs(full)[-5:], rtol=RTOL)


# ----------------------------------------------------------------------------- 2. Ray Data batches + collator
def _word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"[PAD]": 0, "[UNK]": 1, "[MASK]": 2, **{f"w{i}": i + 3 for i in range(20)}}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")),
                                                pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")


def _numpy_batch():
    """What Ray Data's iter_batches(batch_format="numpy") yields for rows of different lengths."""
    ids = np.empty(3, dtype=object)
    ids[:] = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10])]
    return {"input_ids": ids, "label": np.array([1, 0, 1]), "text": np.array(["a", "b", "c"], dtype=object)}


def test_ray_batch_goes_through_the_data_collator():
    from raytrainer.data.ray_data import collate_numpy_batch

    collator = transformers.DataCollatorWithPadding(_word_tokenizer())
    out = collate_numpy_batch(_numpy_batch(), {"input_ids", "label"}, collator)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert out["labels"].tolist() == [1, 0, 1] and "text" not in out  # the collator renames label -> labels

    torch.manual_seed(0)
    mlm = transformers.DataCollatorForLanguageModeling(_word_tokenizer(), mlm_probability=0.5)
    out = collate_numpy_batch(_numpy_batch(), {"input_ids"}, mlm)
    assert out["input_ids"].shape == out["labels"].shape == (3, 3)
    assert (out["labels"][out["labels"] != -100] > 2).all()  # labels only where tokens were masked


def test_ray_shard_loader_collates_what_the_shard_streams(monkeypatch):
    from raytrainer.data.ray_data import RayShard, RayShardLoader

    class FakeShard:  # ray.train.get_dataset_shard(name): only iter_batches is used
        def iter_batches(self, batch_size, batch_format, drop_last):
            assert batch_format == "numpy"
            yield _numpy_batch()
            yield _numpy_batch()

    fake_train = types.SimpleNamespace(get_dataset_shard=lambda name: FakeShard())
    fake_ray = types.ModuleType("ray")
    fake_ray.train = fake_train
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setitem(sys.modules, "ray.train", fake_train)

    shard = RayShard("train", total_rows=6, world_size=1)
    collator = transformers.DataCollatorWithPadding(_word_tokenizer())
    batches = list(RayShardLoader(shard, 3, {"input_ids", "label"}, collate_fn=collator))
    assert len(batches) == 2 and batches[1]["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    with pytest.raises(ValueError):  # no collator: ragged rows cannot be stacked (as before)
        list(RayShardLoader(shard, 3, {"input_ids", "label"}))


def test_loop_hands_the_user_collator_to_the_ray_loader(tmp_path):
    from raytrainer.data.ray_data import RayShard

    shard = RayShard("train", total_rows=8, world_size=1)
    args = make_args(raytrainer.TrainingArguments, tmp_path)
    for collator, expected in ((None, None), (pad_collator, pad_collator)):
        trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, data_collator=collator)
        trainer.train_dataset = shard
        loader, _ = TrainingLoop(trainer).build_train_dataloader()
        assert loader.collate_fn is expected


# ----------------------------------------------------------------------------- 3. empty cache, grad_norm
def test_max_grad_norm_zero_still_logs_grad_norm(tmp_path):
    hf, rt = _train_pair(tmp_path, tiny_gpt2(), lm_examples(26), max_grad_norm=0.0, num_train_epochs=1)
    assert all("grad_norm" in e for e in train_logs(rt))
    assert_logs_close(train_logs(rt), train_logs(hf), rtol=RTOL)


def test_torch_empty_cache_steps_clears_the_cache_like_transformers(tmp_path, monkeypatch):
    import accelerate.utils.memory
    import transformers.trainer

    calls = []

    def record(*args, **kwargs):  # the calls training_step makes (accelerate's free_memory makes others)
        caller = sys._getframe(1)
        if caller.f_code.co_name == "training_step":
            trainer = caller.f_locals["self"]
            calls.append((type(trainer).__module__.split(".")[0], trainer.state.global_step))

    monkeypatch.setattr(transformers.trainer, "clear_device_cache", record)
    monkeypatch.setattr(accelerate.utils.memory, "clear_device_cache", record)
    hf, rt = _train_pair(tmp_path, tiny_gpt2(), lm_examples(26), torch_empty_cache_steps=3, num_train_epochs=1)
    hf_calls = [step for who, step in calls if who == "transformers"]
    assert hf_calls == [step for who, step in calls if who == "raytrainer"] == [0, 0, 3]  # 7 batches: 2 per step
    assert_logs_close(train_logs(rt), train_logs(hf), rtol=RTOL)


# ----------------------------------------------------------------------------- 4. DDP keyword arguments
@pytest.mark.parametrize("overrides, plain_module", [
    ({}, False),
    ({"gradient_checkpointing": True}, False),
    ({}, True),
    ({"ddp_find_unused_parameters": False, "ddp_bucket_cap_mb": 10, "ddp_broadcast_buffers": False,
      "ddp_static_graph": True}, False),
    ({"ddp_find_unused_parameters": True, "gradient_checkpointing": True}, False),
])
def test_ddp_kwargs_are_transformers(tmp_path, overrides, plain_module):
    from raytrainer.strategies import DDPStrategy, build_strategy

    model = torch.nn.Linear(4, 2) if plain_module else tiny_gpt2()
    hf = transformers.Trainer(model=model, args=make_args(transformers.TrainingArguments, tmp_path, **overrides))
    handler = hf._build_accelerator_args()["kwargs_handlers"][0]
    # transformers always decides find_unused_parameters; the others only when set
    expected = {"find_unused_parameters": handler.find_unused_parameters}
    expected.update({k: getattr(handler, k) for k in ("bucket_cap_mb", "broadcast_buffers", "static_graph")
                     if f"ddp_{k}" in overrides})
    args = make_args(raytrainer.TrainingArguments, tmp_path, **overrides)
    strategy = build_strategy(args, torch.device("cpu"), model, world_size=2)
    assert isinstance(strategy, DDPStrategy)
    assert strategy.ddp_kwargs == expected


# ----------------------------------------------------------------------------- 5. multiprocessing context
def test_dataloader_multiprocessing_context_is_passed(tmp_path):
    args = make_args(raytrainer.TrainingArguments, tmp_path, dataloader_num_workers=2,
                     dataloader_multiprocessing_context="spawn")
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8))
    loader, _ = TrainingLoop(trainer).build_train_dataloader()
    assert loader.multiprocessing_context.get_start_method() == "spawn"


# ----------------------------------------------------------------------------- 6. DataParallel
def test_several_gpus_without_a_process_group_choose_data_parallel(monkeypatch):
    from raytrainer.strategies import DataParallelStrategy, Strategy, build_strategy

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = types.SimpleNamespace(n_gpu=2, mixed_precision="no", strategy="ddp")
    strategy = build_strategy(args, torch.device("cpu"), world_size=1)
    assert isinstance(strategy, DataParallelStrategy)
    assert isinstance(strategy.setup_model(torch.nn.Linear(2, 2)), torch.nn.DataParallel)
    args.n_gpu = 1
    assert type(build_strategy(args, torch.device("cpu"), world_size=1)) is Strategy


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA devices")
def test_several_gpus_in_one_process_use_data_parallel(tmp_path):
    hf, rt = _train_pair(tmp_path, tiny_gpt2(), lm_examples(26), use_cpu=False, num_train_epochs=1)
    assert rt.args.n_gpu > 1 and isinstance(rt.model_wrapped, torch.nn.DataParallel)
    assert_logs_close(train_logs(rt), train_logs(hf), rtol=1e-4)


# ----------------------------------------------------------------------------- 7. torch.compile
def test_torch_compile_trains_like_transformers_and_saves_clean_keys(tmp_path):
    from safetensors.torch import load_file

    hf, rt = _train_pair(tmp_path, tiny_gpt2(dropout=0.0), lm_examples(24), torch_compile=True,
                         torch_compile_backend="eager", num_train_epochs=1, save_strategy="epoch")
    assert rt.model_wrapped is not rt.model and hasattr(rt.model_wrapped, "_orig_mod")
    assert_logs_close(train_logs(rt), train_logs(hf), rtol=1e-4)
    rt.wait_for_checkpoints()
    keys = load_file(tmp_path / "rt" / "checkpoint-3" / "model.safetensors").keys()
    assert not any("_orig_mod" in k for k in keys)
    # transformers' names, all of them (raytrainer also writes the tied lm_head.weight)
    assert set(load_file(tmp_path / "hf" / "checkpoint-3" / "model.safetensors")) <= set(keys)


# ----------------------------------------------------------------------------- 8. tokens seen
@pytest.mark.parametrize("mode", ["all", "non_padding"])
def test_num_input_tokens_seen_like_transformers(tmp_path, mode):
    hf, rt = _train_pair(tmp_path, tiny_gpt2(), varlen_examples(), trainer_kw=dict(data_collator=pad_collator),
                         include_num_input_tokens_seen=mode, num_train_epochs=1)
    keys = ("loss", "num_input_tokens_seen")
    assert_logs_close(train_logs(rt, keys), train_logs(hf, keys), rtol=RTOL)
    assert rt.state.num_input_tokens_seen == hf.state.num_input_tokens_seen > 0
    last = [e for e in rt.state.log_history if "train_tokens_per_second" in e]
    assert last and len(last) == len([e for e in hf.state.log_history if "train_tokens_per_second" in e])


# ----------------------------------------------------------------------------- 9. auto_find_batch_size
class OutOfMemoryOverTwo(transformers.GPT2LMHeadModel):
    """Fakes a GPU that holds at most 2 rows."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if input_ids is not None and input_ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)


def test_auto_find_batch_size_like_transformers(tmp_path):
    hf, rt = _train_pair(tmp_path, tiny_gpt2(), lm_examples(26), auto_find_batch_size=True, num_train_epochs=1)
    assert rt._train_batch_size == hf._train_batch_size == 4
    assert_logs_close(train_logs(rt), train_logs(hf), rtol=RTOL)


def test_auto_find_batch_size_shrinks_the_batch_after_out_of_memory(tmp_path):
    torch.manual_seed(0)
    model = OutOfMemoryOverTwo(tiny_gpt2().config)
    hf, rt = _train_pair(tmp_path, model, lm_examples(26), auto_find_batch_size=True, num_train_epochs=1)
    assert rt._train_batch_size == hf._train_batch_size == 2  # 4 -> 3 (x 0.9) -> 2
    assert rt.state.train_batch_size == hf.state.train_batch_size == 2
    assert_logs_close(train_logs(rt), train_logs(hf), rtol=RTOL)


# ----------------------------------------------------------------------------- 10. debug, tf32
def test_debug_underflow_overflow_stops_like_transformers(tmp_path):
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.fill_(1e38)  # overflows in the first block
    errors = []
    for cls, args_cls in ((transformers.Trainer, transformers.TrainingArguments),
                          (raytrainer.Trainer, raytrainer.TrainingArguments)):
        args = make_args(args_cls, tmp_path / cls.__module__, debug="underflow_overflow", max_steps=1)
        with pytest.raises(ValueError, match="inf/nan detected") as info:
            cls(model=clone(model), args=args, train_dataset=lm_examples(8)).train()
        errors.append(str(info.value))
    assert errors[0] == errors[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_tf32_without_a_gpu_raises_transformers_error(tmp_path):
    with pytest.raises(ValueError) as hf_error:
        make_args(transformers.TrainingArguments, tmp_path, tf32=True)
    args = make_args(raytrainer.TrainingArguments, tmp_path, tf32=True)  # the workers' GPUs may have TF32
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8))
    with pytest.raises(ValueError) as rt_error:
        trainer.train()
    assert str(rt_error.value) == str(hf_error.value)


# ----------------------------------------------------------------------------- 11. the banner
def test_running_training_banner_is_transformers(tmp_path):
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler, hf_logger = Keep(), logging.getLogger("transformers.trainer")
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_info()
    hf_logger.addHandler(handler)
    try:
        banners = []
        for cls, args_cls in ((transformers.Trainer, transformers.TrainingArguments),
                              (raytrainer.Trainer, raytrainer.TrainingArguments)):
            lines.clear()
            args = make_args(args_cls, tmp_path / cls.__module__, num_train_epochs=1)
            cls(model=tiny_gpt2(), args=args, train_dataset=lm_examples(26)).train()
            start = lines.index("***** Running training *****")
            banners.append(lines[start:start + 9])
    finally:
        hf_logger.removeHandler(handler)
        transformers.logging.set_verbosity(level)
    assert banners[0] == banners[1]
    assert banners[1][1] == "  Num examples = 26" and banners[1][-1].startswith("  Number of trainable parameters = ")


# ----------------------------------------------------------------------------- 12. a bad resume path
@pytest.mark.parametrize("make_dir", [False, True])
def test_bad_resume_path_raises_transformers_error(tmp_path, make_dir):
    bad = tmp_path / "not-a-checkpoint"
    if make_dir:
        os.makedirs(bad)
    errors = []
    for cls, args_cls in ((transformers.Trainer, transformers.TrainingArguments),
                          (raytrainer.Trainer, raytrainer.TrainingArguments)):
        trainer = cls(model=tiny_gpt2(), args=make_args(args_cls, tmp_path / cls.__module__),
                      train_dataset=lm_examples(8))
        with pytest.raises(ValueError) as info:
            trainer.train(resume_from_checkpoint=str(bad))
        errors.append(str(info.value))
    assert errors[0] == errors[1] == f"Can't find a valid checkpoint at {bad}"
