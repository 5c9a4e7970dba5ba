"""resume_from_checkpoint=True continues the run that wrote last, not another run's higher step (issue 19, item 5).

A fresh train() in a folder that holds an earlier run's checkpoints starts another run (raytrainer_run.pt's
"lineage"). transformers takes the highest step in the folder; raytrainer takes the highest step of the run
whose newest checkpoint was written last, with one warning, and keeps transformers' rule when the folder holds
one run. The same function serves the in-process path (a local folder) and the Ray path (a pyarrow filesystem).
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil

import pyarrow.fs as pafs
import pytest
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

import raytrainer
from raytrainer.checkpoint.resume_pick import Candidate, latest_in_folder, latest_in_storage, pick
from raytrainer.checkpoint.resume import latest_checkpoint_in

try:
    from tests.helpers import lm_examples, tiny_checkpoint, tiny_gpt2
    from tests.reliability.crafted import Payload
except ImportError:
    from crafted import Payload
    from helpers import lm_examples, tiny_checkpoint, tiny_gpt2


def test_one_run_keeps_transformers_rule():
    found = [Candidate(2, "r/checkpoint-2", "A", 30.0), Candidate(10, "r/checkpoint-10", "A", 10.0),
             Candidate(4, "r/checkpoint-4", "A", 20.0)]
    assert pick(found, "r") == "r/checkpoint-10"  # the highest step, whatever the times (a copied folder)
    assert pick([Candidate(2, "r/checkpoint-2", None, 5.0), Candidate(8, "r/checkpoint-8", None, 1.0)], "r") \
        == "r/checkpoint-8"  # transformers' own checkpoints (no raytrainer_run.pt)
    assert pick([], "r") is None


def test_the_run_that_wrote_last_wins_over_a_higher_step(caplog):
    found = [Candidate(8, "r/checkpoint-8", "earlier", 100.0), Candidate(10, "r/checkpoint-10", "earlier", 110.0),
             Candidate(2, "r/checkpoint-2", "later", 200.0), Candidate(4, "r/checkpoint-4", "later", 210.0)]
    with caplog.at_level(logging.WARNING, logger="raytrainer"):
        assert pick(found, "r") == "r/checkpoint-4"
    assert "holds checkpoints of 2 runs" in caplog.text and "checkpoint-8, checkpoint-10" in caplog.text
    assert "transformers would take checkpoint-10" in caplog.text
    # unknown or equal times: the run with the highest step, as transformers
    assert pick([Candidate(8, "r/checkpoint-8", "a", None), Candidate(4, "r/checkpoint-4", "b", None)], "r") \
        == "r/checkpoint-8"


def _run_folder(genuine, run_dir, runs):
    """Checkpoints copied from a genuine one, each marked with its run and its completion time."""
    for step, lineage, written in runs:
        folder = os.path.join(run_dir, f"checkpoint-{step}")
        shutil.copytree(genuine, folder)
        if lineage is not None:
            meta = torch.load(os.path.join(folder, "raytrainer_run.pt"), weights_only=True)
            torch.save({**meta, "lineage": lineage, "fit_id": lineage}, os.path.join(folder, "raytrainer_run.pt"))
        os.utime(os.path.join(folder, "trainer_state.json"), (written, written))


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("genuine") / "run")


MIXED = [(6, "earlier", 1_000_000.0), (8, "earlier", 1_000_100.0), (2, "later", 2_000_000.0), (4, "later", 2_000_100.0)]


def test_both_paths_pick_the_same_checkpoint(genuine, tmp_path):
    run_dir = str(tmp_path / "run")
    _run_folder(genuine, run_dir, MIXED)
    assert get_last_checkpoint(run_dir).endswith("checkpoint-8")  # what transformers would resume
    expected = os.path.join(run_dir, "checkpoint-4")
    assert latest_in_folder(run_dir) == expected  # in-process: checkpoint/resume.plan_resume
    assert latest_in_storage(pafs.LocalFileSystem(), run_dir) == expected
    assert latest_checkpoint_in(pafs.LocalFileSystem(), run_dir) == expected  # the Ray driver's
    bucket_like = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())  # paths as in a bucket
    assert latest_checkpoint_in(bucket_like, "run") == "run/checkpoint-4"


def test_a_crafted_run_file_does_not_run_and_counts_as_no_run(genuine, tmp_path):
    run_dir = str(tmp_path / "run")
    _run_folder(genuine, run_dir, [(2, "mine", 1_000_000.0), (4, None, 2_000_000.0)])
    marker = tmp_path / "ran"
    with open(os.path.join(run_dir, "checkpoint-4", "raytrainer_run.pt"), "wb") as f:
        pickle.dump({"lineage": Payload(str(marker))}, f)
    assert latest_in_folder(run_dir).endswith("checkpoint-4")  # chosen by time; its resume refuses the file
    assert latest_in_storage(pafs.LocalFileSystem(), run_dir).endswith("checkpoint-4")
    assert not marker.exists()


class FirstStep(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step


def test_train_resume_true_continues_the_run_that_wrote_last(genuine, tmp_path, caplog):
    run_dir = tmp_path / "run"
    _run_folder(genuine, str(run_dir), [(6, "earlier", 1_000_000.0), (2, "later", 2_000_000.0)])
    args = raytrainer.TrainingArguments(output_dir=str(run_dir), max_steps=4, save_strategy="no",
                                        per_device_train_batch_size=4, report_to="none", disable_tqdm=True)
    first = FirstStep()
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8), callbacks=[first])
    with caplog.at_level(logging.WARNING, logger="raytrainer"):
        trainer.train(resume_from_checkpoint=True)
    assert first.step == 2 and trainer.state.global_step == 4  # from the later run's checkpoint-2, not checkpoint-6
    assert "transformers would take checkpoint-6" in caplog.text
