"""The loop on Ray Train workers: DDP parity, checkpoints in storage (local and a real S3), a killed
worker, resume with another worker count, Ray Data shards, and errors raised on the driver.

Dropout is off here: DDP ranks draw their own masks, so only dropout-free runs can match one
process. Exact RNG restore with dropout is covered in-process (test_checkpoints.py).

Tolerances: 2 workers vs 1 worker (same global batch) agree within rtol 1e-5 on logged losses and
atol 1e-5 on weights (gloo's all-reduce sums in another order than one process). Runs with the same
worker count are compared bit for bit (torch.equal).

Ray runs cost ~20-40 s each on 2 cores, so reference runs are module fixtures shared by tests.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import raytrainer
from raytrainer.data.checks import SAMPLE_ROWS
from raytrainer.data.sampling import epoch_permutation

try:
    from tests.helpers import CountingDataset, StopAt, lm_examples, tiny_gpt2
except ImportError:
    from helpers import CountingDataset, StopAt, lm_examples, tiny_gpt2

pytestmark = pytest.mark.ray

N_EXAMPLES = 32  # 2 epochs x 4 optimizer steps of a global batch 8


def ray_args(out, workers, per_device, **kw):
    values = dict(
        output_dir=str(out), per_device_train_batch_size=per_device, gradient_accumulation_steps=2,
        num_train_epochs=2, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.01,
        max_grad_norm=1.0, logging_steps=1, save_steps=2, report_to=[], seed=42, disable_tqdm=True,
        num_workers=workers,
    )
    values.update(kw)
    return raytrainer.TrainingArguments(**values)


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


class KillWorkerOnce(raytrainer.TrainerCallback):
    """SIGKILLs rank 1's process at `step`, the first time only (a marker file remembers)."""

    def __init__(self, step, marker):
        self.step, self.marker = step, marker

    def on_step_end(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if state.global_step == self.step and dist.get_rank() == 1 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def in_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inproc")
    trainer = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=ray_args(out, 0, 4), train_dataset=lm_examples(N_EXAMPLES))
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def ddp_run(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    trainer = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=ray_args(out, 2, 2), train_dataset=lm_examples(N_EXAMPLES))
    t0 = time.perf_counter()
    result = trainer.train()
    trainer.wall_s = time.perf_counter() - t0
    trainer.result = result
    return trainer


def test_ddp_two_workers_match_one_process(ddp_run, in_process_run):
    assert ddp_run.state.global_step == in_process_run.state.global_step == 8
    torch.testing.assert_close(losses(ddp_run), losses(in_process_run), rtol=1e-5, atol=0)
    a, b = weights(ddp_run), weights(in_process_run)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    assert ddp_run.result.global_step == 8
    assert "train_runtime" in ddp_run.state.log_history[-1]


def test_driver_trainer_is_usable_after_ray_run(ddp_run, tmp_path):
    # checkpoints persisted where transformers puts them: output_dir/checkpoint-<step>
    out = ddp_run.args.output_dir
    names = set(os.listdir(out))
    assert {"checkpoint-4", "checkpoint-8", "final_model"} <= names
    ckpt = os.path.join(out, "checkpoint-8")
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "trainer_state.json",
            "rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(ckpt))
    ddp_run.save_model(str(tmp_path / "saved"))
    reloaded = type(ddp_run.model).from_pretrained(tmp_path / "saved")
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, ddp_run.model.state_dict()[k]), k


