"""Strategies side by side: DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 on 2 Ray CPU workers (gloo).

Same model (`--model small`: benchmarks/common.py's GPT-2, 4 layers, n_embd 256, vocab 2048, seq 128,
3.7M parameters; `--model 50m`: 8 layers, n_embd 768, 58M parameters), same data, same global batch
(2 workers x `--per-device`), fp32, no checkpoints. Each strategy is one Ray run of `--warmup + --steps`
optimizer steps; samples/s is measured over the steps after the warmup.

The model comes from a model_init, so each worker builds it itself, as a sharded strategy builds it:
fsdp / ZeRO-3 hold only their shard (rank 0 also builds the full model once, the source of every shard;
raytrainer/strategies/build.py). A `model=` object would reach every worker whole.

Memory per worker (every rank is reported): peak RSS (ru_maxrss; it includes the ~0.5-0.7 GB of
imported torch / transformers / Ray / DeepSpeed) and the model-related part of it: peak RSS minus the
RSS when model_init was first called on that worker (after the imports, before any weight exists):
weights, gradients, optimizer state, activations and the strategy's buffers.

    python benchmarks/strategies.py                         # ~3-4 minutes on 2 cores
    python benchmarks/strategies.py --steps 6               # quicker
    python benchmarks/strategies.py --model 50m --per-device 2 --warmup 1 --steps 2 \
        --json benchmarks/results/strategies_50m.json       # ~4 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

STRATEGIES = {
    "ddp": {},
    "fsdp": dict(fsdp="full_shard auto_wrap", fsdp_config={"transformer_layer_cls_to_wrap": ["GPT2Block"]}),
    "zero2": dict(deepspeed={"zero_optimization": {"stage": 2}}),
    # transformers' "auto" sizes (from n_embd), and gathered parameters released after use (DeepSpeed's
    # defaults keep up to 1e9 of them gathered between forward and backward: the whole model here)
    "zero3": dict(deepspeed={"zero_optimization": {
        "stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e7,
        "stage3_max_reuse_distance": 1e7}}),
}


def model_config(size: str):
    from transformers import GPT2Config

    if size == "small":
        return C.gpt2_config()
    if size == "50m":
        return GPT2Config(vocab_size=C.GPT2_VOCAB, n_positions=C.SEQ, n_embd=768, n_layer=8, n_head=12)
    raise ValueError(f"--model {size!r}: small | 50m")


class BenchInit:
    """model_init: the GPT-2 of `size` (seeded); the first call in a process records the RSS before any
    weight exists (`<folder>/init-<pid>.json`)."""

    def __init__(self, size: str, folder: str):
        self.size, self.folder = size, folder

    def __call__(self):
        from transformers import GPT2LMHeadModel

        path = os.path.join(self.folder, f"init-{os.getpid()}.json")
        if not os.path.exists(path):
            with open(path, "w") as f:
                json.dump({"rss_before_model_mb": _rss_kb() / 1024}, f)
        torch.manual_seed(C.SEED)
        return GPT2LMHeadModel(model_config(self.size))


class Probe(TrainerCallback):
    """Every rank writes its step end times and memory to `<folder>/rank<r>.json` at train end."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_begin(self, args, state, control, **kw):
        self.rss0 = _rss_kb()
        self.ends = []

    def on_step_end(self, args, state, control, **kw):
        self.ends.append(time.time())

    def on_train_end(self, args, state, control, **kw):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        record = {"ends": self.ends, "rss_begin_mb": self.rss0 / 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        init = os.path.join(self.folder, f"init-{os.getpid()}.json")
        if os.path.exists(init):
            with open(init) as f:
                record.update(json.load(f))
        with open(os.path.join(self.folder, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)


def _rss_kb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return float(line.split()[1])
    return 0.0


def run(name: str, steps: int, warmup: int, work: str, size: str = "small", per_device: int = 4) -> dict:
    import raytrainer

    out = C.tmpdir(work, name)
    probe_dir = C.tmpdir(work, name + "-probe")
    workers = 2
    dataset = C.build_dataset("gpt2", per_device * workers * (steps + warmup))
    args = raytrainer.TrainingArguments(
        output_dir=out, per_device_train_batch_size=per_device, max_steps=steps + warmup, learning_rate=C.LR,
        weight_decay=C.WEIGHT_DECAY, max_grad_norm=C.MAX_GRAD_NORM, logging_steps=1, save_strategy="no",
        report_to=[], disable_tqdm=True, seed=C.SEED, **C.ray_worker_kwargs(workers), **STRATEGIES[name])
    trainer = raytrainer.Trainer(model_init=BenchInit(size, probe_dir), args=args, train_dataset=dataset,
                                 data_collator=C.collate, callbacks=[Probe(probe_dir)])
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    ranks = [json.load(open(os.path.join(probe_dir, f"rank{r}.json"))) for r in range(workers)]
    step_s, measured = C.steady_rate(ranks[0]["ends"], warmup)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model_mb = [r["peak_rss_mb"] - r["rss_before_model_mb"] for r in ranks]
    return {"samples_per_s": per_device * workers / step_s, "step_s": step_s, "measured_steps": measured,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
            "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in ranks],
            "rss_before_model_mb_per_rank": [r["rss_before_model_mb"] for r in ranks],
            "model_rss_mb": max(model_mb), "model_rss_mb_per_rank": model_mb,
            "rss_growth_mb": max(r["peak_rss_mb"] - r["rss_begin_mb"] for r in ranks),
            "first_loss": losses[0], "last_loss": losses[-1], "fit_wall_s": wall}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=list(STRATEGIES))
    parser.add_argument("--model", choices=["small", "50m"], default="small")
    parser.add_argument("--per-device", type=int, default=4)
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "strategies.json"))
    parser.add_argument("--mmap-threshold", type=int, default=1 << 20,
                        help="glibc MALLOC_MMAP_THRESHOLD_ for the Ray workers (bytes; 0: glibc's default). A fixed "
                             "threshold returns a freed tensor's memory to the OS, so RSS follows the live tensors; "
                             "glibc's sliding default keeps freed tensors of up to 32 MB in its heap (measured: "
                             "+0.6 GB on an FSDP rank of the 50m model after 3 steps)")
    opts = parser.parse_args()
    if opts.mmap_threshold:  # read by glibc at process start: Ray's processes inherit it from this one
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(opts.mmap_threshold)
    C.start_ray()
    work = tempfile.mkdtemp(prefix="rt-bench-strategies-")
    results = {name: run(name, opts.steps, opts.warmup, work, opts.model, opts.per_device) for name in opts.only}
    base = results.get("ddp")
    print(f"\n{'strategy':<8} {'samples/s':>10} {'x ddp':>7} {'peak RSS MB (rank 0, 1)':>24} {'x ddp':>7} "
          f"{'model MB (rank 0, 1)':>21} {'first loss':>11} {'last loss':>10}")
    for name, r in results.items():
        speed = r["samples_per_s"] / base["samples_per_s"] if base else float("nan")
        mem = r["peak_rss_mb"] / base["peak_rss_mb"] if base else float("nan")
        peaks = ", ".join(f"{v:.0f}" for v in r["peak_rss_mb_per_rank"])
        model = ", ".join(f"{v:.0f}" for v in r["model_rss_mb_per_rank"])
        print(f"{name:<8} {r['samples_per_s']:>10.2f} {speed:>7.2f} {peaks:>24} {mem:>7.2f} "
              f"{model:>21} {r['first_loss']:>11.4f} {r['last_loss']:>10.4f}")
    params = sum(p.numel() for p in BenchInit(opts.model, work)().parameters())
    info = {"machine": C.machine_info(), "model": opts.model, "parameters": params, "steps": opts.steps,
            "warmup": opts.warmup, "workers": 2, "per_device_batch": opts.per_device,
            "malloc_mmap_threshold": opts.mmap_threshold or "glibc default",
            "model_built_by": "model_init on each worker (fsdp / ZeRO-3: shard by shard, rank 0 also builds the "
                              "full model once)", "results": results}
    os.makedirs(os.path.dirname(opts.json), exist_ok=True)
    with open(opts.json, "w") as f:
        json.dump(info, f, indent=2)
    print(f"written {opts.json}")


if __name__ == "__main__":
    main()
