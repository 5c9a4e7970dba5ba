"""`ray_args(SomeConfig)`: any TrainingArguments subclass with raytrainer's Ray fields and checks.

`SomeConfig` comes first in the MRO: its fields, defaults and __post_init__ (e.g. SFTConfig's
learning_rate=2e-5), then raytrainer.TrainingArguments (the Ray fields, validate(), the driver-not-worker
hardware checks), then transformers'. Apart from layer.py (which imports the Trainer) so that loop_trainer.py can
convert a plain config without an import cycle.
"""

from __future__ import annotations

import dataclasses
import functools

import transformers

from .args import TrainingArguments


@functools.lru_cache(maxsize=None)
def ray_args(args_cls: type) -> type:
    """`args_cls` (a TrainingArguments subclass) with raytrainer's Ray fields and checks; same name and fields."""
    if not isinstance(args_cls, type) or not issubclass(args_cls, transformers.TrainingArguments):
        raise TypeError(f"ray_args() takes a transformers.TrainingArguments subclass (got {args_cls!r}).")
    if issubclass(args_cls, TrainingArguments):
        return args_cls
    if args_cls is transformers.TrainingArguments:
        return TrainingArguments
    # args_cls first: its field defaults win over transformers' (e.g. SFTConfig's learning_rate=2e-5), and its
    # __post_init__ runs first, then ours, then transformers'
    cls = type(args_cls.__name__, (args_cls, TrainingArguments), {
        "__module__": args_cls.__module__, "__qualname__": args_cls.__qualname__, "__doc__": args_cls.__doc__,
    })
    return dataclasses.dataclass(cls)


def to_ray_args(args):
    """A plain TrainingArguments (sub)class instance as its ray_args() class, with the same field values."""
    cls = ray_args(type(args))
    if isinstance(args, cls):
        return args
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(type(args)) if f.init}
    return cls(**values)