def test_distributed_predict_and_evaluate_gather_every_sample_once(ddp_run, tmp_path):
    # 13 rows over 2 workers x batch 4: an uneven last batch that accelerate pads; the gather drops the padding
    rows = lm_examples(13, seed=5)
    local = raytrainer.Trainer(model=ddp_run.model, args=ray_args(tmp_path / "local", 0, 4,
                                                                  per_device_eval_batch_size=4))
    expected = local.predict(rows)
    ddp_run.args.evaluate_on = "workers"  # after train() "auto" would evaluate on the driver (next test)
    try:
        got = ddp_run.predict(rows)
        metrics = ddp_run.evaluate(eval_dataset=rows)
    finally:
        ddp_run.args.evaluate_on = "auto"
    out = ddp_run.args.output_dir
    assert not os.path.exists(out + "_predict") and not os.path.exists(out + "_evaluate")  # Ray's folders went
    assert got.predictions.shape == expected.predictions.shape == (13, 8, 128)
    torch.testing.assert_close(torch.as_tensor(got.predictions), torch.as_tensor(expected.predictions),
                               rtol=1e-5, atol=1e-5)
    assert (got.label_ids == expected.label_ids).all()
    # transformers' loss is a mean of per-batch means; the padded last batch (repeated rows, dropped
    # from the predictions by the gather) still weighs its mean: equal to ~1e-3, as in transformers' DDP
    assert abs(got.metrics["test_loss"] - expected.metrics["test_loss"]) < 5e-3
    assert abs(metrics["eval_loss"] - expected.metrics["test_loss"]) < 5e-3
    assert ddp_run.state.log_history[-1]["eval_loss"] == metrics["eval_loss"]  # logged on the driver too


def test_evaluate_after_train_runs_on_the_driver_without_a_worker_group(ddp_run, tmp_path):
    """evaluate_on="auto": after a Ray train() the driver holds the trained weights; evaluate()/predict()
    run here (transformers' in-process results, bit for bit) and start no second Ray run."""
    rows = lm_examples(13, seed=5)
    local = raytrainer.Trainer(model=ddp_run.model, args=ray_args(tmp_path / "local", 0, 2))  # the same eval args
    runs_before = set(os.listdir(os.path.dirname(ddp_run.args.output_dir)))
    metrics = ddp_run.evaluate(eval_dataset=rows)
    predicted = ddp_run.predict(rows)
    assert set(os.listdir(os.path.dirname(ddp_run.args.output_dir))) == runs_before  # no "<run>_evaluate" run
    expected = local.evaluate(eval_dataset=rows)
    assert metrics["eval_loss"] == expected["eval_loss"]
    assert torch.equal(torch.as_tensor(predicted.predictions), torch.as_tensor(local.predict(rows).predictions))
    assert ddp_run.state.log_history[-1]["eval_loss"] == metrics["eval_loss"]


def test_evaluate_on_driver_refuses_a_sharded_model(tmp_path):
    args = ray_args(tmp_path / "run", 2, 2, evaluate_on="driver", strategy="fsdp")
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args)
    with pytest.raises(ValueError, match='evaluate_on="driver" cannot run here: strategy=.fsdp. shards'):
        trainer.evaluate(lm_examples(4))
    with pytest.raises(ValueError, match="evaluate_on='worker' is unknown"):
        ray_args(tmp_path / "run", 2, 2, evaluate_on="worker")


def test_killed_worker_restarts_and_matches_uninterrupted(ray_cluster, ddp_run, tmp_path):
    args = ray_args(tmp_path / "run", 2, 2, max_failures=1, save_total_limit=2)
    marker = str(tmp_path / "killed")
    trainer = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(N_EXAMPLES),
                                 callbacks=[KillWorkerOnce(step=5, marker=marker)])
    trainer.train()
    assert os.path.exists(marker), "the worker was never killed"
    assert trainer.state.global_step == 8
    a, b = weights(trainer), weights(ddp_run)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after recovery from checkpoint-4"
    # save_total_limit=2 applies to the persisted copies (Ray's CheckpointConfig)
    kept = sorted(n for n in os.listdir(tmp_path / "run") if n.startswith("checkpoint-"))
    assert kept == ["checkpoint-6", "checkpoint-8"]


