"""raytrainer: transformers.Trainer's API with its loop on Ray Train workers."""

# first, before transformers is imported: outside the tested range, warn (once) before any ImportError
from ._versions import check_versions as _check_versions

_check_versions()


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
    from transformers import (DefaultFlowCallback, EarlyStoppingCallback, PrinterCallback, ProgressCallback,
                              TrainerCallback, TrainerControl, TrainerState)
    from transformers.trainer_utils import BestRun, EvalPrediction, PredictionOutput, TrainOutput

    from .args import TrainingArguments
    from .layer import on_ray, ray_args
    from .trainer import Trainer

    found = locals()
    globals().update({name: found[name] for name in __all__})


# PEP 562: the public names load on first use, so `raytrainer --help` spends no 2 s importing torch and the job's
# Ray log settings go in before Ray is imported (raytrainer.log_filter.skip_ray_noise)
def __getattr__(name: str):
    if name in __all__:
        _load()
        return globals()[name]
    raise AttributeError(f"module 'raytrainer' has no attribute {name!r}")

