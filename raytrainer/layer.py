"""The Ray layer for any transformers.Trainer subclass: `on_ray(SomeTrainer)`, `ray_args(SomeConfig)`.

`raytrainer.Trainer` *is* the layer: a subclass of transformers.Trainer that overrides train(), the
training step's backward, checkpoint saving and evaluate/predict routing, and calls transformers for
everything else. `on_ray(X)` puts it (with its hook classes, loop_trainer.py) directly above
transformers.Trainer in X's MRO:

    on_ray(trl.SFTTrainer).__mro__ == (SFTTrainer, trl.SFTTrainer, trl._BaseTrainer,
                                       raytrainer.Trainer, LoopTrainer, HubHooks, StepHooks,
                                       CheckpointHooks, ModelInitHooks, transformers.Trainer, object)

so X's own overrides (compute_loss, training_step, log, _save_checkpoint ...) stay first and reach ours
through their `super()` calls, as they reach transformers' today. A user who subclasses
`raytrainer.Trainer` gets the same shape; `on_ray(transformers.Trainer) is raytrainer.Trainer`.

`ray_args(C)` does the same for a TrainingArguments subclass: `C` first (its fields, defaults and
__post_init__), then raytrainer.TrainingArguments (the Ray fields, validate(), the driver-not-worker
hardware checks), then transformers'. A plain `C` instance given to a layered Trainer is converted to
`ray_args(C)` with the same values (num_workers=0 unless set), as transformers.TrainingArguments is.

Where a subclass's __init__ work happens (the design the driver/worker split must keep): **once, on the
driver.** The user constructs X on the driver; X.__init__ tokenises, packs, builds reference models,
collators and its callbacks, then calls transformers' __init__ (through ours). At train() the driver's
Trainer, as it stands, crosses to the workers (spec.TrainerBlueprint): the constructor attributes
(the *prepared* datasets, the collator, the model), the callback list (X's own included) and every
attribute X set. Each worker builds an X with transformers' __init__ only (our layer's), never X.__init__
again: no second tokenisation, no second reference model, no second set of callbacks, and X's
signature may hold arguments the worker does not have. The spec this needs is only the class, the
constructor attributes and the user attributes (spec.TrainerBlueprint); loop_trainer.rebuild builds from it:
`cls.__new__(cls)`, the user attributes set, `LoopTrainer.__init__(trainer, **ctor)` (the layer's, so the
driver path is not re-entered), the user attributes set again, the driver's callback list.

What a subclass author must know: attributes set in __init__ cross by pickling (an unpicklable one is
named with the fix before Ray starts); work bound to this process or device (a reference model placed for
the driver's device, a per-process seed, an open handle, a generation engine) is not redone on the workers,
so redo it lazily where the worker runs it (raytrainer.trl.DPOTrainer moves its reference model to the
worker's device in train()/evaluate(); raytrainer.trl.GRPOTrainer redoes TRL's seed + rank there).
"""

from __future__ import annotations

import functools

import transformers

from .args_layer import layered, ray_args, to_ray_args  # noqa: F401 - the public pair lives here
from .trainer import Trainer


@functools.lru_cache(maxsize=None)
def on_ray(trainer_cls: type) -> type:
    """`trainer_cls` with raytrainer's Ray layer under it (see the module docstring); same name and API.

    Its constructor is `trainer_cls`'s; its args may be `ray_args(...)` of its config class to set the Ray
    fields (num_workers, storage_path, ...)."""
    cls = layered(trainer_cls, transformers.Trainer, Trainer, "on_ray")
    if cls is trainer_cls or cls is Trainer:
        return cls
    # only our layer's classes between it and transformers.Trainer: a subclass's super() calls pass through it
    mro = cls.__mro__
    between = mro[mro.index(Trainer):mro.index(transformers.Trainer)]
    assert all(c.__module__.startswith("raytrainer.") for c in between), mro
    return cls
