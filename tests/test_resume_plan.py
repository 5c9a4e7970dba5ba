"""checkpoint/resume.py: a resume is decided once, on the driver, into a ResumePlan the workers only load."""

from __future__ import annotations

import json
import pickle

import pyarrow.fs as pafs
import pytest
import torch

from raytrainer import TrainingArguments
from raytrainer.checkpoint.resume import check_download, plan_resume
from raytrainer.spec import ResumePlan, RunSpec


def _checkpoint(run, step, meta=None):
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "best_model_checkpoint": None}))
    (folder / "model.safetensors").write_bytes(b"")
    if meta is not None:
        torch.save(meta, folder / "raytrainer_run.pt")
    return folder


def test_in_process_plans_with_transformers_words(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path / "out"))
    assert plan_resume(args, None) is None and plan_resume(args, False) is None
    with pytest.raises(ValueError, match=r"^No valid checkpoint found in output directory"):
        plan_resume(args, True)
    with pytest.raises(ValueError, match=r"^Can't find a valid checkpoint at /nowhere"):
        plan_resume(args, "/nowhere")
    _checkpoint(tmp_path / "out", 2)
    newest = _checkpoint(tmp_path / "out", 4, {"world_size": 2, "global_batch_size": 8, "fit_id": "a", "lineage": "a"})
    plan = plan_resume(args, True)
    assert plan.checkpoint == str(newest) and not plan.in_storage and plan.lineage == "a"
    assert plan.checked == ("trainer_state",) and json.loads(plan.trainer_state)["global_step"] == 4
    assert plan == pickle.loads(pickle.dumps(plan))  # it crosses to the workers in the RunSpec


def test_a_bad_state_is_refused_on_the_driver(tmp_path):
    folder = _checkpoint(tmp_path / "run", 3)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": "3"}))
    with pytest.raises(ValueError, match="global_step"):
        plan_resume(TrainingArguments(output_dir=str(tmp_path)), str(folder))


def test_on_ray_the_run_folder_in_storage_is_searched_and_the_world_checked(tmp_path):
    run = tmp_path / "runs" / "a"
    _checkpoint(run, 6, {"world_size": 2, "global_batch_size": 8, "fit_id": "f", "lineage": "f",
                         "data_position": {"order": "ray_data_split_2", "num_samples": 16}})
    args = TrainingArguments(output_dir=str(tmp_path / "out"), num_workers=2)
    fs = pafs.LocalFileSystem()
    plan = plan_resume(args, True, fs=fs, run_dir=str(run), run_label="runs/a", ray_datasets=True)
    assert plan.in_storage and plan.checkpoint == f"{run}/checkpoint-6"
    assert plan.checked == ("trainer_state", "ray_data_split", "sharded_state")
    with pytest.raises(ValueError, match=r"^No valid checkpoint found in output directory \(runs/b\)"):
        plan_resume(args, True, fs=fs, run_dir=str(tmp_path / "runs" / "b"), run_label="runs/b")
    one = TrainingArguments(output_dir=str(tmp_path / "out"), num_workers=1)
    with pytest.raises(ValueError, match="cannot resume with num_workers=1: its Ray Dataset was split over 2"):
        plan_resume(one, True, fs=fs, run_dir=str(run), run_label="runs/a", ray_datasets=True)


def test_a_worker_loads_only_the_bytes_the_driver_checked(tmp_path):
    folder = _checkpoint(tmp_path / "run", 2)
    plan = plan_resume(TrainingArguments(output_dir=str(tmp_path)), str(folder))
    check_download(plan, str(folder))  # unchanged: loads
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2, "best_model_checkpoint": "/etc/x"}))
    with pytest.raises(ValueError, match="changed between the driver's check and this worker's download"):
        check_download(plan, str(folder))


def test_the_spec_is_frozen():
    plan = ResumePlan(checkpoint="c", in_storage=False, run_meta=None, trainer_state=None)
    spec = RunSpec(blueprint=None, resume=plan, storage_filesystem=None, run_dir="r", name="n", threads_per_worker=1,
                   dataset_rows={})
    with pytest.raises(AttributeError):
        spec.resume = None
    with pytest.raises(AttributeError):
        plan.checkpoint = "other"
