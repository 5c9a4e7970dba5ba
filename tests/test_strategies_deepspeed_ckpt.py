"""DeepSpeed checkpoints in the background (strategies/deepspeed_async.py) and ZeRO-3 weights rebuilt from the
partitions without unchecked unpickling (checkpoint/consolidate_ds.py). Two gloo processes, no Ray."""

from __future__ import annotations

import json
import os
import pickle
import sys

import pytest
import torch

try:
    from tests.helpers import run_gloo_ranks, tiny_gpt2
except ImportError:
    from helpers import run_gloo_ranks, tiny_gpt2

import raytrainer
from raytrainer.strategies.deepspeed import DeepSpeedStrategy

pytest.importorskip("deepspeed")
ZERO3 = {"zero_optimization": {"stage": 3}}


def _args(out, deepspeed=None, **kw):
    return raytrainer.TrainingArguments(output_dir=str(out), report_to=[], strategy="deepspeed", num_workers=2,
                                        per_device_train_batch_size=2, learning_rate=1e-2, max_grad_norm=1.0,
                                        deepspeed=deepspeed or ZERO3, **kw)


def test_full_weights_in_checkpoints_as_transformers():
    """ZeRO-3 gathers the weights into checkpoints only when the config asks (transformers' rule); 0/1/2 always."""
    def full(config):
        return DeepSpeedStrategy(torch.device("cpu"), args=_args("/tmp/unused", deepspeed=config)) \
            .full_weights_in_checkpoints()

    assert not full(ZERO3)
    assert full({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}})
    assert not full({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}})
    assert full({"zero_optimization": {"stage": 2}})


# ------------------------------------------------------------------ 2 gloo ranks
class _Holder:
    """What DeepSpeedStrategy.prepare / load_checkpoint read from a trainer."""

    def __init__(self, args, seed):
        self.args, self.model = args, tiny_gpt2(seed=seed, dropout=0.0)
        self.optimizer = self.lr_scheduler = None

    def create_optimizer(self):
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.args.learning_rate)


def _prepare(out, seed, **kw):
    holder = _Holder(_args(out, **kw), seed)
    strategy = DeepSpeedStrategy(torch.device("cpu"), args=holder.args)
    engine = strategy.prepare(holder, max_steps=10)
    return strategy, engine, holder


def _step(strategy, engine, batch):
    loss = engine(input_ids=batch, labels=batch).loss
    strategy.backward(loss)
    strategy.optimizer_step(None)
    return float(loss)


def _gathered(engine) -> dict:
    import deepspeed

    out = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.data.clone()
    return out


def _files_equal(a: str, b: str) -> list:
    """Names of the DeepSpeed files in checkpoint folders a and b whose tensors differ."""
    from raytrainer.checkpoint.pickle_check import safe_deepspeed_load

    def tensors(obj, prefix=""):
        if isinstance(obj, torch.Tensor):
            return {prefix: obj}
        if isinstance(obj, dict):
            return {k: v for key, val in obj.items() for k, v in tensors(val, f"{prefix}/{key}").items()}
        if isinstance(obj, (list, tuple)):
            return {k: v for i, val in enumerate(obj) for k, v in tensors(val, f"{prefix}/{i}").items()}
        return {}

    differ = []
    for name in sorted(os.listdir(os.path.join(a, "global_step2"))):
        ta = tensors(safe_deepspeed_load(os.path.join(a, "global_step2", name), "cpu"))
        tb = tensors(safe_deepspeed_load(os.path.join(b, "global_step2", name), "cpu"))
        if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta):
            differ.append(name)
    return differ


