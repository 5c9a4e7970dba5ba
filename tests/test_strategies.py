"""FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3 (CPU optimizer offload, the seeds' config) on 2 Ray workers
(CPU, gloo): each trains the tiny GPT-2 with its loss falling, checkpoints (fsdp: shards only, consolidated
after the fact by `raytrainer consolidate`; ZeRO-2: sharded state plus a consolidated model.safetensors;
ZeRO-3: sharded state only, as transformers without stage3_gather_16bit_weights_on_model_save; consolidated
fsdp and ZeRO-3 checkpoints when asked: test_trl.py), resumes from its mid-run checkpoint to the same final
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

Model building: every run builds its model with model_init (the first run's is DDP's model), so the
matching losses also say that the workers' shard-by-shard build (strategies/build.py) gives the unsharded
weights; each model_init call records where it ran and how many parameter elements it materialised
(test_workers_build_only_their_shard_once). The build itself, on 2 plain gloo processes without Ray:
test_sharded_build_gives_the_unsharded_weights (bit for bit, ~18 s).

Cost: 6 Ray runs (one train and one resume per sharded strategy, ZeRO-3's with a restart). DDP under
Ray (train, resume, another worker count, a killed worker) is tested in test_ray_train.py.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import torch

import raytrainer
from raytrainer.checkpoint.consolidate import dcp_model_state
from raytrainer.checkpoint.consolidate_ds import consolidate_deepspeed
from raytrainer.cli.command import main

try:
    from tests.helpers import lm_examples, run_gloo_ranks, tiny_gpt2
except ImportError:
    from helpers import lm_examples, run_gloo_ranks, tiny_gpt2

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
    where a restarted worker group resumed); rank 1 SIGKILLs itself at the end of `step`, the first time only."""

    def __init__(self, step, folder):
        self.step, self.folder = step, folder

    def on_train_begin(self, args, state, control, **kwargs):
        import torch.distributed as dist

        with open(os.path.join(self.folder, "starts"), "a") as f:
            f.write(f"{dist.get_rank()}:{state.global_step}\n")

    def on_step_end(self, args, state, control, **kwargs):
        import torch.distributed as dist

        marker = os.path.join(self.folder, "killed")
        if state.global_step >= self.step and dist.get_rank() == 1 and not os.path.exists(marker):
            import ray.train

            # Ray's controller takes a report from a worker's queue when it polls (every 2 s): a worker
            # killed before that loses its last checkpoint. Wait until Ray has committed every report.
            mode = ray.train.CheckpointConsistencyMode.COMMITTED
            ray.train.get_all_reported_checkpoints(consistency_mode=mode)
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module", params=list(STRATEGIES))
def run(request, ray_cluster, tmp_path_factory):
    """One strategy: an uninterrupted run, then a fresh Trainer resumed from its checkpoint-4."""
    name = request.param
    if name.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed")
    out = tmp_path_factory.mktemp(name) / "run"
    # model_init builds DDP's model (tiny_gpt2(dropout=0.0)): each worker builds it shard by shard
    first_record = tmp_path_factory.mktemp(name + "_first_init") / "model_init.log"
    trainer = raytrainer.Trainer(model_init=RecordingInit(str(first_record), seed=0),
                                 args=strategy_args(out, **STRATEGIES[name]), train_dataset=lm_examples(N_EXAMPLES))
    trainer.train()
    trainer.first_init_record = read_record(first_record)
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
    trainer.resumed, trainer.init_record = resumed, read_record(record)
    trainer.kill_dir = kill_dir
    return trainer


class RecordingInit:
    """model_init that appends a JSON line to a file wherever it runs: pid, rank (-1 outside a process
    group), the device of its parameters, and how many parameter elements it materialised ("real": a
    ZeRO-3 partition counts its own slice, a meta tensor nothing) of the model's "total"."""

    def __init__(self, path, seed=7):
        self.path, self.seed = path, seed

    def __call__(self, trial=None):
        import json

        import torch.distributed as dist

        model = tiny_gpt2(dropout=0.0, seed=self.seed)
        params = list(model.parameters())
        real = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0 if p.is_meta else p.numel() for p in params)
        total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else -1
        line = dict(pid=os.getpid(), rank=rank, device=params[0].device.type, real=real, total=total)
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        return model


