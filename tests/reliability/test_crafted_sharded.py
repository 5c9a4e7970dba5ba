"""Crafted DeepSpeed and DCP checkpoints through real 2-worker train() calls: refused, the payload never runs,
and the workers' temporary downloads are gone when the refused run ends.

Three train() calls, two of which start a worker group (the `latest` redirect is refused on the driver).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

import raytrainer
from raytrainer.checkpoint.pickle_check import UnsafeCheckpointError

try:
    from tests.helpers import lm_examples, tiny_gpt2
    from tests.reliability.crafted import Payload, crafted_distcp
except ImportError:
    from crafted import Payload, crafted_distcp
    from helpers import lm_examples, tiny_gpt2

pytestmark = pytest.mark.ray

ZERO2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
         "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto"}
FSDP = dict(fsdp="full_shard auto_wrap", fsdp_config={"transformer_layer_cls_to_wrap": ["GPT2Block"]})


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    out = tmp_path_factory.mktemp("genuine") / "run"
    args = raytrainer.TrainingArguments(output_dir=str(out), max_steps=2, save_steps=2, per_device_train_batch_size=4,
                                        report_to="none", disable_tqdm=True)
    raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(8)).train()
    return out / "checkpoint-2"


def _crafted(genuine, tmp_path):
    checkpoint = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(genuine, checkpoint)
    return checkpoint


def _temp_folders() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("raytrainer-")}


def _resume_on_ray(tmp_path, resume, **strategy):
    args = raytrainer.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, save_steps=2,
                                        per_device_train_batch_size=2, report_to="none", disable_tqdm=True,
                                        num_workers=2, storage_path=str(tmp_path / "storage"), **strategy)
    trainer = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(8))
    trainer.train(resume_from_checkpoint=resume)


def test_deepspeed_global_step_payload_is_refused_on_the_workers(ray_cluster, genuine, tmp_path):
    pytest.importorskip("deepspeed")
    checkpoint = _crafted(genuine, tmp_path)
    marker = tmp_path / "ran"
    (checkpoint / "global_step2").mkdir()
    torch.save({"module": {"w": torch.ones(1)}, "extra": Payload(str(marker))},
               checkpoint / "global_step2" / "mp_rank_00_model_states.pt")
    before = _temp_folders()
    # a file:// URI: every worker downloads the checkpoint first (the storage path), and must remove it
    with pytest.raises(UnsafeCheckpointError, match=r"raytrainer-resume-.*/checkpoint-2/global_step2/mp_rank_00_model_"
                                                    r"states\.pt holds GLOBAL (builtins|io)\.open.*Resume from a "
                                                    r"checkpoint you trust"):
        _resume_on_ray(tmp_path, f"file://{checkpoint}", deepspeed=ZERO2)
    assert not marker.exists()
    assert _temp_folders() <= before, _temp_folders() - before


def test_deepspeed_latest_redirect_is_refused_on_the_driver(ray_cluster, genuine, tmp_path):
    pytest.importorskip("deepspeed")
    checkpoint = _crafted(genuine, tmp_path)
    marker = tmp_path / "ran"
    (checkpoint / "global_step2").mkdir()
    (checkpoint / "evil").mkdir()
    torch.save({"module": Payload(str(marker))}, checkpoint / "evil" / "mp_rank_00_model_states.pt")
    (checkpoint / "latest").write_text("evil")
    with pytest.raises(UnsafeCheckpointError, match="latest names the DeepSpeed tag 'evil'"):
        _resume_on_ray(tmp_path, str(checkpoint), deepspeed=ZERO2)
    assert not marker.exists()


def test_fsdp_dcp_byte_item_payload_is_refused_on_the_workers(ray_cluster, genuine, tmp_path):
    checkpoint = _crafted(genuine, tmp_path)
    marker = tmp_path / "ran"
    crafted_distcp(checkpoint / "optim_dcp", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"optim_dcp/__0_0\.distcp \(item optimizer\.param_groups\.0\.lr\) "
                                                    r"holds GLOBAL (builtins|io)\.open"):
        _resume_on_ray(tmp_path, str(checkpoint), **FSDP)
    assert not marker.exists()
