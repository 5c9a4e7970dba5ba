"""PBT over 2-worker trials: wall time and worker-group starts, synch and async, vs the same trials without PBT.

2 trials x 2 workers (0.5 CPU each), a tiny GPT-2, 32 steps, evaluation + checkpoint every 4 steps, PBT
perturbing every 4 steps (time_attr="step"). A worker-group start is counted from the trials' own record: a
callback writes rank 0's process id at each on_train_begin, and a new process id is a new worker group (a
resume inside a running group, an in-place exploit, keeps its process). Exploits are counted from the
`[hp-search] trial ... exploits` lines' equivalent in the record: a begin from another trial's checkpoint.

    python benchmarks/pbt.py [--modes synch,async,none] [--steps 32] [--every 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402
from ray import tune  # noqa: E402

import raytrainer  # noqa: E402
from tests.helpers import lm_examples, tiny_gpt2  # noqa: E402

LRS = [1e-2, 1e-4]


def model_init(trial=None):
    return tiny_gpt2(dropout=0.0)


class GroupRecorder(transformers.TrainerCallback):
    """Rank 0's process id and step at each on_train_begin, one line per begin, in the trial's output_dir."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            with open(os.path.join(args.output_dir, "groups.jsonl"), "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "step": state.global_step,
                                    "lr": args.learning_rate}) + "\n")


def run(mode: str, work: str, steps: int, every: int) -> dict:
    from ray.tune.schedulers import PopulationBasedTraining

    out = tempfile.mkdtemp(dir=work, prefix=f"{mode}-")
    args = raytrainer.TrainingArguments(
        output_dir=out, per_device_train_batch_size=2, per_device_eval_batch_size=8, max_steps=steps,
        learning_rate=1e-3, lr_scheduler_type="constant", eval_strategy="steps", eval_steps=every,
        save_steps=every, logging_steps=every, report_to="none", disable_tqdm=True, seed=42, num_workers=2,
        resources_per_worker={"CPU": 0.5})
    trainer = raytrainer.Trainer(model_init=model_init, args=args, train_dataset=lm_examples(64),
                                 eval_dataset=lm_examples(16, seed=3), callbacks=[GroupRecorder()])
    scheduler = None
    if mode != "none":
        scheduler = PopulationBasedTraining(
            time_attr="step", metric="objective", mode="min", perturbation_interval=every, quantile_fraction=0.5,
            resample_probability=0.5, synch=mode == "synch",
            hyperparam_mutations={"learning_rate": tune.loguniform(1e-4, 1e-2)})
    t0 = time.perf_counter()
    trainer.hyperparameter_search(hp_space={"learning_rate": tune.grid_search(LRS)}, n_trials=1,
                                  scheduler=scheduler, name=mode)
    wall = time.perf_counter() - t0
    groups = begins = exploits = 0
    for record in Path(work, mode).glob("*/groups.jsonl"):  # the trials' run folders: <storage>/<sweep>/<trial>
        rows = [json.loads(line) for line in record.read_text().splitlines()]
        groups += len({r["pid"] for r in rows})
        begins += len(rows)
        exploits += len(list(record.parent.glob("exploit-checkpoint-*")))
    row = {"mode": mode, "wall_s": round(wall, 1), "group_starts": groups, "train_begins": begins,
           "exploit_copies": exploits}
    print(f"  {mode:5s}: {wall:6.1f} s, {groups} worker-group starts, {begins} train() begins, "
          f"{exploits} exploits", flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="none,async,synch", help="comma list of none, async, synch")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--every", type=int, default=4, help="evaluation, checkpoint and perturbation interval (steps)")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "pbt.json"))
    cfg = p.parse_args(argv)
    import ray

    from raytrainer.launch import ensure_ray

    ensure_ray(num_cpus=4)
    work = tempfile.mkdtemp(prefix="rt-pbt-")
    rows = [run(mode, work, cfg.steps, cfg.every) for mode in cfg.modes.split(",") if mode]
    base = next((r["wall_s"] for r in rows if r["mode"] == "none"), None)
    for r in rows:
        if base and r["mode"] != "none":
            r["ratio_to_no_pbt"] = round(r["wall_s"] / base, 2)
            print(f"PBT {r['mode']}: {r['wall_s']} s = {r['ratio_to_no_pbt']:.2f}x the same trials without PBT "
                  f"(goal <= 1.5x), {r['group_starts']} worker-group starts", flush=True)
    Path(cfg.json).write_text(json.dumps({"steps": cfg.steps, "every": cfg.every, "rows": rows}, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
