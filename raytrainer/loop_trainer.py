"""transformers.Trainer with raytrainer's loop: the Trainer where the training happens.

That is a Ray worker (worker.py builds it from the driver's RunSpec) or this process with num_workers=0.
`LoopTrainer` is transformers.Trainer plus the hooks its loop calls, each in the module named after it:
the training step (step_hooks.py), checkpoints (checkpoint/save.py), where model_init's model is built
(model_init.py) and the Hub without a network (hub.py). trainer.py's `Trainer` adds the driver's facade
on top (train / evaluate / predict / hyperparameter_search routed to Ray).
"""

from __future__ import annotations

import logging
import os

import transformers

from .args import TrainingArguments
from .args_layer import to_ray_args
from .checkpoint import CheckpointWriter
from .checkpoint.save import CheckpointHooks, PendingSave, SaveAwareCallbackHandler
from .data.ray_data import is_ray_dataset
from .deepspeed_import import name_the_cpu_for_deepspeed, skip_unused_deepspeed_import
from .hub import HubHooks
from .loop import TrainingLoop
from .model_init import WORKER_TRAINS, ModelInitHooks
from .step_hooks import StepHooks

name_the_cpu_for_deepspeed()  # before accelerate imports DeepSpeed in Trainer(): no accelerator warning
skip_unused_deepspeed_import()  # ~1 s off every process's first Trainer() when DeepSpeed is installed

logger = logging.getLogger("raytrainer")
# attributes transformers' Trainer sets after __init__ (while training or evaluating): never the user's
LAZY_BASE_ATTRS = {
    "_signature_columns", "_trial", "_tr_loss", "_total_loss_scalar", "_globalstep_last_logged",
    "_initial_num_input_tokens_seen", "_initial_global_step", "current_gradient_accumulation_steps",
    "_eval_dataloaders", "_past", "_train_dataloader", "is_in_train", "hp_search_backend", "hp_space", "hp_name",
    "objective", "compute_objective", "accelerator", "model_wrapped", "optimizer", "lr_scheduler",
    "sweep_results",  # hyperparameter_search's ResultGrid: the driver's, never sent to workers
}


def coerce_args(args) -> TrainingArguments:
    """Accept raytrainer's, transformers' or no TrainingArguments; return raytrainer's."""
    if args is None:
        return TrainingArguments(output_dir="trainer_output")
    if isinstance(args, TrainingArguments):
        return args
    if isinstance(args, transformers.TrainingArguments):  # a subclass (TRL's configs) keeps its own fields
        return to_ray_args(args)
    raise ValueError(f"args must be a raytrainer.TrainingArguments (got {type(args).__name__}).")


