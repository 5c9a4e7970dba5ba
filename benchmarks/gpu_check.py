"""The GPU check: raytrainer's strategies on whatever CUDA devices this machine has, in one table.

For each strategy (DDP over NCCL, FSDP2, DeepSpeed ZeRO-3) and each precision (bf16; fp16 with its loss
scaler) one run of raytrainer's Trainer under Ray's TorchTrainer, `num_workers` = the number of GPUs,
`use_gpu=True`, on a GPT-2-small-sized model (124M parameters, seq 1024) saved once with save_pretrained and
built on the workers by a from_pretrained model_init (fsdp: each rank reads only its slices of the files;
ZeRO-3: partitioned at build). Measured: tokens/s over the steps after a warm-up, MFU against the
device's dense peak (a table of known GPUs, else a measured matmul), peak GPU memory, first and last loss,
and a checkpoint + resume check per strategy (the bf16 run saves at step k; a second run resumes from that
checkpoint and its final weights must equal the uninterrupted run's).

    python benchmarks/gpu_check.py                 # every CUDA device; ~4-6 minutes on one H100/H200
    python benchmarks/gpu_check.py --only fsdp     # one strategy
    python benchmarks/gpu_check.py --smoke         # the same code paths on CPU (gloo, tiny model): the suite runs it

Exit status 0 when every row passed. A failing row prints its error and the table goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

STRATEGIES = {
    "ddp": {},
    "fsdp": dict(fsdp="full_shard auto_wrap", fsdp_config={"transformer_layer_cls_to_wrap": ["GPT2Block"]}),
    "zero3": dict(deepspeed={"zero_optimization": {"stage": 3}}),
}

# Dense (no sparsity) bf16/fp16 tensor-core peaks per device, TFLOP/s, from the vendors' data sheets.
# The first name found in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_TFLOPS = [
    ("GB200", 2500.0), ("B200", 2250.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0),
    ("GH200", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0),
    ("MI300X", 1307.0), ("MI250X", 383.0),
]


@dataclasses.dataclass
class Plan:
    """What one invocation runs: the model, the batch, the matrix and the devices."""

    smoke: bool
    workers: int
    use_gpu: bool
    precisions: tuple[str, ...]
    resume_precision: str          # the precision whose run also checks checkpoint + resume
    resume_strategies: tuple[str, ...] = tuple(STRATEGIES)
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    vocab: int = 50257
    seq: int = 1024
    per_device: int = 8
    warmup: int = 3
    steps: int = 10
    resume_steps: int = 2          # steps trained after the checkpoint, by both runs of the resume check

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + self.resume_steps

    @property
    def tokens_per_step(self) -> int:
        return self.per_device * self.workers * self.seq


def make_plan(smoke: bool, precisions: list[str] | None) -> Plan:
    if smoke:  # CPU: gloo, a tiny GPT-2, bf16 autocast; the resume check once (fsdp), to stay ~1-2 minutes
        return Plan(smoke=True, workers=2, use_gpu=False, precisions=tuple(precisions or ("bf16",)),
                    resume_precision="bf16", resume_strategies=("fsdp",), n_layer=2, n_embd=64, n_head=2, vocab=256,
                    seq=32, per_device=2, warmup=1, steps=2, resume_steps=1)
    n = torch.cuda.device_count()
    if n == 0:
        raise SystemExit("gpu_check: no CUDA device here (torch.cuda.device_count() == 0); "
                         "run with --smoke to check the code paths on CPU")
    return Plan(smoke=False, workers=n, use_gpu=True, precisions=tuple(precisions or ("bf16", "fp16")),
                resume_precision="bf16")


class ModelInit:
    """model_init: a seeded GPT-2 of the plan's size (picklable: built on each worker)."""

    def __init__(self, plan: Plan):
        self.kw = dict(vocab_size=plan.vocab, n_positions=plan.seq, n_embd=plan.n_embd, n_layer=plan.n_layer,
                       n_head=plan.n_head, bos_token_id=plan.vocab - 1, eos_token_id=plan.vocab - 1)

    def __call__(self):
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(C.SEED)
        return GPT2LMHeadModel(GPT2Config(**self.kw))