def read_record(path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.ray
def test_trains_checkpoints_resumes_and_saves(run, tmp_path):
    from transformers import AutoModelForCausalLM

    trained = losses(run)
    assert run.state.global_step == 8 and len(trained) == 8
    assert sum(trained[-2:]) / 2 < sum(trained[:2]) / 2, trained  # the loss falls
    assert "trainer_state.json" in run.files4 and "optimizer.pt" not in run.files4
    if run.name == "fsdp":  # shards only (SHARDED_STATE_DICT, accelerate's FSDP2 default), and the model's config
        assert {"model_dcp", "optim_dcp", "config.json"} <= set(run.files4) and "model.safetensors" not in run.files4
    elif run.name == "zero2":  # sharded state next to the consolidated weights (rank 0's module is whole)
        assert {"global_step4", "model.safetensors"} <= set(run.files4)
    else:  # ZeRO-3: DeepSpeed's state only (stage3_gather_16bit_weights_on_model_save is false by default)
        assert {"global_step4", "config.json"} <= set(run.files4) and "model.safetensors" not in run.files4
    # resume: same final step; the steps after the checkpoint as the uninterrupted run
    assert run.resumed.state.global_step == 8
    torch.testing.assert_close(losses(run.resumed)[-4:], trained[-4:], rtol=1e-5, atol=0)
    # the final model reached the driver: save_model() there loads with from_pretrained, same logits
    run.save_model(str(tmp_path / "final"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final")).eval()
    ids = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, run.model.eval()(ids).logits, rtol=0, atol=1e-6)
    # the checkpoint's weights load too: consolidated by the run (ZeRO-2), or by `raytrainer consolidate` from
    # fsdp's shards or ZeRO-3's fp32 partitions (consolidate_ds.py)
    checkpoint = os.path.join(run.args.output_dir, "checkpoint-8")
    if run.name in ("fsdp", "zero3_offload"):
        assert main(["consolidate", checkpoint, "--output", str(tmp_path / "consolidated")]) == 0
        checkpoint = str(tmp_path / "consolidated")
        assert not {"optim_dcp", "model_dcp", "trainer_state.json", "global_step8", "latest"} & set(
            os.listdir(checkpoint))
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, run.model.eval()(ids).logits, rtol=0, atol=1e-6)


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


def test_an_auto_find_batch_size_attempt_sets_the_engines_micro_batch(tmp_path):
    """transformers' _update_auto_batch_size: the attempt's size fills the "auto" batch values, and a size set
    in the config is then not a mismatch (the engine a Ray worker builds per attempt follows it)."""
    from raytrainer.strategies.deepspeed_config import deepspeed_config

    args = strategy_args(tmp_path, deepspeed={"zero_optimization": {"stage": 2}, "train_batch_size": "auto",
                                              "train_micro_batch_size_per_gpu": "auto"}, auto_find_batch_size=True)
    config = deepspeed_config(args, 2, batch_size=3)
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (3, 3 * 2 * args.gradient_accumulation_steps)
    assert deepspeed_config(args, 2)["train_micro_batch_size_per_gpu"] == args.per_device_train_batch_size
    fixed = strategy_args(tmp_path, deepspeed={"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 2},
                          auto_find_batch_size=True)
    config = deepspeed_config(fixed, 2, batch_size=3)
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (2, 2 * 2 * 2)  # the user's


def test_fsdp_without_a_matching_layer_class_fails_on_the_driver(tmp_path, monkeypatch):
    import raytrainer.launch

    def no_ray(*a, **k):
        raise AssertionError("a worker group was started")

    monkeypatch.setattr(raytrainer.launch, "run_on_ray", no_ray)
    args = strategy_args(tmp_path, fsdp="full_shard auto_wrap", fsdp_config={"transformer_layer_cls_to_wrap": ["Nope"]})
    assert args.strategy == "fsdp" and args.fsdp_config["reshard_after_forward"] is True
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8))
    with pytest.raises(ValueError, match=r"transformer_layer_cls_to_wrap=\['Nope'\] matches no module of GPT2LMHeadModel"):
        trainer.train()


class MlpDtypeProbe:
    """model_init: tiny_gpt2(dropout=0.0) whose first MLP appends the dtype of its output to a file at each forward."""

    def __init__(self, path):
        self.path = path

    def __call__(self):
        model, path = tiny_gpt2(dropout=0.0), self.path

        def record(module, inputs, output):
            with open(path, "a") as f:
                f.write(f"{output.dtype}\n")

        model.transformer.h[0].mlp.c_fc.register_forward_hook(record)
        return model


