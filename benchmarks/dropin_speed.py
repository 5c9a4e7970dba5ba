"""In-process speed: raytrainer vs transformers.Trainer vs a plain loop, and the checkpoint writer's blocked/write ratio.

Issue 18, item 5. Tiny GPT-2 (4 layers x 256), seq 128, batch 8, 512 samples (one epoch, 64 steps), fp32 on
CPU. The three contenders are interleaved (the order rotates every repetition) in this one process; each
figure is the steady seconds per step after `--warmup` steps, and the ratios are of medians
(throughput of raytrainer / throughput of the other, so > 1 means raytrainer is faster).

Then raytrainer with save_steps=16 (4 checkpoints, written in the background), without and with a user
callback that implements on_save: the loop's blocked time (snapshot copy + any wait) over the writer's
write time. With a user on_save the loop waits for each write at its step (what transformers does:
on_save sees the finished folder and its control flags act at that step).

    python benchmarks/dropin_speed.py            # 3 repetitions (about 4 minutes on 2 cores)
    python benchmarks/dropin_speed.py --reps 5
    python benchmarks/dropin_speed.py --reps 0     # the writer's blocked/write ratio only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402

import transformers  # noqa: E402

SAMPLES = 512
CONTENDERS = ("rt", "hf", "plain")


class OnSave(transformers.TrainerCallback):
    """A user callback that observes on_save (so the writer cannot stay in the background past the step)."""

    def __init__(self):
        self.saved = []

    def on_save(self, args, state, control, **kwargs):
        self.saved.append(state.global_step)


def run(name: str, dataset, work: str, warmup: int, **extra) -> dict:
    import raytrainer

    steps = SAMPLES // C.BATCH
    timer = C.StepTimer()
    model = C.build_model("gpt2")
    out = C.tmpdir(work, name)
    kw = C.hf_args_kwargs(steps=steps, bf16=False)
    kw.update(extra.pop("args", {}))
    t0 = time.perf_counter()
    if name == "plain":
        C.plain_train(model, dataset, steps=steps, bf16=False, timer=timer)
        trainer = None
    else:
        mod = raytrainer if name == "rt" else transformers
        args = mod.TrainingArguments(output_dir=out, **kw)
        trainer = mod.Trainer(model=model, args=args, train_dataset=dataset, data_collator=C.collate,
                              callbacks=[timer] + extra.pop("callbacks", []))
        trainer.train()
    sec, _ = C.steady_rate(timer.ends, warmup)
    cpu, _ = C.steady_rate(timer.cpu_ends, warmup)  # process CPU time: robust to other load on a shared machine
    return {"sec_per_step": sec, "cpu_per_step": cpu, "wall_s": time.perf_counter() - t0, "trainer": trainer}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--skip-writer", action="store_true")
    a = p.parse_args(argv)
    dataset = C.build_dataset("gpt2", SAMPLES)
    work = tempfile.mkdtemp(prefix="rt-dropin-")
    times = {n: [] for n in CONTENDERS}
    cpu = {n: [] for n in CONTENDERS}
    pairs = {"rt/hf": [], "rt/plain": []}
    for rep in range(a.reps):
        order = CONTENDERS[rep % 3:] + CONTENDERS[:rep % 3]
        got = {n: run(n, dataset, work, a.warmup) for n in order}
        for n, r in got.items():
            times[n].append(r["sec_per_step"])
            cpu[n].append(r["cpu_per_step"])
        pairs["rt/hf"].append(got["hf"]["sec_per_step"] / got["rt"]["sec_per_step"])
        pairs["rt/plain"].append(got["plain"]["sec_per_step"] / got["rt"]["sec_per_step"])
        print(f"rep {rep}: " + ", ".join(f"{n} {r['sec_per_step'] * 1000:.1f} ms/step ({r['cpu_per_step'] * 1000:.1f} "
                                         "ms CPU)" for n, r in got.items()), flush=True)
    if a.reps == 0:  # --reps 0: the checkpoint writer's figures only
        times, cpu = {n: [float("nan")] for n in CONTENDERS}, {n: [float("nan")] for n in CONTENDERS}
    med = {n: statistics.median(v) for n, v in times.items()}
    med_cpu = {n: statistics.median(v) for n, v in cpu.items()}
    result = {
        "ms_per_step_median": {n: round(v * 1000, 2) for n, v in med.items()},
        "speed_ratio_of_medians": {"raytrainer/transformers": round(med["hf"] / med["rt"], 3),
                                   "raytrainer/plain": round(med["plain"] / med["rt"], 3)},
        "pairwise_ratios": {k: [round(x, 3) for x in v] for k, v in pairs.items()},
        "cpu_ms_per_step_median": {n: round(v * 1000, 2) for n, v in med_cpu.items()},
        "cpu_ratio_of_medians": {"raytrainer/transformers": round(med_cpu["hf"] / med_cpu["rt"], 3),
                                 "raytrainer/plain": round(med_cpu["plain"] / med_cpu["rt"], 3)},
    }
    if not a.skip_writer:
        result["checkpoint_writer"] = {}
        for label, callbacks in (("no user on_save", []), ("a user on_save", [OnSave()])):
            r = run("rt", dataset, work, a.warmup, args={"save_strategy": "steps", "save_steps": 16},
                    callbacks=callbacks)
            w = r["trainer"]._checkpoint_writer
            result["checkpoint_writer"][label] = {
                "blocked_s": round(w.blocked_s, 3), "write_s": round(w.write_s, 3),
                "blocked_over_write": round(w.blocked_s / w.write_s, 3) if w.write_s else None,
                "ms_per_step": round(r["sec_per_step"] * 1000, 2)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
