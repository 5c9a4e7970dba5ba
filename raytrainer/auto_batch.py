"""auto_find_batch_size across the driver / worker boundary, as transformers keeps it (issue 18).

transformers' train() runs its loop through accelerate's find_executable_batch_size, starting from
`trainer._train_batch_size`: the args' batch at first, the checkpoint's `train_batch_size` on a resume, and
after a run the size that fitted (a second train() starts there). Ray workers run that same train(); these
hand the driver's current size to them and the size that fitted back to the driver's Trainer. (After a
resume transformers' state.train_batch_size still says the checkpoint's size, so it is not the source.)
"""

from __future__ import annotations

_FOUND = "_rt_found_batch_size"  # a worker-set attribute: rank 0's user attributes return to the driver


def carry_to_workers(trainer, blueprint) -> None:
    """Driver: the workers' Trainer starts from the driver's current size."""
    if trainer.args.auto_find_batch_size:
        blueprint.user_attrs["_train_batch_size"] = trainer._train_batch_size


def report_found(trainer) -> None:
    """Worker, after train(): the size that fitted travels back with rank 0's final state."""
    if trainer.args.auto_find_batch_size:
        setattr(trainer, _FOUND, trainer._train_batch_size)


def keep_found(trainer) -> None:
    """Driver, after rank 0's final state is applied: hold the size that fitted, as transformers' Trainer does."""
    found = trainer.__dict__.pop(_FOUND, None)
    if found:
        trainer._train_batch_size = found
