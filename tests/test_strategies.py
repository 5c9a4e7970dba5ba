"""FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3 (CPU optimizer offload, the seeds' config) on 2 Ray workers
(CPU, gloo): each trains the tiny GPT-2 with its loss falling, checkpoints (sharded
state plus a consolidated model.safetensors), resumes from its mid-run checkpoint to the same final
step and loss, and its final save_model() output loads with from_pretrained and gives the trained
model's logits. Bad configurations fail on the driver, before any worker starts.

Tolerances: FSDP and ZeRO-2 against DDP (fp32, dropout off, same data order and global batch; DDP's
losses are those of one process with the same global batch, which 2-worker DDP matches to rtol 1e-5 in
test_ray_train.py, so the reference costs no Ray run):
logged losses within rtol 1e-4 over all 8 steps (measured: ~1e-6; the reductions run in another
order: reduce-scatter of flat buckets vs DDP's all-reduce). ZeRO-3 with CPU offload: rtol 1e-3.
A resumed run against its uninterrupted run: rtol 1e-5. The ZeRO-3 resumed run also loses rank 1
to SIGKILL at step 6 (max_failures=1): Ray restarts both workers, which resume again from the given
checkpoint-4 (the run has no checkpoint of its own yet), and end with the uninterrupted run's weights
within atol 1e-6 (measured: bit for bit; same worker count, same reduction order). FSDP's resumed run
runs on 1 worker (DCP reshards the 2-worker checkpoint; same global batch: accumulation 4): losses
within rtol 1e-5, weights within atol 1e-5 (measured 1e-6: gloo's sum order). A ZeRO checkpoint on
another worker count is a driver-side error. A killed worker under FSDP (and ZeRO-2), restarting
from the run's own checkpoint: test_strategies_peft.py.

Cost: 6 Ray runs (one train and one resume per sharded strategy, ZeRO-3's with a restart). DDP under
Ray (train, resume, another worker count, a killed worker) is tested in test_ray_train.py.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import raytrainer

try:
    from tests.helpers import lm_examples, tiny_gpt2
except ImportError:
    from helpers import lm_examples, tiny_gpt2

N_EXAMPLES = 32  # 2 epochs x 4 optimizer steps of a global batch 8 (2 workers x 2 x accumulation 2)
# ../shared/seeds: "启用优化器卸载（DeepSpeed）", as given
SEED_ZERO3_OFFLOAD = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
ZERO2 = {
    "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
    "gradient_clipping": "auto",
}
STRATEGIES = {
    "fsdp": dict(fsdp="full_shard auto_wrap", fsdp_config={"transformer_layer_cls_to_wrap": ["GPT2Block"]}),
    "zero2": dict(deepspeed=ZERO2),
    "zero3_offload": dict(deepspeed=SEED_ZERO3_OFFLOAD),
}


def strategy_args(out, **kw):
    values = dict(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2,
        learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.01, max_grad_norm=1.0,
        logging_steps=1, save_steps=4, report_to=[], seed=42, disable_tqdm=True, num_workers=2,
    )
    values.update(kw)
    return raytrainer.TrainingArguments(**values)


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


KILLED_RESUMES = {"zero3_offload"}  # its resumed run loses a worker mid-run (fsdp's: test_strategies_peft.py)
KILL_STEP = 6
ONE_WORKER_RESUMES = {"fsdp"}  # resumed on 1 worker: DCP reshards the 2-worker checkpoint


class KillRank1Once(raytrainer.TrainerCallback):
    """Every rank writes "<rank>:<global step>" to `folder`/starts when training begins (so a test sees
    where a restarted worker group resumed); rank 1 SIGKILLs itself at `step`, the first time only."""

    def __init__(self, step, folder):
        self.step, self.folder = step, folder

    def on_train_begin(self, args, state, control, **kwargs):
        import torch.distributed as dist

        with open(os.path.join(self.folder, "starts"), "a") as f:
            f.write(f"{dist.get_rank()}:{state.global_step}\n")

    def on_step_end(self, args, state, control, **kwargs):
        import torch.distributed as dist

        marker = os.path.join(self.folder, "killed")
        if state.global_step == self.step and dist.get_rank() == 1 and not os.path.exists(marker):
            import ray.train

            # Ray's controller takes a report from a worker's queue when it polls (every 2 s): a worker
            # killed before that loses its last checkpoint. Wait until Ray has committed every report.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module", params=list(STRATEGIES))
def run(request, ray_cluster, tmp_path_factory):
    """One strategy: an uninterrupted run, then a fresh Trainer resumed from its checkpoint-4."""
    name = request.param
    if name.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed")
    out = tmp_path_factory.mktemp(name) / "run"
    trainer = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=strategy_args(out, **STRATEGIES[name]),
                                 train_dataset=lm_examples(N_EXAMPLES))
    trainer.train()
    ckpt4 = os.path.join(out, "checkpoint-4")
    files4 = sorted(os.listdir(ckpt4))
    trainer.name, trainer.files4, trainer.resumed = name, files4, None
    # the resumed run builds its model with model_init: the driver holds only a meta skeleton meanwhile
    record = tmp_path_factory.mktemp(name + "_init") / "model_init.log"
    kill_dir = tmp_path_factory.mktemp(name + "_kill")
    extra, callbacks = {}, []
    if name in KILLED_RESUMES:  # and loses rank 1 at step 6: Ray restarts the group (max_failures=1)
        extra, callbacks = {"max_failures": 1}, [KillRank1Once(KILL_STEP, str(kill_dir))]
    if name in ONE_WORKER_RESUMES:  # on 1 worker, same global batch (2 x 1 x 4)
        extra = {"num_workers": 1, "gradient_accumulation_steps": 4}
    resumed = raytrainer.Trainer(model_init=RecordingInit(str(record)),
                                 args=strategy_args(tmp_path_factory.mktemp(name + "_resume") / "run",
                                                    **STRATEGIES[name], **extra),
                                 train_dataset=lm_examples(N_EXAMPLES), callbacks=callbacks)
    resumed.train(resume_from_checkpoint=ckpt4)
    trainer.resumed, trainer.init_record = resumed, record.read_text().split()
    trainer.kill_dir = kill_dir
    return trainer


class RecordingInit:
    """model_init that appends "<pid>:<device of its parameters>" to a file wherever it runs."""

    def __init__(self, path):
        self.path = path

    def __call__(self, trial=None):
        model = tiny_gpt2(dropout=0.0, seed=7)
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}:{next(model.parameters()).device.type}\n")
        return model


@pytest.mark.ray
def test_trains_checkpoints_resumes_and_saves(run, tmp_path):
    from transformers import AutoModelForCausalLM

    trained = losses(run)
    assert run.state.global_step == 8 and len(trained) == 8
    assert sum(trained[-2:]) / 2 < sum(trained[:2]) / 2, trained  # the loss falls
    # sharded state next to the consolidated weights
    assert "model.safetensors" in run.files4 and "trainer_state.json" in run.files4
    if run.name == "fsdp":
        assert {"model_dcp", "optim_dcp"} <= set(run.files4) and "optimizer.pt" not in run.files4
    else:
        assert "global_step4" in run.files4 and "optimizer.pt" not in run.files4
    # resume: same final step; the steps after the checkpoint as the uninterrupted run
    assert run.resumed.state.global_step == 8
    torch.testing.assert_close(losses(run.resumed)[-4:], trained[-4:], rtol=1e-5, atol=0)
    # the final model reached the driver: save_model() there loads with from_pretrained, same logits
    run.save_model(str(tmp_path / "final"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final")).eval()
    ids = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, run.model.eval()(ids).logits, rtol=0, atol=1e-6)
    # the checkpoint's consolidated weights load too
    AutoModelForCausalLM.from_pretrained(os.path.join(run.args.output_dir, "checkpoint-8"))


@pytest.fixture(scope="module")
def ddp_losses(tmp_path_factory):
    """DDP's losses: one process with the global batch of 2 workers x 2 (test_ray_train.py: equal to rtol 1e-5)."""
    args = strategy_args(tmp_path_factory.mktemp("ddp_reference") / "run", num_workers=0,
                         per_device_train_batch_size=4, save_strategy="no")
    trainer = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(N_EXAMPLES))
    trainer.train()
    return losses(trainer)


