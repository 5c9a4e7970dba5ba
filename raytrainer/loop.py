"""The per-worker training loop.

`TrainingLoop(trainer).run(...)` is what every Ray Train worker runs, and what `Trainer.train()` runs
in-process with world size 1. It follows transformers' `_inner_training_loop` step for step (same
callback events through transformers' own CallbackHandler, same loss normalisation, same logged
values; the events are below) and differs where
transformers is slow or inexact:

* data: a sampler whose order is a function of (seed, epoch); resume slices the order, it does not
  iterate skipped batches (a subclass's own get_train_dataloader / _get_train_sampler, and the
  group_by_length / batch_rebalance strategies, use transformers' dataloader and read past them);
  checkpoints record the position in samples, so a resume with another global batch continues at the
  same sample (resume_at_sample);
* the strategy object owns the optimizer's creation, wrapping / sharding, backward, no_sync, clipping,
  the optimizer step and sharded checkpoint state (strategies/base.py);
* checkpoints are snapshotted in memory and written atomically in the background (checkpoint/).

The loop as pseudocode, with each callback event at its place (tests/test_events.py compares a run's
events with transformers.Trainer's):

    <on_init_end>                              # Trainer.__init__
    <on_train_begin>
    [evaluate if eval_on_start]                # <on_evaluate>, <on_log>
    for epoch in epochs:
        <on_epoch_begin>
        for each accumulation window:
            <on_step_begin>
            for each micro-batch in the window:
                training_step()                # forward, loss / num_items, backward (no_sync but last)
                if not the last micro-batch:
                    <on_substep_end>
            clip gradients
            <on_pre_optimizer_step>
            optimizer.step()
            <on_optimizer_step>
            scheduler.step(); zero_grad(); global_step += 1
            <on_step_end>
            if control.should_log:       <on_log>
            if control.should_evaluate:  <on_evaluate>, <on_log>   # (+ <on_prediction_step> per batch)
            if control.should_save:      snapshot checkpoint, <on_save>
        <on_epoch_end>
        [log / evaluate / save as at a step end]
    [load best model]
    <on_log>                                   # train_runtime, train_loss, ...
    <on_train_end>
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import time

import torch
import transformers
from torch.utils.data import DataLoader
from transformers.data.data_collator import default_data_collator
from transformers.trainer_pt_utils import get_model_param_count
from transformers.trainer_utils import seed_worker
from transformers.utils import logging as hf_logging

from .checkpoint.pickle_check import check_checkpoint_pickles
from .checkpoint.run_meta import resume_position
from .data import ResumableBatchSampler
from .data.ray_data import RayShard, RayShardLoader
from .preemption import RayPreemption
from .strategies import build_strategy
from .world import world_info

logger = logging.getLogger(__name__)
# transformers' own logger: the "***** Running training *****" banner reads as it does under transformers.Trainer
hf_trainer_logger = hf_logging.get_logger("transformers.trainer")
# train_sampling_strategy values our resumable sampler reproduces (shuffle or not); others are transformers'
OWN_SAMPLING = {"random": True, None: True, "sequential": False}


def is_map_style(dataset) -> bool:
    return not isinstance(dataset, torch.utils.data.IterableDataset) and hasattr(dataset, "__len__") \
        and hasattr(dataset, "__getitem__")


def overrides_data_hooks(trainer) -> bool:
    """True when a subclass builds its own training dataloader or sampler (a weighted or curriculum
    sampler...): the loop must then use it, as transformers.Trainer would, instead of our sampler."""
    for name in ("get_train_dataloader", "_get_train_sampler"):
        if getattr(type(trainer), name) is not getattr(transformers.Trainer, name):  # raytrainer.Trainer keeps them
            return True
    return False


def apply_tf32(args) -> None:
    """transformers sets TF32 in TrainingArguments.__post_init__, on the driver; the driver may have no GPU,
    so the process that trains (this one) applies it, with transformers' rule and error."""
    from transformers.utils.import_utils import enable_tf32, is_torch_tf32_available

    enable = getattr(enable_tf32, "__wrapped__", enable_tf32)  # transformers caches it: (True) after (False) no-ops
    # transformers turns TF32 on to speed up torch.compile (its condition, precedence included)
    if args.torch_compile and ((args.tf32 is None and not args.fp16) or args.bf16) and is_torch_tf32_available():
        enable(True)
    if args.tf32 is not None:
        if args.tf32 and not is_torch_tf32_available():
            raise ValueError("--tf32 requires Ampere or a newer GPU arch, cuda>=11 and torch>=1.7")
        if args.tf32 or is_torch_tf32_available():
            enable(bool(args.tf32))


