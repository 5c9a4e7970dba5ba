"""raytrainer.tracking.mlflow against a real MLflow server: params without secrets, metrics equal to
log_history at every logging step, the driver's run handed to another process, plot + model artifacts."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from raytrainer.tracking import mlflow as tracking

SECRET = "hf_" + uuid.uuid4().hex  # a value that must never reach MLflow
S3_SECRET = "sk" + uuid.uuid4().hex


def test_safe_params_redact_secrets_and_objects():
    import pyarrow.fs as pafs

    import raytrainer

    fs = pafs.S3FileSystem(access_key="AKIAEXAMPLE", secret_key=S3_SECRET, endpoint_override="127.0.0.1:1",
                           scheme="http")
    args = raytrainer.TrainingArguments(output_dir="/tmp/x", hub_token=SECRET, storage_path="s3://AKIA:" + S3_SECRET
                                        + "@bucket/runs", storage_filesystem=fs)
    params = tracking.safe_params(args, {"pad_token_id": 0, "api_key": "k-" + SECRET, "nested": {"password": "p"}})
    text = repr(params)
    assert SECRET not in text and S3_SECRET not in text and "AKIA" not in text
    assert params["hub_token"] == tracking.REDACTED and params["api_key"] == tracking.REDACTED
    assert params["nested.password"] == tracking.REDACTED
    assert params["pad_token_id"] == 0  # a token id is no secret
    assert params["storage_path"] == "s3://bucket/runs"
    assert params["storage_filesystem"] == "<pyarrow._s3fs.S3FileSystem>"
    assert params["learning_rate"] == args.learning_rate and "accelerator_config.split_batches" in params


def tiny_model(width=16):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=width, n_layer=1, n_head=2))


def sweep_model_init(trial):
    return tiny_model(width=trial["width"] if trial else 16)  # a hyperparameter only model_init takes


def tiny_trainer(output_dir, report_to, model_init=None, **kw):
    import torch

    import raytrainer

    torch.manual_seed(0)
    rows = [{"input_ids": (torch.arange(8) + i) % 64, "labels": (torch.arange(8) + i) % 64} for i in range(32)]
    args = raytrainer.TrainingArguments(output_dir=str(output_dir), max_steps=6, logging_steps=1, report_to=report_to,
                                        per_device_train_batch_size=4, save_strategy="no", eval_strategy="steps",
                                        eval_steps=3, hub_token=SECRET, run_name="tracking-test", **kw)
    return raytrainer.Trainer(model=None if model_init else tiny_model(), model_init=model_init, args=args,
                              train_dataset=rows, eval_dataset=rows[:8])


@pytest.fixture
def mlflow_env(mlflow_server, monkeypatch):
    import mlflow

    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_NESTED_RUN", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    experiment = f"raytrainer-tracking-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment(experiment)
    yield mlflow_server
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.mark.e2e
def test_in_process_run_logs_log_history_and_no_secret(mlflow_env, tmp_path):
    """report_to=mlflow in the driver's `with mlflow.start_run():`: every logged value of log_history
    is the run's metric at that step; no param holds the token; the plot and the model are artifacts."""
    import mlflow

    from raytrainer.tracking.plots import plot_run

    trainer = tiny_trainer(tmp_path, ["mlflow"])
    # the Trainer swapped transformers' callback for the safe one already
    assert any(type(cb) is tracking.MLflowCallback for cb in trainer.callback_handler.callbacks)
    assert not tracking.use_safe_mlflow_callback(trainer)
    with mlflow.start_run() as run:
        trainer.train()
        trainer.save_model()
        plot = plot_run(trainer.state.log_history, tmp_path / "training_plot.png")
        logged = tracking.log_final_artifacts(run.info.run_id, plot_path=str(plot), model_dir=str(tmp_path))
    assert logged == ["training_plot.png", "model"]
    client = mlflow.MlflowClient(mlflow_env)
    data = client.get_run(run.info.run_id).data

    assert not [k for k, v in data.params.items() if SECRET in v]
    assert data.params["hub_token"] == tracking.REDACTED and data.params["learning_rate"] == str(5e-05)

    expected: dict[str, list] = {}
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            if key not in ("step",) and isinstance(value, (int, float)):
                expected.setdefault(key, []).append((entry["step"], float(value)))
    assert {"loss", "learning_rate", "grad_norm", "eval_loss"} <= set(expected)
    assert len(expected["loss"]) == 6 and len(expected["eval_loss"]) == 2
    for key, points in expected.items():
        history = client.get_metric_history(run.info.run_id, key)
        got = sorted((m.step, m.value) for m in history)
        assert got == sorted(points), key

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"training_plot.png", "model"} <= artifacts
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    local = client.download_artifacts(run.info.run_id, "training_plot.png", str(tmp_path / "dl"))
    assert open(local, "rb").read() == open(plot, "rb").read()
    assert mlflow.active_run() is None


