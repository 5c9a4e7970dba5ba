"""Faster start-up of a Trainer, on Ray workers above all.

* `start_background_imports()` is the Ray workers' `worker_process_setup_hook` (ray_run._fit). Ray Train
  spawns the worker processes, then spends seconds on the process-group rendezvous and on shipping the
  train function while each process mostly waits. Importing torch, transformers' Trainer, peft and
  raytrainer (3-5 s of CPU) in a thread from the moment the process starts takes that off the path to
  the first step: the train function then finds the modules already imported (or waits on Python's
  import lock for the rest).
* `skip_unused_deepspeed_import()`: accelerate's `extract_model_from_parallel`, called by every
  transformers `Trainer()`, runs `from deepspeed import DeepSpeedEngine` whenever DeepSpeed is installed
  (~1 s: DeepSpeed imports its autotuner, which imports mlflow). A model can be a DeepSpeedEngine only once
  deepspeed has been imported, so until then the check is skipped; strategy="deepspeed" imports it first.
"""

from __future__ import annotations

import importlib
import sys
import threading

# what every worker imports before its first step (raytrainer.ray_run pulls torch, transformers.trainer
# with peft and accelerate, and the rest of raytrainer)
WORKER_MODULES = ("raytrainer.ray_run",)


def start_background_imports() -> None:
    threading.Thread(target=_import_all, name="raytrainer-warmup", daemon=True).start()


def _import_all() -> None:
    for name in WORKER_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the train function's own import reports it, with its traceback
            return


def skip_unused_deepspeed_import() -> None:
    import accelerate.utils.other as other

    check = other.is_deepspeed_available
    if getattr(check, "_raytrainer", False):
        return

    def deepspeed_in_use() -> bool:
        return "deepspeed" in sys.modules and check()

    deepspeed_in_use._raytrainer = True
    other.is_deepspeed_available = deepspeed_in_use