@pytest.mark.ray
@pytest.mark.parametrize("name", ["fsdp", "zero3_offload"])
def test_bf16_and_load_best_model_at_end_through_the_sharded_strategies(ray_cluster, tmp_path, name, ddp_losses):
    """bf16=True on CPU workers (autocast; FSDP's MixedPrecisionPolicy): every forward of the first MLP runs
    in bf16, and the losses stay within rtol 1e-3 of the fp32 DDP run's (measured 1.0e-4 fsdp, 4.1e-5
    ZeRO-3). eval_loss with greater_is_better=True makes the first evaluation's checkpoint-4 the best (the
    loss falls): the final model is checkpoint-4's weights, not the last step's, as transformers' would be."""
    if name.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed")
    out = tmp_path / "run"
    args = strategy_args(out, **STRATEGIES[name], load_best_model_at_end=True, eval_strategy="steps", eval_steps=4,
                         metric_for_best_model="eval_loss", greater_is_better=True, bf16=True)
    dtypes = tmp_path / "dtypes.txt"
    trainer = raytrainer.Trainer(model_init=MlpDtypeProbe(str(dtypes)), args=args,
                                 train_dataset=lm_examples(N_EXAMPLES), eval_dataset=lm_examples(8, seed=3))
    trainer.train()
    got = losses(trainer)
    torch.testing.assert_close(got, ddp_losses, rtol=1e-3, atol=0)
    # bf16 really ran on the workers (the losses alone hardly tell: this model's differ by ~1e-4)
    assert set(dtypes.read_text().split()) == {"torch.bfloat16"}
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert trainer.state.global_step == 8 and evals[0] > evals[-1], evals
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    # fsdp's and ZeRO-3's checkpoints hold shards only: load_best read each rank's part of them
    read = dcp_model_state if name == "fsdp" else consolidate_deepspeed  # (bf16 is autocast: fp32 weights)
    best, last = read(str(out / "checkpoint-4")), read(str(out / "checkpoint-8"))
    final = trainer.model.state_dict()
    for k in best:
        assert torch.equal(final[k].float(), best[k].float()), k
    assert any(not torch.equal(best[k], last[k]) for k in best)


