"""One writer per run folder (raytrainer/checkpoint/lease.py) and retention scoped to the run's own checkpoints.

Unit tests drive the lease directly (a live holder, a dead process, an expired TTL). The Ray test runs a
2-worker train() and, while it holds the folder (at its first persisted checkpoint), starts a second
train() with the same config and storage path: refused before any worker starts. The first finishes
with all of its checkpoints; a foreign checkpoint planted in the folder survives its retention and its
resume; the resume continues from its own newest checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.fs as pafs
import pytest
import torch

import raytrainer
from raytrainer.checkpoint.lease import LEASE_FILE, RunFolderBusy, RunLease

try:
    from tests.helpers import lm_examples, tiny_gpt2
except ImportError:
    from helpers import lm_examples, tiny_gpt2


def lease(run_dir, fit_id, name="run-a"):
    return RunLease(pafs.LocalFileSystem(), str(run_dir), fit_id, name, str(run_dir))


def test_a_live_writer_refuses_a_second_and_releases_on_exit(tmp_path):
    with lease(tmp_path / "run", "fit-a") as first:
        held = json.loads((tmp_path / "run" / LEASE_FILE).read_text())
        assert held["fit_id"] == "fit-a" and held["pid"] == os.getpid()
        with pytest.raises(RunFolderBusy, match=r"run 'run-a' \(fit fit-a.*run_name=<another name>"):
            lease(tmp_path / "run", "fit-b", "run-b").acquire()
        assert first.lost_to is None
    assert not (tmp_path / "run" / LEASE_FILE).exists()
    with lease(tmp_path / "run", "fit-b", "run-b"):  # free again
        pass


def test_a_dead_writers_lease_is_taken_over(tmp_path, monkeypatch):
    run = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with lease(run, "fit-dead"):
        pass
    record = lease(run, "fit-dead").lease | {"pid": int(dead.stdout)}  # a process of this host that exited
    (run / LEASE_FILE).write_text(json.dumps(record))
    with lease(run, "fit-new"):
        assert json.loads((run / LEASE_FILE).read_text())["fit_id"] == "fit-new"
    # another host's writer (pid unknowable here) that stopped renewing: dead after the TTL
    (run / LEASE_FILE).write_text(json.dumps(record | {"host": "elsewhere", "renewed_at": 0.0, "ttl_s": 60}))
    with lease(run, "fit-newer"):
        pass
    (run / LEASE_FILE).write_text(json.dumps(record | {"host": "elsewhere", "renewed_at": 1e12}))
    with pytest.raises(RunFolderBusy):
        lease(run, "fit-late").acquire()


def plant_foreign_checkpoint(run_dir, step=1):
    """A checkpoint of another run (another lineage) in the same folder: nobody else's retention may delete it."""
    folder = os.path.join(run_dir, f"checkpoint-{step}")
    os.makedirs(folder)
    torch.save({"world_size": 2, "global_batch_size": 8, "fit_id": "someone-else", "lineage": "someone-else"},
               os.path.join(folder, "raytrainer_run.pt"))
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step}, f)
    return folder


@pytest.mark.ray
def test_second_concurrent_run_is_refused_and_the_first_keeps_its_checkpoints(ray_cluster, tmp_path):
    from raytrainer.event_stream import DriverStream

    storage = tmp_path / "storage"
    run_dir = storage / "shared-run"
    # a higher step than this run ever reaches, written before it: transformers' rule would resume it (issue 19)
    foreign = plant_foreign_checkpoint(str(run_dir), step=10)

    def args(max_steps):
        return raytrainer.TrainingArguments(
            output_dir=str(tmp_path / "out"), storage_path=str(storage), run_name="shared-run", num_workers=2,
            max_steps=max_steps, save_steps=2, save_total_limit=2, per_device_train_batch_size=4, logging_steps=1,
            report_to="none", disable_tqdm=True)

    refused = []

    def second_run(event):  # on the driver, while the first run holds the folder
        kind, path, _ = event
        if kind == "checkpoint" and not refused:
            try:
                raytrainer.Trainer(model=tiny_gpt2(), args=args(6), train_dataset=lm_examples(32)).train()
                refused.append(None)
            except RunFolderBusy as e:
                refused.append(e)

    DriverStream.listeners.append(second_run)
    try:
        first = raytrainer.Trainer(model=tiny_gpt2(), args=args(6), train_dataset=lm_examples(32))
        first.train()
    finally:
        DriverStream.listeners.remove(second_run)
    assert refused and isinstance(refused[0], RunFolderBusy), refused
    assert "'shared-run'" in str(refused[0]) and "run_name=" in str(refused[0])
    assert first.state.global_step == 6
    left = sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint-"))
    assert left == ["checkpoint-10", "checkpoint-4", "checkpoint-6"], left  # its newest 2, and the foreign one
    assert not (run_dir / LEASE_FILE).exists()

    resumed = raytrainer.Trainer(model=tiny_gpt2(), args=args(8), train_dataset=lm_examples(32))
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 8
    # went on from its checkpoint-6, not the foreign checkpoint-10 (resume_pick.py: the run that wrote last):
    # its first 6 logged losses are the first run's, then steps 7 and 8
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == list(range(1, 9))
    assert [h["loss"] for h in resumed.state.log_history if "loss" in h][:6] == \
        [h["loss"] for h in first.state.log_history if "loss" in h]
    left = sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint-"))
    assert left == ["checkpoint-10", "checkpoint-6", "checkpoint-8"], left  # its own run rotated; the foreign stays
    assert os.path.isdir(foreign)
