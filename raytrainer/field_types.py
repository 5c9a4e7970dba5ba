"""Every TrainingArguments value checked against its field's type, before anything reads it.

transformers trusts its annotations: `eval_strategy=None` fails as "None is not a valid
IntervalStrategy", `adam_beta1=0` (an int) inside torch as "betas must be either both floats or
both Tensors", `label_smoothing_factor=None` as an arithmetic TypeError mid-training. Here each value
is checked against the field's annotation on the driver, and the error names the field, what was
given and what is expected. Ints given to float fields become floats (what HfArgumentParser does);
NaN is refused, infinity except where it means "no limit".

Add, never take away (added_checks.py): a value is refused only for the fields where transformers fails on
it too (TRAINING_FIELDS, and raytrainer's own fields); elsewhere it is kept as given, with one warning.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import math
import types
import typing
from typing import Any

INFINITY_ALLOWED = {"max_grad_norm"}  # inf: no clipping (transformers logs the norm, clips nothing)
# fields whose value of another type fails under transformers too (its TrainingArguments, or training): refused
# here. field -> such a value (tests/test_dropin_registry.py runs each through transformers.Trainer). Any other
# field of the wrong type is kept, with one warning: transformers runs it (None and "x" read as false or true
# where a bool is expected; most others are read only by evaluation or an integration).
TRAINING_FIELDS = {
    **dict.fromkeys(("per_device_train_batch_size", "num_train_epochs", "max_steps", "learning_rate", "weight_decay",
                     "adam_beta1", "adam_beta2", "adam_epsilon", "gradient_accumulation_steps", "max_grad_norm",
                     "label_smoothing_factor", "log_level", "log_level_replica", "seed", "dataloader_drop_last",
                     "lr_scheduler_type", "warmup_steps", "optim", "use_cache", "logging_strategy", "logging_steps",
                     "eval_strategy", "save_strategy", "hub_strategy", "dataloader_num_workers")),
    **dict.fromkeys(("tf32", "use_liger_kernel", "neftune_noise_alpha", "torch_empty_cache_steps", "eval_steps",
                     "save_steps", "data_seed", "dataloader_persistent_workers", "dataloader_prefetch_factor",
                     "label_names"), "x"),
}
# None is transformers' own spelling of "nothing" for these (its __post_init__ turns debug=None into [])
NONE_NORMALISED_BY_TRANSFORMERS = {"debug"}

# ranges of fields TrainingArguments.validate() does not cover: name -> (check, what is expected)
RANGES = {
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_epsilon": (lambda v: v >= 0, ">= 0"),
    "neftune_noise_alpha": (lambda v: v is None or v > 0, "> 0, or None to switch NEFTune off"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "dataloader_num_workers": (lambda v: v >= 0, ">= 0 (0 loads in the training process)"),
    "num_workers": (lambda v: v >= 0, ">= 0 (0 trains in this process)"),
    "max_failures": (lambda v: v >= -1, ">= 0, or -1 for unlimited restarts"),
    "resources_per_worker": (lambda v: v is None or isinstance(v, dict) and all(isinstance(k, str) and isinstance(n, (int, float))
                                                        and not isinstance(n, bool) and n >= 0 and math.isfinite(n)
                                                        for k, n in v.items()),
                             'a dict of resource name -> amount >= 0, e.g. {"CPU": 2, "GPU": 1}'),
}


# ranges transformers runs outside of: one warning (label smoothing >= 1 and a negative data seed train)
WARN_RANGES = {
    "label_smoothing_factor": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "data_seed": (lambda v: v is None or 0 <= v < 2**32, "in [0, 2**32), or None"),
}


class FieldTypeError(TypeError, ValueError):
    """A value of the wrong type: both a TypeError and the ValueError every other bad argument raises."""


# transformers' __post_init__ rewrites these into other types (fsdp="full_shard" -> True, a config dict or
# JSON path -> an object), and dataclasses.replace() runs __post_init__ again on the rewritten values
REWRITTEN_BY_TRANSFORMERS = {"fsdp"}


def check_field_types(args) -> None:
    """Raise FieldTypeError/ValueError naming the first field whose value does not fit; coerce int -> float.

    Config fields (dict or JSON path: accelerator_config, fsdp_config, deepspeed...) are transformers'
    own to parse and check.
    """
    from .added_checks import warn_once

    hints = _hints(type(args))
    for f in dataclasses.fields(args):
        if not f.init or f.name not in hints or f.name in REWRITTEN_BY_TRANSFORMERS or _mentions_dict(hints[f.name]):
            continue
        value = getattr(args, f.name)
        if value is None and f.name in NONE_NORMALISED_BY_TRANSFORMERS:
            continue
        _check_enum_string(f.name, value, hints[f.name])
        fits, value = _fit(value, hints[f.name])
        refuse = f.name in TRAINING_FIELDS or f.name not in TRANSFORMERS_FIELDS
        if not fits:
            message = f"{f.name}={getattr(args, f.name)!r}: expected {_describe(hints[f.name])}."
            if refuse:
                raise FieldTypeError(message)
            warn_once(args, f"type:{f.name}", f"{message} transformers runs it as given; so does raytrainer.")
            continue
        if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and f.name not in INFINITY_ALLOWED)):
            if refuse:
                raise ValueError(f"{f.name}={value!r} must be a finite number.")
            warn_once(args, f"finite:{f.name}", f"{f.name}={value!r} is not a finite number.")
        if value is not getattr(args, f.name):
            object.__setattr__(args, f.name, value)
    for name, (fits, expected) in RANGES.items():
        try:
            ok = not hasattr(args, name) or fits(getattr(args, name))
        except TypeError:  # warned about as a type already
            continue
        if not ok:
            raise ValueError(f"{name}={getattr(args, name)!r} must be {expected}.")
    for name, (fits, expected) in WARN_RANGES.items():
        try:
            ok = fits(getattr(args, name))
        except TypeError:  # warned about as a type already
            continue
        if not ok:
            warn_once(args, f"range:{name}", f"{name}={getattr(args, name)!r} is not {expected} (transformers runs it).")


@functools.lru_cache(maxsize=None)
def _transformers_fields() -> frozenset:
    import transformers

    return frozenset(f.name for f in dataclasses.fields(transformers.TrainingArguments))


class _Fields:
    def __contains__(self, name):
        return name in _transformers_fields()


TRANSFORMERS_FIELDS = _Fields()  # raytrainer's own fields (the Ray ones) are always refused when mistyped


def _check_enum_string(name: str, value, hint) -> None:
    """"IntervalStrategy | str" and the like: a string outside the enum is a ValueError with the closest name."""
    if not isinstance(value, str) or isinstance(value, enum.Enum):
        return
    enums = [m for m in typing.get_args(hint) if isinstance(m, type) and issubclass(m, enum.Enum)]
    choices = [e.value for cls in enums for e in cls]
    if enums and value not in choices:
        hint_text = difflib.get_close_matches(value, choices, n=1)
        raise ValueError(f"{value} is not a valid {enums[0].__name__}: {name}={value!r} is unknown; use one of {', '.join(map(repr, choices))}"
                         + (f" (did you mean {hint_text[0]!r}?)" if hint_text else "") + ".")


def _mentions_dict(hint) -> bool:
    return hint is dict or typing.get_origin(hint) is dict or any(_mentions_dict(a) for a in typing.get_args(hint))


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fit(value, hint) -> tuple[bool, Any]:
    """(does value fit hint, value as stored: an int given for a float becomes a float)."""
    if hint is Any:
        return True, value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        # ("IntervalStrategy | str" with a string outside the enum was refused by _check_enum_string)
        for member in typing.get_args(hint):
            fits, coerced = _fit(value, member)
            if fits:
                return True, coerced
        return False, value
    if origin is typing.Literal:
        return any(value == option and type(value) is type(option) for option in typing.get_args(hint)), value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        return True, float(value)
    if origin in (list, dict, tuple):
        return isinstance(value, origin), value
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value  # an annotation this check does not understand: transformers' own checks decide


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        parts = []
        for member in typing.get_args(hint):
            if isinstance(member, type) and issubclass(member, enum.Enum):
                parts.append("one of " + ", ".join(repr(e.value) for e in member))
            elif member is not str or not any(isinstance(m, type) and issubclass(m, enum.Enum)
                                              for m in typing.get_args(hint)):
                parts.append(_describe(member))
        return " or ".join(parts)
    if origin is typing.Literal:
        return " or ".join(repr(o) for o in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if origin is not None:
        return f"a {origin.__name__}"
    return f"a {getattr(hint, '__name__', str(hint))}"
