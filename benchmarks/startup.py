"""Start-up on a warm local Ray: raytrainer's train() to its first optimizer step vs a bare TorchTrainer.

The floor is what any Ray Train user pays: a bare TorchTrainer's fit() until its function runs on
worker 0, plus importing torch and transformers there; "+ Trainer import" adds
`from transformers import Trainer` (which imports peft, datasets, accelerate when installed), which
any transformers.Trainer-based loop pays as well. Contenders run interleaved, --reps times each.

    python benchmarks/startup.py --workers 2 --reps 2
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


def bare(workers: int, out: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def fn(config):
        import ray.train

        entered = time.time()
        import torch  # noqa: F401
        import transformers  # noqa: F401
        imported = time.time()
        from transformers import Trainer  # noqa: F401
        trainer_imported = time.time()
        if ray.train.get_context().get_world_rank() == 0:
            with open(config["out"], "w") as f:
                json.dump({"entered": entered, "imported": imported, "trainer_imported": trainer_imported}, f)

    path = os.path.join(out, "bare.json")
    t0 = time.time()
    TorchTrainer(fn, train_loop_config={"out": path}, scaling_config=ScalingConfig(num_workers=workers),
                 run_config=RunConfig(name="bare", storage_path=out)).fit()
    marks = json.load(open(path))
    return {"enter": marks["entered"] - t0, "floor": marks["imported"] - t0,
            "floor_with_trainer_import": marks["trainer_imported"] - t0, "total": time.time() - t0}


def raytrainer_run(workers: int, out: str) -> dict:
    import transformers

    import raytrainer
    from tests.helpers import lm_examples, tiny_gpt2

    class FirstStep(transformers.TrainerCallback):
        def __init__(self, path):
            self.path = path

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1 and state.is_world_process_zero:
                with open(self.path, "w") as f:
                    json.dump({"first_step": time.time()}, f)

    path = os.path.join(out, "first_step.json")
    args = raytrainer.TrainingArguments(output_dir=os.path.join(out, "rt"), num_workers=workers, max_steps=2,
                                        per_device_train_batch_size=2, save_strategy="no", report_to="none",
                                        disable_tqdm=True, logging_steps=1)
    trainer = raytrainer.Trainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=lm_examples(16),
                                 eval_dataset=lm_examples(8, seed=1), callbacks=[FirstStep(path)])
    t0 = time.time()
    trainer.train()
    first = json.load(open(path))["first_step"] - t0
    trained = time.time() - t0
    t1 = time.time()
    trainer.evaluate()
    return {"first_step": first, "train_total": trained, "evaluate_after_train": time.time() - t1}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args(argv)
    from raytrainer.launch import ensure_ray

    ensure_ray(num_cpus=4)
    work = tempfile.mkdtemp(prefix="raytrainer-startup-")
    bare(a.workers, tempfile.mkdtemp(dir=work))  # warm: Ray's own first-use costs are not start-up
    rows = {"bare": [], "raytrainer": []}
    for rep in range(a.reps):
        rows["bare"].append(bare(a.workers, tempfile.mkdtemp(dir=work)))
        rows["raytrainer"].append(raytrainer_run(a.workers, tempfile.mkdtemp(dir=work)))
        print(f"rep {rep}: {json.dumps(rows['bare'][-1])} {json.dumps(rows['raytrainer'][-1])}", flush=True)
    med = lambda name, key: statistics.median(r[key] for r in rows[name])  # noqa: E731
    floor, floor_t = med("bare", "floor"), med("bare", "floor_with_trainer_import")
    first = med("raytrainer", "first_step")
    print(f"\n{a.workers} workers, medians of {a.reps}:")
    print(f"  bare TorchTrainer: function entered {med('bare', 'enter'):.1f} s after fit(); + torch/transformers "
          f"import {floor:.1f} s (the floor); + `from transformers import Trainer` {floor_t:.1f} s")
    print(f"  raytrainer train() -> first optimizer step: {first:.1f} s = floor + {first - floor:.1f} s "
          f"(= floor with Trainer import + {first - floor_t:.1f} s)")
    print(f"  evaluate() after train(): {med('raytrainer', 'evaluate_after_train'):.1f} s (its own worker group)")
    Path(__file__).with_name("results").mkdir(exist_ok=True)
    Path(__file__).with_name("results").joinpath("startup.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