def test_strategy_field_conflicts_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match="fsdp and deepspeed are both set"):
        strategy_args(tmp_path, fsdp=True, deepspeed={"zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match="needs deepspeed="):
        strategy_args(tmp_path, strategy="deepspeed")
    with pytest.raises(ValueError, match="auto_wrap_policy"):
        strategy_args(tmp_path, strategy="fsdp", fsdp_config={"auto_wrap_policy": "SIZE_BASED_WRAP"})


@pytest.mark.ray
def test_the_driver_builds_only_a_meta_skeleton_of_a_sharded_model(run):
    """model_init with fsdp / ZeRO: real parameters only on the workers while they train; the driver's
    one real build is the trained model it receives at the end."""
    for calls in (run.first_init_record, run.init_record):
        driver = [c for c in calls if c["rank"] == -1]
        assert driver[0]["device"] == "meta" and driver[0]["real"] == 0, calls
        assert calls[-1]["rank"] == -1 and calls[-1]["real"] == calls[-1]["total"]  # the trained weights, after
        assert [c for c in driver if c["real"]] == [calls[-1]], calls
    assert not any(p.is_meta for p in run.resumed.model.parameters())


def worker_builds(calls) -> dict:
    """pid -> that worker's model_init calls, in order (a restarted worker group has new pids)."""
    out = {}
    for c in calls:
        if c["rank"] >= 0:
            out.setdefault(c["pid"], []).append(c)
    return out


@pytest.mark.ray
def test_workers_build_only_their_shard_once(run):
    """On a worker, transformers' two model_init calls (Trainer.__init__ and train()) make one real build:
    __init__'s is a meta skeleton. fsdp: rank 0 builds the full model once (the source every shard is
    filled from, dropped once they are), the other ranks only a meta skeleton and then their shard.
    ZeRO-3: every rank builds a meta skeleton, then under deepspeed.zero.Init, and holds its partition
    (1/world_size), plus on rank 0 the full reference build. ZeRO-2 keeps all weights on every rank: one full build each. The
    weights are those of the unsharded build: test_sharded_losses_match_ddp (this run's losses, with
    DDP's model from this model_init)."""
    runs = [(run.first_init_record, 2, 1)]  # (calls, workers per attempt, attempts)
    runs.append((run.init_record, 1 if run.name in ONE_WORKER_RESUMES else 2, 2 if run.name in KILLED_RESUMES else 1))
    for calls, world, attempts in runs:
        builds = worker_builds(calls)
        assert len(builds) == world * attempts, calls
        for pid, mine in builds.items():
            rank, total = mine[0]["rank"], mine[0]["total"]
            assert mine[0]["device"] == "meta" and mine[0]["real"] == 0, mine  # Trainer.__init__'s skeleton
            train_time = [(c["device"], c["real"]) for c in mine[1:]]
            if run.name == "fsdp":  # the skeleton first (a from_pretrained model_init would load sharded from it)
                expected = [("meta", 0), ("cpu", total)] if rank == 0 else [("meta", 0)]
                assert train_time == expected, mine
            elif run.name.startswith("zero3"):  # the skeleton first too (what a from_pretrained model_init reads)
                reference = [("meta", 0), ("cpu", total)] if rank == 0 else [("meta", 0)]
                assert train_time[:-1] == reference, mine
                device, real = train_time[-1]  # under zero.Init: this rank's partition only
                assert device == "cpu" and 0 < real <= total // world + 64, mine
            else:
                assert train_time == [("cpu", total)], mine


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


# ------------------------------------------------------------------ the sharded build itself (2 processes, no Ray)
def _sharded_build_rank(out_dir: str) -> None:
    """One rank of test_sharded_build_gives_the_unsharded_weights (RANK / WORLD_SIZE / MASTER_* set)."""
    import json

    import torch.distributed as dist
    from transformers import set_seed

    from raytrainer.strategies.build import build_sharded
    from raytrainer.strategies.fsdp import FSDPStrategy

    dist.init_process_group("gloo")
    rank, result = dist.get_rank(), {}
    reference = tiny_gpt2(seed=7, dropout=0.0)  # the unsharded build
    for kind, extra in (("fsdp", STRATEGIES["fsdp"]), ("zero3", {"deepspeed": {"zero_optimization": {"stage": 3}}})):
        if kind == "zero3":
            try:
                import deepspeed
            except ImportError:
                continue
        args = strategy_args(os.path.join(out_dir, kind), **extra)
        holder = type("T", (), {"args": args})()

        def model_init():
            torch.randn(3)  # model_init draws from the global RNG: every rank must end with rank 0's state
            return tiny_gpt2(seed=7, dropout=0.0)

        set_seed(42)
        model = build_sharded(holder, model_init, kind)
        draw = torch.rand(4).tolist()  # what training would draw next (dropout...)
        if kind == "fsdp":
            strategy = FSDPStrategy(torch.device("cpu"), "no", fsdp_config=args.fsdp_config)
            holder.model, holder.create_optimizer = model, lambda: None
            model = strategy.prepare(holder, max_steps=1)  # fully_shard, to_empty, filled from rank 0's build
            held = sum(p.to_local().numel() for p in model.parameters())
            full = strategy.full_state_dict(model)
        else:
            held = sum(p.ds_tensor.numel() for p in model.parameters())
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                full = {k: v.detach().clone() for k, v in model.state_dict().items()}
        equal = None if full is None else sorted(k for k, v in reference.state_dict().items()
                                                 if not torch.equal(full[k], v))
        result[kind] = {"held": held, "draw": draw, "not_equal": equal,
                        "reference_kept": holder._sharded_build.reference is not None}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    # done: skip the interpreter's teardown, where a thread DeepSpeed's comm backend leaves behind aborts
    # the process about half the time ("terminate called without an active exception")
    sys.stdout.flush()
    os._exit(0)


def test_sharded_build_gives_the_unsharded_weights(tmp_path):
    """strategies/build.py on 2 gloo ranks (plain processes): fsdp's meta skeleton filled from rank 0's build,
    and ZeRO-3's zero.Init partitions filled from it, hold half the parameters each and equal the unsharded
    build bit for bit; every rank then draws the random numbers an unsharded build's rank would."""
    results = run_gloo_ranks("tests.test_strategies", f"_sharded_build_rank({str(tmp_path)!r})", tmp_path)
    total = sum(p.numel() for p in tiny_gpt2().parameters())
    with torch.random.fork_rng():
        torch.manual_seed(42)  # transformers' set_seed, then model_init, then training's first draw
        torch.randn(3)
        tiny_gpt2(seed=7, dropout=0.0)
        draw = torch.rand(4).tolist()
    for kind in results[0]:
        for rank, result in enumerate(results):
            mine = result[kind]
            assert mine["held"] == total // 2, (kind, rank, mine["held"], total)
            assert mine["draw"] == draw, (kind, rank)
            assert not mine["reference_kept"]  # fsdp's reference is dropped once the shards are filled
        # full_state_dict gathers on rank 0 (fsdp); ZeRO-3's GatheredParameters on every rank
        assert results[0][kind]["not_equal"] == [], kind
