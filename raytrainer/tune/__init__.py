"""Driver-side pieces of `Trainer.hyperparameter_search` on Ray Tune.

space.py: any documented hp_space style -> a Tune param_space; validate.py: the search's checks
before any trial starts, and a trial config split into TrainingArguments overrides / model_init keys;
objective.py: transformers' default objective, direction -> Tune mode, BestRun; schedulers.py:
"asha" / "pbt" / a Tune scheduler.
"""

from .objective import best_run, default_objective, direction_to_mode
from .schedulers import build_scheduler
from .space import HpSpaceError, RecordingTrial, to_tune_space
from .validate import check_search, split_params

__all__ = [
    "HpSpaceError",
    "RecordingTrial",
    "best_run",
    "build_scheduler",
    "check_search",
    "default_objective",
    "direction_to_mode",
    "split_params",
    "to_tune_space",
]
