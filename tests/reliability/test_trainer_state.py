"""A checkpoint's trainer_state.json is checked before a resume reads it: each malformed value is named
(file, key, fix) on the driver, and best_model_checkpoint cannot point outside the run."""

from __future__ import annotations

import json
import os

import pytest
import torch
from pyarrow import fs as pafs

import raytrainer
from raytrainer.checkpoint.state_check import check_state_in_storage

try:
    from tests.helpers import lm_examples, tiny_checkpoint, tiny_gpt2
except ImportError:
    from helpers import lm_examples, tiny_checkpoint, tiny_gpt2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("state") / "run")


CORRUPTIONS = [
    (lambda s: {**s, "global_step": "2"}, r"global_step='2' must be int >= 0"),
    (lambda s: {**s, "global_step": -1}, r"global_step=-1 must be int >= 0"),
    (lambda s: {k: v for k, v in s.items() if k != "global_step"}, "no global_step"),
    (lambda s: {**s, "steps_done": 2}, r"unknown key\(s\) \['steps_done'\]"),
    (lambda s: {**s, "log_history": ["loss 1.0"]}, "log_history must be a list of objects"),
    (lambda s: {**s, "best_model_checkpoint": "../../../etc"}, "best_model_checkpoint='../../../etc' must be"),
    (lambda s: {**s, "best_model_checkpoint": "/x/checkpoint-2/../../../etc/checkpoint-1"}, "must be the path"),
    (lambda s: [s], "must hold a JSON object"),
    # outside the run folder: load_best_model_at_end would read it, save_total_limit=1 would keep only it
    (lambda s: {**s, "best_model_checkpoint": "/etc/checkpoint-1"}, "'/etc/checkpoint-1' must be the path .* directly"),
    (lambda s: {**s, "best_model_checkpoint": "s3://other-bucket/x/checkpoint-3"}, "other-bucket.* directly inside"),
    (lambda s: {**s, "best_model_checkpoint": "/tmp/another-run/checkpoint-2"}, "another-run.* directly inside"),
]


@pytest.mark.parametrize("corrupt,message", CORRUPTIONS)
def test_resume_names_what_is_wrong_in_trainer_state(checkpoint, tmp_path, corrupt, message):
    import shutil

    bad = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(checkpoint, bad)
    state = json.loads((bad / "trainer_state.json").read_text())
    (bad / "trainer_state.json").write_text(json.dumps(corrupt(state)))
    args = raytrainer.TrainingArguments(output_dir=str(tmp_path / "next"), max_steps=4, per_device_train_batch_size=4,
                                        report_to="none", disable_tqdm=True)
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8))
    with pytest.raises(ValueError, match=message) as info:
        trainer.train(resume_from_checkpoint=str(bad))
    assert "trainer_state.json" in str(info.value) and trainer.state.global_step == 0
    assert sorted(os.listdir(bad)) == sorted(os.listdir(checkpoint))  # nothing deleted


