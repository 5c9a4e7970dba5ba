"""raytrainer.storage against a real SeaweedFS S3 server, plus the MLflow test server.

The storage tests never start Ray; the servers come from the session fixtures in conftest.py.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from raytrainer.storage import (
    copy_dir,
    delete_dir,
    download_dir,
    list_dirs,
    preflight_storage,
    resolve_storage,
    upload_dir,
)

try:
    from tests.services import free_port
except ImportError:
    from services import free_port

FAST_FAIL_S = 5.0  # every preflight failure must be reported within this many seconds


def _expect_preflight_error(storage_path: str, *fragments: str, **kwargs) -> ValueError:
    """Run the preflight, assert it fails fast with a ValueError naming storage_path."""
    started = time.monotonic()
    with pytest.raises(ValueError) as info:
        preflight_storage(storage_path, **kwargs)
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert elapsed < FAST_FAIL_S, f"preflight took {elapsed:.1f}s: {message}"
    assert "storage_path" in message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    return info.value


def _make_tree(root: Path) -> dict[str, bytes]:
    """A checkpoint-like folder: nested files, one big enough for a multipart upload."""
    files = {
        "config.json": b'{"model_type": "gpt2"}',
        "model.safetensors": os.urandom(6 * 1024 * 1024 + 123),
        "optimizer.pt": os.urandom(4096),
        "nested/deeper/rng_state_0.pth": os.urandom(77),
        "empty.txt": b"",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


# ------------------------------------------------------------------------------- resolve (unit)


def test_resolve_local_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = resolve_storage("runs/exp1")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path / "runs" / "exp1")
    assert resolve_storage(f"file://{tmp_path}")[1] == str(tmp_path)


def test_resolve_s3_reads_aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    fs, path = resolve_storage("s3://bucket/prefix/run/")
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "bucket/prefix/run"
    assert fs.region == "eu-west-3"


def test_resolve_keeps_a_given_filesystem(tmp_path):
    given = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    fs, path = resolve_storage("s3://bucket/prefix", given)
    assert fs is given and path == "bucket/prefix"


def test_resolve_rejects_empty_path():
    with pytest.raises(ValueError, match="storage_path"):
        resolve_storage("")
    with pytest.raises(ValueError, match="storage_path"):
        resolve_storage("s3://")


# ------------------------------------------------------------------------------ S3 (SeaweedFS)


@pytest.mark.e2e
def test_upload_download_round_trip(s3_env, s3_bucket, tmp_path):
    import boto3

    source = tmp_path / "checkpoint-10"
    files = _make_tree(source)

    fs, run_path = resolve_storage(f"s3://{s3_bucket}/runs/exp1")
    assert isinstance(fs, pafs.S3FileSystem) and run_path == f"{s3_bucket}/runs/exp1"
    upload_dir(source, fs, f"{run_path}/checkpoint-10")
    upload_dir(source, fs, f"{run_path}/checkpoint-20")

    # the objects really are in the bucket, seen by an independent client
    client = boto3.client(
        "s3", endpoint_url=s3_env.endpoint_url, region_name=s3_env.region,
        aws_access_key_id=s3_env.access_key, aws_secret_access_key=s3_env.secret_key,
    )
    listing = client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/exp1/checkpoint-10/")
    sizes = {obj["Key"]: obj["Size"] for obj in listing.get("Contents", [])}
    for rel, data in files.items():
        assert sizes[f"runs/exp1/checkpoint-10/{rel}"] == len(data)

    assert list_dirs(fs, run_path) == ["checkpoint-10", "checkpoint-20"]
    assert list_dirs(fs, f"{s3_bucket}/no/such/prefix") == []

    # a PBT exploit's copy: bucket to bucket (CopyObject), every file there
    copy_dir(fs, f"{run_path}/checkpoint-20", f"{s3_bucket}/runs/exp2/exploit-checkpoint-20-from-exp1")
    copied = client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/exp2/exploit-checkpoint-20-from-exp1/")
    assert {obj["Key"].rsplit("from-exp1/", 1)[1]: obj["Size"] for obj in copied.get("Contents", [])
            if not obj["Key"].endswith("/")} == {rel: len(data) for rel, data in files.items()}
    with pytest.raises(FileNotFoundError):
        copy_dir(fs, f"{run_path}/checkpoint-30", f"{run_path}/elsewhere")

    target = tmp_path / "downloaded"
    download_dir(fs, f"{run_path}/checkpoint-10", target)
    for rel, data in files.items():
        assert (target / rel).read_bytes() == data, rel

    delete_dir(fs, f"{run_path}/checkpoint-10")
    delete_dir(fs, f"{run_path}/checkpoint-10")  # absent: no error
    assert list_dirs(fs, run_path) == ["checkpoint-20"]
    with pytest.raises(FileNotFoundError):
        download_dir(fs, f"{run_path}/checkpoint-10", tmp_path / "again")

    delete_dir(fs, s3_bucket)  # a bare bucket is emptied, not deleted
    assert fs.get_file_info(s3_bucket).type == pafs.FileType.Directory
    assert client.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0


@pytest.mark.e2e
def test_preflight_passes_on_a_good_bucket(s3_env, s3_bucket):
    started = time.monotonic()
    preflight_storage(f"s3://{s3_bucket}/runs/exp1")
    assert time.monotonic() - started < 3.0
    # the probe object is gone again
    fs, _ = resolve_storage(f"s3://{s3_bucket}")
    leftovers = fs.get_file_info(pafs.FileSelector(s3_bucket, recursive=True))
    assert not [i.path for i in leftovers if i.type == pafs.FileType.File]


@pytest.mark.e2e
def test_preflight_uses_a_given_filesystem(s3_server, s3_bucket, monkeypatch):
    # no AWS_* env at all: only the given filesystem knows the endpoint and the keys
    for name in s3_server.env():
        monkeypatch.delenv(name, raising=False)
    given = s3_server.filesystem(allow_bucket_creation=False)
    preflight_storage(f"s3://{s3_bucket}/runs", storage_filesystem=given)
    _expect_preflight_error("s3://no-such-bucket-9a2e/runs", "storage_filesystem",
                            storage_filesystem=given)


@pytest.mark.e2e
def test_preflight_missing_bucket(s3_env):
    _expect_preflight_error("s3://no-such-bucket-4f1c/runs", "no-such-bucket-4f1c", "does not exist")


@pytest.mark.e2e
def test_preflight_unreachable_endpoint(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nobody listens
    _expect_preflight_error("s3://any-bucket/runs", "cannot reach", "AWS_ENDPOINT_URL")


@pytest.mark.e2e
def test_preflight_endpoint_that_never_answers(s3_env, monkeypatch):
    # accepts TCP connections (kernel backlog) but never replies: only the deadline saves us
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{silent.getsockname()[1]}")
        _expect_preflight_error("s3://any-bucket/runs", "no answer", timeout_s=2)


@pytest.mark.e2e
def test_preflight_bad_credentials(s3_env, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    _expect_preflight_error(f"s3://{s3_bucket}/runs", "access denied", "AWS_SECRET_ACCESS_KEY")


# -------------------------------------------------------------------------------------- local


def test_preflight_local_ok(tmp_path):
    target = tmp_path / "new" / "runs"
    preflight_storage(str(target))
    assert target.is_dir() and list(target.iterdir()) == []


def test_preflight_local_path_under_a_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _expect_preflight_error(str(blocker / "runs"), "not a writable directory")
    _expect_preflight_error(str(blocker), "not a writable directory")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file modes")
def test_preflight_local_read_only_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _expect_preflight_error(str(locked / "runs"), "not a writable directory")
        _expect_preflight_error(str(locked), "not a writable directory")
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------------------------- MLflow


@pytest.mark.e2e
def test_mlflow_server_records_a_metric(mlflow_server):
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment_id = client.create_experiment(f"raytrainer-fixture-{time.time_ns()}")
    run = client.create_run(experiment_id, run_name="fixture-check")
    run_id = run.info.run_id

    client.log_metric(run_id, "loss", 2.5, step=0)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric("loss", v, now, s) for s, v in [(1, 2.0), (2, 1.5)]])
    client.log_param(run_id, "learning_rate", "5e-5")
    client.log_text(run_id, "hello", "notes/hello.txt")  # proxied artifact upload
    client.set_terminated(run_id)

    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (0, 2.5), (1, 2.0), (2, 1.5)
    ]
    fetched = client.get_run(run_id)
    assert fetched.data.metrics["loss"] == 1.5
    assert fetched.data.params["learning_rate"] == "5e-5"
    assert fetched.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/hello.txt"]
