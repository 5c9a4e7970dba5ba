"""The driver facade: transformers.Trainer's API, raytrainer's loop.

`Trainer` subclasses `transformers.Trainer`, so its constructor, its overridable hooks
(compute_loss, training_step, prediction_step, create_optimizer, create_scheduler, log, ...), its
callbacks and its evaluate/predict are transformers' own. What it replaces:

* `train()`: validates on the driver, resolves `resume_from_checkpoint=True` to the latest
  *complete* checkpoint, then runs the per-worker loop (loop.py) in this process
  (`num_workers=0`) or on Ray Train workers (`num_workers>=1`, ray_run.py).
* `training_step()`: backward goes through the strategy (DDP, fp16 scaling), and subclasses with
  the older signatures (`compute_loss(model, inputs, return_outputs=False)`,
  `training_step(model, inputs)`) keep working.
* `_save_checkpoint()`: an in-memory snapshot, written atomically (optionally in the background).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import os
import shutil
import tempfile
import time

import torch
import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints

from .args import TrainingArguments
from .checkpoint import CheckpointWriter, Snapshot, latest_checkpoint
from .checkpoint.writer import state_to_json, to_cpu
from .loop import TrainingLoop, world_info

RUN_META = "raytrainer_run.pt"  # world size and global batch of the run that wrote a checkpoint


def coerce_args(args) -> TrainingArguments:
    """Accept raytrainer's, transformers' or no TrainingArguments; return raytrainer's."""
    if args is None:
        return TrainingArguments(output_dir="trainer_output")
    if isinstance(args, TrainingArguments):
        return args
    if isinstance(args, transformers.TrainingArguments):
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(transformers.TrainingArguments) if f.init}
        return TrainingArguments(**values)
    raise ValueError(f"args must be a raytrainer.TrainingArguments (got {type(args).__name__}).")