def test_s3_checkpoints_then_resume_with_one_worker(ray_cluster, s3_env, s3_bucket, ddp_run, tmp_path):
    storage = f"s3://{s3_bucket}/runs"
    args = ray_args(tmp_path / "first", 2, 2, storage_path=storage, run_name="gpt2")
    first = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(N_EXAMPLES),
                               callbacks=[StopAt(4)])
    first.train()
    assert first.state.global_step == 4
    fs = s3_env.filesystem()
    import pyarrow.fs as pafs

    listed = {i.path for i in fs.get_file_info(pafs.FileSelector(f"{s3_bucket}/runs/gpt2", recursive=True))}
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state_1.pth"):
        assert f"{s3_bucket}/runs/gpt2/checkpoint-4/{name}" in listed

    # a fresh Trainer, one worker with the same global batch (4 x 1 x 2), resumes from the bucket
    args = ray_args(tmp_path / "second", 1, 4, storage_path=storage, run_name="gpt2")
    second = raytrainer.Trainer(model=tiny_gpt2(seed=123, dropout=0.0), args=args, train_dataset=lm_examples(N_EXAMPLES))
    second.train(resume_from_checkpoint=True)
    assert second.state.global_step == 8
    torch.testing.assert_close(losses(second)[-4:], losses(ddp_run)[-4:], rtol=1e-5, atol=0)
    a, b = weights(second), weights(ddp_run)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_resume_with_other_global_batch_continues_at_the_sample(ray_cluster, ddp_run, tmp_path):
    """The 2-worker run's checkpoint-2 (global batch 8: 16 samples into epoch 0) resumed in-process with a
    global batch of 4 (2 x 1 x 2) continues at sample 16 (tests/reliability/test_resume_batch.py: the rest)."""
    args = ray_args(tmp_path / "x", 0, 2, save_strategy="no")
    data = CountingDataset(lm_examples(N_EXAMPLES))
    trainer = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=os.path.join(ddp_run.args.output_dir, "checkpoint-2"))
    order = [epoch_permutation(N_EXAMPLES, args.seed, epoch).tolist() for epoch in (0, 1)]
    assert data.fetched[SAMPLE_ROWS:] == order[0][16:] + order[1]
    assert trainer.state.global_step == trainer.state.max_steps == 2 + 4 + 8  # 8 steps of 4 per epoch


class IdRecorder(torch.nn.Module):
    """A model that records the ids of the rows it trains on (one file per rank and epoch)."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder
        self.w = torch.nn.Linear(1, 1)

    def forward(self, x, labels, id=None):
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        with open(os.path.join(self.folder, f"rank{rank}"), "a") as f:
            f.write(" ".join(str(int(i)) for i in id) + "\n")
        loss = torch.nn.functional.mse_loss(self.w(x.float().unsqueeze(-1)).squeeze(-1), labels.float())
        return {"loss": loss}


def ray_data_training(out, ids_dir, callbacks=(), resume_from_checkpoint=None, **kw):
    import ray.data

    ds = ray.data.range(1000).map(lambda r: {"id": r["id"], "x": r["id"] % 7, "labels": (r["id"] % 7) * 2.0})
    os.makedirs(ids_dir, exist_ok=True)
    kw = {"num_workers": 2, "per_device_train_batch_size": 50, **kw}
    args = ray_args(out, kw.pop("num_workers"), kw.pop("per_device_train_batch_size"), gradient_accumulation_steps=1,
                    save_steps=5, lr_scheduler_type="linear", warmup_steps=0, **kw)
    torch.manual_seed(0)
    trainer = raytrainer.Trainer(model=IdRecorder(str(ids_dir)), args=args, train_dataset=ds,
                                 callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


@pytest.fixture(scope="module")
def ray_data_run(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("raydata")
    trainer = ray_data_training(tmp / "run", tmp / "ids")
    trainer.ids_dir = tmp / "ids"
    return trainer


def test_ray_data_epochs_without_max_steps(ray_data_run):
    # 500 rows per shard, 10 steps of 50 per epoch, 2 epochs, no max_steps
    assert ray_data_run.state.global_step == 20
    per_rank = []
    for rank in (0, 1):
        lines = (ray_data_run.ids_dir / f"rank{rank}").read_text().split("\n")
        ids = [int(i) for line in lines if line for i in line.split()]
        assert len(ids) == 1000  # two epochs of 500
        per_rank.append(ids)
    for epoch in (0, 1):
        shards = [set(ids[epoch * 500:(epoch + 1) * 500]) for ids in per_rank]
        assert len(shards[0]) == len(shards[1]) == 500
        assert not shards[0] & shards[1], "shards overlap"
        assert shards[0] | shards[1] == set(range(1000)), "rows missing from the epoch"
    # the split and the order are deterministic: each rank streams the same rows in the same order every epoch
    for ids in per_rank:
        assert ids[:500] == ids[500:]


def test_ray_data_killed_worker_resumes_mid_epoch_exactly(ray_data_run, tmp_path):
    marker = str(tmp_path / "killed")
    trainer = ray_data_training(tmp_path / "run", tmp_path / "ids", max_failures=1,
                                callbacks=[KillWorkerOnce(step=7, marker=marker)])
    assert os.path.exists(marker), "the worker was never killed"
    assert trainer.state.global_step == 20
    a, b = weights(trainer), weights(ray_data_run)
    for k in a:  # restarted from checkpoint-5, mid-epoch: the stream skips the 5 batches it had trained on
        assert torch.equal(a[k], b[k]), k


def test_ray_data_resume_with_another_batch_continues_at_the_row(ray_data_run, tmp_path):
    """checkpoint-15 (per-device batch 50: 250 rows into epoch 1 on each rank) resumed with a per-device batch
    of 25 streams each rank's rows from its 251st on; on another worker count the driver refuses."""
    checkpoint = os.path.join(ray_data_run.args.output_dir, "checkpoint-15")
    trainer = ray_data_training(tmp_path / "run", tmp_path / "ids", per_device_train_batch_size=25,
                                resume_from_checkpoint=checkpoint)
    assert trainer.state.global_step == 15 + 250 // 25
    for rank in (0, 1):
        full = [int(i) for i in (ray_data_run.ids_dir / f"rank{rank}").read_text().split()]
        resumed = [int(i) for i in (tmp_path / "ids" / f"rank{rank}").read_text().split()]
        assert resumed == full[500 + 250:]
    with pytest.raises(ValueError, match="split over 2 workers and this run's over 1.*keep num_workers=2"):
        ray_data_training(tmp_path / "one", tmp_path / "ids1", num_workers=1, resume_from_checkpoint=checkpoint)


