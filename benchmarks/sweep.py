"""Sweep wall time: raytrainer's hyperparameter_search vs transformers' own backend="ray", same run.

ASHA, 4 trials of a tiny GPT-2 (num_workers=0: each trial trains inside its Tune trial), on one local
Ray started here; each contender runs --reps times, interleaved; medians and the ratio are printed.
With --workers 2 raytrainer's trials are 2-worker Ray Train runs (transformers cannot do this).

    python benchmarks/sweep.py --reps 2 [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402
from ray import tune  # noqa: E402

import raytrainer  # noqa: E402
from tests.helpers import lm_examples, tiny_gpt2  # noqa: E402

LRS = [1e-2, 5e-3, 1e-6, 1e-7]


def model_init(trial=None):
    return tiny_gpt2(dropout=0.0)


def args_kwargs(out, workers=0):
    kw = dict(output_dir=out, per_device_train_batch_size=4 // max(workers, 1), per_device_eval_batch_size=8,
              max_steps=12, eval_strategy="steps", eval_steps=2, save_steps=4, logging_steps=2, report_to="none",
              disable_tqdm=True, seed=42)
    return kw


def run(name, work, workers):
    out = tempfile.mkdtemp(dir=work, prefix=f"{name}-")
    space = {"learning_rate": tune.grid_search(LRS)}
    t0 = time.perf_counter()
    if name == "hf":
        from ray.tune.schedulers import ASHAScheduler

        trainer = transformers.Trainer(model_init=model_init, args=transformers.TrainingArguments(**args_kwargs(out)),
                                       train_dataset=lm_examples(48), eval_dataset=lm_examples(16, seed=3))
        best = trainer.hyperparameter_search(hp_space=lambda _: space, n_trials=1, direction="minimize",
                                             backend="ray", scheduler=ASHAScheduler(metric="objective", mode="min"),
                                             resources_per_trial={"cpu": 1}, storage_path=out)
    else:
        args = raytrainer.TrainingArguments(**args_kwargs(out, workers), num_workers=workers)
        trainer = raytrainer.Trainer(model_init=model_init, args=args, train_dataset=lm_examples(48),
                                     eval_dataset=lm_examples(16, seed=3))
        best = trainer.hyperparameter_search(hp_space=space, n_trials=1, direction="minimize", scheduler="asha")
    wall = time.perf_counter() - t0
    print(f"  {name:3s} workers={workers}: {wall:.1f} s, best lr {best.hyperparameters.get('learning_rate')}", flush=True)
    return wall


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--workers", type=int, default=0, help="raytrainer trials' num_workers (0: in the trial)")
    p.add_argument("--contenders", default="hf,rt", help="comma list of hf, rt")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "sweep.json"))
    cfg = p.parse_args(argv)
    import ray

    ray.init(num_cpus=4, runtime_env={"env_vars": {"PYTHONPATH": ":".join(sys.path)}})
    work = tempfile.mkdtemp(prefix="rt-sweep-")
    names = [n for n in cfg.contenders.split(",") if n]
    walls = {n: [] for n in names}
    for rep in range(cfg.reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            walls[name].append(run(name, work, cfg.workers if name == "rt" else 0))
    med = {k: statistics.median(v) for k, v in walls.items()}
    print("ASHA, 4 trials: " + ", ".join(f"{k} {v:.1f} s" for k, v in med.items()) +
          (f": {med['rt'] / med['hf']:.2f}x (target <= 1.0x)" if len(med) == 2 else ""))
    Path(cfg.json).write_text(json.dumps({"walls_s": walls, "median_s": med, "workers": cfg.workers}, indent=2))


if __name__ == "__main__":
    main()
