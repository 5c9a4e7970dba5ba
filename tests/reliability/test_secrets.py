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


def ray_log_files() -> list[str]:
    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()
    return [os.path.join(d, n) for d, _, names in os.walk(logs) for n in names]


@pytest.mark.ray
@pytest.mark.e2e
def test_planted_secrets_reach_no_file_and_no_log_line(ray_cluster, s3_server, s3_bucket, mlflow_server, tmp_path,
                                                       tmp_path_factory, capfd, monkeypatch):
    """A distinct fake secret in each source: an env var, the MLflow password and tracking URI, the hub token, the
    DeepSpeed config (a URI with key:secret@), the S3 keys. A 2-worker DeepSpeed run to S3 logging to MLflow; then
    every file it wrote (bucket, output_dir, the MLflow server's store, Ray's session logs) and every captured
    line is searched for each: zero hits. (The storage URI's own key:secret@ is refused before a run: test_redact.)"""
    import mlflow

    planted = {name: f"{name}-{os.urandom(6).hex()}" for name in ("env", "mlflowpw", "tracking", "deepspeed")}
    monkeypatch.setenv("RAYTRAINER_TEST_SERVICE_API_TOKEN", planted["env"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", planted["mlflowpw"])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "tracker")
    host = mlflow_server.split("://", 1)[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://tracker:{planted['tracking']}@{host}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "planted-secrets")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    deepspeed = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                 "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
                 "csv_monitor": {"enabled": False, "output_path": f"s3://AKID:{planted['deepspeed']}@bucket/ds",
                                 "job_name": "ds"}}
    fs = s3_server.filesystem()
    args = raytrainer.TrainingArguments(**dict(run_args(tmp_path / "out"), report_to="mlflow"), num_workers=2,
                                        storage_path=f"s3://{s3_bucket}/runs", storage_filesystem=fs,
                                        run_name="planted", deepspeed=deepspeed)
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(16))
    trainer.train()
    trainer.save_model()
    run_id = mlflow.search_runs(experiment_names=["planted-secrets"], output_format="list")[0].info.run_id
    params = mlflow.get_run(run_id).data.params
    assert params["deepspeed.csv_monitor.output_path"] == "s3://bucket/ds" and params["hub_token"] == "<redacted>"
    secrets = [*planted.values(), HUB_TOKEN, s3_server.secret_key]
    local = tmp_path / "bucket"
    pafs.copy_files(s3_bucket, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    assert any(p.endswith("training_args.bin") for d, _, n in os.walk(local) for p in n)
    hits = files_containing(local, secrets) + files_containing(tmp_path / "out", secrets)
    for store in tmp_path_factory.getbasetemp().glob("mlflow*"):  # the tracking server's db and artifacts
        hits += files_containing(store, secrets)
    for path in ray_log_files():  # (the S3 keys: earlier tests of the session hand them to Ray on purpose)
        data = open(path, "rb").read()
        hits += [f"{path}: {s[:8]}..." for s in [*planted.values(), HUB_TOKEN] if s.encode() in data]
    out, err = capfd.readouterr()
    hits += [f"captured output: {s[:8]}..." for s in secrets if s in out + err]
    assert hits == []