class LoopTrainer(HubHooks, StepHooks, CheckpointHooks, ModelInitHooks, transformers.Trainer):
    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, model_init=None, compute_loss_func=None, compute_metrics=None,
                 callbacks=None, optimizers=(None, None), optimizer_cls_and_kwargs=None,
                 preprocess_logits_for_metrics=None, tokenizer=None):
        args = coerce_args(args)
        args.validate()
        if tokenizer is not None and processing_class is None:  # the older transformers name
            processing_class = tokenizer
        set_before = set(self.__dict__)  # a subclass may set attributes before calling us: those are its own
        self._user_optimizers = optimizers != (None, None)
        self._in_worker = False  # True in a Trainer that worker.py built from the driver's RunSpec
        self._trained_on_ray = False  # set by a Ray train(): evaluate_on="auto" evaluates here afterwards
        self._ray = None  # a checkpoint.ray_checkpoints.RayCheckpoints inside a Ray worker
        self._fit_id = None  # set inside Ray workers: which fit() wrote a checkpoint
        self._lineage = None  # set inside Ray workers: the run a checkpoint belongs to (retention's scope)
        self._strategy = None
        self._nonfinite_steps_skipped = 0
        self._checkpoint_writer = CheckpointWriter(background=args.save_in_background)
        self._flops_per_token = None
        self._training_step_takes_items = None  # signatures of the (possibly overridden) hooks, read once
        self._compute_loss_signature_ok = None
        self._unfinished_saves: list[PendingSave] = []  # taken, on_save not fired yet (see _finish_saves)
        self._last_metrics: dict = {}  # the latest logged values, sent with each Ray checkpoint report
        # transformers asks a dataset without __len__ for max_steps; a Ray Dataset's length is counted later
        ray_data = is_ray_dataset(train_dataset)
        # transformers' __init__ refuses fsdp outside a distributed launch ("only works in distributed
        # training"): the driver is not one; strategies/fsdp.py shards on the workers
        fsdp, args.fsdp = args.fsdp, None
        # with Ray workers a preemption notice is a node drain that the loop watches (preemption.py), not a
        # SIGTERM: transformers' JITCheckpointCallback would hold a SIGTERM handler on the driver (and could not
        # cross to the workers), and on a worker signal.signal raises (Ray Train runs train() in a thread)
        jit = args.enable_jit_checkpoint
        if args.num_workers > 0:
            args.enable_jit_checkpoint = False
        try:
            super().__init__(
                model=model, args=args, data_collator=data_collator,
                train_dataset=None if ray_data else train_dataset, eval_dataset=eval_dataset,
                processing_class=processing_class, model_init=model_init, compute_loss_func=compute_loss_func,
                compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            )
        finally:
            args.fsdp = fsdp
            args.enable_jit_checkpoint = jit
        if ray_data:
            self.train_dataset = train_dataset
        # on_save waits for the checkpoint folder to be complete (see SaveAwareCallbackHandler)
        self.callback_handler.__class__ = SaveAwareCallbackHandler
        self.callback_handler.trainer = self
        if any(type(cb).__name__ == "MLflowCallback" for cb in self.callback_handler.callbacks):
            from .tracking.mlflow import use_safe_mlflow_callback  # mlflow only when reported to

            # params without secrets; ends only a run its own process started (not the driver's run
            # after a Ray run hands rank 0's callback state back)
            use_safe_mlflow_callback(self)
        # what transformers' and our __init__ set; anything else on the instance is the user's (crossing.py)
        self._rt_base_attrs = None
        self._rt_base_attrs = (set(self.__dict__) - set_before) | LAZY_BASE_ATTRS

    def _apply_logging_dir(self) -> None:
        """The older `logging_dir` field: where TensorBoard writes (transformers 4 did; 5 reads an env var)."""
        if not self.args.logging_dir:
            return
        try:
            from transformers.integrations import TensorBoardCallback
        except ImportError:  # pragma: no cover
            return
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, TensorBoardCallback) and cb.tb_writer is None:
                # absolute: Ray workers run in another folder
                cb.logging_dir = os.path.abspath(os.path.expanduser(self.args.logging_dir))

    def train_here(self, resume_from_checkpoint: str | None, trial=None, ignore_keys_for_eval=None):
        """transformers' train() in this process, with our loop; the resume was decided by the caller (a
        checkpoint folder or None): checkpoint/resume.py on the driver, worker.py on a Ray worker."""
        return transformers.Trainer.train(self, resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                          ignore_keys_for_eval=ignore_keys_for_eval)

    def _inner_training_loop(self, batch_size=None, args=None, resume_from_checkpoint=None, trial=None,
                             ignore_keys_for_eval=None):
        if self.args.auto_find_batch_size and batch_size is not None:
            # transformers' train() retries this with a smaller batch_size after an out-of-memory error
            self._train_batch_size = batch_size
            self.model_wrapped = self.model  # the next attempt wraps the bare model again
            if self.args.strategy == "deepspeed" and not self._user_optimizers:
                self.optimizer = None  # ZeRO rewrote the last attempt's param groups: the next engine needs a new one
        return TrainingLoop(self).run(resume_from_checkpoint, trial, ignore_keys_for_eval)



def rebuild(blueprint):
    """A Trainer of the user's class, as the driver's stood at the call (a Ray worker's, a Tune trial's): the
    subclass's __init__ is not run again (its effects are in the copied attributes, and its signature may
    take arguments the rebuilding process does not have); our layer's __init__ (transformers' own, plus ours) is."""
    cls = blueprint.trainer_cls
    trainer = cls.__new__(cls)
    # before __init__ too: an overridden hook that __init__ calls may read the subclass's attributes
    trainer.__dict__.update(blueprint.user_attrs)
    # a Trainer built to train (it has a train_dataset; evaluate/predict runs have none) calls model_init
    # again in train(): __init__'s call builds a meta skeleton on a worker (model_init.py)
    token = WORKER_TRAINS.set(blueprint.ctor.get("train_dataset") is not None)
    try:
        LoopTrainer.__init__(trainer, callbacks=None, **blueprint.ctor)
    finally:
        WORKER_TRAINS.reset(token)
    trainer.__dict__.update(blueprint.user_attrs)
    # the driver's list exactly (its defaults, report_to integrations, removals), minus display
    trainer.callback_handler.callbacks = list(blueprint.callbacks)
    return trainer


__all__ = ["LoopTrainer", "PendingSave", "coerce_args", "rebuild"]
