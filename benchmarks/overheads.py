"""Fixed and per-event costs of raytrainer, next to transformers.Trainer where it has the same event.

1. start-up: time from `train()` to the first step (in-process; 1 and 2 Ray workers on a running
   cluster with --ray), and steady ms/step, whose difference gives the per-step Ray overhead;
2. checkpoint cost: time the loop is blocked in a save vs the total write time;
3. resume cost vs data position: `train(resume_from_checkpoint=...)` to the first step, from a
   checkpoint at 10% and at 90% of an epoch (should be flat: O(1) in position);
4. eval throughput: samples/s of `evaluate()`.

    python benchmarks/overheads.py            # full run
    python benchmarks/overheads.py --quick    # smoke run, < 2 minutes
    python benchmarks/overheads.py --ray      # adds the Ray rows (needs raytrainer/launch.py)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402

import transformers  # noqa: E402

LABELS = {"hf": "transformers.Trainer", "rt": "raytrainer in-process", "ray1": "raytrainer 1 Ray worker",
          "ray2": "raytrainer 2 Ray workers"}


def make_trainer(name: str, out: str, dataset, task: str, callbacks=(), eval_dataset=None, **arg_over):
    model = C.build_model(task)
    per_device = C.BATCH
    extra = {}
    if name in ("ray1", "ray2"):
        workers = 1 if name == "ray1" else 2
        extra = C.ray_worker_kwargs(workers)
        per_device = C.BATCH // workers
    steps = arg_over.pop("steps", -1)
    bf16 = arg_over.pop("bf16", False)
    kw = C.hf_args_kwargs(steps=steps, bf16=bf16, per_device=per_device, **arg_over)
    if name == "hf":
        args = transformers.TrainingArguments(output_dir=out, **kw)
        cls = transformers.Trainer
    else:
        import raytrainer

        args = raytrainer.TrainingArguments(output_dir=out, **kw, **extra)
        cls = raytrainer.Trainer
    return cls(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset, data_collator=C.collate,
               callbacks=list(callbacks))


# ------------------------------------------------------------------------------------------ 1. start-up
def bench_startup(cfg, contenders, task, work):
    ds = C.build_dataset(task, max(256, (cfg.warmup + cfg.steps) * C.BATCH))
    rows = []
    for rep in range(cfg.reps):
        order = contenders[rep % len(contenders):] + contenders[:rep % len(contenders)]
        for name in order:
            out = C.tmpdir(work, f"startup-{name}")
            timer = C.StepTimer(path=os.path.join(out, "timer.json"))
            tr = make_trainer(name, out, ds, task, [timer], steps=cfg.warmup + cfg.steps)
            t_call = time.time()
            tr.train()
            t_done = time.time()
            rec = C.read_record(timer)
            sps, _ = C.steady_rate(rec["ends"], cfg.warmup)
            r = {"contender": name, "rep": rep, "to_train_begin_s": rec["train_begin"] - t_call,
                 "to_first_step_s": rec["first_step_begin"] - t_call, "after_last_step_s": t_done - rec["ends"][-1],
                 "ms_per_step": sps * 1000, "threads": rec["threads"], "world_size": rec["world_size"]}
            rows.append(r)
            print(f"  startup rep {rep} {name:5s} first step {r['to_first_step_s']:.2f}s, {r['ms_per_step']:.0f} ms/step, "
                  f"return {r['after_last_step_s']:.2f}s after last step", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ 2. checkpoint
def bench_checkpoint(cfg, task, work):
    """Time blocked in `_save_checkpoint` (wrapper) vs the writer's total write time."""
    steps = cfg.save_every * cfg.saves
    ds = C.build_dataset(task, max(256, steps * C.BATCH))
    rows = []
    for rep in range(cfg.reps):
        for name in (["hf", "rt"] if rep % 2 == 0 else ["rt", "hf"]):
            out = C.tmpdir(work, f"ckpt-{name}")
            tr = make_trainer(name, out, ds, task, steps=steps, save_strategy="steps", save_steps=cfg.save_every)
            blocked = []
            orig = tr._save_checkpoint

            def timed(model, trial, _orig=orig, _blocked=blocked):
                t0 = time.perf_counter()
                _orig(model, trial)
                _blocked.append(time.perf_counter() - t0)

            tr._save_checkpoint = timed
            t0 = time.perf_counter()
            tr.train()
            train_s = time.perf_counter() - t0
            writer = getattr(tr, "_checkpoint_writer", None)
            if writer is not None:
                writer.wait()
                write_s = writer.write_s
                n_written = len(writer.written)
                writer_blocked = writer.blocked_s
            else:  # transformers writes synchronously: everything it spends is blocking
                write_s, n_written, writer_blocked = sum(blocked), len(blocked), None
            # raytrainer's writer counts the save call and any wait before the next optimizer step
            # for the background copy of the weights; transformers blocks for the whole save call
            blocked_s = writer_blocked if writer_blocked is not None else sum(blocked)
            r = {"contender": name, "rep": rep, "saves": len(blocked), "written": n_written,
                 "blocked_s": blocked_s, "save_call_s": sum(blocked), "write_s": write_s,
                 "blocked_over_write": blocked_s / write_s if write_s else None,
                 "blocked_ms_per_save": 1000 * blocked_s / max(1, len(blocked)),
                 "write_ms_per_save": 1000 * write_s / max(1, n_written), "train_s": train_s,
                 "checkpoint_mb": _dir_mb(os.path.join(out, sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))[-1]))}
            rows.append(r)
            print(f"  checkpoint rep {rep} {name:3s}: {r['saves']} saves, blocked {r['blocked_ms_per_save']:.0f} ms/save, "
                  f"write {r['write_ms_per_save']:.0f} ms/save, blocked/write {r['blocked_over_write']:.2f}", flush=True)
    return rows