def _accepts(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


class Trainer(transformers.Trainer):
    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, model_init=None, compute_loss_func=None, compute_metrics=None,
                 callbacks=None, optimizers=(None, None), optimizer_cls_and_kwargs=None,
                 preprocess_logits_for_metrics=None, tokenizer=None):
        args = coerce_args(args)
        args.validate()
        if tokenizer is not None and processing_class is None:  # the older transformers name
            processing_class = tokenizer
        # What a Ray worker needs to build this Trainer again on its side (see ray_run.py).
        self._init_kwargs = dict(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, model_init=model_init,
            compute_loss_func=compute_loss_func, compute_metrics=compute_metrics, callbacks=callbacks,
            optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self._in_worker = False
        self._ray = None  # a ray_run.WorkerRun inside a Ray worker
        self._resume_requested_latest = False
        self._fit_id = None  # set inside Ray workers: which fit() wrote a checkpoint
        self._strategy = None
        self._checkpoint_writer = CheckpointWriter(background=args.save_in_background)
        self._flops_per_token = None
        self._training_step_takes_items = None  # signatures of the (possibly overridden) hooks, read once
        self._compute_loss_signature_ok = None
        self._pending: list[str] = []  # checkpoint folders queued but not yet renamed into place
        self._last_metrics: dict = {}  # the latest logged values, sent with each Ray checkpoint report
        # transformers asks a dataset without __len__ for max_steps; a Ray Dataset's length is counted later
        ray_data = _is_ray_dataset(train_dataset)
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=None if ray_data else train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, model_init=model_init,
            compute_loss_func=compute_loss_func, compute_metrics=compute_metrics, callbacks=callbacks,
            optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        if ray_data:
            self.train_dataset = train_dataset

    # ------------------------------------------------------------------ train
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if kwargs:
            raise TypeError(f"train() got unexpected keyword arguments {sorted(kwargs)}")
        self.args.validate()
        if self.args.num_workers > 0 and not self._in_worker:
            from .ray_run import run_on_ray

            # True means "the latest checkpoint in the run's storage", found by run_on_ray
            self._resume_requested_latest = resume_from_checkpoint is True
            resume = resume_from_checkpoint
            if resume is True or resume is False:
                resume = None
            elif resume is not None and "://" not in resume:  # a storage URI is opened by run_on_ray
                resume = self._resolve_resume(resume)
            return run_on_ray(self, resume, trial, ignore_keys_for_eval)
        if _is_ray_dataset(self.train_dataset):
            raise ValueError("train_dataset is a ray.data.Dataset: set num_workers >= 1 so Ray Train shards it.")
        resume = self._resolve_resume(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval)

    # ------------------------------------------------------------------ evaluate / predict
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        if self.args.num_workers > 0 and not self._in_worker:
            from .ray_run import run_eval_on_ray

            dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
            if dataset is None:
                raise ValueError("Trainer: evaluation requires an eval_dataset.")
            metrics = run_eval_on_ray(self, "evaluate", dataset, ignore_keys, metric_key_prefix)
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix="test"):
        if self.args.num_workers > 0 and not self._in_worker:
            from .ray_run import run_eval_on_ray

            output = run_eval_on_ray(self, "predict", test_dataset, ignore_keys, metric_key_prefix)
            self.control = self.callback_handler.on_predict(self.args, self.state, self.control, output.metrics)
            return output
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _resolve_resume(self, resume_from_checkpoint):
        if resume_from_checkpoint is False or resume_from_checkpoint is None:
            return None
        if resume_from_checkpoint is True:
            found = latest_checkpoint(self.args.output_dir)
            if found is None:
                raise ValueError(
                    f"resume_from_checkpoint=True: no complete checkpoint in output_dir={self.args.output_dir!r}; "
                    "train without resuming first, or pass the path of a checkpoint-<step> folder."
                )
            return found
        if not os.path.isdir(resume_from_checkpoint):
            raise ValueError(f"resume_from_checkpoint={resume_from_checkpoint!r} is not a folder.")
        return resume_from_checkpoint

    def _inner_training_loop(self, batch_size=None, args=None, resume_from_checkpoint=None, trial=None,
                             ignore_keys_for_eval=None):
        return TrainingLoop(self).run(resume_from_checkpoint, trial, ignore_keys_for_eval)

    # ------------------------------------------------------------------ the step
    def _call_training_step(self, model, inputs, num_items_in_batch):
        # subclasses written for transformers < 4.46 define training_step(model, inputs)
        if self._training_step_takes_items is None:
            self._training_step_takes_items = _accepts(self.training_step, "num_items_in_batch")
        if self._training_step_takes_items:
            return self.training_step(model, inputs, num_items_in_batch)
        return self.training_step(model, inputs)

    def _compute_loss_takes_items(self) -> bool:
        """False for subclasses written for transformers < 4.46: compute_loss(model, inputs, return_outputs=False)."""
        if self._compute_loss_signature_ok is None:
            self._compute_loss_signature_ok = _accepts(self.compute_loss, "num_items_in_batch")
        return self._compute_loss_signature_ok

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            if self._compute_loss_takes_items():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            else:  # an older override: it computes a per-batch mean, scaled for accumulation below
                loss = self.compute_loss(model, inputs)
                num_items_in_batch = None
        del inputs
        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        else:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        if not scaled:
            loss = loss / self.current_gradient_accumulation_steps
        if self._strategy is not None:
            self._strategy.backward(loss)
        else:
            loss.backward()
        return loss.detach()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # transformers' prediction_step calls compute_loss(..., num_items_in_batch=...), which a
        # subclass with the older `compute_loss(self, model, inputs, return_outputs=False)` rejects
        # (TypeError in evaluate()). For such overrides, hide that keyword for this call only.
        if self._compute_loss_takes_items():
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        older = self.compute_loss

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            return older(model, inputs, return_outputs=return_outputs)

        self.compute_loss = compute_loss
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            del self.compute_loss  # back to the class's method

    def autocast_smart_context_manager(self, cache_enabled=True):
        # transformers autocasts through accelerate's prepared model; our model is not prepared by it
        if self.args.bf16 or self.args.fp16:
            dtype = torch.bfloat16 if self.args.bf16 else torch.float16
            return torch.autocast(self.args.device.type, dtype=dtype, cache_enabled=cache_enabled)
        return contextlib.nullcontext()

    def _cheap_flos(self, inputs) -> float:
        """6 * tokens * non-embedding params, as transformers counts, without re-counting params each step."""
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return 0.0
        if self._flops_per_token is None:
            self._flops_per_token = 6 * self.model.num_parameters(exclude_embeddings=True)
        return float(inputs[main].numel() * self._flops_per_token)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        """Snapshot every state now; write `checkpoint-<step>/` atomically (in the background by default)."""
        t0 = time.perf_counter()
        try:
            self._snapshot_and_save(trial)
        finally:  # what the loop waited for: the copy, plus the write when it is not in the background
            self._checkpoint_writer.blocked_s += time.perf_counter() - t0

    def _snapshot_and_save(self, trial):
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self._ray is not None:  # staged locally, persisted by Ray into <storage>/<run>/checkpoint-N
            run_dir = tempfile.mkdtemp(prefix="raytrainer-ckpt-")
        else:
            run_dir = self._get_output_dir(trial=trial)
        final_dir = os.path.join(run_dir, name)
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) \
                and self.state.best_global_step:
            if self._ray is not None:
                self.state.best_model_checkpoint = self._ray.checkpoint_path(self.state.best_global_step)
            else:
                best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
                if best == final_dir or os.path.exists(best) or best in self._pending:
                    self.state.best_model_checkpoint = best
        rank, world = world_info()
        for cb in [c for c in self.callback_handler.callbacks + [self.control]
                   if isinstance(c, transformers.trainer_callback.ExportableState)]:
            cb_name, cb_state = cb.__class__.__name__, cb.state()
            if isinstance(self.state.stateful_callbacks.get(cb_name), list):
                self.state.stateful_callbacks[cb_name].append(cb_state)
            else:
                self.state.stateful_callbacks[cb_name] = cb_state
        # self.model is the bare module (DDP wraps model_wrapped); accelerate's unwrap_model would
        # read package metadata on every call (~4 ms per save)
        unwrapped = self.model
        snap = Snapshot(final_dir=final_dir, rng_file="rng_state.pth" if world == 1 else f"rng_state_{rank}.pth")
        if rank == 0:
            # buffers (e.g. BatchNorm statistics) change in forward: copied now; parameters change only in
            # optimizer.step, so their copy may wait for the writer thread (see below)
            buffers = {n for n, _ in unwrapped.named_buffers()}
            snap.model_state = {k: to_cpu(v) if k in buffers else v for k, v in unwrapped.state_dict().items()}
            snap.save_model_fn = self._model_saver(unwrapped)
            snap.trainer_state_json = state_to_json(self.state)
            snap.training_args = self.args
            # the data position of a checkpoint is in optimizer steps of this global batch
            snap.extra_files[RUN_META] = {"world_size": world, "global_batch_size": self._global_batch_size(),
                                          "fit_id": self._fit_id}
        if not self.args.save_only_model:
            if rank == 0:
                snap.optimizer_state = self.optimizer.state_dict()
                snap.scheduler_state = copy.deepcopy(self.lr_scheduler.state_dict())
                snap.scaler_state = self._strategy.scaler_state() if self._strategy else None
            snap.rng_state = _rng_state()
        if self._checkpoint_writer.background:
            # the writer thread copies parameters and optimizer state while the next forward/backward
            # runs; the loop waits for that copy before the next optimizer.step (wait_copied)
            snap.copy_fn = _copy_live_tensors
        else:
            _copy_live_tensors(snap)
        if self._ray is not None:
            # every rank reports the same number of times (Ray's report is a barrier), right after writing
            self._checkpoint_writer.save(snap)
            self._ray.report(final_dir, {"step": self.state.global_step, **self._last_metrics})
            return
        snap.after = lambda d: self._after_checkpoint_written(d, run_dir)
        self._pending.append(final_dir)
        self._checkpoint_writer.save(snap)

    def log(self, logs, start_time=None):
        self._last_metrics = dict(logs)
        return super().log(logs, start_time)

    def _global_batch_size(self) -> int:
        _, world = world_info()
        return self._train_batch_size * world * self.args.gradient_accumulation_steps

    def _check_resume_batch(self, checkpoint_dir: str) -> None:
        """Resuming with another num_workers keeps the data position only if the global batch is unchanged."""
        meta_file = os.path.join(checkpoint_dir, RUN_META)
        if not os.path.isfile(meta_file):
            return
        meta = torch.load(meta_file, weights_only=True)
        now = self._global_batch_size()
        if meta["global_batch_size"] != now:
            _, world = world_info()
            raise ValueError(
                f"{checkpoint_dir} was trained with a global batch of {meta['global_batch_size']} "
                f"({meta['world_size']} workers); this run's is {now} = per_device_train_batch_size "
                f"{self._train_batch_size} x {world} workers x gradient_accumulation_steps "
                f"{self.args.gradient_accumulation_steps}. Set per_device_train_batch_size or "
                "gradient_accumulation_steps so the global batch is the same, then resume."
            )

    def _model_saver(self, unwrapped):
        processing_class = self.processing_class
        if processing_class is None and getattr(self.data_collator, "tokenizer", None) is not None:
            processing_class = self.data_collator.tokenizer

        def save(out_dir, state_dict):
            if isinstance(unwrapped, transformers.PreTrainedModel):
                unwrapped.save_pretrained(out_dir, state_dict=state_dict)
            else:
                from safetensors.torch import save_file

                save_file(state_dict, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
            if processing_class is not None:
                processing_class.save_pretrained(out_dir)

        return save

    def _after_checkpoint_written(self, final_dir, run_dir):
        if final_dir in self._pending:
            self._pending.remove(final_dir)
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)

    def wait_for_checkpoints(self) -> None:
        """Block until every checkpoint taken so far is on disk (they are written in the background)."""
        self._checkpoint_writer.wait()

    def _load_best_model(self):
        self._checkpoint_writer.wait()
        if self._ray is None:
            return super()._load_best_model()
        rank, _ = world_info()
        if rank != 0:  # only rank 0's weights leave the worker group
            return None
        in_storage = self.state.best_model_checkpoint
        self.state.best_model_checkpoint = self._ray.fetch(in_storage)
        try:
            return super()._load_best_model()
        finally:
            shutil.rmtree(os.path.dirname(self.state.best_model_checkpoint), ignore_errors=True)
            self.state.best_model_checkpoint = in_storage


def _copy_live_tensors(snap: Snapshot) -> None:
    snap.model_state = to_cpu(snap.model_state)
    snap.optimizer_state = to_cpu(snap.optimizer_state)


def _is_ray_dataset(obj) -> bool:
    try:
        import ray.data
    except ImportError:
        return False
    return isinstance(obj, ray.data.Dataset)


def _rng_state() -> dict:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # the layout transformers' _load_rng_state expects: all devices' states when distributed
        distributed = world_info()[1] > 1
        state["cuda"] = torch.cuda.random.get_rng_state_all() if distributed else torch.cuda.random.get_rng_state()
    return state
