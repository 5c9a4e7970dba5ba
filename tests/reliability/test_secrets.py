"""Credentials never reach what a run writes: hub_token, an S3 filesystem's keys.

transformers pickles the whole TrainingArguments into every training_args.bin (hub_token included:
the first test shows it); raytrainer saves a copy without credentials. Every file the run wrote (and,
under Ray, every object in the bucket) plus the captured output is searched for the secrets' bytes.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest
import transformers

import raytrainer

try:
    from tests.helpers import lm_examples, tiny_gpt2
except ImportError:
    from helpers import lm_examples, tiny_gpt2

HUB_TOKEN = "hf_doNotLeakThisToken1234567890"


def files_containing(root, secrets) -> list[str]:
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            data = open(os.path.join(folder, name), "rb").read()
            found += [f"{os.path.join(folder, name)}: {s[:6]}..." for s in secrets if s.encode() in data]
    return found


def run_args(out, **kw):
    return dict(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4, logging_steps=1,
                report_to="none", hub_token=HUB_TOKEN, disable_tqdm=True, **kw)


def test_transformers_itself_writes_the_hub_token(tmp_path):
    """The pain this guards against (so the search below can find a token when one is there)."""
    args = transformers.TrainingArguments(**run_args(tmp_path))
    transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(16)).train()
    assert files_containing(tmp_path, [HUB_TOKEN])


def test_no_secret_in_what_an_in_process_run_writes(tmp_path, capfd):
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=raytrainer.TrainingArguments(**run_args(tmp_path / "run")),
                                 train_dataset=lm_examples(16))
    trainer.train()
    trainer.save_model()
    assert trainer.args.hub_token == HUB_TOKEN  # the live arguments keep it (push_to_hub needs it)
    assert os.path.isfile(tmp_path / "run" / "checkpoint-4" / "training_args.bin")
    assert files_containing(tmp_path, [HUB_TOKEN]) == []
    out, err = capfd.readouterr()
    assert HUB_TOKEN not in out + err


@pytest.mark.ray
@pytest.mark.e2e
def test_no_secret_in_what_a_ray_run_writes_to_the_bucket(ray_cluster, s3_server, s3_bucket, tmp_path, capfd):
    fs = s3_server.filesystem()
    args = raytrainer.TrainingArguments(**run_args(tmp_path / "out"), num_workers=2, storage_path=f"s3://{s3_bucket}/runs",
                                        storage_filesystem=fs, run_name="secret-check")
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(16))
    trainer.train()
    trainer.save_model()
    local = tmp_path / "bucket"
    pafs.copy_files(s3_bucket, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    written = [os.path.join(d, n) for d, _, names in os.walk(local) for n in names]
    assert any(p.endswith(os.path.join("checkpoint-4", "training_args.bin")) for p in written), written
    secrets = [HUB_TOKEN, s3_server.secret_key]
    assert files_containing(local, secrets) == []
    assert files_containing(tmp_path / "out", secrets) == []
    out, err = capfd.readouterr()
    assert not [s for s in secrets if s in out + err]