@pytest.mark.ray
def test_sharded_losses_match_ddp(run, ddp_losses):
    ddp = ddp_losses
    rtol = 1e-3 if run.name == "zero3_offload" else 1e-4
    torch.testing.assert_close(losses(run), ddp, rtol=rtol, atol=0)


# ------------------------------------------------------------------ driver-side errors (no Ray)
def test_deepspeed_config_contradicting_arguments_fails_at_construction(tmp_path):
    bad = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4}
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=4 vs hf per_device_train_batch_size=2"):
        strategy_args(tmp_path, deepspeed=bad)
    with pytest.raises(ValueError, match="train_batch_size"):  # world size is num_workers, not the driver's 1
        strategy_args(tmp_path, deepspeed={"zero_optimization": {"stage": 2}, "train_batch_size": 4})
    args = strategy_args(tmp_path, deepspeed={"zero_optimization": {"stage": 2}, "train_batch_size": 8})
    assert args.strategy == "deepspeed"


def test_fsdp_without_a_matching_layer_class_fails_on_the_driver(tmp_path, monkeypatch):
    import raytrainer.ray_run

    def no_ray(*a, **k):
        raise AssertionError("a worker group was started")

    monkeypatch.setattr(raytrainer.ray_run, "run_on_ray", no_ray)
    args = strategy_args(tmp_path, fsdp="full_shard auto_wrap", fsdp_config={"transformer_layer_cls_to_wrap": ["Nope"]})
    assert args.strategy == "fsdp" and args.fsdp_config["reshard_after_forward"] is True
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8))
    with pytest.raises(ValueError, match=r"transformer_layer_cls_to_wrap=\['Nope'\] matches no module of GPT2LMHeadModel"):
        trainer.train()


