"""SIGKILL the driver of a 2-worker run: Ray ends the run's workers with it (they are owned by the dead
driver's job), and a new train(resume_from_checkpoint=True) with the same storage path continues from the
last complete checkpoint to the weights of an uninterrupted run. Nothing beyond that checkpoint is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import raytrainer

try:
    from tests.helpers import lm_examples, tiny_gpt2
except ImportError:
    from helpers import lm_examples, tiny_gpt2

pytestmark = pytest.mark.ray

# the driver's script: the same run as `make_args` below; rank 0 parks at the end of step 5 (after
# checkpoint-4 is in storage) and says so, so the driver dies mid-run, never between runs
DRIVER = textwrap.dedent("""
    import os, sys, time
    sys.path[:0] = [{repo!r}, {tests!r}]
    import transformers, raytrainer
    from helpers import lm_examples, tiny_gpt2

    class ParkAtStep5(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5 and state.is_world_process_zero:
                open({parked!r}, "w").close()
                time.sleep(600)  # until Ray ends this worker with its driver

    args = raytrainer.TrainingArguments(**{args!r})
    trainer = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(32),
                                 callbacks=[ParkAtStep5()])
    trainer.train()
""")


def make_args(out, storage):
    return dict(output_dir=str(out), storage_path=str(storage), run_name="crash", num_workers=2, max_steps=8,
                save_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, seed=11,
                report_to="none", disable_tqdm=True)


def wait_for(predicate, what, proc, timeout=240.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the driver exited (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)  # polling a file the run writes, with a deadline


def test_killed_driver_then_resume_true_continues_from_the_last_checkpoint(ray_cluster, tmp_path):
    import ray

    storage, parked = tmp_path / "storage", tmp_path / "parked"
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(repo=repo, tests=os.path.join(repo, "tests"), parked=str(parked),
                                    args=make_args(tmp_path / "out", storage)))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            ckpt4 = storage / "crash" / "checkpoint-4" / "trainer_state.json"
            wait_for(lambda: parked.exists() and ckpt4.is_file(), "step 5 with checkpoint-4 in storage", proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert not (storage / "crash" / "checkpoint-6").exists()

    # a new driver: the same arguments, resume=True finds checkpoint-4 in the storage path
    resumed = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=raytrainer.TrainingArguments(
        **make_args(tmp_path / "out", storage)), train_dataset=lm_examples(32))
    resumed.train(resume_from_checkpoint=True)
    steps = [e["step"] for e in resumed.state.log_history if "loss" in e]
    assert resumed.state.global_step == 8 and steps == list(range(1, 9))  # none lost, none repeated

    # the uninterrupted run (one process, the same global batch: 2-worker DDP matches it to ~1e-5)
    full_args = make_args(tmp_path / "full", storage)
    full_args.update(num_workers=0, storage_path=None, per_device_train_batch_size=4)
    full = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=raytrainer.TrainingArguments(**full_args),
                              train_dataset=lm_examples(32))
    full.train()
    for (name, a), b in zip(resumed.model.state_dict().items(), full.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