def test_worker_exception_reaches_driver_with_its_type(ray_cluster, tmp_path):
    class Boom(raytrainer.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                raise KeyError("boom from a worker")

    args = ray_args(tmp_path / "run", 1, 4, save_strategy="no")
    trainer = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(8), callbacks=[Boom()])
    with pytest.raises(KeyError, match="boom from a worker") as info:
        trainer.train()
    assert "worker traceback" in "".join(getattr(info.value, "__notes__", []))
    assert os.listdir(tmp_path / "run") == []  # Ray's files went with the failed fit as well


# ------------------------------------------------------------------ errors before resources
def _assert_fast_error(trainer, match, seconds=5.0):
    import ray

    before = ray.available_resources().get("CPU", 0) if ray.is_initialized() else None
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert time.perf_counter() - t0 < seconds
    if before is not None:
        assert ray.available_resources().get("CPU", 0) == before  # no worker group was started


def test_error_missing_bucket(ray_cluster, s3_env, tmp_path):
    args = ray_args(tmp_path / "r", 2, 2, storage_path="s3://no-such-bucket-raytrainer/run")
    _assert_fast_error(raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(8)), "storage_path")


def test_error_unreachable_endpoint(ray_cluster, monkeypatch, tmp_path):
    try:
        from tests.services import free_port
    except ImportError:
        from services import free_port
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    args = ray_args(tmp_path / "r", 2, 2, storage_path="s3://bucket/run")
    _assert_fast_error(raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(8)), "storage_path")


def test_error_bad_credentials(ray_cluster, s3_env, s3_bucket, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    args = ray_args(tmp_path / "r", 2, 2, storage_path=f"s3://{s3_bucket}/run")
    _assert_fast_error(raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(8)), "storage_path")


def test_error_dataset_without_model_inputs(ray_cluster, tmp_path):
    rows = [{"text": "hello", "score": 1.0}] * 8
    args = ray_args(tmp_path / "r", 2, 2)
    _assert_fast_error(raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=rows), "input_ids")


def test_error_more_workers_than_cluster(ray_cluster, tmp_path):
    args = ray_args(tmp_path / "r", 64, 2)
    _assert_fast_error(raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(8)), "num_workers")


def test_error_unpicklable_argument(ray_cluster, tmp_path):
    import threading

    lock = threading.Lock()

    def collate(rows):  # closes over a lock: cannot be pickled
        with lock:
            return torch.utils.data.default_collate(rows)

    args = ray_args(tmp_path / "r", 2, 2)
    trainer = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(8), data_collator=collate)
    _assert_fast_error(trainer, "data_collator")