WORKER = """
import os, sys
import mlflow
from raytrainer.tracking.mlflow import apply_env
apply_env(dict(a.split("=", 1) for a in sys.argv[1:]))
# what transformers' MLflowCallback.setup does with this environment on the rank-0 worker
mlflow.start_run(run_name="ignored")
mlflow.log_metric("worker_metric", 7.0, step=3)
mlflow.end_run()
"""


@pytest.mark.e2e
def test_driver_run_handed_to_another_process(mlflow_env, tmp_path, monkeypatch):
    """driver_env() on the driver + apply_env() in a fresh process (as on a Ray worker): the metric
    lands in the driver's active run, in its experiment, on the driver's server."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    with mlflow.start_run() as run:
        env = tracking.driver_env(str(tmp_path / "out"))
        assert env["MLFLOW_RUN_ID"] == run.info.run_id and env["MLFLOW_TRACKING_URI"] == mlflow_env
        assert env["MLFLOW_EXPERIMENT_NAME"] == mlflow.get_experiment(run.info.experiment_id).name
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        subprocess.run([sys.executable, "-c", WORKER, *(f"{k}={v}" for k, v in env.items())], env=clean, check=True,
                       cwd=str(tmp_path), timeout=120)
        history = mlflow.MlflowClient(mlflow_env).get_metric_history(run.info.run_id, "worker_metric")
        assert [(m.step, m.value) for m in history] == [(3, 7.0)]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_default_store_lives_in_output_dir(tmp_path, monkeypatch):
    """With nothing set, the local store and its artifacts are inside output_dir, not the cwd."""
    import mlflow

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    uri = tracking.use_local_store(str(out), experiment_name=f"e-{uuid.uuid4().hex[:6]}")
    try:
        assert uri == f"sqlite:///{out}/mlflow/mlflow.db" and os.environ["MLFLOW_TRACKING_URI"] == uri
        env = tracking.driver_env()
        assert env["MLFLOW_TRACKING_URI"] == uri
        with mlflow.start_run() as run:
            mlflow.log_text("x", "a.txt")
        assert os.path.isfile(out / "mlflow" / "artifacts" / run.info.run_id / "artifacts" / "a.txt")
        assert os.listdir(cwd) == []
        assert tracking.run_url(run.info.run_id, uri).startswith(uri)
    finally:
        mlflow.set_tracking_uri(None)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)  # use_local_store set it; monkeypatch never saw it


def test_callback_copy_from_another_process_does_not_end_the_drivers_run(tmp_path, monkeypatch):
    """A callback whose run was started in another process (rank 0's state poured into the driver's
    callback) must not end the driver's active run when it is collected or sees on_train_end."""
    import gc

    import mlflow

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    uri = f"sqlite:///{tmp_path}/m.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("callback-copy")
    try:
        with mlflow.start_run() as run:
            cb = tracking.MLflowCallback()
            cb._initialized, cb._auto_end_run, cb._owner_pid = True, True, os.getpid() + 1  # set up elsewhere
            cb.on_train_end(None, type("S", (), {"is_world_process_zero": True})(), None)
            del cb
            gc.collect()
            assert mlflow.active_run() is not None and mlflow.active_run().info.run_id == run.info.run_id
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.e2e
def test_job_logs_to_the_server_with_plot_and_model(mlflow_env, tmp_path, capsys):
    """jobs/finetune.py with report_to mlflow: summary gives the run's URL; plot and model are artifacts."""
    import importlib.util

    import mlflow

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("finetune", os.path.join(root, "jobs", "finetune.py"))
    job = importlib.util.module_from_spec(spec)
    sys.modules["finetune"] = job
    spec.loader.exec_module(job)
    summary = job.main(["--config", os.path.join(root, "jobs", "configs", "tiny_gpt2_text.yaml"), "--max_steps", "4",
                        "--eval_steps", "2", "--save_strategy", "no", "--output_dir", str(tmp_path),
                        "--hub_token", SECRET])
    out = capsys.readouterr().out
    run_id = summary["mlflow_run_id"]
    assert summary["mlflow_run"].startswith(f"{mlflow_env}/#/experiments/") and summary["mlflow_run"].endswith(run_id)
    assert f"MLflow run: {summary['mlflow_run']}" in out and SECRET not in out
    client = mlflow.MlflowClient(mlflow_env)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and not [v for v in run.data.params.values() if SECRET in v]
    assert {"training_plot.png", "model"} <= {a.path for a in client.list_artifacts(run_id)}
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [4]  # logging_steps: 4


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.e2e
@pytest.mark.ray
def test_two_ray_workers_log_to_mlflow_and_tensorboard(mlflow_env, ray_cluster, tmp_path, monkeypatch):
    """report_to mlflow + tensorboard, 2 Ray workers, no run opened on the driver: rank 0 starts the run
    (named run_name, in the driver's mlflow.set_experiment experiment), logs params without a secret and
    every logging step of log_history; TensorBoard events come from rank 0 only, equal to log_history."""
    import mlflow

    from raytrainer.tracking.plots import plot_run

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)  # must not reach the params either
    experiment = mlflow.set_experiment(f"two-workers-{uuid.uuid4().hex[:8]}")  # the driver's choice, as a user sets it
    trainer = tiny_trainer(tmp_path / "out", ["mlflow", "tensorboard"], num_workers=2,
                           logging_dir=str(tmp_path / "tb"), storage_path=str(tmp_path / "storage"))
    trainer.train()
    run_id = tracking.run_id_of(trainer)  # rank 0's callback state, back on the driver
    assert run_id and mlflow.active_run() is None
    trainer.save_model()
    plot = plot_run(trainer.state.log_history, tmp_path / "out" / "training_plot.png")
    assert tracking.log_final_artifacts(run_id, plot_path=str(plot), model_dir=str(tmp_path / "out")) == [
        "training_plot.png", "model"]

    client = mlflow.MlflowClient(mlflow_env)
    run = client.get_run(run_id)
    assert run.info.experiment_id == experiment.experiment_id and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.runName"] == "tracking-test"
    leaked = [k for k, v in {**run.data.params, **run.data.tags}.items() if SECRET in v or S3_SECRET in v]
    assert not leaked and run.data.params["hub_token"] == tracking.REDACTED
    assert run.data.params["num_workers"] == "2" and run.data.params["learning_rate"] == str(5e-05)

    expected: dict[str, list] = {}
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)):
                expected.setdefault(key, []).append((entry["step"], float(value)))
    assert [s for s, _ in expected["loss"]] == [1, 2, 3, 4, 5, 6] and len(expected["eval_loss"]) == 2
    for key, points in expected.items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert got == sorted(points), key
    assert {"training_plot.png", "model"} <= {a.path for a in client.list_artifacts(run_id)}
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(run_id, "model")}

    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events  # rank 0 only; the other rank and the driver wrote none
    scalars = tensorboard_scalars(events[0].parent)
    for tb_key, key in (("train/loss", "loss"), ("eval/loss", "eval_loss"), ("train/learning_rate", "learning_rate")):
        assert [s for s, _ in scalars[tb_key]] == [s for s, _ in expected[key]], tb_key
        assert [v for _, v in scalars[tb_key]] == pytest.approx([v for _, v in expected[key]], rel=1e-6), tb_key


