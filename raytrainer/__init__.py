"""raytrainer: transformers.Trainer's API with its loop on Ray Train workers."""

# first, before transformers is imported: outside the tested range, warn (once) before any ImportError
from ._versions import check_versions as _check_versions

_check_versions()


def _name_the_cpu_for_deepspeed() -> None:
    """accelerate imports DeepSpeed in every Trainer() when it is installed, and DeepSpeed then logs
    "Setting accelerator to CPU. If you have GPU ... we were unable to detect it." in every process
    (driver and each worker). On a machine with no accelerator, say so up front: no warning."""
    import importlib.util
    import os

    if "DS_ACCELERATOR" in os.environ or importlib.util.find_spec("deepspeed") is None:
        return
    import torch

    others = ("torch_npu", "intel_extension_for_pytorch", "habana_frameworks")
    if torch.cuda.is_available() or torch.backends.mps.is_available() or \
            (hasattr(torch, "xpu") and torch.xpu.is_available()) or \
            any(importlib.util.find_spec(name) is not None for name in others):
        return
    os.environ["DS_ACCELERATOR"] = "cpu"


__version__ = "0.1.0"  # the one version source (pyproject.toml reads it)

__all__ = [
    "Trainer",
    "TrainingArguments",
    "on_ray",
    "ray_args",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "EarlyStoppingCallback",
    "DefaultFlowCallback",
    "PrinterCallback",
    "ProgressCallback",
    "BestRun",
    "EvalPrediction",
    "PredictionOutput",
    "TrainOutput",
]


def _load() -> None:
    """The public names (importing transformers and torch)."""
    _name_the_cpu_for_deepspeed()
    from transformers import (DefaultFlowCallback, EarlyStoppingCallback, PrinterCallback, ProgressCallback,
                              TrainerCallback, TrainerControl, TrainerState)
    from transformers.trainer_utils import BestRun, EvalPrediction, PredictionOutput, TrainOutput

    from .args import TrainingArguments
    from .layer import on_ray, ray_args
    from .trainer import Trainer

    found = locals()
    globals().update({name: found[name] for name in __all__})


def _entry_loads_later() -> bool:
    """The job's entries (the `raytrainer` command, jobs/finetune.py) load these names when they need
    them: `--help` must not spend its 2 s importing torch, and Ray's log settings go in before Ray is
    imported (raytrainer.log_filter.skip_ray_noise)."""
    import os
    import sys

    return os.path.basename((sys.argv or [""])[0]) in ("raytrainer", "finetune.py")


def __getattr__(name: str):  # PEP 562: the names load on first use after such a start
    if name in __all__:
        _load()
        return globals()[name]
    raise AttributeError(f"module 'raytrainer' has no attribute {name!r}")


if not _entry_loads_later():
    _load()
