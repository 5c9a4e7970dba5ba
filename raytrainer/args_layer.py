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


def layered(user_cls, hf_base: type, ours: type, caller: str):
    """`user_cls` (a subclass of transformers' `hf_base`) with `ours` under it: the same name, module and doc;
    `ours` itself for `hf_base`; `user_cls` if it has our layer already. A new class is the caller's to finish
    (ray_args makes it a dataclass)."""
    if not isinstance(user_cls, type) or not issubclass(user_cls, hf_base):
        raise TypeError(f"{caller}() takes a transformers.{hf_base.__name__} subclass (got {user_cls!r}).")
    if issubclass(user_cls, ours):
        return user_cls
    if user_cls is hf_base:
        return ours
    # user_cls first: its defaults and methods win, and its super() calls pass through our layer
    return type(user_cls.__name__, (user_cls, ours), {
        "__module__": user_cls.__module__, "__qualname__": user_cls.__qualname__, "__doc__": user_cls.__doc__,
    })


@functools.lru_cache(maxsize=None)
def ray_args(args_cls: type) -> type:
    """`args_cls` (a TrainingArguments subclass) with raytrainer's Ray fields and checks; same name and fields."""
    cls = layered(args_cls, transformers.TrainingArguments, TrainingArguments, "ray_args")
    # args_cls first: its field defaults win over transformers' (e.g. SFTConfig's learning_rate=2e-5), and its
    # __post_init__ runs first, then ours, then transformers'
    return cls if cls is args_cls or cls is TrainingArguments else dataclasses.dataclass(cls)


def to_ray_args(args):
    """A plain TrainingArguments (sub)class instance as its ray_args() class, with the same field values."""
    cls = ray_args(type(args))
    if isinstance(args, cls):
        return args
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(type(args)) if f.init}
    return cls(**values)
