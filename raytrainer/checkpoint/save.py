"""Checkpoints as the loop takes them: a snapshot in memory, written atomically, on_save when complete.

`_save_checkpoint` copies every state now and hands the folder to the CheckpointWriter (in the background
by default); `on_save` fires once `checkpoint-<step>/` is complete (`_finish_saves`), in transformers'
place when a callback implements it (SaveAwareCallbackHandler). On a Ray worker the folder is reported to
Ray (`self._ray`, checkpoint/ray_checkpoints.py) instead of rotated here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import shutil
import threading
import time

import torch
import transformers
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints

from ..redact import save_args_without_secrets, state_without_secrets
from ..strategies.base import is_peft_model
from ..world import world_info
from .pickle_check import refusal_named
from .run_meta import RUN_META, run_meta
from .writer import Snapshot, state_to_json, to_cpu

logger = logging.getLogger("raytrainer")


class CheckpointHooks(transformers.Trainer):
    def _save_checkpoint(self, model, trial):
        """Snapshot every state now; write `checkpoint-<step>/` atomically (in the background by default).

        `on_save` fires once the folder is complete (`_finish_saves`), not when the snapshot is taken.
        """
        t0 = time.perf_counter()
        try:
            self._snapshot_and_save(trial)
        except BaseException as e:  # the partial folder goes; a full disk is named with the space it needs
            error = self._checkpoint_writer.failed(e)
            if error is e:
                raise
            raise error from e
        finally:  # what the loop waited for: the copy, plus the write when it is not in the background
            self._checkpoint_writer.blocked_s += time.perf_counter() - t0

    def _snapshot_and_save(self, trial):
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        rank, world = world_info()
        run_dir = self._ray.staging_dir(rank) if self._ray is not None else self._get_output_dir(trial=trial)
        final_dir = os.path.join(run_dir, name)
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) \
                and self.state.best_global_step:
            if self._ray is not None:
                self.state.best_model_checkpoint = self._ray.checkpoint_path(self.state.best_global_step)
            else:
                best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
                if best == final_dir or os.path.exists(best) or best in [p.final_dir for p in self._unfinished_saves]:
                    self.state.best_model_checkpoint = best
        for cb in [c for c in self.callback_handler.callbacks + [self.control]
                   if isinstance(c, transformers.trainer_callback.ExportableState)]:
            cb_name, cb_state = cb.__class__.__name__, cb.state()
            if isinstance(self.state.stateful_callbacks.get(cb_name), list):
                self.state.stateful_callbacks[cb_name].append(cb_state)
            else:
                self.state.stateful_callbacks[cb_name] = cb_state
        snap = Snapshot(final_dir=final_dir, rng_file="rng_state.pth" if world == 1 else f"rng_state_{rank}.pth")
        strategy = self._strategy
        sharded = strategy is not None and strategy.sharded
        if self._saves_through_hooks():
            # an overridden save_model/_save, or a PEFT model (adapter files only): transformers' own
            # path, in the foreground, into the folder the writer will complete and rename
            snap.tmp_dir = self._checkpoint_writer.tmp_dir_for(final_dir)
            self.save_model(snap.tmp_dir, _internal_call=True)
        elif sharded and strategy.full_weights_in_checkpoints():
            # every rank joins the gather; rank 0 gets CPU copies (nothing left for the writer to copy)
            state = strategy.full_state_dict(self.model_wrapped)
            if rank == 0:
                snap.model_state = state
                snap.save_model_fn = lambda out_dir, state_dict: self._save(out_dir, state_dict=state_dict)
        elif sharded and rank == 0:
            # the weights are the shards below: no gather; config, tokenizer and training args as _save writes them
            snap.model_state = {}
            snap.save_model_fn = lambda out_dir, _: self._save_without_weights(out_dir)
        elif rank == 0:
            # self.model is the bare module (DDP wraps model_wrapped). Buffers (e.g. BatchNorm statistics)
            # change in forward: copied now; parameters change only in optimizer.step, so their copy may
            # wait for the writer thread (see below). The writer calls the trainer's own _save with it.
            buffers = {n for n, _ in self.model.named_buffers()}
            live = self.model.state_dict()
            snap.model_state = {k: to_cpu(v) if k in buffers else v for k, v in live.items()}
            snap.model_aliases = _shared_keys(live)  # tied weights stay one tensor, saved once as transformers does
            snap.save_model_fn = lambda out_dir, state_dict: self._save(out_dir, state_dict=state_dict)
        if rank == 0:
            snap.trainer_state_json = state_to_json(state_without_secrets(self.state))
            snap.extra_files[RUN_META] = run_meta(self, self._fit_id, getattr(self, "_lineage", None))
        if sharded and not (self.args.save_only_model and snap.model_state is not None):
            snap.tmp_dir = snap.tmp_dir or self._checkpoint_writer.tmp_dir_for(final_dir)
            self._save_shards(snap, strategy)
        if not self.args.save_only_model:
            if rank == 0:
                snap.optimizer_state = strategy.optimizer_state(self.optimizer) if strategy else \
                    self.optimizer.state_dict()
                snap.scheduler_state = copy.deepcopy(self.lr_scheduler.state_dict())
                snap.scaler_state = self._strategy.scaler_state() if self._strategy else None
            snap.rng_state = _rng_state()
        pending = PendingSave(final_dir=final_dir, run_dir=run_dir, background=self._checkpoint_writer.in_background(snap),
                              metrics={"step": self.state.global_step, **self._last_metrics})
        snap.after = lambda _: pending.written.set()
        self._unfinished_saves.append(pending)
        if pending.background:
            # the writer thread copies parameters and optimizer state while the next forward/backward
            # runs; the loop waits for that copy before the next optimizer.step (wait_copied)
            snap.copy_fn = _copy_live_tensors
        else:
            _copy_live_tensors(snap)
        self._checkpoint_writer.save(snap)

    def _save_shards(self, snap: Snapshot, strategy) -> None:
        """Every rank's shards into the folder the writer completes: staged and written by the writer's thread
        when the strategy allows it (the loop goes on), else a collective save here, in the foreground."""
        optimizer = None if self.args.save_only_model else self.optimizer
        staged = strategy.sharded_state(self.model_wrapped, optimizer)
        if staged is not None:
            snap.sharded_state, snap.write_sharded_fn, snap.background = staged, strategy.write_sharded, True
            return
        wait = strategy.save_sharded(self.model_wrapped, optimizer, snap.tmp_dir, self.state.global_step)
        if wait is not None:  # the engine writes in the background: the folder is complete once it returns
            snap.wait_fns.append(wait)
            snap.background = True

    def _save_without_weights(self, out_dir: str) -> None:
        """What transformers' _save writes besides the weights (a sharded checkpoint's weights are its shards)."""
        model = self.model
        if getattr(model, "config", None) is not None:
            model.config.save_pretrained(out_dir)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(out_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(out_dir)
        save_args_without_secrets(self.args, os.path.join(out_dir, TRAINING_ARGS_NAME))

    def save_model(self, output_dir=None, _internal_call=False):
        """transformers' save_model; with a sharded strategy (fsdp, deepspeed) every rank must call it:
        the full weights are gathered on rank 0, which writes them with transformers' `_save`."""
        strategy = self._strategy
        if strategy is None or not strategy.sharded:
            return super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state = strategy.full_state_dict(self.model_wrapped)
        if self.args.should_save:
            self._save(output_dir, state_dict=state)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        # transformers pickled self.args (hub_token, an S3 filesystem's keys) into training_args.bin
        path = os.path.join(output_dir if output_dir is not None else self.args.output_dir, TRAINING_ARGS_NAME)
        if os.path.isfile(path):
            save_args_without_secrets(self.args, path)

    def _saves_through_hooks(self) -> bool:
        overridden = type(self)._save not in (transformers.Trainer._save, CheckpointHooks._save) or \
            type(self).save_model not in (transformers.Trainer.save_model, CheckpointHooks.save_model)
        return overridden or is_peft_model(self.model)

    def _finish_saves(self, block: bool) -> None:
        """Fire on_save for every checkpoint whose folder is complete, in order; then rotate (or report to Ray).

        The loop calls this at each step with block=False (nothing waits for a background write) and at
        the end with block=True. A callback's on_save finds `checkpoint-<step>/` complete, and what it
        writes there is kept (and persisted to Ray's storage with the checkpoint).
        """
        while self._unfinished_saves:
            pending = self._unfinished_saves[0]
            if not block and not self._written_on_every_rank(pending):
                self._checkpoint_writer.raise_pending()
                return
            if not pending.written.is_set():  # block: wait for the write
                t0 = time.perf_counter()
                self._checkpoint_writer.wait()
                self._checkpoint_writer.blocked_s += time.perf_counter() - t0  # the loop waited for the write
            self._unfinished_saves.pop(0)
            if self._ray is not None:
                self._ray.complete(self, pending)
                continue
            self._fire_on_save(pending)
            if self.args.should_save:
                rotate_checkpoints(output_dir=pending.run_dir, save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)

    def _written_on_every_rank(self, pending: "PendingSave") -> bool:
        """On Ray every rank reports a checkpoint at the same step (the report is a barrier): a background write
        counts as done once it is done on every rank. A collective: every rank calls _finish_saves(block=False)
        at the same points (the loop's step boundaries; on_save, whose callbacks are the same on every rank)."""
        if self._ray is None or not pending.background or world_info()[1] == 1:
            return pending.written.is_set()
        import torch.distributed as dist

        done = torch.tensor([int(pending.written.is_set())], device=self.args.device)
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return bool(done.item())

    def _fire_on_save(self, pending: "PendingSave") -> None:
        if self.args.push_to_hub and os.path.isdir(pending.final_dir):  # as transformers' _save_checkpoint
            self._push_from_checkpoint(pending.final_dir)
        if pending.state is not None:  # None: _save_checkpoint called outside the loop, no on_save asked
            self.control = transformers.trainer_callback.CallbackHandler.on_save(
                self.callback_handler, self.args, pending.state, self.control)

    def wait_for_checkpoints(self) -> None:
        """Block until every checkpoint taken so far is on disk (they are written in the background)."""
        self._finish_saves(block=True)

    def _load_best_model(self):
        self._finish_saves(block=True)
        strategy = getattr(self, "_strategy", None)
        if strategy is not None and strategy.sharded:
            return self._load_best_sharded(strategy)
        if self._ray is None:
            with refusal_named(self.state.best_model_checkpoint):
                return super()._load_best_model()
        rank, _ = world_info()
        if rank != 0:  # only rank 0's weights leave the worker group
            return None
        in_storage = self.state.best_model_checkpoint
        with self._best_checkpoint_here() as local, refusal_named(in_storage):
            self.state.best_model_checkpoint = local
            try:
                return super()._load_best_model()
            finally:
                self.state.best_model_checkpoint = in_storage

    def _load_best_sharded(self, strategy):
        """fsdp / deepspeed: every rank joins; rank 0 reads the best checkpoint's consolidated model.safetensors
        and the strategy fills the shards (or partitions) from it, or every rank reads its slices of the shards."""
        rank, _ = world_info()
        if rank != 0 and not strategy.best_read_by_every_rank():
            return strategy.load_best_weights(self, None)
        if rank == 0:
            logger.info(f"Loading best model from {self.state.best_model_checkpoint} "
                        f"(score: {self.state.best_metric}).")  # transformers' line
        with self._best_checkpoint_here() as local:
            strategy.load_best_weights(self, local)

    @contextlib.contextmanager
    def _best_checkpoint_here(self):
        """state.best_model_checkpoint as a local folder: fetched from Ray storage (and removed afterwards), or
        the folder itself in-process."""
        if self._ray is None:
            yield self.state.best_model_checkpoint
            return
        local = self._ray.fetch(self.state.best_model_checkpoint)
        try:
            yield local
        finally:
            shutil.rmtree(os.path.dirname(local), ignore_errors=True)