def apply_hyperparameters_after_resume(optimizer, scheduler, args) -> None:
    """A PBT exploit resumed another trial's state: this trial's learning_rate / weight_decay win.

    The learning rate is rescaled where the schedule keeps it (the scheduler's base_lrs, each group's
    initial_lr and its current lr), so the schedule continues at the donor's step with this trial's
    peak value; the optimizer's moments stay the donor's. Weight decay replaces every non-zero group's.
    """
    base = list(getattr(scheduler, "base_lrs", None) or [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups])
    reference = max(base) if base else 0.0
    if reference > 0:
        ratio = args.learning_rate / reference
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [b * ratio for b in scheduler.base_lrs]
        for group in optimizer.param_groups:
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
            group["lr"] *= ratio
        if scheduler is not None and hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    for group in optimizer.param_groups:
        if group.get("weight_decay", 0.0):
            group["weight_decay"] = args.weight_decay


class TrainingLoop:
    def __init__(self, trainer):
        self.t = trainer
        self.args = trainer.args
        self.rank, self.world_size = world_info()
        self.preemption = None  # enable_jit_checkpoint on a Ray worker: Ray's preemption notice (preemption.py)

    # ------------------------------------------------------------------ data
    def build_train_dataloader(self):
        """Return (dataloader, positioner): the positioner's set_epoch(epoch, start_batch) places each epoch.

        Map-style data: our resumable sharded sampler. Ray Data: this worker's shard. Anything else:
        transformers' dataloader (positioner None: skipped batches are consumed).
        """
        t, args = self.t, self.args
        dataset = t.train_dataset
        if dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        if isinstance(dataset, RayShard):
            t._set_signature_columns_if_needed()
            columns = None if not args.remove_unused_columns else set(t._signature_columns)
            # a collator the user chose (or transformers' padding one for a tokenizer) is applied to the rows;
            # the default one would only stack what Ray Data has already stacked
            collate = t.data_collator if t.data_collator is not default_data_collator else None
            loader = RayShardLoader(dataset, t._train_batch_size, columns, drop_last=args.dataloader_drop_last,
                                    collate_fn=collate)
            return loader, loader
        sampling = getattr(args, "train_sampling_strategy", "random")
        if getattr(args, "group_by_length", False):  # transformers 4's name of this strategy
            sampling = "group_by_length"
        if not is_map_style(dataset) or sampling not in OWN_SAMPLING or overrides_data_hooks(t):
            # transformers' own dataloader (it calls the subclass's _get_train_sampler, builds the
            # LengthGroupedSampler...): its order is the user's, so resume consumes the skipped batches
            return t.get_train_dataloader(), None
        collator = t.data_collator
        try:
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = t._remove_unused_columns(dataset, description="training")
            else:
                collator = t._get_collator_with_removed_columns(collator, description="training")
        except ImportError:
            collator = t._get_collator_with_removed_columns(collator, description="training")
        seed = args.data_seed if args.data_seed is not None else args.seed
        sampler = ResumableBatchSampler(
            len(dataset), t._train_batch_size, seed, rank=self.rank, world_size=self.world_size,
            shuffle=OWN_SAMPLING[sampling], drop_last=args.dataloader_drop_last,
        )
        params = dict(
            batch_sampler=sampler,
            collate_fn=collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
            persistent_workers=args.dataloader_persistent_workers,
            prefetch_factor=args.dataloader_prefetch_factor,
            multiprocessing_context=args.dataloader_multiprocessing_context,
            worker_init_fn=functools.partial(seed_worker, num_workers=args.dataloader_num_workers, rank=self.rank),
        )
        if args.dataloader_num_workers == 0:  # options of worker processes; DataLoader refuses them without
            for name in ("prefetch_factor", "worker_init_fn", "multiprocessing_context"):
                params.pop(name)
        return DataLoader(dataset, **params), sampler

    # ------------------------------------------------------------------ run
    def run(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        t, args = self.t, self.args
        apply_tf32(args)
        if args.auto_find_batch_size and self.world_size > 1:
            # an out-of-memory error on one rank would leave the others waiting in a collective
            raise ValueError("auto_find_batch_size=True needs num_workers <= 1: the workers cannot retry a smaller "
                             "batch together; set per_device_train_batch_size.")
        t.accelerator.free_memory()
        train_dataloader, sampler = self.build_train_dataloader()
        (num_train_epochs, num_update_steps_per_epoch, num_examples, num_train_samples,
         total_train_batch_size, steps_in_epoch, max_steps) = t.set_initial_training_values(args, train_dataloader)
        # another global batch: the checkpoint's data position in samples (None: its global_step places it)
        position = None if resume_from_checkpoint is None else resume_position(t, resume_from_checkpoint, sampler)
        epochs_trained, steps_trained_in_current_epoch = t._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if position is not None:
            epochs_trained, steps_trained_in_current_epoch, max_steps, num_train_epochs = self.resume_at_sample(
                position, sampler, num_update_steps_per_epoch, num_train_epochs, max_steps)

        # --- model, optimizer, scheduler, under the strategy ---
        device = args.device
        strategy = build_strategy(args, device, t.model)
        t._strategy = strategy
        if t._created_lr_scheduler:
            t.lr_scheduler = None
            t._created_lr_scheduler = False
        if getattr(t, "_sharded_build", None) is None:  # a model built shard by shard: the strategy places it
            t.model.to(device)
        # the optimizer and the wrapped / sharded model, in the order the strategy needs
        model = strategy.prepare(t, max_steps)
        if args.torch_compile:
            # compiled last, around the wrapper, as accelerate does; t.model stays the bare module, so
            # checkpoints keep clean parameter names (no "_orig_mod.")
            model = torch.compile(model, backend=args.torch_compile_backend or "inductor",
                                  mode=args.torch_compile_mode)
        t.create_scheduler(num_training_steps=max_steps, optimizer=t.optimizer)
        t.model_wrapped = model
        if resume_from_checkpoint is not None:
            check_checkpoint_pickles(resume_from_checkpoint)  # DeepSpeed / DCP would unpickle them unchecked
            strategy.load_checkpoint(t, resume_from_checkpoint)  # optimizer, scheduler (and sharded state)
            scaler_file = os.path.join(resume_from_checkpoint, "scaler.pt")
            if os.path.isfile(scaler_file):
                strategy.load_scaler_state(torch.load(scaler_file, weights_only=True))
            if getattr(t, "_hyperparameters_override_checkpoint", False):
                apply_hyperparameters_after_resume(t.optimizer, t.lr_scheduler, args)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(t.callback_handler, attr, getattr(t, attr))
        t.callback_handler.train_dataloader = train_dataloader
        self.preemption = RayPreemption.for_trainer(t)
        self.log_banner(model, num_examples, num_train_epochs, num_update_steps_per_epoch, total_train_batch_size,
                        max_steps, resume_from_checkpoint, epochs_trained, steps_trained_in_current_epoch)

        start_time = time.time()
        t._initial_num_input_tokens_seen = t.state.num_input_tokens_seen
        t._initial_global_step = t.state.global_step
        t._tr_loss = torch.tensor(0.0, device=device)
        t._total_loss_scalar = 0.0
        t._globalstep_last_logged = t.state.global_step
        strategy.zero_grad(model)
        t.control = t.callback_handler.on_train_begin(args, t.state, t.control)
        if args.eval_on_start:
            t._evaluate(trial, ignore_keys_for_eval, skip_scheduler=True)

        for epoch in range(epochs_trained, num_train_epochs):
            t.control = t.callback_handler.on_epoch_begin(args, t.state, t.control)
            resuming_here = epoch == epochs_trained and resume_from_checkpoint is not None
            skip = steps_trained_in_current_epoch if resuming_here and not args.ignore_data_skip else 0
            self.run_epoch(model, strategy, epoch, train_dataloader, sampler, steps_in_epoch,
                           num_update_steps_per_epoch, skip, resume_from_checkpoint if resuming_here else None,
                           trial, ignore_keys_for_eval, start_time)
            if t.control.should_training_stop:
                break

        t._finish_saves(block=True)  # every checkpoint complete, its on_save fired, rotation done
        return t._finalize_training(trial, num_train_samples, start_time)

    def resume_at_sample(self, position, sampler, updates_per_epoch, num_train_epochs, max_steps):
        """Resume with another global batch at the checkpoint's data position (epoch, samples trained).

        The epoch order does not depend on the batch, so the run continues at that sample when the new
        global batch divides it, else at the last boundary of the new batch before it (the samples in
        between are trained twice: a warning counts them). global_step keeps counting optimizer steps;
        the steps left are recomputed with the new batch: max_steps becomes global_step + the steps that
        finish num_train_epochs (an explicit max_steps stays, and the epochs stretch to reach it).
        Returns (epochs_trained, batches to skip, max_steps, num_train_epochs).
        """
        t, args = self.t, self.args
        ga = args.gradient_accumulation_steps
        global_batch = sampler.global_batch_size * ga  # samples per optimizer step
        epoch, trained = position["epoch"], position["samples"]
        start = 0 if args.ignore_data_skip else trained // global_batch * global_batch
        done = start // global_batch  # optimizer steps of the new batch the epoch's start covers
        step = t.state.global_step
        if args.max_steps > 0:
            left = max(args.max_steps - step, 0)
            num_train_epochs = epoch + max(1, math.ceil((done + left) / updates_per_epoch))
        else:
            total = math.ceil(args.num_train_epochs * updates_per_epoch)  # a fresh run's steps with this batch
            max_steps = step + max(total - epoch * updates_per_epoch - done, 0)
        t.state.max_steps, t.state.num_train_epochs = max_steps, num_train_epochs
        if self.rank == 0:
            self.log_resume_at_sample(epoch, trained, start, global_batch, max_steps - step)
        return epoch, done * ga, max_steps, num_train_epochs

    def log_resume_at_sample(self, epoch, trained, start, global_batch, steps_left):
        if start == trained:
            logger.info("raytrainer: resuming with a global batch of %d at sample %d of epoch %d, where the "
                        "checkpoint left it; %d optimizer steps left", global_batch, start, epoch, steps_left)
            return
        reason = "ignore_data_skip=True" if self.args.ignore_data_skip else \
            f"{trained} is not a multiple of the new global batch {global_batch}"
        logger.warning("raytrainer: the checkpoint trained %d samples of epoch %d; resuming at sample %d "
                       "(%s): %d samples are seen twice; %d optimizer steps left",
                       trained, epoch, start, reason, trained - start, steps_left)

    def should_take_step(self, strategy, grad_norm) -> bool:
        """Whether the optimizer step goes ahead: False for a step to skip, whose gradient norm (the same on
        every rank: the gradients are already reduced) is NaN or inf. fp16's loss scaler handles its own
        overflows, as in transformers."""
        policy = self.args.nonfinite_steps
        if policy == "apply" or strategy.scaler is not None or grad_norm is None or not strategy.can_skip_steps:
            return True
        norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if math.isfinite(norm):
            return True
        step = self.t.state.global_step + 1
        if policy == "stop":
            raise FloatingPointError(
                f"step {step}: the gradient norm is {norm} (a NaN/inf loss or gradient); nothing of this step was "
                "applied. Lower learning_rate, set max_grad_norm, check the data of this step, or set "
                "nonfinite_steps='skip' to skip such steps."
            )
        self.t._nonfinite_steps_skipped += 1
        logger.warning("raytrainer: step %d skipped: gradient norm %s (NaN/inf); %d step(s) skipped so far "
                       "(nonfinite_steps='skip')", step, norm, self.t._nonfinite_steps_skipped)
        return False

    def log_banner(self, model, num_examples, num_train_epochs, num_update_steps_per_epoch, total_train_batch_size,
                   max_steps, resume_from_checkpoint, epochs_trained, steps_trained_in_current_epoch):
        """transformers' "***** Running training *****" lines, word for word, on its logger."""
        t, args, log = self.t, self.args, hf_trainer_logger.info
        log("***** Running training *****")
        log(f"  Num examples = {num_examples:,}")
        log(f"  Num Epochs = {num_train_epochs:,}")
        log(f"  Num update steps per epoch = {num_update_steps_per_epoch:,}")
        log(f"  Instantaneous batch size per device = {args.per_device_train_batch_size:,}")
        if args.per_device_train_batch_size != t._train_batch_size:
            log(f"  Training with DataParallel so batch size has been adjusted to: {t._train_batch_size:,}")
        log(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_train_batch_size:,}")
        log(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
        log(f"  Total optimization steps = {max_steps:,}")
        log(f"  Number of trainable parameters = {get_model_param_count(model, trainable_only=True):,}")
        if resume_from_checkpoint is not None:
            log(f"  Resuming training from checkpoint with epoch {epochs_trained} and global step "
                f"{t.state.global_step}")
            if not args.ignore_data_skip:
                log(f"  Fast-forwarding the dataloader past {epochs_trained} epochs and"
                    f" {steps_trained_in_current_epoch} batches to resume from the exact training state.")

    # ------------------------------------------------------------------ one epoch
    def run_epoch(self, model, strategy, epoch, dataloader, sampler, steps_in_epoch, updates_per_epoch,
                  skip_batches, resume_dir, trial, ignore_keys_for_eval, start_time):
        t, args = self.t, self.args
        ga = args.gradient_accumulation_steps
        step = -1
        grad_norm = None
        learning_rate = None
        first_update = 0
        if resume_dir is not None and skip_batches == 0:
            # saved at an epoch end: that RNG state is from before this epoch's iterator was made
            t._load_rng_state(resume_dir)
        if sampler is not None:
            # O(1) resume: the sampler starts at the saved batch; nothing before it is produced
            sampler.set_epoch(epoch, skip_batches)
            epoch_iterator = iter(dataloader)
        else:
            if hasattr(dataloader, "set_epoch"):
                dataloader.set_epoch(epoch)
            # accelerate's DataLoaderShard does not forward set_epoch to a batch sampler it wraps (transformers too)
            inner = getattr(getattr(dataloader, "batch_sampler", None), "batch_sampler", None)
            if hasattr(inner, "set_epoch"):
                inner.set_epoch(epoch)
            epoch_iterator = iter(dataloader)
            if skip_batches:
                # the user's dataloader / sampler (or a stream) cannot seek: the skipped batches are read
                logger.warning("raytrainer: resuming in epoch %d by reading and discarding its first %d batches "
                               "(a custom dataloader, sampler or stream cannot be positioned directly)",
                               epoch, skip_batches)
            for _ in range(skip_batches):
                next(epoch_iterator, None)
        if resume_dir is not None and skip_batches > 0:
            step = skip_batches - 1
            first_update = skip_batches // ga
            # saved mid-epoch: the uninterrupted run had made its iterator before that state
            t._load_rng_state(resume_dir)

        remainder = steps_in_epoch % ga or ga
        for update_step in range(first_update, updates_per_epoch):
            num_batches = ga if update_step != updates_per_epoch - 1 else remainder
            batch_samples, num_items_in_batch = t.get_batch_samples(epoch_iterator, num_batches, args.device)
            t.current_gradient_accumulation_steps = len(batch_samples)
            for i, inputs in enumerate(batch_samples):
                step += 1
                do_sync_step = (step + 1) % ga == 0 or (step + 1) == steps_in_epoch
                if step % ga == 0:
                    t._finish_saves(block=False)  # on_save for checkpoints the writer has completed
                    t.control = t.callback_handler.on_step_begin(args, t.state, t.control)
                if i == len(batch_samples) - 1:
                    tr_loss_step = t._call_training_step(model, inputs, num_items_in_batch)
                else:
                    with strategy.no_sync(model):
                        tr_loss_step = t._call_training_step(model, inputs, num_items_in_batch)
                if args.logging_nan_inf_filter and not torch.isfinite(tr_loss_step):
                    t._tr_loss += t._tr_loss / (1 + t.state.global_step - t._globalstep_last_logged)
                else:
                    t._tr_loss += tr_loss_step
                t.current_flos += t._cheap_flos(inputs)
                if args.include_num_input_tokens_seen not in ("no", False, None):
                    t._track_num_input_tokens(inputs)  # transformers' count, gathered over the ranks by accelerate

                if do_sync_step:
                    if args.max_grad_norm is not None and args.max_grad_norm > 0:
                        grad_norm = strategy.clip_grad_norm(model, t.optimizer, args.max_grad_norm)
                    else:  # transformers logs the norm without clipping too
                        grad_norm = strategy.grad_norm(model, t.optimizer)
                    t.control = t.callback_handler.on_pre_optimizer_step(args, t.state, t.control)
                    t._checkpoint_writer.wait_copied()  # a background snapshot still reads these weights
                    if self.should_take_step(strategy, grad_norm):
                        stepped = strategy.optimizer_step(t.optimizer)
                    else:
                        stepped = False
                    t.control = t.callback_handler.on_optimizer_step(args, t.state, t.control)
                    learning_rate = t._get_learning_rate()
                    if stepped and not isinstance(t.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) \
                            and type(t.lr_scheduler).__name__ != "GreedyLR":
                        strategy.step_scheduler(t.lr_scheduler)
                    strategy.zero_grad(model)
                    t.state.global_step += 1
                    t.state.epoch = epoch + (step + 1) / steps_in_epoch
                    if sampler is not None:
                        sampler.mark_trained(epoch, step + 1)  # the data position a checkpoint now records
                    t.control = t.callback_handler.on_step_end(args, t.state, t.control)
                    # every rank asks Ray (a collective) at every optimizer step; a notice asks for a save
                    preempted = self.preemption.before_save(t) if self.preemption is not None else None
                    t._maybe_log_save_evaluate(t._tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval,
                                               start_time, learning_rate=learning_rate)
                    if preempted is not None:  # checkpoint-<global_step> reported; Ray restarts the group from it
                        self.preemption.park(t, model, trial, preempted)
                else:
                    t.control = t.callback_handler.on_substep_end(args, t.state, t.control)
                if t.control.should_epoch_stop or t.control.should_training_stop:
                    break
            if t.control.should_epoch_stop or t.control.should_training_stop:
                break

        if step < 0:
            print(f"raytrainer: no sample in the epoch iterator; stopping at step {t.state.global_step}",
                  file=sys.stderr)
            t.control.should_training_stop = True
        t.control = t.callback_handler.on_epoch_end(args, t.state, t.control)
        t._maybe_log_save_evaluate(t._tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval,
                                   start_time, learning_rate=learning_rate)