def _dir_mb(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 1e6


# ------------------------------------------------------------------------------------------ 3. resume
def bench_resume(cfg, task, work):
    """Resume from a checkpoint at 10% and at 90% of an epoch of `epoch_batches` batches.

    One real checkpoint is trained (2 steps); copies of it are re-labelled to the wanted positions
    (trainer_state.json global_step/epoch), so reaching 90% of a long epoch costs no training. The
    model/optimizer/RNG payload is identical at both positions: only the data position differs.
    """
    n_batches = cfg.epoch_batches
    ds = C.build_dataset(task, n_batches * C.BATCH)
    base = C.tmpdir(work, "resume-base")
    timer = C.StepTimer(stop_after=2)
    tr = make_trainer("rt", base, ds, task, [timer], num_train_epochs=1, save_strategy="steps", save_steps=2)
    tr.train()
    tr.wait_for_checkpoints()
    src = os.path.join(base, "checkpoint-2")
    positions = {"10%": max(1, n_batches // 10), "90%": n_batches * 9 // 10}
    ckpts = {}
    for label, step in positions.items():
        dst = os.path.join(work, "resume-ckpts", f"checkpoint-{step}")
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        path = os.path.join(dst, "trainer_state.json")
        with open(path) as f:
            state = json.load(f)
        state["global_step"] = step
        state["epoch"] = step / n_batches
        with open(path, "w") as f:
            json.dump(state, f, indent=2, sort_keys=True)
        ckpts[label] = dst
    for name in ("rt", "hf"):  # untimed warm-up resume of each contender (first-call imports, caches)
        timer = C.StepTimer(stop_after=1)
        make_trainer(name, C.tmpdir(work, f"resume-{name}"), ds, task, [timer], num_train_epochs=1).train(
            resume_from_checkpoint=ckpts["10%"])
    rows = []
    for rep in range(cfg.reps):
        for label in (list(positions) if rep % 2 == 0 else list(positions)[::-1]):
            for name in (["rt", "hf"] if rep % 2 == 0 else ["hf", "rt"]):
                out = C.tmpdir(work, f"resume-{name}")
                timer = C.StepTimer(stop_after=1)
                tr = make_trainer(name, out, ds, task, [timer], num_train_epochs=1)
                t0 = time.time()
                tr.train(resume_from_checkpoint=ckpts[label])
                r = {"contender": name, "rep": rep, "position": label, "step": positions[label],
                     "epoch_batches": n_batches, "to_first_step_s": timer.first_step_begin - t0,
                     "first_step_end_s": timer.ends[0] - t0}
                rows.append(r)
                print(f"  resume rep {rep} {name:3s} at {label} (batch {positions[label]}/{n_batches}): "
                      f"first step {r['to_first_step_s']:.2f}s after train()", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ 4. eval
def bench_eval(cfg, task, work, dtypes):
    ds = C.build_dataset(task, cfg.eval_samples, seed=3)
    rows = []
    for rep in range(cfg.reps):
        for dtype in dtypes:
            for name in (["hf", "rt"] if rep % 2 == 0 else ["rt", "hf"]):
                out = C.tmpdir(work, f"eval-{name}")
                tr = make_trainer(name, out, ds, task, eval_dataset=ds, bf16=dtype == "bf16")
                t0 = time.perf_counter()
                metrics = tr.evaluate()
                dt = time.perf_counter() - t0
                rows.append({"contender": name, "rep": rep, "dtype": dtype, "samples": len(ds), "eval_s": dt,
                             "samples_per_s": len(ds) / dt, "eval_loss": metrics.get("eval_loss")})
                print(f"  eval rep {rep} {dtype} {name:3s}: {len(ds) / dt:.1f} samples/s", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ main
def med(rows, key, **match):
    vals = [r[key] for r in rows if all(r.get(k) == v for k, v in match.items()) and r.get(key) is not None]
    return (statistics.median(vals), min(vals), max(vals)) if vals else None


def fmt(m, unit="", scale=1.0, prec=2):
    if m is None:
        return "-"
    return f"{m[0] * scale:.{prec}f}{unit} [{m[1] * scale:.{prec}f}-{m[2] * scale:.{prec}f}]"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="gpt2", choices=["gpt2", "minilm"])
    p.add_argument("--parts", default="startup,checkpoint,resume,eval")
    p.add_argument("--steps", type=int, default=10, help="measured steps in the start-up/per-step part")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--save-every", type=int, default=2, help="checkpoint every N steps")
    p.add_argument("--saves", type=int, default=3, help="checkpoints per checkpoint run")
    p.add_argument("--epoch-batches", type=int, default=2000, help="batches per epoch in the resume part")
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--eval-dtypes", default="fp32,bf16")
    p.add_argument("--ray", action="store_true", help="add 1 and 2 Ray workers to the start-up part")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 rep, few steps, small epoch/eval set")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "overheads.json"))
    p.add_argument("--workdir", default=None)
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.steps, cfg.warmup, cfg.reps, cfg.saves, cfg.save_every, cfg.epoch_batches, cfg.eval_samples = 2, 1, 1, 2, 1, 500, 32
        cfg.eval_dtypes = "fp32"
    parts = [x for x in cfg.parts.split(",") if x]
    work = cfg.workdir or tempfile.mkdtemp(prefix="rt-overheads-")
    info = C.machine_info()
    info["loadavg_start"] = os.getloadavg()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['date']}; task {cfg.task}")

    contenders = ["hf", "rt"]
    ray_init_s = None
    if cfg.ray:
        if C.ray_available():
            ray_init_s = C.start_ray()
            print(f"ray.init: {ray_init_s:.1f}s (cluster start; not counted below)")
            contenders += ["ray1", "ray2"]
        else:
            print("--ray: raytrainer/launch.py does not exist yet; skipping the Ray rows", file=sys.stderr)

    res = {}
    if "startup" in parts:
        res["startup"] = bench_startup(cfg, contenders, cfg.task, work)
    if "checkpoint" in parts:
        res["checkpoint"] = bench_checkpoint(cfg, cfg.task, work)
    if "resume" in parts:
        res["resume"] = bench_resume(cfg, cfg.task, work)
    if "eval" in parts:
        res["eval"] = bench_eval(cfg, cfg.task, work, [d for d in cfg.eval_dtypes.split(",") if d])
    info["loadavg_end"] = os.getloadavg()

    summary = {}
    print(f"\n# Overheads ({cfg.task}, median [min-max] of {cfg.reps} rep(s))")
    print("| measurement | contender | value |")
    print("|---|---|---|")
    if "startup" in res:
        rows = res["startup"]
        rt_ms = med(rows, "ms_per_step", contender="rt")
        for name in contenders:
            fs = med(rows, "to_first_step_s", contender=name)
            ms = med(rows, "ms_per_step", contender=name)
            summary[f"first_step_s/{name}"] = fs[0]
            summary[f"ms_per_step/{name}"] = ms[0]
            print(f"| train() -> first step | {LABELS[name]} | {fmt(fs, ' s')} |")
            print(f"| steady step time | {LABELS[name]} | {fmt(ms, ' ms', prec=0)} |")
            if name.startswith("ray") and rt_ms:
                over = ms[0] - rt_ms[0]
                summary[f"ray_step_overhead_ms/{name}"] = over
                print(f"| per-step Ray overhead vs in-process | {LABELS[name]} | {over:+.0f} ms ({over / rt_ms[0] * 100:+.1f}%) |")
        if ray_init_s is not None:
            print(f"| ray.init (cluster start, excluded above) | - | {ray_init_s:.2f} s |")
    if "checkpoint" in res:
        rows = res["checkpoint"]
        for name in ("hf", "rt"):
            b = med(rows, "blocked_ms_per_save", contender=name)
            w = med(rows, "write_ms_per_save", contender=name)
            ratio = med(rows, "blocked_over_write", contender=name)
            summary[f"ckpt_blocked_over_write/{name}"] = ratio[0]
            summary[f"ckpt_blocked_ms/{name}"] = b[0]
            mb = rows[[r["contender"] for r in rows].index(name)]["checkpoint_mb"]
            print(f"| checkpoint: loop blocked per save ({mb:.0f} MB) | {LABELS[name]} | {fmt(b, ' ms', prec=0)} |")
            print(f"| checkpoint: write time per save | {LABELS[name]} | {fmt(w, ' ms', prec=0)} |")
            print(f"| checkpoint: blocked / write (target <= 0.10) | {LABELS[name]} | {fmt(ratio)} |")
    if "resume" in res:
        rows = res["resume"]
        for name in ("rt", "hf"):
            a = med(rows, "to_first_step_s", contender=name, position="10%")
            b = med(rows, "to_first_step_s", contender=name, position="90%")
            summary[f"resume_s_10/{name}"], summary[f"resume_s_90/{name}"] = a[0], b[0]
            summary[f"resume_90_over_10/{name}"] = b[0] / a[0]
            print(f"| resume -> first step, 10% of epoch | {LABELS[name]} | {fmt(a, ' s')} |")
            print(f"| resume -> first step, 90% of epoch | {LABELS[name]} | {fmt(b, ' s')} |")
            print(f"| resume 90% / 10% (target <= 1.2) | {LABELS[name]} | {b[0] / a[0]:.2f}x |")
    if "eval" in res:
        rows = res["eval"]
        for dtype in sorted({r["dtype"] for r in rows}):
            for name in ("hf", "rt"):
                e = med(rows, "samples_per_s", contender=name, dtype=dtype)
                summary[f"eval_samples_per_s/{dtype}/{name}"] = e[0]
                print(f"| evaluate() samples/s, {dtype} | {LABELS[name]} | {fmt(e, '', prec=1)} |")
    print(f"\nloadavg start {info['loadavg_start']}, end {info['loadavg_end']}")

    os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
    with open(cfg.json, "w") as f:
        json.dump({"machine": info, "config": vars(cfg), "ray_init_s": ray_init_s, "summary": summary, "runs": res},
                  f, indent=1)
    print(f"wrote {cfg.json}")


if __name__ == "__main__":
    main()
