"""Every check raytrainer makes on top of transformers.Trainer's own: the rule "add, never take away".

raytrainer may refuse an input earlier and more clearly than transformers, but only one that
transformers.Trainer also fails on (later, with a worse message); anything transformers runs, raytrainer
runs, at most with one warning. Each entry of ADDED_CHECKS says which:

* REFUSED_TOO: transformers fails on this input too; tests/test_dropin_registry.py runs the entry's example
  through transformers.Trainer and sees it fail, and through raytrainer and sees `message` in the error.
* WARN_ONLY: transformers runs it; raytrainer runs it the same way and logs `message` once.
* OURS: a field transformers does not have (the Ray fields, older names); nothing is taken away.
* NOT_HONOURED: a transformers field raytrainer's loop does not implement (fields.REFUSED); the only
  refusals of inputs transformers runs, listed so they stay visible.

Argument checks (kind "arguments") are data here and run by `TrainingArguments.validate()`; the other
kinds name the code that makes them. docs/compatibility.md prints the table (`table()`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

logger = logging.getLogger("raytrainer")

REFUSED_TOO = "refused: transformers fails too"
WARN_ONLY = "warn only"
OURS = "raytrainer's own field"
NOT_HONOURED = "refused: not honoured by the loop"


@dataclasses.dataclass(frozen=True)
class AddedCheck:
    name: str
    kind: str          # arguments | field types | dataset | resume | preflight
    condition: str     # when it fires, in words
    message: str       # a fragment of the error (or warning) text; transformers' own words come first
    outcome: str       # REFUSED_TOO | WARN_ONLY | OURS | NOT_HONOURED
    example: dict | None = None  # TrainingArguments overrides that trigger it (arguments checks)
    fires: Callable[[Any], bool] | None = None  # arguments checks: the predicate on the arguments
    text: Callable[[Any], str] | None = None    # arguments checks: the full message for these arguments
    where: str = "args.py validate()"


def _v(x):
    return getattr(x, "value", x)


def _arg(name, condition, outcome, example, fires, text, message=None):
    """An arguments check; `message` defaults to the text rendered for the example's values."""
    return AddedCheck(name=name, kind="arguments", condition=condition, message=message or "", outcome=outcome,
                      example=example, fires=fires, text=text)


