"""fsdp's shards-only checkpoints outside fsdp (no Ray, one process): `raytrainer consolidate` writes a
model.safetensors that from_pretrained loads with the shards' weights bit for bit, and a run resumed
in-process from such a checkpoint reads the shards and ends with the uninterrupted run's weights.

The checkpoint is checkpoint-2 of a real 4-step in-process run, its model.safetensors replaced by `model_dcp/`
(DCP written by one process, as `get_model_state_dict` names the tensors). The same folders written by
2 fsdp workers: tests/test_strategies.py (consolidate, load_best from shards, resume on 1 worker)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import raytrainer
from raytrainer.cli.command import main
from tests.helpers import lm_examples, tiny_gpt2


def shards_only(checkpoint: str) -> dict:
    """Replace the checkpoint's model.safetensors by DCP shards of the same weights; returns the weights."""
    import torch.distributed.checkpoint as dcp

    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    model = tiny_gpt2()
    model.load_state_dict(weights, strict=False)
    model.tie_weights()
    with pytest.warns(UserWarning, match="save in a single process"):
        dcp.save({"model": model.state_dict()}, checkpoint_id=os.path.join(checkpoint, "model_dcp"))
    os.remove(os.path.join(checkpoint, "model.safetensors"))
    return model.state_dict()


def run(out, resume=None) -> dict:
    args = raytrainer.TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                                        report_to="none", disable_tqdm=True)
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8))
    trainer.train(resume_from_checkpoint=resume)
    return trainer.model.state_dict()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint-2 of a 4-step run, made shards-only; the run's final weights."""
    out = tmp_path_factory.mktemp("run")
    final = run(out)
    path = str(out / "checkpoint-2")
    return path, shards_only(path), final


def test_consolidate_writes_weights_from_pretrained_loads(checkpoint, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    path, weights, _ = checkpoint
    out = tmp_path / "model"
    assert main(["consolidate", path, "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "model.safetensors")
    # a model folder: the weights and config, none of the training state
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json"} <= files and not {"optimizer.pt", "trainer_state.json"} & files
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    for name, tensor in weights.items():
        assert torch.equal(loaded[name], tensor), name


def test_consolidate_names_what_is_wrong(tmp_path, capsys):
    assert main(["consolidate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no sharded weights to consolidate (model_dcp/.metadata)" in err and "written under fsdp" in err
    assert main(["consolidate", str(tmp_path / "checkpoint-3")]) == 2
    assert f"{tmp_path / 'checkpoint-3'}: no such folder" in capsys.readouterr().err


def test_a_run_resumed_without_fsdp_reads_the_shards(checkpoint, tmp_path):
    path, _, uninterrupted = checkpoint
    resumed = run(tmp_path / "resumed", resume=path)
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


def test_a_shards_only_checkpoint_counts_as_complete(checkpoint, tmp_path):
    """resume_from_checkpoint=True and the writer's space estimate find checkpoints by their weights: fsdp's
    model_dcp/ and ZeRO-3's state (its `latest` tag file) count as weights when no model.safetensors is there."""
    from raytrainer.checkpoint import complete_checkpoints

    path, _, _ = checkpoint
    assert path in complete_checkpoints(os.path.dirname(path))
    zero3 = tmp_path / "checkpoint-6"
    (zero3 / "global_step6").mkdir(parents=True)
    (zero3 / "trainer_state.json").write_text("{}")
    assert complete_checkpoints(str(tmp_path)) == []  # DeepSpeed state without its tag file: not a checkpoint
    (zero3 / "latest").write_text("global_step6")
    assert complete_checkpoints(str(tmp_path)) == [str(zero3)]


@pytest.mark.e2e
def test_consolidate_a_checkpoint_in_s3(checkpoint, s3_env, s3_bucket, tmp_path, capsys):
    """s3://bucket/run/checkpoint-2: fetched without its optimizer state, consolidated here, and the weights
    written back into the checkpoint (the default) or into a local --output folder."""
    import pyarrow.fs as pafs

    from raytrainer import storage

    path, weights, _ = checkpoint
    fs, base = storage.resolve_storage(f"s3://{s3_bucket}/run/checkpoint-2")
    storage.upload_dir(path, fs, base)
    uri = f"s3://{s3_bucket}/run/checkpoint-2"
    assert main(["consolidate", uri, "--output", str(tmp_path / "model")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "model" / "model.safetensors")
    assert main(["consolidate", uri]) == 0
    assert capsys.readouterr().out.strip() == f"{uri}/model.safetensors"
    storage.download_dir(fs, base, tmp_path / "back")
    for folder in (tmp_path / "model", tmp_path / "back"):
        loaded = load_file(folder / "model.safetensors")
        for name, tensor in weights.items():
            if name in loaded:  # a tied weight is saved once
                assert torch.equal(loaded[name], tensor), (folder, name)
    assert fs.get_file_info(f"{base}/model_dcp/.metadata").type == pafs.FileType.File  # the shards stay
    assert main(["consolidate", f"s3://{s3_bucket}/run/checkpoint-9"]) == 2
    assert "no such checkpoint in storage" in capsys.readouterr().err
    assert main(["consolidate", f"s3://AKIAPLANTED:planted-secret-123@{s3_bucket}/run/checkpoint-2"]) == 2
    assert "planted-secret-123" not in capsys.readouterr().err  # credentials in a URI are never echoed
