"""Strategies side by side: DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 on 2 Ray CPU workers (gloo).

Same model (benchmarks/common.py's GPT-2: 4 layers, n_embd 256, vocab 2048, seq 128), same data,
same global batch (2 workers x per-device 4), fp32, no checkpoints. Each strategy is one Ray run of
`--warmup + --steps` optimizer steps; samples/s is measured over the steps after the warmup. Peak
memory per worker is the process's peak RSS (ru_maxrss) and its growth from train begin (what the
strategy's model, gradients and optimizer state add over the imported libraries), max over ranks.

    python benchmarks/strategies.py            # ~3-4 minutes on 2 cores
    python benchmarks/strategies.py --steps 6  # quicker
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
    "zero3": dict(deepspeed={"zero_optimization": {"stage": 3}}),
}


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
        with open(os.path.join(self.folder, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)


def _rss_kb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return float(line.split()[1])
    return 0.0


def run(name: str, steps: int, warmup: int, work: str) -> dict:
    import raytrainer

    out = C.tmpdir(work, name)
    probe_dir = C.tmpdir(work, name + "-probe")
    per_device, workers = 4, 2
    dataset = C.build_dataset("gpt2", per_device * workers * (steps + warmup))
    args = raytrainer.TrainingArguments(
        output_dir=out, per_device_train_batch_size=per_device, max_steps=steps + warmup, learning_rate=C.LR,
        weight_decay=C.WEIGHT_DECAY, max_grad_norm=C.MAX_GRAD_NORM, logging_steps=1, save_strategy="no",
        report_to=[], disable_tqdm=True, seed=C.SEED, **C.ray_worker_kwargs(workers), **STRATEGIES[name])
    trainer = raytrainer.Trainer(model=C.build_model("gpt2"), args=args, train_dataset=dataset,
                                 data_collator=C.collate, callbacks=[Probe(probe_dir)])
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    ranks = [json.load(open(os.path.join(probe_dir, f))) for f in sorted(os.listdir(probe_dir))]
    step_s, measured = C.steady_rate(ranks[0]["ends"], warmup)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"samples_per_s": per_device * workers / step_s, "step_s": step_s, "measured_steps": measured,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
            "rss_growth_mb": max(r["peak_rss_mb"] - r["rss_begin_mb"] for r in ranks),
            "first_loss": losses[0], "last_loss": losses[-1], "fit_wall_s": wall}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=list(STRATEGIES))
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "strategies.json"))
    opts = parser.parse_args()
    C.start_ray()
    work = tempfile.mkdtemp(prefix="rt-bench-strategies-")
    results = {name: run(name, opts.steps, opts.warmup, work) for name in opts.only}
    base = results.get("ddp")
    print(f"\n{'strategy':<8} {'samples/s':>10} {'x ddp':>7} {'peak RSS MB':>12} {'x ddp':>7} "
          f"{'RSS growth MB':>14} {'first loss':>11} {'last loss':>10}")
    for name, r in results.items():
        speed = r["samples_per_s"] / base["samples_per_s"] if base else float("nan")
        mem = r["peak_rss_mb"] / base["peak_rss_mb"] if base else float("nan")
        print(f"{name:<8} {r['samples_per_s']:>10.2f} {speed:>7.2f} {r['peak_rss_mb']:>12.0f} {mem:>7.2f} "
              f"{r['rss_growth_mb']:>14.0f} {r['first_loss']:>11.4f} {r['last_loss']:>10.4f}")
    info = {"machine": C.machine_info(), "steps": opts.steps, "warmup": opts.warmup, "workers": 2,
            "per_device_batch": 4, "results": results}
    os.makedirs(os.path.dirname(opts.json), exist_ok=True)
    with open(opts.json, "w") as f:
        json.dump(info, f, indent=2)
    print(f"written {opts.json}")


if __name__ == "__main__":
    main()
