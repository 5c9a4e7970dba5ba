"""Checks of a hyperparameter search, run on the driver before any trial (or Ray resource) starts.

transformers finds several of these only inside the trials (an hp_space key that is no
TrainingArguments field is a warning logged per trial, and the search varies nothing; a value
TrainingArguments refuses fails each trial that samples it). Here each is a ValueError naming the key
or argument and the fix, all problems reported together: model_init, n_trials, direction and
compute_objective; hp_space keys; empty ranges; every value a key can sample (each category, both
ends of a range) tried on TrainingArguments; the scheduler against eval/save strategies.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Any

from ray.tune.search.sample import Categorical, Domain, Float, Function, Integer, LogUniform, Quantized

from ..fields import REFUSED
from .objective import DIRECTIONS
from .schedulers import is_pbt, needs_intermediate_results, pbt_mutations, scheduler_problem

# Fields that are the same for every trial: Tune reserves a trial's workers before the trial's config
# is known, and the experiment's storage holds every trial. Set them on TrainingArguments.
PER_SEARCH_FIELDS = {
    "num_workers": "Tune reserves each trial's workers before the trial's hyperparameters are sampled",
    "use_gpu": "Tune reserves each trial's workers before the trial's hyperparameters are sampled",
    "resources_per_worker": "Tune reserves each trial's workers before the trial's hyperparameters are sampled",
    "storage_path": "every trial of the search is stored under one experiment folder",
    "storage_filesystem": "every trial of the search is stored under one experiment folder",
    "strategy": "a search compares hyperparameters under one parallelism strategy",
    "fsdp": "a search compares hyperparameters under one parallelism strategy",
    "fsdp_config": "a search compares hyperparameters under one parallelism strategy",
    "deepspeed": "a search compares hyperparameters under one parallelism strategy",
}

_MODEL_INIT = ("hyperparameter_search needs model_init=... (a function building a fresh model per trial), "
               "as in transformers")


def check_search(trainer_args, hp_space_dict: Mapping[str, Any], model_init, n_trials: int = 20,
                 direction="minimize", compute_objective=None, scheduler=None) -> None:
    """Raise one ValueError listing every problem of this search; return None when there is none.

    trainer_args: the Trainer's TrainingArguments; hp_space_dict: `space.to_tune_space(...)`'s result;
    model_init, n_trials, direction, compute_objective: as `Trainer.hyperparameter_search` takes them;
    scheduler: None, "asha", "pbt" or a Tune TrialScheduler.
    """
    problems: list[str] = []
    model_init_takes_trial = _check_model_init(model_init, problems)
    if isinstance(n_trials, bool) or not isinstance(n_trials, numbers.Integral) or n_trials < 1:
        problems.append(f"n_trials={n_trials!r} must be an integer >= 1 (the number of trials to run).")
    multi = _check_direction(direction, problems)
    if compute_objective is not None and not callable(compute_objective):
        problems.append(f"compute_objective={compute_objective!r} must be a function of the evaluation metrics.")
    if multi and compute_objective is None:
        # transformers' default objective is one number; a list of directions needs one per direction
        problems.append(
            f"direction={list(direction)!r} is a multi-objective search: pass compute_objective= a function "
            f"returning {len(direction)} values (one per direction) from the evaluation metrics."
        )
    _check_keys(trainer_args, hp_space_dict, model_init, model_init_takes_trial, problems)
    before = len(problems)
    for key, value in hp_space_dict.items():
        _check_ranges(value, key, problems)
    if len(problems) == before and not any(key in REFUSED or key in PER_SEARCH_FIELDS for key in hp_space_dict):
        _check_values(trainer_args, hp_space_dict, problems)
    _check_scheduler(scheduler, trainer_args, hp_space_dict, multi, problems)
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise ValueError(f"hyperparameter_search found {len(problems)} problems:\n- " + "\n- ".join(problems))


# ------------------------------------------------------------------------------------ model_init
def _check_model_init(model_init, problems: list[str]) -> bool | None:
    """True: transformers calls model_init(trial); False: model_init(); None: unusable."""
    if model_init is None:
        problems.append(_MODEL_INIT + ".")
        return None
    if not callable(model_init):
        problems.append(f"model_init={model_init!r} is not callable: {_MODEL_INIT}.")
        return None
    try:
        params = list(inspect.signature(model_init).parameters.values())
    except (TypeError, ValueError):
        return True  # no signature to read (a builtin): leave it to the call
    # transformers' number_of_arguments counts every parameter (defaults too): 0 -> model_init(),
    # 1 -> model_init(trial) with the trial's dict, more -> "model_init should have 0 or 1 argument."
    if len(params) == 0:
        return False
    if len(params) > 1:
        problems.append(
            f"model_init{inspect.signature(model_init)} has {len(params)} parameters: transformers calls "
            "model_init() or model_init(trial) (trial: the dict of the trial's hyperparameters); give it 0 or 1."
        )
        return None
    if params[0].kind in (params[0].KEYWORD_ONLY, params[0].VAR_KEYWORD):
        problems.append(
            f"model_init{inspect.signature(model_init)}: transformers passes the trial's hyperparameters as one "
            "positional argument, model_init(trial); take `trial` (a dict) instead."
        )
        return None
    return True


# ------------------------------------------------------------------------------------------- keys
def _field_names(trainer_args) -> list[str]:
    return [f.name for f in dataclasses.fields(trainer_args)]


def _check_keys(trainer_args, space: Mapping[str, Any], model_init, takes_trial, problems: list[str]) -> None:
    fields = _field_names(trainer_args)
    for key in space:
        if key in REFUSED:
            problems.append(f"hp_space key {key!r}: not supported by raytrainer: {REFUSED[key]}.")
        elif key in PER_SEARCH_FIELDS:
            problems.append(
                f"hp_space key {key!r} cannot vary between trials ({PER_SEARCH_FIELDS[key]}); "
                "set it on TrainingArguments."
            )
        elif key not in fields and takes_trial is False:
            # model_init() cannot receive it and no field has the name: the search would vary nothing
            hint = difflib.get_close_matches(key, fields, n=1)
            problems.append(
                f"hp_space key {key!r} is not a TrainingArguments field"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f", and model_init{inspect.signature(model_init)} takes no trial to read it from; rename the key, "
                "or define model_init(trial) and read trial[" + repr(key) + "] there."
            )
        # key not a field and model_init(trial): transformers hands model_init the whole trial dict,
        # which may read the key; that cannot be checked, so it is accepted


# ----------------------------------------------------------------------------------------- ranges
def _check_ranges(value: Any, path: str, problems: list[str]) -> None:
    """Every Tune domain (also inside dicts, lists, grid_search) must have at least one value."""
    if isinstance(value, Domain):
        empty = _empty_reason(value)
        if empty:
            problems.append(f"hp_space[{path!r}] has no values to sample: {empty}.")
    elif isinstance(value, Mapping):
        if set(value) == {"grid_search"}:
            if not isinstance(value["grid_search"], (list, tuple)) or not value["grid_search"]:
                problems.append(f"hp_space[{path!r}]: tune.grid_search(...) needs a non-empty list of values.")
            return
        for k, v in value.items():
            _check_ranges(v, f"{path}.{k}", problems)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_ranges(v, f"{path}[{i}]", problems)


def _empty_reason(domain: Domain) -> str | None:
    if isinstance(domain, Categorical):
        return None if len(domain.categories) else "tune.choice([]) has no categories"
    if isinstance(domain, Function):
        return None  # tune.sample_from: any function, nothing to check
    if not isinstance(domain, (Float, Integer)):
        return None
    sampler = domain.get_sampler()
    low, high = domain.lower, domain.upper
    if isinstance(sampler, Quantized):
        q = sampler.q
        if q <= 0:
            return f"quantization q={q} must be > 0"
        first, last = math.ceil(low / q - 1e-9), math.floor(high / q + 1e-9)
        if isinstance(domain, Integer) and q == 1:
            last = math.floor(high) - 1  # Tune: qrandint's upper is exclusive for q == 1 only
        if first > last:
            return f"no multiple of q={q} lies in [{low}, {high}]"
        return None
    if isinstance(domain, Integer):
        if low >= high:
            return (f"the integer range [{low}, {high}) is empty "
                    "(Tune's upper is exclusive: randint(lo, hi + 1) includes hi)")
        return None
    if math.isinf(low) and math.isinf(high):
        return None  # tune.randn: unbounded
    if low >= high:
        return f"lower={low} >= upper={high}"
    if isinstance(sampler, LogUniform) and low <= 0:
        return f"a log-uniform range needs lower > 0 (got {low})"
    return None


# ----------------------------------------------------------------------------------------- values
MAX_CANDIDATES = 50  # values tried per key: every category, or a numeric range's two ends


def _check_values(trainer_args, space: Mapping[str, Any], problems: list[str]) -> None:
    """Build TrainingArguments with values each field key can sample, so a bad one (a batch size of 0,
    an unknown scheduler name, eval/save strategies that disagree) fails here and not in a trial.

    The base has the space's constants and every searched field's first value; then each searched
    field's values are tried on it one at a time (its other values stay at the base's).
    """
    if not dataclasses.is_dataclass(trainer_args):
        return
    fields = {f.name for f in dataclasses.fields(trainer_args) if f.init}
    candidates = {k: _candidates(v) for k, v in space.items() if k in fields}
    # numbers cast as a trial's will be (a float seed -> int); strings stay strings, for
    # TrainingArguments' own message (with its closest-name hint) on an unknown enum value
    candidates = {k: [_cast(c, getattr(trainer_args, k, None), _field_type(trainer_args, k), enums=False) for c in cs]
                  for k, cs in candidates.items() if cs}
    base = {k: cs[0] for k, cs in candidates.items()}
    if _args_error(trainer_args, base) is not None:
        if len(base) == 1:
            (key, value), = base.items()
            problems.append(f"hp_space[{key!r}] can sample {value!r}, which TrainingArguments refuses: "
                            f"{_args_error(trainer_args, base)}")
        else:
            problems.append(f"hp_space can sample {base!r} together, which TrainingArguments refuses: "
                            f"{_args_error(trainer_args, base)}")
        return
    for key, values in candidates.items():
        for value in values[1:]:
            error = _args_error(trainer_args, {**base, key: value})
            if error is not None:
                problems.append(f"hp_space[{key!r}] can sample {value!r}, which TrainingArguments refuses: {error}")
                break


def _candidates(value: Any) -> list:
    if isinstance(value, Categorical):
        return list(value.categories)[:MAX_CANDIDATES]
    if isinstance(value, (Float, Integer)):
        low, high = value.lower, value.upper
        if math.isinf(low) or math.isinf(high):
            return []
        sampler = value.get_sampler()
        if isinstance(sampler, Quantized):
            q = sampler.q
            low, high = math.ceil(low / q - 1e-9) * q, math.floor(high / q + 1e-9) * q
            if isinstance(value, Integer) and q == 1:
                high -= 1
        elif isinstance(value, Integer):
            high -= 1  # randint / lograndint: upper exclusive
        return [value.cast(low), value.cast(high)]
    if isinstance(value, Domain):
        return []  # tune.sample_from: values unknown until a trial runs
    if isinstance(value, Mapping):
        if set(value) == {"grid_search"}:
            return list(value["grid_search"])[:MAX_CANDIDATES]
        return [] if _holds_domain(value) else [value]
    if isinstance(value, (list, tuple)):
        return [] if _holds_domain(value) else [value]
    return [value]


def _holds_domain(value) -> bool:
    if isinstance(value, Domain):
        return True
    if isinstance(value, Mapping):
        return any(_holds_domain(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_domain(v) for v in value)
    return False


def _args_error(trainer_args, overrides: dict) -> str | None:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # construction warnings are the trial's, shown when it runs
            dataclasses.replace(trainer_args, **overrides)
    except (ValueError, TypeError) as error:
        return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return None


def _field_type(trainer_args, name: str):
    return _field_types(type(trainer_args))[name]


def _field_types(cls) -> dict:
    # the annotations, not dataclasses.Field.type: HfArgumentParser rewrites Field.type in place
    from ..field_types import _hints

    return {f.name: _hints(cls).get(f.name, f.type) for f in dataclasses.fields(cls)}


# -------------------------------------------------------------------------------------- direction
def _check_direction(direction, problems: list[str]) -> bool:
    """Record a bad direction; return True for a multi-objective (list) direction."""
    if isinstance(direction, str):
        if direction not in DIRECTIONS:
            problems.append(f"direction={direction!r} must be 'minimize' or 'maximize' (or a list of them).")
        return False
    if isinstance(direction, (list, tuple)) and direction and all(d in DIRECTIONS for d in direction):
        return True
    problems.append(f"direction={direction!r} must be 'minimize' or 'maximize', or a non-empty list of them.")
    return False


# -------------------------------------------------------------------------------------- scheduler
def _check_scheduler(scheduler, trainer_args, space, multi: bool, problems: list[str]) -> None:
    if scheduler is None:
        return
    problem = scheduler_problem(scheduler)
    if problem:
        problems.append(problem)
        return
    name = scheduler.lower() if isinstance(scheduler, str) else type(scheduler).__name__
    if multi:
        problems.append(f"scheduler {name!r} stops or exploits trials on one metric: a multi-objective search "
                        "(a list direction) cannot use one; pass scheduler=None.")
    if needs_intermediate_results(scheduler) and _value(trainer_args.eval_strategy) == "no":
        # transformers raises the same at the start of the search (run_hp_search_ray)
        problems.append(
            f"scheduler {name!r} decides on intermediate results, which come from evaluations during training: "
            "set eval_strategy='steps' or 'epoch' (with an eval_dataset)."
        )
    if is_pbt(scheduler):
        if _value(trainer_args.save_strategy) == "no":
            # PBT copies a better trial's weights from its latest checkpoint; without one it never exploits
            problems.append(f"scheduler {name!r} continues trials from better trials' checkpoints: set "
                            "save_strategy='steps' or 'epoch' (the same as eval_strategy).")
        if isinstance(scheduler, str) and not pbt_mutations(space):
            problems.append("scheduler 'pbt' mutates the searched hyperparameters, and hp_space searches none.")


def _value(x):
    return x.value if isinstance(x, enum.Enum) else x


# ------------------------------------------------------------------------------------------ params
def split_params(params: Mapping[str, Any], args=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a trial's sampled config into (TrainingArguments overrides, the keys only model_init uses).

    Note transformers calls model_init(trial) with the *whole* trial dict (field keys included); the
    second dict is what no field takes. With `args`, each override is cast as transformers'
    `_hp_search_setup` casts it (to the type of the current value: a float seed from tune.uniform
    becomes an int), except that a float field keeps a float (warmup_steps=0.1 stays a ratio where
    transformers would make it int(0.1) == 0) and bools are never cast (bool("False") is True).
    """
    if args is None:
        from ..args import TrainingArguments

        field_types = _field_types(TrainingArguments)
    else:
        field_types = _field_types(type(args))
    overrides, model_params = {}, {}
    for key, value in params.items():
        if key == "wandb":  # Tune's W&B integration adds it; transformers drops it too
            continue
        if key in field_types:
            overrides[key] = _cast(value, getattr(args, key, None), field_types[key]) if args is not None else value
        else:
            model_params[key] = value
    return overrides, model_params


def _cast(value, current, annotation, enums: bool = True):
    if current is None or value is None or isinstance(value, bool) or isinstance(current, bool):
        return value
    if isinstance(current, enum.Enum):
        if not enums:
            return value
        return type(current)(value)
    if isinstance(value, numbers.Real) and isinstance(current, numbers.Real):
        if _is(annotation, "int") and not isinstance(value, numbers.Integral):
            return int(value)  # transformers: type(old)(value), e.g. seed from tune.uniform(1, 40)
        if _is(annotation, "float"):
            return float(value)
    return value


def _is(annotation, name: str) -> bool:
    return annotation is {"int": int, "float": float}[name] or annotation == name
