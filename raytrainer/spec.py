"""What crosses from the driver to the Ray workers: one frozen, picklable RunSpec (Ray pickles it once).

It imports neither side: the driver (launch.py) builds it, the workers (worker.py) read it.

* `TrainerBlueprint`: the Trainer *as it stands* when train() / evaluate() / predict() is called: its class,
  its current constructor attributes (datasets, collator, compute_metrics, model_init, arguments), its
  callback list (add/remove/pop_callback included, display callbacks left out: they stay on the driver) and
  every attribute a subclass or the user set on it.
* `ResumePlan`: the resume, decided once on the driver (checkpoint/resume.py): which checkpoint, where it
  is, its run metadata, the trainer_state.json the driver checked, and what was checked.
  The workers only load it.
* `RunSpec`: both, plus where the run lives (storage filesystem, run folder), the call's own arguments and
  the handles the workers report to.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers.trainer_callback import PrinterCallback, ProgressCallback

# Constructor arguments that are plain attributes of a built Trainer (users reassign them).
CTOR_ATTRS = ("model", "args", "data_collator", "train_dataset", "eval_dataset", "processing_class", "model_init",
              "compute_loss_func", "compute_metrics", "preprocess_logits_for_metrics", "optimizer_cls_and_kwargs")


def is_display_callback(cb) -> bool:
    """Progress bars and printers: they run on the driver, fed by the workers' event stream."""
    try:
        from transformers.utils.notebook import NotebookProgressCallback
    except ImportError:  # pragma: no cover
        NotebookProgressCallback = ProgressCallback
    return isinstance(cb, (ProgressCallback, PrinterCallback, NotebookProgressCallback))


@dataclasses.dataclass(frozen=True)
class TrainerBlueprint:
    """The driver's Trainer as it stood when train() / evaluate() / predict() was called."""

    trainer_cls: type
    ctor: dict            # the CTOR_ATTRS values as they are now
    callbacks: list       # the current callbacks, display callbacks left out
    user_attrs: dict      # attributes not set by Trainer.__init__ (a subclass's own, or set by the user)

    @classmethod
    def of(cls, trainer, **overrides) -> "TrainerBlueprint":
        ctor = {name: getattr(trainer, name, None) for name in CTOR_ATTRS}
        ctor.update(overrides)
        callbacks = [cb for cb in trainer.callback_handler.callbacks if not is_display_callback(cb)]
        return cls(type(trainer), ctor, callbacks, user_attributes(trainer))

    def named_values(self) -> dict:
        """Everything that must pickle, by the name a user knows it under (for error messages)."""
        out = {k: v for k, v in self.ctor.items() if v is not None}
        out.update({f"callbacks[{i}] ({type(cb).__name__})": cb for i, cb in enumerate(self.callbacks)})
        out.update({f"trainer.{k}": v for k, v in self.user_attrs.items()})
        return out


def user_attributes(trainer) -> dict:
    base = getattr(trainer, "_rt_base_attrs", set())
    return {k: v for k, v in trainer.__dict__.items() if k not in base and k not in CTOR_ATTRS}


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """A resume decided on the driver (checkpoint/resume.py); the workers load it and check nothing again."""

    checkpoint: str                 # a checkpoint-<step> folder: a local path, or a path in the storage filesystem
    in_storage: bool                # True: workers download it from the run's storage filesystem
    run_meta: dict | None           # its raytrainer_run.pt (world size, global batch, data position, lineage)
    trainer_state: str | None       # the trainer_state.json the driver checked: a download must hold these bytes
    checked: tuple = ()             # what the driver checked, in order (for logs and the tests)

    @property
    def lineage(self) -> str | None:
        meta = self.run_meta or {}
        return meta.get("lineage") or meta.get("fit_id")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything that crosses from the driver to the workers (pickled once by Ray)."""

    blueprint: TrainerBlueprint  # the driver's Trainer as it stood when train()/evaluate()/predict() was called
    resume: ResumePlan | None
    storage_filesystem: Any      # a pyarrow.fs.FileSystem
    run_dir: str                 # the run folder inside the storage filesystem
    name: str
    threads_per_worker: int
    dataset_rows: dict           # Ray Data datasets: rows per dataset (counted once on the driver)
    fit_id: str = ""             # tells this fit's checkpoints from an earlier fit's in the same run folder
    train_call: tuple = (None, None)  # train()'s own (trial, ignore_keys_for_eval)
    eval_call: tuple | None = None  # (method, dataset, ignore_keys, prefix) for launch.run_eval_on_ray
    driver_state: Any = None     # the driver's TrainerState (evaluate/predict log at its step)
    events: Any = None           # the driver's EventBox actor: rank 0 streams callback events to it
    driver_cwd: str = ""         # relative paths resolve here on the driver's machine
    driver_host: str = ""
    submitted_at: float = 0.0    # driver's time.time() at fit(): workers log their start-up latency
    tracking_env: Any = None     # MLFLOW_* of the driver (its tracking URI, its active run): set on the workers