def test_strategy_field_conflicts_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match="fsdp and deepspeed are both set"):
        strategy_args(tmp_path, fsdp=True, deepspeed={"zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match="needs deepspeed="):
        strategy_args(tmp_path, strategy="deepspeed")
    with pytest.raises(ValueError, match="auto_wrap_policy"):
        strategy_args(tmp_path, strategy="fsdp", fsdp_config={"auto_wrap_policy": "SIZE_BASED_WRAP"})
    with pytest.raises(ValueError, match="load_best_model_at_end"):
        strategy_args(tmp_path, strategy="fsdp", load_best_model_at_end=True, eval_strategy="steps",
                      save_strategy="steps", eval_steps=4)


@pytest.mark.ray
def test_the_driver_builds_only_a_meta_skeleton_of_a_sharded_model(run):
    """model_init with fsdp / ZeRO: real parameters only on the workers while they train; the driver's
    one real build is the trained model it receives at the end."""
    driver = str(os.getpid())
    calls = [line.split(":") for line in run.init_record]
    assert [device for pid, device in calls if pid == driver][:1] == ["meta"], calls
    workers = [(pid, device) for pid, device in calls if pid != driver]
    attempts = 2 if run.name in KILLED_RESUMES else 1  # a restarted worker group builds the model again
    workers_per_attempt = 1 if run.name in ONE_WORKER_RESUMES else 2
    assert len({pid for pid, _ in workers}) == workers_per_attempt * attempts, calls
    assert {device for _, device in workers} == {"cpu"}, calls
    assert calls[-1] == [driver, "cpu"]  # after the workers finished: the trained weights, loaded on the driver
    assert [pid for pid, device in calls if pid == driver and device == "cpu"] == [driver]
    assert not any(p.is_meta for p in run.resumed.model.parameters())


@pytest.mark.ray
def test_killed_worker_recovers_to_the_uninterrupted_weights(run):
    """fsdp / ZeRO-3: rank 1 SIGKILLed at step 6 of the resumed run; the restarted group resumes from the
    given checkpoint-4 again (no checkpoint of this run yet) and ends with the uninterrupted weights."""
    if run.name not in KILLED_RESUMES:
        pytest.skip("folded into the zero3_offload resumed run (fsdp: test_strategies_peft.py)")
    assert (run.kill_dir / "killed").exists(), "rank 1 was never killed"
    starts = sorted((run.kill_dir / "starts").read_text().split())
    assert starts == ["0:4", "0:4", "1:4", "1:4"], starts  # two attempts, both from checkpoint-4
    assert run.resumed.state.global_step == 8
    a, b = weights(run.resumed), weights(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def _fast_value_error(trainer, match, **train_kwargs):
    import ray

    before = ray.available_resources().get("CPU", 0)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=match) as info:
        trainer.train(**train_kwargs)
    assert time.perf_counter() - t0 < 5.0
    assert ray.available_resources().get("CPU", 0) == before  # no worker group was started
    return str(info.value)


@pytest.mark.ray
def test_resume_on_another_worker_count(run, tmp_path):
    """FSDP: the resumed run (the fixture's) continued checkpoint-4 of 2 workers on 1 worker (DCP reshards;
    same global batch: accumulation 4) to the uninterrupted run's final weights. ZeRO: the partitioned
    optimizer state cannot, a driver-side error before any worker starts."""
    if run.name in ONE_WORKER_RESUMES:
        assert run.resumed.args.num_workers == 1 and run.resumed.state.global_step == 8
        a, b = weights(run.resumed), weights(run)  # its losses: test_trains_checkpoints_resumes_and_saves
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
        return
    ckpt4 = os.path.join(run.args.output_dir, "checkpoint-4")
    args = strategy_args(tmp_path / "one", **STRATEGIES[run.name], num_workers=1, gradient_accumulation_steps=4)
    trainer = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(N_EXAMPLES))
    message = _fast_value_error(trainer, "partitioned over 2 data-parallel ranks", resume_from_checkpoint=ckpt4)
    assert "this run has 1 (num_workers=1)" in message and "num_workers=2" in message
    assert "ds_to_universal" in message and "load_universal" in message