# ------------------------------------------------------------------ arguments (TrainingArguments.validate)
ARGUMENT_CHECKS: list[AddedCheck] = [
    _arg("per_device_train_batch_size", "not a positive int", REFUSED_TOO, {"per_device_train_batch_size": 0},
         lambda a: not isinstance(a.per_device_train_batch_size, int) or a.per_device_train_batch_size < 1,
         lambda a: f"per_device_train_batch_size={a.per_device_train_batch_size!r} must be a positive integer.",
         "must be a positive integer"),
    _arg("per_device_eval_batch_size", "not a positive int", WARN_ONLY, {"per_device_eval_batch_size": -1},
         lambda a: not isinstance(a.per_device_eval_batch_size, int) or a.per_device_eval_batch_size < 1,
         lambda a: f"per_device_eval_batch_size={a.per_device_eval_batch_size!r} is not a positive integer: "
                   "training runs, evaluate()/predict() will fail.",
         "evaluate()/predict() will fail"),
    _arg("gradient_accumulation_steps", "not a positive int", REFUSED_TOO, {"gradient_accumulation_steps": 0},
         lambda a: not isinstance(a.gradient_accumulation_steps, int) or a.gradient_accumulation_steps < 1,
         lambda a: f"gradient_accumulation_steps={a.gradient_accumulation_steps!r} must be a positive integer.",
         "must be a positive integer"),
    _arg("max_steps", "0 or below -1", WARN_ONLY, {"max_steps": 0},
         lambda a: a.max_steps == 0 or a.max_steps < -1,
         lambda a: f"max_steps={a.max_steps} is not a step count: as in transformers, num_train_epochs="
                   f"{a.num_train_epochs} decides the length (-1 says so).",
         "is not a step count"),
    _arg("num_train_epochs", "<= 0 with max_steps <= 0", WARN_ONLY, {"max_steps": -1, "num_train_epochs": 0},
         lambda a: a.max_steps <= 0 and isinstance(a.num_train_epochs, (int, float)) and not a.num_train_epochs > 0,
         lambda a: f"num_train_epochs={a.num_train_epochs} with max_steps={a.max_steps}: no step will train "
                   "(as in transformers); set num_train_epochs > 0 or max_steps > 0.",
         "no step will train"),
    _arg("learning_rate", "< 0", REFUSED_TOO, {"learning_rate": -1e-3},
         lambda a: a.learning_rate < 0,
         lambda a: f"Invalid learning rate: {a.learning_rate}. learning_rate must be >= 0.",
         "Invalid learning rate"),
    _arg("weight_decay", "< 0", WARN_ONLY, {"weight_decay": -0.1},
         lambda a: a.weight_decay < 0,
         lambda a: f"weight_decay={a.weight_decay} < 0 grows the weights (transformers runs it as given).",
         "grows the weights"),
    _arg("max_grad_norm", "< 0", WARN_ONLY, {"max_grad_norm": -1.0},
         lambda a: a.max_grad_norm is not None and a.max_grad_norm < 0,
         lambda a: f"max_grad_norm={a.max_grad_norm} < 0: nothing is clipped (as in transformers; 0 says so).",
         "nothing is clipped"),
    _arg("warmup_steps", "< 0", REFUSED_TOO, {"warmup_steps": -2},
         lambda a: a.warmup_steps < 0,
         lambda a: f"Got warmup_steps = {a.warmup_steps}, Expected value warmup_steps >= 0. "
                   "Set a count of steps, or a ratio < 1.",
         "Expected value warmup_steps >= 0"),
    *[_arg(f"{n}", "< 0", WARN_ONLY, {n: -1, **({"eval_strategy": "steps"} if n == "eval_steps" else {}),
                                       **({"save_strategy": "steps"} if n == "save_steps" else {})},
           (lambda n: lambda a: getattr(a, n) is not None and getattr(a, n) < 0)(n),
           (lambda n: lambda a: f"{n}={getattr(a, n)} < 0: as in transformers, every step matches it.")(n),
           "every step matches it") for n in ("logging_steps", "eval_steps", "save_steps")],
    _arg("save_total_limit", "< 1", WARN_ONLY, {"save_total_limit": 0},
         lambda a: a.save_total_limit is not None and a.save_total_limit < 1,
         lambda a: f"save_total_limit={a.save_total_limit} < 1: every checkpoint is kept (as in transformers; "
                   "None says so).",
         "every checkpoint is kept"),
    _arg("eval_accumulation_steps", "< 1", WARN_ONLY, {"eval_accumulation_steps": 0},
         lambda a: a.eval_accumulation_steps is not None and a.eval_accumulation_steps < 1,
         lambda a: f"eval_accumulation_steps={a.eval_accumulation_steps} < 1: set it >= 1 or None.",
         "set it >= 1 or None"),
    _arg("fp16 and bf16", "both True", REFUSED_TOO, {"fp16": True, "bf16": True},
         lambda a: a.fp16 and a.bf16,
         lambda a: "At most one of fp16 and bf16 can be True, but not both. Set at most one "
                   "(bf16=True on CPUs and Ampere+ GPUs).",
         "At most one of fp16 and bf16 can be True, but not both"),
    _arg("fp16_full_eval and bf16_full_eval", "both True", REFUSED_TOO,
         {"fp16_full_eval": True, "bf16_full_eval": True},
         lambda a: a.fp16_full_eval and a.bf16_full_eval,
         lambda a: "At most one of fp16 and bf16 can be True for full eval, but not both. "
                   "Set at most one of fp16_full_eval and bf16_full_eval.",
         "At most one of fp16 and bf16 can be True for full eval"),
    _arg("save_strategy='best' without metric", "metric_for_best_model is None", REFUSED_TOO,
         {"save_strategy": "best"},
         lambda a: _v(a.save_strategy) == "best" and a.metric_for_best_model is None,
         lambda a: "`args.metric_for_best_model` must be provided when using 'best' save_strategy or if "
                   "`args.load_best_model_at_end` is set to `True`. Set e.g. "
                   'metric_for_best_model="eval_loss" or a key your compute_metrics returns.',
         "`args.metric_for_best_model` must be provided"),
    _arg("save_strategy='best' without evaluation", 'eval_strategy="no"', WARN_ONLY,
         {"save_strategy": "best", "metric_for_best_model": "eval_loss"},
         lambda a: _v(a.save_strategy) == "best" and _v(a.eval_strategy) == "no",
         lambda a: 'save_strategy="best" with eval_strategy="no": no evaluation, so no checkpoint is saved '
                   '(as in transformers); set eval_strategy="steps" or "epoch".',
         "no checkpoint is saved"),
    _arg("load_best_model_at_end strategies", "save_strategy != eval_strategy (not 'best')", REFUSED_TOO,
         {"load_best_model_at_end": True, "eval_strategy": "epoch", "save_strategy": "steps"},
         lambda a: a.load_best_model_at_end and _v(a.save_strategy) != "best"
         and _v(a.eval_strategy) != _v(a.save_strategy),
         lambda a: "--load_best_model_at_end requires the save and eval strategy to match: "
                   f"save_strategy={_v(a.save_strategy)!r}, eval_strategy={_v(a.eval_strategy)!r}; or use "
                   'save_strategy="best".',
         "--load_best_model_at_end requires the save and eval strategy to match"),
    _arg("eval_on_start without evaluation", 'eval_strategy="no"', WARN_ONLY, {"eval_on_start": True},
         lambda a: a.eval_on_start and _v(a.eval_strategy) == "no",
         lambda a: 'eval_on_start=True with eval_strategy="no": evaluates once before training (as in '
                   "transformers) and never again.",
         "evaluates once before training"),
]

