"""A crafted checkpoint file cannot run code: every pickle a resume reads is loaded weights_only.

The payload would create a marker file when unpickled by plain pickle; resuming from a checkpoint
holding it must fail with torch's weights-only error, and the marker must not exist.
"""

from __future__ import annotations

import os
import pickle
import re

import pytest
import torch

import raytrainer
from raytrainer.checkpoint.pickle_check import UnsafeCheckpointError, check_checkpoint_pickles

try:
    from tests.helpers import lm_examples, tiny_gpt2
    from tests.reliability.crafted import Payload, crafted_distcp
except ImportError:
    from crafted import Payload, crafted_distcp
    from helpers import lm_examples, tiny_gpt2


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


# ------------------------------------------------------------------------------ every loader, one crafted file each
@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """One in-process run's checkpoint-2 (transformers' layout), copied by each test before it is crafted."""
    out = tmp_path_factory.mktemp("genuine") / "run"
    raytrainer.Trainer(model=tiny_gpt2(), args=_args(out), train_dataset=lm_examples(8)).train()
    return out / "checkpoint-2"


def _args(out, **kw):
    values = dict(output_dir=str(out), max_steps=2, save_steps=2, per_device_train_batch_size=4, report_to="none",
                  disable_tqdm=True)
    return raytrainer.TrainingArguments(**{**values, **kw})


def _copy(genuine, tmp_path):
    import shutil

    checkpoint = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(genuine, checkpoint)
    return checkpoint


def _resume(checkpoint, tmp_path, error, match, model=None):
    trainer = raytrainer.Trainer(model=model or tiny_gpt2(), args=_args(tmp_path / "next", max_steps=4),
                                 train_dataset=lm_examples(8))
    with pytest.raises(error, match=match):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert not (tmp_path / "next").exists() or not os.listdir(tmp_path / "next")  # no step trained, nothing saved


def test_a_dcp_byte_item_with_a_payload_is_refused_on_resume(genuine, tmp_path):
    checkpoint = _copy(genuine, tmp_path)
    marker = tmp_path / "ran"
    crafted_distcp(checkpoint / "optim_dcp", marker)
    _resume(checkpoint, tmp_path, UnsafeCheckpointError,
            r"optim_dcp/__0_0\.distcp \(item optimizer\.param_groups\.0\.lr\) holds GLOBAL (builtins|io)\.open")
    assert not marker.exists()


def test_the_safe_dcp_loader_refuses_it_inside_dcp_load(tmp_path):
    """The reader/planner the fsdp strategy loads with, without the check before it (a file swapped after it)."""
    from raytrainer.checkpoint.pickle_check import safe_dcp_load

    marker = tmp_path / "ran"
    crafted_distcp(tmp_path / "optim_dcp", marker)
    target = {"optimizer": {"param_groups.0.lr": 0.0, "param_groups.0.params": []}}
    with pytest.raises(Exception, match=r"holds GLOBAL (builtins|io)\.open") as info:
        safe_dcp_load(target, str(tmp_path / "optim_dcp"))
    assert "item optimizer.param_groups.0.lr" in str(info.value) and not marker.exists()
    # a genuine folder loads through the same reader and planner, values as saved
    import torch.distributed.checkpoint as dcp

    dcp.save({"optimizer": {"param_groups.0.lr": 0.25, "w": torch.arange(4.0)}}, checkpoint_id=str(tmp_path / "ok"))
    target = {"optimizer": {"param_groups.0.lr": 0.0, "w": torch.zeros(4)}}
    safe_dcp_load(target, str(tmp_path / "ok"))
    assert target["optimizer"]["param_groups.0.lr"] == 0.25 and torch.equal(target["optimizer"]["w"], torch.arange(4.0))


@pytest.mark.parametrize("latest", ["evil", "/tmp/evil", "global_step2/../evil", "global_step9"])
def test_a_deepspeed_latest_redirect_is_refused(genuine, tmp_path, latest):
    checkpoint = _copy(genuine, tmp_path)
    marker = tmp_path / "ran"
    (checkpoint / "global_step2").mkdir()
    for tag in ("evil", "global_step2"):  # the payload where `latest` leads, and a genuine-looking tag
        (checkpoint / tag).mkdir(exist_ok=True)
    torch.save({"module": Payload(str(marker))}, checkpoint / "evil" / "mp_rank_00_model_states.pt")
    (checkpoint / "latest").write_text(latest)
    _resume(checkpoint, tmp_path, UnsafeCheckpointError, rf"latest names the DeepSpeed tag '{re.escape(latest)}'")
    assert not marker.exists()


def test_the_safe_deepspeed_loader_refuses_a_payload(tmp_path):
    """What the deepspeed strategy installs as engine.checkpoint_engine.load (DeepSpeed's own: weights_only=False)."""
    from raytrainer.checkpoint.pickle_check import safe_deepspeed_load

    marker = tmp_path / "ran"
    torch.save({"module": {"w": torch.ones(2)}, "extra": Payload(str(marker))}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"mp_rank_00_model_states\.pt holds GLOBAL (builtins|io)\.open"):
        safe_deepspeed_load(str(tmp_path / "mp_rank_00_model_states.pt"), map_location="cpu")
    assert not marker.exists()


def test_symbolic_links_out_of_a_checkpoint_are_refused(genuine, tmp_path):
    checkpoint = _copy(genuine, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (checkpoint / "global_step2").symlink_to(elsewhere, target_is_directory=True)
    _resume(checkpoint, tmp_path, UnsafeCheckpointError, "global_step2 is a symbolic link")


def test_training_args_bin_is_never_read(genuine, tmp_path):
    """Neither transformers nor raytrainer reads training_args.bin on resume: a payload there cannot run."""
    checkpoint = _copy(genuine, tmp_path)
    marker = tmp_path / "ran"
    with open(checkpoint / "training_args.bin", "wb") as f:
        pickle.dump(Payload(str(marker)), f)
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=_args(tmp_path / "next", max_steps=4, save_strategy="no"),
                                 train_dataset=lm_examples(8))
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 4 and not marker.exists()


def test_a_peft_adapter_with_a_payload_is_refused(tmp_path):
    peft = pytest.importorskip("peft")

    def lora():
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True)
        return peft.get_peft_model(tiny_gpt2(dropout=0.0), config)

    out = tmp_path / "run"
    raytrainer.Trainer(model=lora(), args=_args(out), train_dataset=lm_examples(8)).train()
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file(), sorted(os.listdir(checkpoint))
    (checkpoint / "adapter_model.safetensors").unlink()  # PEFT falls back to adapter_model.bin (torch.load)
    marker = tmp_path / "ran"
    torch.save({"base_model.model.lm_head.weight": Payload(str(marker))}, checkpoint / "adapter_model.bin")
    _resume(checkpoint, tmp_path, pickle.UnpicklingError, "[Ww]eights only load failed", model=lora())
    assert not marker.exists()


def test_pytorch_model_bin_with_a_payload_is_refused(genuine, tmp_path):
    """Weights in transformers' older format: transformers loads them weights_only (safetensors has no pickle)."""
    checkpoint = _copy(genuine, tmp_path)
    (checkpoint / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"transformer.wte.weight": Payload(str(marker))}, checkpoint / "pytorch_model.bin")
    _resume(checkpoint, tmp_path, pickle.UnpicklingError, "[Ww]eights only load failed")
    assert not marker.exists()
