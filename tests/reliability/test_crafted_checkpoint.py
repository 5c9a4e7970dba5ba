"""A crafted checkpoint file cannot run code: every pickle a resume reads is loaded weights_only.

The payload would create a marker file when unpickled by plain pickle; resuming from a checkpoint
holding it must fail with torch's weights-only error, and the marker must not exist.
"""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import raytrainer
from raytrainer.checkpoint.pickle_check import UnsafeCheckpointError, check_checkpoint_pickles

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


# DeepSpeed's checkpoint engine and DCP's metadata reader unpickle without weights_only: checked first
SHARDED_FILES = ["global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt", "model_dcp/.metadata"]


@pytest.mark.parametrize("name", SHARDED_FILES)
def test_resume_refuses_a_crafted_deepspeed_or_dcp_pickle(tmp_path, name):
    args = raytrainer.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, save_steps=2,
                                        per_device_train_batch_size=4, report_to="none", disable_tqdm=True)
    raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8)).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    marker = tmp_path / "ran"
    (checkpoint / name).parent.mkdir()
    crafted = {"state": Payload(str(marker))}
    if name.endswith(".pt"):  # DeepSpeed writes torch.save files, DCP plain pickles
        torch.save(crafted, checkpoint / name)
    else:
        with open(checkpoint / name, "wb") as f:
            pickle.dump(crafted, f)
    resumed = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8))
    with pytest.raises(UnsafeCheckpointError, match=f"{name}.*holds GLOBAL (builtins|io).open"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()


def test_genuine_deepspeed_and_dcp_pickles_pass(tmp_path):
    import torch.distributed.checkpoint as dcp

    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    (tmp_path / "global_step1").mkdir()
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2),
                                         "state": torch.ones(3)}, "ds_version": deepspeed.__version__},
               tmp_path / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    dcp.save({"model": tiny_gpt2().state_dict()}, checkpoint_id=str(tmp_path / "model_dcp"))  # one process, no group
    check_checkpoint_pickles(str(tmp_path))