# ------------------------------------------------------------------ the other kinds: made by code elsewhere
OTHER_CHECKS: list[AddedCheck] = [
    AddedCheck("field type", "field types", "a value of the wrong type for a field transformers reads while "
               "training (field_types.TRAINING_FIELDS), or NaN", "expected", REFUSED_TOO,
               {"learning_rate": None}, where="field_types.py check_field_types"),
    AddedCheck("field type (other fields)", "field types", "a value of the wrong type for any other field "
               "(transformers reads None as false, most others only in evaluation or integrations)",
               "expected", WARN_ONLY, {"logging_first_step": None}, where="field_types.py check_field_types"),
    AddedCheck("field range", "field types", "adam_beta1/2, adam_epsilon, neftune_noise_alpha, seed, "
               "dataloader_num_workers out of range (field_types.RANGES)", "must be", REFUSED_TOO,
               {"adam_beta1": 1.5}, where="field_types.py check_field_types"),
    AddedCheck("field range (warn)", "field types", "label_smoothing_factor, data_seed out of range",
               "(transformers runs it)", WARN_ONLY, {"label_smoothing_factor": 1.5}, where="field_types.py check_field_types"),
    AddedCheck("unknown enum name", "field types", "optim, lr_scheduler_type or a strategy name outside transformers' "
               "enum", "is not a valid", REFUSED_TOO, {"optim": "adamw_torch_fusd"},
               where="args.py _check_names, field_types.py"),
    AddedCheck("empty train_dataset", "dataset", "len(train_dataset) == 0", "train_dataset is empty",
               REFUSED_TOO, where="data/checks.py"),
    AddedCheck("row is not a dict", "dataset", "a row that is not a Mapping, with the default collator",
               "the default collator needs a dict", REFUSED_TOO, where="data/checks.py"),
    AddedCheck("main input column missing", "dataset", "no model.main_input_name column, default collator",
               "column", REFUSED_TOO, where="data/checks.py"),
    AddedCheck("no model input column", "dataset", "no column the forward of a model without main_input_name accepts, default collator",
               "contain none of the inputs", REFUSED_TOO, where="data/checks.py"),
    AddedCheck("token ids not integers", "dataset", "float input_ids for a model whose input is an nn.Embedding "
               "(a custom nn.Module taking float features as input_ids is not checked)",
               "token ids must be integers", REFUSED_TOO, where="data/checks.py"),
    AddedCheck("token id outside the vocabulary", "dataset", "an input id < 0 or >= the embedding's rows",
               "outside the model's vocabulary", REFUSED_TOO, where="data/checks.py"),
    AddedCheck("ragged rows", "dataset", "input_ids of different lengths and a collator that cannot pad",
               "default collator cannot pad", REFUSED_TOO, where="data/checks.py"),
    AddedCheck("no checkpoint to resume", "resume", "resume_from_checkpoint=True, no complete checkpoint in "
               "output_dir", "No valid checkpoint found in output directory", REFUSED_TOO,
               where="checkpoint/resume.py plan_resume"),
    AddedCheck("checkpoint path missing", "resume", "resume_from_checkpoint names no folder",
               "Can't find a valid checkpoint at", REFUSED_TOO, where="checkpoint/resume.py plan_resume"),
    AddedCheck("data position cannot be placed", "resume", "another global batch and the checkpoint's sample "
               "position is unknown or not placeable here (another dataset size, custom sampler)",
               "resuming by global_step", WARN_ONLY, where="checkpoint/run_meta.py resume_position"),
    AddedCheck("Ray fields", "arguments", "num_workers, max_failures, max_preemption_failures, "
               "resources_per_worker, storage_path, run_name (as a folder), strategy, nonfinite_steps, "
               "evaluate_on, warmup_ratio: values outside their range", "must be", OURS,
               {"num_workers": -1}),
    AddedCheck("fields the loop does not honour", "preflight", "accelerator_config options, parallelism_config, "
               "dataloader_in_order set away from their defaults (fields.REFUSED), at train()",
               "is not supported by raytrainer", NOT_HONOURED, {"dataloader_in_order": False},
               where="args.py check_supported"),
    AddedCheck("auto_find_batch_size with several workers", "preflight", "auto_find_batch_size and num_workers > 1",
               "is not supported by raytrainer", OURS, {"auto_find_batch_size": True, "num_workers": 2},
               where="args.py check_supported"),
]


ADDED_CHECKS: list[AddedCheck] = ARGUMENT_CHECKS + OTHER_CHECKS


def run_argument_checks(args) -> None:
    """validate()'s part: raise the first REFUSED_TOO check that fires; warn once per WARN_ONLY one."""
    warned = args.__dict__.setdefault("_rt_warned", set())
    for check in ARGUMENT_CHECKS:
        try:
            fires = check.fires(args)
        except TypeError:  # a value of another type: field_types warned about it already
            continue
        if not fires:
            continue
        if check.outcome == WARN_ONLY:
            if check.name not in warned:
                warned.add(check.name)
                logger.warning("raytrainer: %s", check.text(args))
            continue
        raise ValueError(check.text(args))


def warn_once(args, key: str, message: str) -> None:
    warned = args.__dict__.setdefault("_rt_warned", set())
    if key not in warned:
        warned.add(key)
        logger.warning("raytrainer: %s", message)


def table() -> str:
    """The markdown table of docs/compatibility.md."""
    rows = ["| check | kind | condition | outcome | where |", "|---|---|---|---|---|"]
    for c in ADDED_CHECKS:
        rows.append(f"| {c.name} | {c.kind} | {c.condition} | {c.outcome} | {c.where} |")
    return "\n".join(rows)