def _rank_background(out_dir: str) -> None:
    """One rank of test_background_save_is_the_foreground_save."""
    import threading
    import time

    import torch.distributed as dist

    from raytrainer.checkpoint.consolidate_ds import consolidate_deepspeed

    dist.init_process_group("gloo")
    rank, result = dist.get_rank(), {}
    torch.manual_seed(100 + rank)
    batches = [torch.randint(0, 64, (2, 16)) for _ in range(3)]
    strategy, engine, _ = _prepare(os.path.join(out_dir, "run"), seed=3)
    result["staged"] = strategy._staged is not None
    for batch in batches[:2]:
        _step(strategy, engine, batch)
    at_save = _gathered(engine)
    fg, bg = os.path.join(out_dir, "foreground"), os.path.join(out_dir, "background")
    staged, strategy._staged = strategy._staged, None
    result["foreground_wait"] = strategy.save_sharded(engine, None, fg, 2) is None  # today's path: written now
    strategy._staged = staged
    gate = threading.Event()
    staged._writer.submit(gate.wait)  # the writer thread is held until the next step is done
    t0 = time.perf_counter()
    wait = strategy.save_sharded(engine, None, bg, 2)
    result["returned_s"] = time.perf_counter() - t0
    # the loop goes on at once: the next step changes the partitions before any file is written
    result["next_loss"] = _step(strategy, engine, batches[2])
    after = _gathered(engine)
    optim = os.path.join(bg, "global_step2", f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    result["written_before_wait"] = os.path.exists(optim)
    gate.set()
    t0 = time.perf_counter()
    wait()
    result["wait_s"] = time.perf_counter() - t0
    dist.barrier()
    if rank == 0:
        result["files_differ"] = _files_equal(fg, bg)
        full = consolidate_deepspeed(bg)
        result["consolidated_not_equal"] = sorted(k for k, v in at_save.items() if not torch.equal(full[k], v))
        result["consolidated_keys"] = sorted(full)
        result["changed_after_save"] = any(not torch.equal(after[k], v) for k, v in at_save.items())
    # resume from the background checkpoint: the same next step, bit for bit
    strategy2, engine2, holder2 = _prepare(os.path.join(out_dir, "resumed"), seed=9)
    strategy2.load_checkpoint(holder2, bg)
    result["resumed_loss"] = _step(strategy2, engine2, batches[2])
    resumed = _gathered(engine2)
    result["resumed_not_equal"] = sorted(k for k, v in after.items() if not torch.equal(resumed[k], v))
    # load_best from a checkpoint without model.safetensors: every rank reads its DeepSpeed state
    result["best_read_by_every_rank"] = strategy2.best_read_by_every_rank()
    strategy2.load_best_weights(holder2, bg)
    best = _gathered(engine2)
    result["best_not_equal"] = sorted(k for k, v in at_save.items() if not torch.equal(best[k], v))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # a thread DeepSpeed's comm backend leaves behind can abort the interpreter's teardown


def test_background_save_is_the_foreground_save(tmp_path):
    """ZeRO-3 on 2 ranks: save_sharded returns a wait() (the files are written by threads while the next step
    runs and changes the partitions); once it returns, every file holds the same tensors as a foreground save of
    the same state; the weights rebuilt from it (consolidate_deepspeed) are the ones at the save; a resume from
    it takes the same next step bit for bit; load_best without model.safetensors reads the DeepSpeed state."""
    results = run_gloo_ranks("tests.test_strategies_deepspeed_ckpt", f"_rank_background({str(tmp_path)!r})",
                             tmp_path)
    for rank, r in enumerate(results):
        assert r["staged"] and r["foreground_wait"], rank
        assert not r["written_before_wait"], rank  # written after save_sharded returned and the next step ran
        assert r["resumed_loss"] == r["next_loss"] and r["resumed_not_equal"] == [], (rank, r)
        assert r["best_read_by_every_rank"] and r["best_not_equal"] == [], (rank, r)
    zero = results[0]
    assert zero["changed_after_save"]  # the step after the save changed the weights: the copy was taken first
    assert zero["files_differ"] == [], zero["files_differ"]
    assert zero["consolidated_not_equal"] == []
    expected = {n for n, _ in tiny_gpt2().named_parameters()} | {"lm_head.weight"}
    assert expected <= set(zero["consolidated_keys"])
    print(f"\nsave_sharded returned in {zero['returned_s']:.3f} s; wait() then took {zero['wait_s']:.3f} s")


def test_consolidate_refuses_code_in_a_pickle(tmp_path):
    """A DeepSpeed state file whose pickle would run code is refused, and the code does not run."""
    from raytrainer.checkpoint.consolidate_ds import consolidate_deepspeed
    from raytrainer.checkpoint.pickle_check import UnsafeCheckpointError

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    step = tmp_path / "checkpoint-2" / "global_step2"
    step.mkdir(parents=True)
    (tmp_path / "checkpoint-2" / "latest").write_text("global_step2")
    with open(step / "zero_pp_rank_0_mp_rank_00_model_states.pt", "wb") as f:
        pickle.dump({"module": Payload()}, f)
    with pytest.raises(UnsafeCheckpointError):
        consolidate_deepspeed(str(tmp_path / "checkpoint-2"))
    assert not marker.exists()
