"""raytrainer: transformers.Trainer's API with its loop on Ray Train workers."""

# first, before transformers is imported: outside the tested range, warn (once) before any ImportError
from ._versions import check_versions as _check_versions

_check_versions()

from transformers import (
    DefaultFlowCallback,
    EarlyStoppingCallback,
    PrinterCallback,
    ProgressCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)
from transformers.trainer_utils import BestRun, EvalPrediction, PredictionOutput, TrainOutput

from .args import TrainingArguments
from .trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "Trainer",
    "TrainingArguments",
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
