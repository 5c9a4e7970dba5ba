"""A crafted checkpoint file cannot run code: every pickle a resume reads is loaded weights_only.

The payload would create a marker file when unpickled by plain pickle; resuming from a checkpoint
holding it must fail with torch's weights-only error, and the marker must not exist.
"""

from __future__ import annotations

import os
import pickle

import pytest

import raytrainer

try:
    from tests.helpers import lm_examples, tiny_gpt2
except ImportError:
    from helpers import lm_examples, tiny_gpt2


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # plain pickle would create the marker file


def test_the_payload_runs_under_plain_pickle(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(str(marker)))).close()
    assert marker.exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "raytrainer_run.pt"])
def test_resume_refuses_a_crafted_pickle(tmp_path, name):
    args = raytrainer.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2,
                                        per_device_train_batch_size=4, report_to="none", disable_tqdm=True)
    raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(16)).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / name).is_file(), sorted(os.listdir(checkpoint))
    marker = tmp_path / "ran"
    with open(checkpoint / name, "wb") as f:
        pickle.dump({"state": Payload(str(marker))}, f)
    resumed = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(16))
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only load failed"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()