class FromPretrained:
    """model_init: from_pretrained of the folder main() saved (fsdp reads each rank's slices of it)."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self):
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel.from_pretrained(self.folder)


class Probe(TrainerCallback):
    """Rank 0 writes what the run was (backend, device, dtype, scaler) and its step end times to `path`."""

    def __init__(self, path: str):
        self.path = path

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.ends = []
        self.info = {"backend": dist_backend(), "world_size": world_size(),
                     "device": str(next(model.parameters()).device) if model is not None else "?"}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels are done when its time is taken
        self.ends.append(time.time())

    def on_train_end(self, args, state, control, **kw):
        if world_rank() != 0:
            return
        record = dict(self.info, ends=self.ends)
        if torch.cuda.is_available():
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        with open(self.path, "w") as f:
            json.dump(record, f)


def dist_backend() -> str:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def world_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def dataset(plan: Plan, n: int) -> C.RowsDataset:
    g = torch.Generator().manual_seed(1)
    # tokens from 1/16 of the vocabulary: a few steps learn that much, so the loss falls from ln(vocab)
    ids = torch.randint(0, max(2, plan.vocab // 16), (n, plan.seq), generator=g)
    return C.RowsDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})


def training_args(plan: Plan, strategy: str, precision: str, out: str, save_at: int | None):
    import raytrainer

    cores = os.cpu_count() or 1
    resources = {"CPU": max(1, cores // plan.workers)}
    if plan.use_gpu:
        resources["GPU"] = 1
    save = dict(save_strategy="steps", save_steps=save_at, save_only_model=False) if save_at else \
        dict(save_strategy="no")
    return raytrainer.TrainingArguments(
        output_dir=out, per_device_train_batch_size=plan.per_device, max_steps=plan.total_steps,
        learning_rate=1e-3, weight_decay=C.WEIGHT_DECAY, max_grad_norm=C.MAX_GRAD_NORM, warmup_steps=1,
        logging_steps=1, report_to=[], disable_tqdm=True, seed=C.SEED, bf16=precision == "bf16",
        fp16=precision == "fp16", num_workers=plan.workers, use_gpu=plan.use_gpu, resources_per_worker=resources,
        **save, **STRATEGIES[strategy])


def train_once(plan: Plan, strategy: str, precision: str, work: str, name: str, save_at: int | None = None,
               resume: str | None = None):
    """One raytrainer run; returns (trainer, rank 0's probe record, wall seconds)."""
    import raytrainer

    out = C.tmpdir(work, name)
    probe = os.path.join(work, name + ".probe.json")
    trainer = raytrainer.Trainer(
        model_init=FromPretrained(os.path.join(work, "pretrained")),
        args=training_args(plan, strategy, precision, out, save_at),
        train_dataset=dataset(plan, plan.per_device * plan.workers * plan.total_steps), data_collator=C.collate,
        callbacks=[Probe(probe)])
    t0 = time.time()
    trainer.train(resume_from_checkpoint=resume)
    wall = time.time() - t0
    with open(probe) as f:
        return trainer, json.load(f), wall


def flops_per_step(plan: Plan) -> float:
    """6 * N_matmul * tokens (N_matmul: every parameter but the position embedding; the tied LM head once)
    plus the attention scores and values, 12 * layers * seq * n_embd per token (PaLM's appendix B)."""
    n_matmul = 12 * plan.n_layer * plan.n_embd ** 2 + plan.vocab * plan.n_embd  # blocks (~12 d^2 each) + head
    return (6.0 * n_matmul + 12.0 * plan.n_layer * plan.seq * plan.n_embd) * plan.tokens_per_step


def device_peak(plan: Plan) -> tuple[float, str]:
    """(peak FLOP/s of one device for the run's 16-bit matmuls, where the figure came from)."""
    if plan.use_gpu:
        name = torch.cuda.get_device_name(0)
        tflops = known_peak_tflops(name)
        if tflops is not None:
            return tflops * 1e12, f"{name}: data-sheet dense bf16 {tflops:.0f} TFLOP/s"
        return measured_cuda_matmul(), f"{name}: not in the table, measured bf16 matmul"
    peak = C.matmul_peak(n=1024, reps=3, dtypes=("fp32",))["fp32"]["gflops_best"] * 1e9
    return peak, "CPU: measured fp32 matmul (whole machine)"


def known_peak_tflops(device_name: str) -> float | None:
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def measured_cuda_matmul(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    torch.matmul(a, b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    return 2.0 * n ** 3 * reps / (time.perf_counter() - t0)


def final_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}


def compare(a: dict, b: dict) -> tuple[bool, float]:
    """(bit-equal, largest absolute difference)."""
    if a.keys() != b.keys():
        return False, math.inf
    equal = all(torch.equal(a[k], b[k]) for k in a)
    diff = max(((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].numel()), default=0.0)
    return equal, diff


def check_row(plan: Plan, strategy: str, precision: str, work: str, peak: float) -> dict:
    row = {"strategy": strategy, "precision": precision}
    resume = precision == plan.resume_precision and strategy in plan.resume_strategies
    save_at = plan.warmup + plan.steps if resume else None
    name = f"{strategy}-{precision}"
    try:
        trainer, probe, wall = train_once(plan, strategy, precision, work, name, save_at=save_at)
        ends = probe["ends"]
        timed = ends[: plan.warmup + plan.steps]  # the steps before the checkpoint is written
        step_s, _ = C.steady_rate(timed, plan.warmup)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        tps = plan.tokens_per_step / step_s
        row.update(backend=probe["backend"], world_size=probe["world_size"], step_ms=step_s * 1e3, tokens_s=tps,
                   mfu=flops_per_step(plan) / step_s / (peak * plan.workers), peak_mem_gb=probe.get("peak_mem_gb"),
                   first_loss=losses[0], last_loss=losses[-1], wall_s=wall)
        problems = []
        if not all(math.isfinite(x) for x in losses):
            problems.append("non-finite loss")
        if not losses[-1] < losses[0]:
            problems.append(f"loss did not fall ({losses[0]:.4f} -> {losses[-1]:.4f})")
        if plan.use_gpu and probe["backend"] != "nccl":
            problems.append(f"backend {probe['backend']}, not nccl")
        if resume:
            full = final_weights(trainer)
            checkpoint = os.path.join(trainer.args.output_dir, f"checkpoint-{save_at}")
            resumed, _, _ = train_once(plan, strategy, precision, work, name + "-resumed", save_at=save_at,
                                       resume=checkpoint)
            equal, diff = compare(full, final_weights(resumed))
            row.update(resume_equal=equal, resume_max_diff=diff)
            # CPU is deterministic: bit for bit. CUDA kernels (atomics in embedding backward) may not be.
            if not equal and (plan.smoke or diff > 1e-3):
                problems.append(f"resumed weights differ (max |diff| {diff:.3g})")
        row["status"] = "ok" if not problems else "FAIL: " + "; ".join(problems)
    except Exception as e:  # noqa: BLE001 - one row's failure is reported and the check goes on
        traceback.print_exc()
        row["status"] = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'strategy':<8} {'prec':<5} {'backend':<7} {'ws':>2} {'tokens/s':>10} {'MFU %':>6} {'step ms':>8} "
            f"{'mem GB':>7} {'loss first->last':>17} {'resume':>16}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "tokens_s" not in r:
            lines.append(f"{r['strategy']:<8} {r['precision']:<5} {'':<7} {'':>2} {'':>10} {'':>6} {'':>8} {'':>7} "
                         f"{'':>17} {'':>16}  {r['status']}")
            continue
        mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") is not None else "-"
        resume = "-" if "resume_equal" not in r else \
            ("bit-equal" if r["resume_equal"] else f"diff {r['resume_max_diff']:.1e}")
        lines.append(f"{r['strategy']:<8} {r['precision']:<5} {r['backend']:<7} {r['world_size']:>2} "
                     f"{r['tokens_s']:>10.0f} {100 * r['mfu']:>6.1f} {r['step_ms']:>8.1f} {mem:>7} "
                     f"{r['first_loss']:>8.3f}->{r['last_loss']:<7.3f} {resume:>16}  {r['status']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, 2 workers, a tiny GPT-2, a few steps")
    parser.add_argument("--only", nargs="*", choices=list(STRATEGIES), default=list(STRATEGIES))
    parser.add_argument("--precisions", nargs="*", choices=["fp32", "bf16", "fp16"], default=None)
    parser.add_argument("--json", default=None, help="also write the rows and the machine here")
    opts = parser.parse_args(argv)
    plan = make_plan(opts.smoke, opts.precisions)
    if not plan.smoke:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # workers inherit it
    C.start_ray()
    peak, peak_source = device_peak(plan)
    work = tempfile.mkdtemp(prefix="rt-gpu-check-")
    initial = ModelInit(plan)()
    params = sum(p.numel() for p in initial.parameters())
    initial.save_pretrained(os.path.join(work, "pretrained"))  # every run starts from these weights
    del initial
    t0 = time.time()
    rows = [check_row(plan, s, p, work, peak) for s in opts.only for p in plan.precisions]
    print(f"\nraytrainer GPU check ({'CPU smoke' if plan.smoke else 'CUDA'}): {plan.workers} worker(s), GPT-2 "
          f"{params / 1e6:.1f}M params, seq {plan.seq}, {plan.per_device}/device, {plan.steps} timed steps after "
          f"{plan.warmup} warm-up; peak {peak / 1e12:.3g} TFLOP/s per device ({peak_source}); {time.time() - t0:.0f} s")
    print(table(rows))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"machine": C.machine_info(), "plan": dataclasses.asdict(plan), "peak_flops": peak,
                       "peak_source": peak_source, "rows": rows}, f, indent=2)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
