"""`ray job submit` of jobs/finetune.py against a real 2-node Ray cluster with token auth, S3 storage
(SeaweedFS) and an MLflow server: the workers spread over both nodes, the checkpoints and the final
model land in the bucket, the job's log is plain lines with progress and the summary."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid

import pytest

try:
    from tests.services import find_executable, start_ray_cluster
except ImportError:
    from services import find_executable, start_ray_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """A head and a second node (`ray start --address`), 1 CPU each: a 2-worker job must use both."""
    if find_executable("ray") is None:
        pytest.skip("`ray` executable not found")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cluster = start_ray_cluster(tmp_path_factory.mktemp("ray_cluster"), cpus_per_node=(1, 1), env=env)
    yield cluster
    cluster.stop()
    assert not cluster.pids(), "processes of the test's Ray cluster survived stop()"


def wait_for_job(cluster, submission_id: str, timeout_s: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        info = cluster.api(f"/api/jobs/{submission_id}")
        if info["status"] in TERMINAL or time.monotonic() > deadline:
            return info
        time.sleep(1.0)


@pytest.mark.e2e
def test_ray_job_submit_on_two_nodes_with_s3_and_mlflow(two_node_cluster, s3_server, mlflow_server, tmp_path):
    import mlflow

    cluster = two_node_cluster
    bucket = s3_server.make_bucket(f"job-submit-{uuid.uuid4().hex[:8]}")
    experiment = f"job-submit-{uuid.uuid4().hex[:8]}"
    runs_home = tmp_path / "runs_home"
    job_env = {**s3_server.env(), "RAYTRAINER_RUNS_DIR": str(runs_home), "MLFLOW_TRACKING_URI": mlflow_server,
               "MLFLOW_EXPERIMENT_NAME": experiment}
    runtime_env = {"env_vars": job_env, "excludes": [".git", ".venv*", ".hypothesis", "runs", "out"]}
    submission_id = f"raytrainer-{uuid.uuid4().hex[:8]}"
    submit = subprocess.run(
        [find_executable("ray"), "job", "submit", "--address", cluster.dashboard_url, "--submission-id", submission_id,
         "--no-wait", "--working-dir", ROOT, "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "jobs/finetune.py", "--config", "jobs/configs/tiny_gpt2.yaml", "--num_workers", "2",
         "--max_steps", "4", "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "2",
         "--save_strategy", "steps", "--save_steps", "2", "--storage_path", f"s3://{bucket}/runs",
         "--report_to", "mlflow"],
        env=cluster.env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert cluster.token not in submit.stdout + submit.stderr

    info = wait_for_job(cluster, submission_id)
    logs = cluster.api(f"/api/jobs/{submission_id}/logs")["logs"]
    (tmp_path / "job.log").write_text(logs)  # kept by pytest for a look after a failure
    assert info["status"] == "SUCCEEDED", f"{info.get('message', '')[:300]}... whole log: {tmp_path / 'job.log'}"

    # the log: plain lines (no tqdm redraws, no escape codes), progress, the summary, no Ray noise
    assert "\r" not in logs and "\x1b[" not in logs, [line for line in logs.split("\n") if "\r" in line or "\x1b[" in line][:5]
    assert "PlacementGroupCleaner" not in logs
    assert_one_clean_stream(logs)
    progress = [line for line in logs.splitlines() if line.startswith("[progress] step ")]
    assert progress and progress[-1].startswith("[progress] step 4/4 (100%)"), progress
    assert "samples/s" in progress[-1] and "loss " in progress[-1], progress
    assert len([line for line in logs.splitlines() if line.startswith("{'loss'")]) == 4  # once each, not per rank
    assert "=== raytrainer job summary ===" in logs
    summary = json.loads(logs.split("RAYTRAINER_RESULT ", 1)[1].splitlines()[0])
    assert summary["global_step"] == 4 and summary["eval_loss"] > 0
    # a relative output_dir under a Ray job goes to the runs dir, not Ray's temporary copy of the repo
    assert summary["output_dir"] == str(runs_home / "tiny_gpt2")
    assert os.path.isfile(runs_home / "tiny_gpt2" / "model.safetensors")
    # ...and where they are in the bucket
    assert summary["final_model_uri"] == f"s3://{bucket}/runs/tiny_gpt2/final_model"
    assert f"final model URI: s3://{bucket}/runs/tiny_gpt2/final_model" in logs
    assert summary["checkpoints"] == f"s3://{bucket}/runs/tiny_gpt2/"

    # checkpoints and the final model are in the bucket
    fs = s3_server.filesystem()
    run_folder = f"{bucket}/runs/tiny_gpt2"
    from pyarrow.fs import FileSelector

    files = {info.path[len(run_folder) + 1:] for info in fs.get_file_info(FileSelector(run_folder, recursive=True))
             if info.type.name == "File"}
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        assert {f"{checkpoint}/model.safetensors", f"{checkpoint}/trainer_state.json", f"{checkpoint}/optimizer.pt",
                f"{checkpoint}/rng_state_0.pth", f"{checkpoint}/rng_state_1.pth"} <= files, sorted(files)
    assert {"final_model/model.safetensors", "final_model/config.json"} <= files, sorted(files)

    # the 2 training workers ran on the 2 nodes
    out = subprocess.run([find_executable("ray"), "list", "actors", "--address", cluster.dashboard_url,
                          "--filter", "class_name=RayTrainWorker", "--detail", "--format", "json", "--limit", "100"],
                         env=cluster.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    workers = json.loads(out.stdout)
    assert workers and {w["node_id"] for w in workers} == {n["node_id"] for n in cluster.alive_nodes()}

    # the job's MLflow run: the driver opened it, rank 0 on a worker node logged into it
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.runName"] == "tiny_gpt2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert {"training_plot.png", "model"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


RAY_PREFIX = re.compile(r"^\((?:[\w.]+ )?pid=\d+(?:, ip=[\d.]+)?\) ")


def assert_one_clean_stream(logs: str) -> None:
    """issue 11: each warning once (whichever process printed it), no per-rank copies, no Ray noise, and the
    summary is the last thing of substance in the log."""
    from raytrainer.quiet import warning_key

    lines = [RAY_PREFIX.sub("", line) for line in logs.splitlines()]
    # noise that is gone: Ray Train's PreemptionWatcher E-line, Ray's token notice for a token it found,
    # the tiny GPT-2's out-of-vocabulary special tokens, lines Ray held back for deduplication
    for noise in ("has constructor arguments in the object store", "Token authentication is enabled",
                  "must be `None` or an integer within the vocabulary", "[repeated "):
        assert noise not in logs, [line for line in lines if noise in line][:3]
    keys = [warning_key(line) for line in lines]
    repeated = {k for k in keys if k is not None and keys.count(k) > 1}
    assert not repeated, repeated
    # warnings that tell something stay, once (transformers' loss_type fallback for GPT2LMHeadModel, DDP's
    # find_unused_parameters hint, torch's pin_memory notice on CPU)
    # (and MLflow's "View run ... at: <url>" once: the driver's, not rank 0's as well)
    for kept in ("find_unused_parameters=True was specified", "'pin_memory' argument is set as true", "View run "):
        assert sum(kept in line for line in lines) <= 1, [line for line in lines if kept in line]
    # Ray Train's lines about a checkpoint from rank 0 only: once per checkpoint
    for start in ("Checkpoint successfully created at: ", "Reporting training result "):
        about = [line.split(" from rank ")[0] for line in lines if line.startswith(start)]
        assert len(about) == len(set(about)), about
    # the summary is the end: after RAYTRAINER_RESULT nothing but blank lines
    tail = lines[next(i for i, line in enumerate(lines) if line.startswith("RAYTRAINER_RESULT ")) + 1:]
    assert not [line for line in tail if line.strip()], tail
