"""enable_jit_checkpoint (transformers' field) in-process: SIGTERM makes the loop write checkpoint-<step>
at the next step boundary and stop; a resume continues from that exact step. No optimizer step is
lost or repeated: the resumed run's steps are exactly the ones after the checkpoint, and its losses
are the uninterrupted run's (dropout off)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import transformers

import raytrainer

try:
    from tests.helpers import lm_examples, tiny_gpt2
except ImportError:
    from helpers import lm_examples, tiny_gpt2

TERM_AT = 5  # the step at whose end SIGTERM arrives (a spot instance's notice)


class SigtermAt(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == TERM_AT:
            os.kill(os.getpid(), signal.SIGTERM)


def make(out, **kw):
    args = raytrainer.TrainingArguments(output_dir=str(out), max_steps=40, per_device_train_batch_size=2,
                                        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                                        seed=3, **kw)
    return raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(64))


def losses(trainer, after=0):
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e and e["step"] > after]


@pytest.fixture
def keep_sigterm():
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def test_sigterm_checkpoints_the_current_step_and_resume_loses_nothing(tmp_path, keep_sigterm):
    full = make(tmp_path / "full")
    full.train()

    first = make(tmp_path / "run", enable_jit_checkpoint=True)
    jit = next(cb for cb in first.callback_handler.callbacks if type(cb).__name__ == "JITCheckpointCallback")
    jit.jit_manager.kill_wait = 0  # transformers waits 3 s for a SIGKILL that may follow; none comes here
    first.add_callback(SigtermAt())
    first.train()
    stopped = first.state.global_step
    assert TERM_AT <= stopped < 40  # stopped early, at the step boundary after the signal was handled
    # transformers' callback saves at the first event after the signal: a step's begin (before it runs: the
    # loop, like transformers', still finishes that step, whose update the checkpoint does not hold) or end
    checkpoints = [d for d in os.listdir(tmp_path / "run") if d.startswith("checkpoint-")]
    assert len(checkpoints) == 1 and int(checkpoints[0].split("-")[1]) in (stopped - 1, stopped), (checkpoints, stopped)
    saved = int(checkpoints[0].split("-")[1])
    with open(tmp_path / "run" / checkpoints[0] / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == saved
    assert not os.path.exists(tmp_path / "run" / checkpoints[0] / "checkpoint-is-incomplete.txt")

    resumed = make(tmp_path / "run")
    resumed.train(resume_from_checkpoint=True)
    assert [s for s, _ in losses(resumed, after=saved)] == list(range(saved + 1, 41))  # none lost or repeated
    assert losses(first) == losses(full)[:len(losses(first))]
    assert losses(resumed, after=saved) == pytest.approx(losses(full, after=saved), rel=1e-5)


def test_refused_with_ray_workers(tmp_path):
    args = raytrainer.TrainingArguments(output_dir=str(tmp_path), enable_jit_checkpoint=True, num_workers=2,
                                        report_to="none")
    with pytest.raises(ValueError, match="enable_jit_checkpoint=True with num_workers"):
        args.check_supported()
