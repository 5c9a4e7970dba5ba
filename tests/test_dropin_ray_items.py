"""Drop-in under Ray (issue 18, item 6) on Ray workers: save_strategy="best", what output_dir holds after the run,
and auto_find_batch_size with a resume, each compared with transformers.Trainer running the same script.

Two workers take half the batch each (the same global batch as transformers' one process); logged values and
weights within rtol 1e-4 / atol 1e-5 (test_ray_train.py's DDP tolerance).
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers

import raytrainer
from tests.helpers import assert_logs_close, lm_examples, make_args, tiny_gpt2, train_logs
from tests.test_dropin import Recorder, attempts, auto_batch_run, found_4  # noqa: F401 - found_4 is a fixture

BEST = dict(gradient_accumulation_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="best",
            metric_for_best_model="eval_loss", load_best_model_at_end=True, max_steps=8, per_device_eval_batch_size=2)


def best_run(mod, out, **extra):
    args = make_args(mod.TrainingArguments, out, **{**BEST, **extra})
    recorder = Recorder()
    trainer = mod.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(32),
                          eval_dataset=lm_examples(8, seed=3), callbacks=[recorder])
    trainer.train()
    return trainer, recorder


def without_predictions(recorder) -> list:
    return [e for e in recorder.events if e[0] != "on_prediction_step"]


def predictions(recorder) -> int:
    return sum(1 for e in recorder.events if e[0] == "on_prediction_step")


@pytest.mark.ray
def test_save_strategy_best_on_two_workers_and_output_dir_entries(ray_cluster, tmp_path, monkeypatch):
    """save_strategy="best" (the issue saw a RaySystemError with a recursion: not reproduced since, on 1 or 2
    workers). Same events, the same best checkpoints saved, the same best loaded at the end; output_dir holds
    transformers' entries plus final_model/ (Ray's own files are removed once the fit ended)."""
    monkeypatch.chdir(tmp_path)
    hf, hf_rec = best_run(transformers, tmp_path / "hf", per_device_train_batch_size=4)
    rt, rt_rec = best_run(raytrainer, tmp_path / "rt", per_device_train_batch_size=2, num_workers=2)
    # evaluation is sharded as under torchrun: rank 0's callbacks see its half of the prediction steps
    assert without_predictions(rt_rec) == without_predictions(hf_rec)
    assert predictions(rt_rec) * 2 == predictions(hf_rec) > 0
    assert rt.state.global_step == hf.state.global_step == 8
    assert_logs_close(train_logs(rt), train_logs(hf), rtol=1e-4, atol=1e-5)
    hf_entries = sorted(os.listdir(tmp_path / "hf"))
    assert hf_entries and all(e.startswith("checkpoint-") for e in hf_entries)
    assert sorted(os.listdir(tmp_path / "rt")) == sorted(hf_entries + ["final_model"])
    assert os.path.basename(rt.state.best_model_checkpoint) == os.path.basename(hf.state.best_model_checkpoint)
    assert os.path.dirname(rt.state.best_model_checkpoint) == str(tmp_path / "rt")
    assert rt.state.best_metric == pytest.approx(hf.state.best_metric, rel=1e-4)
    for a, b in zip(hf.model.parameters(), rt.model.parameters()):  # the best weights, loaded at the end
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.ray
def test_auto_find_batch_size_resume_on_a_ray_worker(ray_cluster, tmp_path, monkeypatch, found_4):
    """One worker (auto_find_batch_size needs num_workers <= 1): the resume starts the search at the checkpoint's
    size 4 as transformers does (attempts 4, 3, 2), and the driver holds the size that fitted afterwards."""
    monkeypatch.chdir(tmp_path)
    hf, hf_rec = auto_batch_run(transformers, tmp_path / "hf", 2, resume=found_4)
    local, _ = auto_batch_run(raytrainer, tmp_path / "local", 2, resume=found_4)
    rt, rt_rec = auto_batch_run(raytrainer, tmp_path / "rt", 2, resume=found_4, num_workers=1)
    assert attempts(rt_rec) == attempts(hf_rec) == 3
    assert rt_rec.events == hf_rec.events
    assert rt.state.global_step == 4
    assert rt._train_batch_size == hf._train_batch_size == 2
    assert rt.state.train_batch_size == hf.state.train_batch_size == 4
    assert_logs_close(train_logs(rt), train_logs(local), rtol=1e-4, atol=1e-5)
    for a, b in zip(local.model.parameters(), rt.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_ray_files_are_removed_and_nothing_else(tmp_path):
    """ray_files.remove_ray_files: Ray Train's two files go, checkpoints and final_model/ stay; run twice is fine."""
    import pyarrow.fs as pafs

    from raytrainer.ray_files import RAY_FILES, remove_ray_files

    for name in RAY_FILES:
        (tmp_path / name).write_text("{}")
    for folder in ("checkpoint-2", "final_model"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.safetensors").write_bytes(b"x")
    fs = pafs.LocalFileSystem()
    remove_ray_files(fs, str(tmp_path))
    remove_ray_files(fs, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "final_model"]
    assert os.listdir(tmp_path / "checkpoint-2") == ["model.safetensors"]


@pytest.mark.ray
def test_auto_find_batch_size_under_deepspeed_zero2_on_a_ray_worker(ray_cluster, tmp_path, monkeypatch, found_4):
    """ZeRO-2 on one worker: the out-of-memory retry builds a new engine (and optimizer) per attempt, and the
    resume starts at the checkpoint's size, with transformers' attempts and sizes (found_4: 8..4, 5 attempts)."""
    pytest.importorskip("deepspeed", reason="DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed")
    from tests.test_strategies import ZERO2

    monkeypatch.chdir(tmp_path)
    first, first_rec = auto_batch_run(raytrainer, tmp_path / "first", 4, num_workers=1, deepspeed=ZERO2)
    assert attempts(first_rec) == 5 and first._train_batch_size == first.state.train_batch_size == 4
    rt, rt_rec = auto_batch_run(raytrainer, tmp_path / "rt", 2, resume=str(tmp_path / "first" / "checkpoint-2"),
                                num_workers=1, deepspeed=ZERO2)
    assert attempts(rt_rec) == 3 and rt.state.global_step == 4
    assert rt._train_batch_size == 2 and rt.state.train_batch_size == 4