@pytest.mark.e2e
@pytest.mark.ray
def test_sweep_is_one_parent_run_with_a_child_per_trial(mlflow_env, ray_cluster, tmp_path):
    """hyperparameter_search with report_to mlflow: a parent run for the sweep on the driver, one child
    run per trial (tagged mlflow.parentRunId) holding that trial's hyperparameters and its metrics."""
    import mlflow
    from ray import tune

    trainer = tiny_trainer(tmp_path / "out", ["mlflow"], model_init=sweep_model_init)
    experiment = mlflow.set_experiment(f"sweep-{uuid.uuid4().hex[:8]}")
    best = trainer.hyperparameter_search(
        hp_space={"learning_rate": tune.choice([1e-3, 3e-3]), "seed": tune.randint(0, 100),
                  "width": tune.choice([16, 24])}, n_trials=2,
        direction="minimize", backend="ray", name="mlflow-sweep")
    parent_id = trainer.sweep_mlflow_run_id
    assert mlflow.active_run() is None  # the sweep ended the parent run it started

    runs = mlflow.MlflowClient(mlflow_env).search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert [r.info.run_id for r in parents] == [parent_id] and len(children) == 2 == len(runs) - 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["mlflow.runName"] == "mlflow-sweep"
    assert parent.data.params["sweep.n_trials"] == "2" and "sweep.hp.learning_rate" in parent.data.params
    assert parent.data.tags["raytrainer.best_trial_id"] == best.run_id

    configs = {r.metrics["trial_id"]: r.config for r in trainer.sweep_results}
    assert {c.data.tags["raytrainer.trial_id"] for c in children} == set(configs)
    for child in children:
        config = configs[child.data.tags["raytrainer.trial_id"]]
        assert child.info.status == "FINISHED"
        assert float(child.data.params["learning_rate"]) == config["learning_rate"]  # the trial's own values
        assert int(child.data.params["seed"]) == config["seed"]
        assert child.data.params["width"] == child.data.params["n_embd"] == str(config["width"])
        assert SECRET not in repr(child.data.params)
        assert child.data.metrics["eval_loss"] > 0 and "loss" in child.data.metrics