def test_not_json_and_a_checkpoint_in_storage(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, bad)
    (bad / "trainer_state.json").write_text('{"global_step": 2,')
    local = pafs.LocalFileSystem()
    with pytest.raises(ValueError, match="is not valid JSON"):
        check_state_in_storage(local, str(bad))
    check_state_in_storage(local, checkpoint)  # the intact one passes
    (bad / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        check_state_in_storage(local, str(bad))


def test_best_checkpoint_in_storage_must_be_in_the_run_folder(checkpoint, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpoint, run / "checkpoint-2")
    path = run / "checkpoint-2" / "trainer_state.json"
    state = json.loads(path.read_text())
    local = pafs.LocalFileSystem()
    for best, ok in [(str(run / "checkpoint-2"), True), (str(run / "checkpoint-1"), True),
                     (str(tmp_path / "other" / "checkpoint-2"), False), (str(run / "sub" / "checkpoint-2"), False),
                     ("/etc/checkpoint-1", False), (str(run / "checkpoint-2" / ".." / "checkpoint-1"), False)]:
        path.write_text(json.dumps({**state, "best_model_checkpoint": best}))
        if ok:
            check_state_in_storage(local, str(run / "checkpoint-2"))
        else:
            with pytest.raises(ValueError, match="best_model_checkpoint=.* directly inside this run's folder"):
                check_state_in_storage(local, str(run / "checkpoint-2"))


def test_bucket_paths_stay_in_their_run_folder():
    from raytrainer.checkpoint.state_check import checkpoint_in_run

    assert checkpoint_in_run("bucket/runs/a/checkpoint-3", "bucket/runs/a", local=False)
    for other in ("bucket/runs/b/checkpoint-3", "other-bucket/runs/a/checkpoint-3", "s3://bucket/runs/a/checkpoint-3",
                  "bucket/runs/a/../b/checkpoint-3", "bucket/runs/a/checkpoint-3/x", "bucket/runs/a/ckpt-3"):
        assert not checkpoint_in_run(other, "bucket/runs/a", local=False), other


def _worker_run(run_dir, save_total_limit=1):
    from types import SimpleNamespace

    from raytrainer.checkpoint.ray_checkpoints import RayCheckpoints

    spec = SimpleNamespace(storage_filesystem=pafs.LocalFileSystem(), run_dir=str(run_dir), fit_id="fit")
    args = SimpleNamespace(output_dir=str(run_dir.parent / "out"), save_total_limit=save_total_limit)
    return RayCheckpoints(spec, args)


def test_a_best_checkpoint_outside_the_run_deletes_nothing_and_is_not_loaded(tmp_path, caplog):
    from types import SimpleNamespace

    run = tmp_path / "run"
    for step in (2, 4, 6):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        # this run's own checkpoints (retention only rotates its own lineage)
        torch.save({"fit_id": "fit"}, run / f"checkpoint-{step}" / "raytrainer_run.pt")
    worker = _worker_run(run)
    try:
        outside = str(tmp_path / "other-team" / "checkpoint-4")
        trainer = SimpleNamespace(state=SimpleNamespace(best_model_checkpoint=outside))
        worker.after_training(trainer)  # transformers' save_total_limit=1 end of train: keep only the best
        assert sorted(os.listdir(run)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
        assert "deletes none of its checkpoints" in caplog.text
        with pytest.raises(ValueError, match="not a checkpoint-<step> folder directly inside this run's folder"):
            worker.fetch(outside)  # load_best_model_at_end
        trainer.state.best_model_checkpoint = str(run / "checkpoint-4")  # its own best: the others go
        worker.after_training(trainer)
        assert sorted(os.listdir(run)) == ["checkpoint-4"]
    finally:
        worker.release_temp_dirs()


def test_a_downloaded_checkpoint_is_checked_against_its_run_folder_in_storage(checkpoint, tmp_path):
    """A worker resumes from a local copy of s3://bucket/runs/a/checkpoint-4: its best checkpoint is one of
    bucket/runs/a, not of the temporary folder it was downloaded to."""
    import shutil
    from types import SimpleNamespace

    from raytrainer.checkpoint.state_check import check_checkpoint_state
    from raytrainer.checkpoint.ray_checkpoints import RayCheckpoints

    s3 = pafs.S3FileSystem(anonymous=True, region="us-east-1")  # never contacted: only its kind matters
    spec = SimpleNamespace(storage_filesystem=s3, run_dir="bucket/runs/a", fit_id="fit")
    worker = RayCheckpoints(spec, SimpleNamespace(output_dir=str(tmp_path / "out"), save_total_limit=None))
    try:
        downloaded = os.path.join(worker.temp_dir("resume", "bucket/runs/a/checkpoint-4"), "checkpoint-4")
        restored = worker.temp_dir("restore", "bucket/runs/a/checkpoint-4")  # Ray's to_directory: the folder itself
        for local in (downloaded, restored):
            shutil.copytree(checkpoint, local, dirs_exist_ok=True)
            state = json.loads(open(os.path.join(local, "trainer_state.json")).read())
            for best, ok in [("bucket/runs/a/checkpoint-2", True), ("bucket/runs/b/checkpoint-2", False),
                             (os.path.join(os.path.dirname(local), "checkpoint-2"), False)]:
                with open(os.path.join(local, "trainer_state.json"), "w") as f:
                    json.dump({**state, "best_model_checkpoint": best}, f)
                if ok:
                    check_checkpoint_state(local, **worker.resume_origin(local))
                else:
                    with pytest.raises(ValueError, match="directly inside this run's folder 'bucket/runs/a'"):
                        check_checkpoint_state(local, **worker.resume_origin(local))
    finally:
        worker.release_temp_dirs()
    assert not os.path.exists(downloaded) and not os.path.exists(restored)
