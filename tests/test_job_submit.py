"""`ray job submit -- raytrainer train ...` (and `-- python jobs/finetune.py`) against a real 2-node Ray
cluster with token auth, S3 storage (SeaweedFS) and an MLflow server: the workers spread over both nodes,
the checkpoints and the final model land in the bucket, the job's log is plain lines with progress and
the summary; a local storage_path is refused; a resubmitted job resumes after its driver was killed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
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


@pytest.fixture(scope="module")
def command(two_node_cluster, tmp_path_factory) -> dict:
    """How a job's entrypoint finds the `raytrainer` console command: the installed one (pip install -e
    / the wheel put it beside python), else the same three lines pip writes, on the job's PATH."""
    if os.path.isfile(os.path.join(os.path.dirname(sys.executable), "raytrainer")):
        return {}
    bin_dir = tmp_path_factory.mktemp("bin")
    script = bin_dir / "raytrainer"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom raytrainer.cli.command import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{two_node_cluster.env['PATH']}"}


def submit(cluster, entrypoint: list[str], env_vars: dict, submission_id: str | None = None) -> str:
    submission_id = submission_id or f"raytrainer-{uuid.uuid4().hex[:8]}"
    runtime_env = {"env_vars": env_vars, "excludes": [".git", ".venv*", ".hypothesis", "runs", "out", "build"]}
    done = subprocess.run(
        [find_executable("ray"), "job", "submit", "--address", cluster.dashboard_url, "--submission-id", submission_id,
         "--no-wait", "--working-dir", ROOT, "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint],
        env=cluster.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert cluster.token not in done.stdout + done.stderr
    return submission_id


def finished(cluster, submission_id: str, log_path) -> tuple[dict, str]:
    info = wait_for_job(cluster, submission_id)
    logs = cluster.api(f"/api/jobs/{submission_id}/logs")["logs"]
    log_path.write_text(logs)  # kept by pytest for a look after a failure
    return info, logs


def result_of(logs: str) -> dict:
    return json.loads(logs.split("RAYTRAINER_RESULT ", 1)[1].splitlines()[0])


# the job of the first test; the resume test compares its weights with this uninterrupted run's
TINY = ["--config", "tiny_gpt2", "--num_workers", "2", "--max_steps", "4", "--logging_steps", "1",
        "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]


@pytest.fixture(scope="module")
def first_job(two_node_cluster, command, s3_server, mlflow_server, tmp_path_factory) -> dict:
    """`ray job submit -- raytrainer train --config tiny_gpt2 ...` to the bucket, with MLflow."""
    cluster, tmp = two_node_cluster, tmp_path_factory.mktemp("first_job")
    bucket = s3_server.make_bucket(f"job-submit-{uuid.uuid4().hex[:8]}")
    experiment = f"job-submit-{uuid.uuid4().hex[:8]}"
    runs_home = tmp / "runs_home"
    env = {**s3_server.env(), "RAYTRAINER_RUNS_DIR": str(runs_home), "MLFLOW_TRACKING_URI": mlflow_server,
           "MLFLOW_EXPERIMENT_NAME": experiment, **command}
    submission_id = submit(cluster, ["raytrainer", "train", *TINY, "--storage_path", f"s3://{bucket}/runs",
                                     "--report_to", "mlflow"], env)
    info, logs = finished(cluster, submission_id, tmp / "job.log")
    return {"info": info, "logs": logs, "bucket": bucket, "runs_home": runs_home, "submission_id": submission_id,
            "log_path": tmp / "job.log"}


@pytest.mark.e2e
def test_ray_job_submit_on_two_nodes_with_s3_and_mlflow(two_node_cluster, first_job, s3_server, mlflow_server):
    import mlflow

    cluster = two_node_cluster
    info, logs, bucket, runs_home = first_job["info"], first_job["logs"], first_job["bucket"], first_job["runs_home"]
    assert info["status"] == "SUCCEEDED", f"{info.get('message', '')[:300]}... whole log: {first_job['log_path']}"

    # the log: plain lines (no tqdm redraws, no escape codes), progress, the summary, no Ray noise
    assert "\r" not in logs and "\x1b[" not in logs, [line for line in logs.split("\n") if "\r" in line or "\x1b[" in line][:5]
    assert "PlacementGroupCleaner" not in logs
    assert_one_clean_stream(logs)
    progress = [line for line in logs.splitlines() if line.startswith("[progress] step ")]
    assert progress and progress[-1].startswith("[progress] step 4/4 (100%)"), progress
    assert "samples/s" in progress[-1] and "loss " in progress[-1], progress
    assert len([line for line in logs.splitlines() if line.startswith("{'loss'")]) == 4  # once each, not per rank
    assert "=== raytrainer job summary ===" in logs
    summary = result_of(logs)
    assert summary["global_step"] == 4 and summary["eval_loss"] > 0
    # where to look next: the job's id (ray job logs <id>) and the cluster's dashboard
    assert summary["ray_job_id"] == first_job["submission_id"] and f"Ray job: {first_job['submission_id']}" in logs
    assert summary["ray_dashboard"] == cluster.dashboard_url and f"Ray dashboard: {cluster.dashboard_url}" in logs
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


@pytest.mark.e2e
def test_local_storage_on_two_nodes_is_refused_before_workers_start(two_node_cluster, tmp_path):
    """python jobs/finetune.py (the checkout's entry; jobs/configs links to the package's configs, and the
    working dir's copy holds them) with a local storage_path: Ray's multi-node rule."""
    local = tmp_path / "local_runs"
    submission_id = submit(two_node_cluster, ["python", "jobs/finetune.py", *TINY[2:], "--config",
                                              "jobs/configs/tiny_gpt2.yaml", "--max_steps", "2",
                                              "--storage_path", str(local)], {"RAYTRAINER_RUNS_DIR": str(tmp_path)})
    info, logs = finished(two_node_cluster, submission_id, tmp_path / "job.log")
    assert info["status"] == "FAILED", logs[-2000:]
    assert f"storage_path: {local}/tiny_gpt2 is a local folder, and the Ray cluster has 2 nodes" in logs, logs[-3000:]
    assert "s3://bucket/prefix" in logs and "shared filesystem" in logs
    assert "finetune.py: error: storage_path: " in logs and "Traceback" not in logs, logs[-3000:]  # one line
    assert "RayTrainWorker" not in logs and not (local / "tiny_gpt2").exists()  # no worker started


@pytest.mark.e2e
def test_resubmitted_job_resumes_after_its_driver_was_killed(two_node_cluster, command, first_job, s3_server,
                                                             tmp_path):
    """A job killed (its workers frozen, then its driver SIGKILLed) after checkpoint-2; the same command with
    --resume_from_checkpoint true logs steps 3 and 4 only, from the checkpoint in storage, and ends with the
    uninterrupted run's weights."""
    import psutil
    import torch
    from safetensors.torch import load

    cluster, fs = two_node_cluster, s3_server.filesystem()
    bucket = s3_server.make_bucket(f"resume-{uuid.uuid4().hex[:8]}")
    env = {**s3_server.env(), "RAYTRAINER_RUNS_DIR": str(tmp_path / "runs_home"), **command}
    # a slower evaluation (one row per batch; the weights do not depend on it): the evaluation at step 4
    # takes seconds, so the driver is killed after checkpoint-2 and before checkpoint-4
    argv = ["raytrainer", "train", *TINY, "--storage_path", f"s3://{bucket}/runs", "--run_name", "resumed",
            "--report_to", "none", "--eval_rows", "400", "--per_device_eval_batch_size", "1"]
    killed = submit(cluster, argv, env)
    state = f"{bucket}/runs/resumed/checkpoint-2/trainer_state.json"  # uploaded last: the checkpoint is whole
    deadline = time.monotonic() + 300
    while fs.get_file_info(state).type.name != "File":
        if cluster.api(f"/api/jobs/{killed}")["status"] in TERMINAL or time.monotonic() > deadline:
            info, logs = finished(cluster, killed, tmp_path / "killed.log")
            pytest.fail(f"no checkpoint-2 in the bucket; job {info['status']}: {logs[-3000:]}")
        time.sleep(0.05)
    # the workers are frozen first: killing the driver alone leaves them running until Ray reaps them, and on
    # a loaded machine that was long enough to upload checkpoint-4; then the driver dies, then they do
    processes = list(psutil.process_iter(["cmdline"]))
    workers = [p for p in processes if (p.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker")]
    assert len(workers) == 2, [p.info["cmdline"] for p in workers]
    for worker in workers:
        worker.suspend()
    drivers = [p for p in processes
               if any(a.endswith("raytrainer") for a in (p.info["cmdline"] or [])[:2]) and "resumed" in p.info["cmdline"]]
    assert len(drivers) == 1, [p.info["cmdline"] for p in drivers]
    drivers[0].kill()
    for worker in workers:
        worker.kill()
    info, logs = finished(cluster, killed, tmp_path / "killed.log")
    assert info["status"] == "FAILED", logs[-3000:]
    assert fs.get_file_info(f"{bucket}/runs/resumed/checkpoint-4/trainer_state.json").type.name == "NotFound", \
        "the driver was killed too late: checkpoint-4 is complete"

    resumed = submit(cluster, [*argv, "--resume_from_checkpoint", "true"], env)
    info, logs = finished(cluster, resumed, tmp_path / "resumed.log")
    assert info["status"] == "SUCCEEDED", f"{info.get('message', '')[:300]}... {logs[-3000:]}"
    steps = [line.split()[2] for line in logs.splitlines() if line.startswith("[progress] step ")]
    assert steps and steps[0].startswith("3/") and steps[-1] == "4/4", steps
    assert len([line for line in logs.splitlines() if line.startswith("{'loss'")]) == 2  # steps 3 and 4 only
    assert result_of(logs)["global_step"] == 4

    def final_weights(bucket_name: str, run: str) -> dict:
        with fs.open_input_stream(f"{bucket_name}/runs/{run}/final_model/model.safetensors") as f:
            return load(f.read())

    ours, uninterrupted = final_weights(bucket, "resumed"), final_weights(first_job["bucket"], "tiny_gpt2")
    assert ours.keys() == uninterrupted.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], uninterrupted[name], rtol=0, atol=1e-6, msg=name)


RAY_PREFIX = re.compile(r"^\((?:[\w.]+ )?pid=\d+(?:, ip=[\d.]+)?\) ")


def assert_one_clean_stream(logs: str) -> None:
    """issue 11: each warning once (whichever process printed it), no per-rank copies, no Ray noise, and the
    summary is the last thing of substance in the log."""
    from raytrainer.log_filter import warning_key

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