@dataclasses.dataclass
class PendingSave:
    """A checkpoint taken by _save_checkpoint whose on_save has not fired yet."""

    final_dir: str
    run_dir: str
    background: bool = False  # written by the writer's thread (the loop went on)
    metrics: dict = dataclasses.field(default_factory=dict)  # the latest logged values at the save (Ray's report)
    written: threading.Event = dataclasses.field(default_factory=threading.Event)
    state: transformers.TrainerState | None = None  # the state at the save, for on_save


class SaveAwareCallbackHandler(transformers.trainer_callback.CallbackHandler):
    """transformers' CallbackHandler, with on_save fired once checkpoint-<step>/ is complete.

    transformers calls on_save right after _save_checkpoint. When a callback implements on_save, the
    loop waits for the write there, so on_save comes at the same point (before the next epoch event)
    and a flag it sets stops the run at this step. When none does, the write stays in the background:
    the state is copied now and the Trainer fires the (unobserved) on_save from _finish_saves.
    """

    trainer = None

    def on_save(self, args, state, control):
        trainer = self.trainer
        if trainer is None or not trainer._unfinished_saves or trainer._unfinished_saves[-1].state is not None:
            return super().on_save(args, state, control)
        trainer._unfinished_saves[-1].state = copy.deepcopy(state)
        control.should_save = False  # as transformers' handler does at once: this save is taken
        trainer.control = control
        # a callback that implements on_save sees it at this step, in transformers' order, and the control
        # flags it sets act at this step: the loop waits for the write. With no such callback nothing
        # observable changes, and the write stays in the background. A foreground write (Ray workers,
        # save_in_background=False) is complete now: no delay at all.
        wait = not trainer._unfinished_saves[-1].background or self.on_save_observed(args)
        trainer._finish_saves(block=wait)
        return trainer.control

    def on_save_observed(self, args) -> bool:
        base = transformers.TrainerCallback.on_save
        return bool(args.push_to_hub) or any(type(cb).on_save is not base for cb in self.callbacks)


def _copy_live_tensors(snap: Snapshot) -> None:
    snap.model_state = to_cpu(snap.model_state)
    for key, first in (snap.model_aliases or {}).items():
        snap.model_state[key] = snap.model_state[first]
    snap.optimizer_state = to_cpu(snap.optimizer_state)
    if snap.sharded_state is not None:  # torch's own staging: a CPU copy that keeps each DTensor's placement
        from torch.distributed.checkpoint.staging import BlockingAsyncStager

        snap.sharded_state = BlockingAsyncStager(cache_staged_state_dict=False).stage(snap.sharded_state)


def _shared_keys(state: dict) -> dict:
    """{key: first key holding the same tensor} for tied weights (e.g. lm_head and the embedding)."""
    seen, aliases = {}, {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.numel():
            ident = (value.data_ptr(), value.shape, value.dtype)
            if ident in seen:
                aliases[key] = seen[ident]
            else:
                seen[ident] = key
    return aliases


def _rng_state() -> dict:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # the layout transformers' _load_rng_state expects: all devices' states when distributed
        distributed = world_info()[1] > 1
        state["cuda"] = torch.cuda.random.get_rng_state_all() if distributed else torch.cuda.random.get_rng_state()
    return state
