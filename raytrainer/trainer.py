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
import contextvars
import copy
import dataclasses
import functools
import inspect
import logging
import os
import shutil
import threading
import time

import torch
import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints
from transformers.trainer import TRAINING_ARGS_NAME

from .args import TrainingArguments
from .args_layer import to_ray_args
from .checkpoint import CheckpointWriter, Snapshot, latest_checkpoint
from .checkpoint.state_check import check_checkpoint_state
from .checkpoint.writer import state_to_json, to_cpu
from .loop import TrainingLoop, world_info
from .redact import redact_file, redact_text, redacted_errors, save_args_without_secrets, state_without_secrets
from .data.ray_data import is_ray_dataset
from .strategies.base import is_lomo
from .strategies.build import is_skeleton
from .fast_start import skip_unused_deepspeed_import

skip_unused_deepspeed_import()  # ~1 s off every process's first Trainer() when DeepSpeed is installed

logger = logging.getLogger("raytrainer")
# set while a Ray worker that will train builds its Trainer (crossing.py): __init__'s model_init builds a skeleton
WORKER_TRAINS = contextvars.ContextVar("raytrainer_worker_trains", default=False)
RUN_META = "raytrainer_run.pt"  # world size, global batch and data position of the run that wrote a checkpoint
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
        set_before = set(self.__dict__)  # a subclass may set attributes before calling us: those are its own
        self._user_optimizers = optimizers != (None, None)
        self._in_worker = False
        self._trained_on_ray = False  # set by a Ray train(): evaluate_on="auto" evaluates here afterwards
        self._ray = None  # a ray_run.WorkerRun inside a Ray worker
        self._resume_requested_latest = False
        self._fit_id = None  # set inside Ray workers: which fit() wrote a checkpoint
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
            from .tracking.mlflow import use_safe_mlflow_callback

            # params without secrets; ends only a run its own process started (not the driver's run
            # after a Ray run hands rank 0's callback state back)
            use_safe_mlflow_callback(self)
        # what transformers' and our __init__ set; anything else on the instance is the user's (crossing.py)
        self._rt_base_attrs = None
        self._rt_base_attrs = (set(self.__dict__) - set_before) | LAZY_BASE_ATTRS

    # ------------------------------------------------------------------ train
    @redacted_errors()  # an error echoing s3://key:secret@ or a token shows neither
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if kwargs:
            raise TypeError(f"train() got unexpected keyword arguments {sorted(kwargs)}")
        self.args.validate()
        self.args.check_supported()  # fields the loop does not honour (fields.py): refused here, not at construction
        self._apply_logging_dir()
        if not self._in_worker:
            from .strategies import check_strategy

            check_strategy(self.args, self.model)  # fsdp's layer classes, deepspeed's config vs the arguments
        if self.args.num_workers > 0 and not self._in_worker:
            from .ray_run import run_on_ray

            # True means "the latest checkpoint in the run's storage", found by run_on_ray
            self._resume_requested_latest = resume_from_checkpoint is True
            resume = resume_from_checkpoint
            if resume is True or resume is False:
                resume = None
            elif resume is not None and "://" not in resume:  # a storage URI is opened by run_on_ray
                resume = self._resolve_resume(resume)
            output = run_on_ray(self, resume, trial, ignore_keys_for_eval)
            self._trained_on_ray = True  # evaluate_on="auto": evaluate these weights here
            return output
        if is_ray_dataset(self.train_dataset):
            raise ValueError("train_dataset is a ray.data.Dataset: set num_workers >= 1 so Ray Train shards it.")
        if not self._in_worker:
            from .data.checks import check_train_dataset

            check_train_dataset(self)  # a malformed dataset is named here, not deep in a collator
        resume = self._resolve_resume(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval)

    # ------------------------------------------------------------------ evaluate / predict
    @redacted_errors()  # an error echoing s3://key:secret@ or a token shows neither
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if self._evaluate_on_workers(dataset):
            from .ray_run import run_eval_on_ray

            if dataset is None:
                raise ValueError("Trainer: evaluation requires an eval_dataset.")
            metrics = run_eval_on_ray(self, "evaluate", dataset, ignore_keys, metric_key_prefix)
            # the other callbacks saw on_log / on_evaluate on the workers (their state is back in them)
            with self._display_callbacks_only():
                self.log(metrics)
                self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    @redacted_errors()  # an error echoing s3://key:secret@ or a token shows neither
    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix="test"):
        if self._evaluate_on_workers(test_dataset):
            from .ray_run import run_eval_on_ray

            output = run_eval_on_ray(self, "predict", test_dataset, ignore_keys, metric_key_prefix)
            with self._display_callbacks_only():
                self.control = self.callback_handler.on_predict(self.args, self.state, self.control, output.metrics)
            return output
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _evaluate_on_workers(self, dataset) -> bool:
        """evaluate_on: after a Ray train() the driver holds the trained weights, and evaluating them here
        costs no second worker-group start (~15 s for a tiny model). Workers when this process cannot
        hold or run the model the way they do: a sharded strategy's skeleton, GPU workers but no GPU here,
        or a Ray Dataset (streamed to workers only)."""
        args = self.args
        if args.num_workers == 0 or self._in_worker:
            return False
        if args.evaluate_on == "workers":
            return True
        reasons = []
        if args.strategy != "ddp" or is_skeleton(self.model):
            reasons.append(f'strategy={args.strategy!r} shards the model over the workers')
        if args.use_gpu and not torch.cuda.is_available():
            reasons.append("use_gpu=True but this process has no GPU")
        if is_ray_dataset(dataset):
            reasons.append("the dataset is a ray.data.Dataset, streamed to workers only")
        if args.evaluate_on == "driver" and reasons:
            raise ValueError(f'evaluate_on="driver" cannot run here: {"; ".join(reasons)}. '
                             'Use evaluate_on="workers" (or "auto").')
        if args.evaluate_on == "driver":
            return False
        return bool(reasons) or not self._trained_on_ray

    @contextlib.contextmanager
    def _display_callbacks_only(self):
        from .crossing import is_display_callback

        handler = self.callback_handler
        everyone = handler.callbacks
        handler.callbacks = [cb for cb in everyone if is_display_callback(cb)]
        try:
            yield
        finally:
            handler.callbacks = everyone

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

    # ------------------------------------------------------------------ hyperparameter search
    @redacted_errors()  # an error echoing s3://key:secret@ or a token shows neither
    def hyperparameter_search(self, hp_space=None, compute_objective=None, n_trials=20, direction="minimize",
                              backend=None, hp_name=None, **kwargs):
        """transformers' hyperparameter_search, on Ray Tune: every trial is a raytrainer run (tune/search.py).

        Extra keyword arguments: scheduler ("asha" or a Tune scheduler), search_alg, max_concurrent_trials,
        name (the sweep's folder under storage_path), resume=True (finish an interrupted sweep).
        """
        from .tune.search import hyperparameter_search

        return hyperparameter_search(self, hp_space=hp_space, compute_objective=compute_objective, n_trials=n_trials,
                                     direction=direction, backend=backend, hp_name=hp_name, **kwargs)

    # ------------------------------------------------------------------ the Hub
    # Ray workers never reach these: their args have push_to_hub=False (the driver pushes)
    _hub_unreachable = None  # why the Hub could not be reached, once init_hf_repo has failed

    def init_hf_repo(self, token=None, private=None):
        """transformers' repo creation; without a network, one clear line and training goes on."""
        try:
            return super().init_hf_repo(token=token, private=private)
        except Exception as e:  # noqa: BLE001 - offline mode, no route: "not now"; a refused token: an error
            said = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            if getattr(getattr(e, "response", None), "status_code", None) in (401, 403):
                raise ValueError(redact_text(
                    f"push_to_hub: the Hugging Face Hub refused the token ({said}). Set hub_token (or HF_TOKEN, or "
                    f"run `hf auth login`) to a token with write access to {self.args.hub_model_id or 'the repo'}, "
                    "or set push_to_hub=False.")) from None
            self._hub_unreachable = said
            self.hub_model_id = None
            logger.warning("push_to_hub: the Hugging Face Hub is unreachable (%s); training goes on, the model and "
                           "its card are saved in output_dir=%s; push later with trainer.push_to_hub().",
                           self._hub_unreachable, self.args.output_dir)
            return None

    def push_to_hub(self, commit_message="End of training", blocking=True, token=None, revision=None, **kwargs):
        if self._hub_unreachable is None and self.hub_model_id is None:
            self.init_hf_repo(token=token)
        if self._hub_unreachable:
            # what push_to_hub would upload stays on disk: the model (saved by the caller) and its card
            self.create_model_card(model_name=self.args.hub_model_id or os.path.basename(
                os.path.abspath(self.args.output_dir)), **{k: v for k, v in kwargs.items() if k in _CARD_ARGS})
            logger.warning("push_to_hub: not pushed (the Hub is unreachable); model card written to %s",
                           os.path.join(self.args.output_dir, "README.md"))
            return None
        return super().push_to_hub(commit_message=commit_message, blocking=blocking, token=token,
                                   revision=revision, **kwargs)

    def create_model_card(self, *args, **kwargs):
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():  # transformers' card may quote a storage URI or a dataset's signed URL
            redact_file(os.path.join(self.args.output_dir, "README.md"))

    def _push_from_checkpoint(self, checkpoint_folder):
        if self._hub_unreachable or self.hub_model_id is None:
            return None
        return super()._push_from_checkpoint(checkpoint_folder)

    def _resolve_resume(self, resume_from_checkpoint):
        if resume_from_checkpoint is False or resume_from_checkpoint is None:
            return None
        if resume_from_checkpoint is True:
            found = latest_checkpoint(self.args.output_dir)
            if found is None:
                # transformers' words first: scripts and tests match on them
                raise ValueError(
                    f"No valid checkpoint found in output directory ({self.args.output_dir}): "
                    "resume_from_checkpoint=True found no complete checkpoint-<step> folder there; train without "
                    "resuming first, or pass the path of a checkpoint-<step> folder."
                )
            resume_from_checkpoint = found
        if not os.path.isdir(resume_from_checkpoint):
            # transformers' own message (its _load_from_checkpoint), so code that matches on it keeps working
            raise ValueError(f"Can't find a valid checkpoint at {resume_from_checkpoint}")
        # a malformed trainer_state.json is named here; a downloaded copy's best checkpoint is one of its run in storage
        check_checkpoint_state(resume_from_checkpoint,
                               **(self._ray.resume_origin(resume_from_checkpoint) if self._ray is not None else {}))
        return resume_from_checkpoint

    def _inner_training_loop(self, batch_size=None, args=None, resume_from_checkpoint=None, trial=None,
                             ignore_keys_for_eval=None):
        if self.args.auto_find_batch_size and batch_size is not None:
            # transformers' train() retries this with a smaller batch_size after an out-of-memory error
            self._train_batch_size = batch_size
            self.model_wrapped = self.model  # the next attempt wraps the bare model again
            if self.args.strategy == "deepspeed" and not self._user_optimizers:
                self.optimizer = None  # ZeRO rewrote the last attempt's param groups: the next engine needs a new one
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
        steps = self.args.torch_empty_cache_steps
        if steps is not None and self.state.global_step % steps == 0:
            from accelerate.utils.memory import clear_device_cache

            clear_device_cache()  # as transformers does: less fragmentation, at some speed
            if torch.backends.mps.is_available() and hasattr(torch.mps, "clear_graph_cache"):
                torch.mps.clear_graph_cache()
        if self.args.n_gpu > 1:
            loss = loss.mean()  # nn.DataParallel returns one loss per GPU
        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        else:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        if not scaled:
            loss = loss / self.current_gradient_accumulation_steps
        if is_lomo(self.optimizer):
            # LOMO updates each parameter inside backward (accelerate's lomo_backward); its step() is a no-op
            self.optimizer.fused_backward(loss, self._get_learning_rate())
        elif self._strategy is not None:
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
        elif sharded:
            # every rank joins the gather; rank 0 gets CPU copies (nothing left for the writer to copy)
            state = strategy.full_state_dict(self.model_wrapped)
            if rank == 0:
                snap.model_state = state
                snap.save_model_fn = lambda out_dir, state_dict: self._save(out_dir, state_dict=state_dict)
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
            snap.extra_files[RUN_META] = self._run_meta()
        if not self.args.save_only_model:
            if sharded:
                # a collective save, in the foreground on every rank, into the folder the writer completes
                snap.tmp_dir = snap.tmp_dir or self._checkpoint_writer.tmp_dir_for(final_dir)
                strategy.save_sharded(self.model_wrapped, self.optimizer, snap.tmp_dir, self.state.global_step)
            if rank == 0:
                snap.optimizer_state = strategy.optimizer_state(self.optimizer) if strategy else \
                    self.optimizer.state_dict()
                snap.scheduler_state = copy.deepcopy(self.lr_scheduler.state_dict())
                snap.scaler_state = self._strategy.scaler_state() if self._strategy else None
            snap.rng_state = _rng_state()
        pending = PendingSave(final_dir=final_dir, run_dir=run_dir)
        snap.after = lambda _: pending.written.set()
        self._unfinished_saves.append(pending)
        if self._checkpoint_writer.background:
            # the writer thread copies parameters and optimizer state while the next forward/backward
            # runs; the loop waits for that copy before the next optimizer.step (wait_copied)
            snap.copy_fn = _copy_live_tensors
        else:
            _copy_live_tensors(snap)
        self._checkpoint_writer.save(snap)

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

    # ------------------------------------------------------------------ sharded models: a skeleton on the driver
    def call_model_init(self, trial=None):
        """Under fsdp / deepspeed with Ray workers the driver builds model_init's model on the meta device:
        a skeleton (names, shapes, config) for the driver's checks; each worker builds the real model.

        On a worker that trains, transformers' two calls (in __init__ and again in train()) make one real
        build: __init__'s is a skeleton. Under fsdp / ZeRO-3 train()'s builds only this rank's shard
        (strategies/build.py; rank 0 also builds the full model once, the source of every shard)."""
        self._sharded_build = None
        if self._skeleton_on_driver():
            from .strategies.pretrained import meta_build  # a from_pretrained model_init too: it reads headers only

            return meta_build(functools.partial(super().call_model_init, trial))[0]
        if self._skeleton_on_worker():
            from .strategies.pretrained import meta_build

            try:
                return meta_build(functools.partial(super().call_model_init, trial))[0]
            except Exception as e:  # noqa: BLE001 - a model_init that cannot build on meta: build it for real
                logger.debug("raytrainer: model_init on the meta device failed (%s: %s); building it", type(e).__name__, e)
                return super().call_model_init(trial)
        kind = self._sharded_build_kind()
        if kind is not None:
            from .strategies.build import build_sharded

            return build_sharded(self, functools.partial(super().call_model_init, trial), kind)
        return super().call_model_init(trial)

    def _skeleton_on_driver(self) -> bool:
        import torch.distributed as dist

        args = self.args
        return args.num_workers > 0 and args.strategy in ("fsdp", "deepspeed") and not self._in_worker and \
            not (dist.is_available() and dist.is_initialized())

    def _skeleton_on_worker(self) -> bool:
        """In __init__ on a Ray worker that will train: train() calls model_init again (as transformers does)."""
        import torch.distributed as dist

        return WORKER_TRAINS.get() and not getattr(self, "is_in_train", False) and \
            dist.is_available() and dist.is_initialized()

    def _sharded_build_kind(self) -> str | None:
        """train()'s model_init on a Ray worker whose strategy shards the weights: "fsdp" / "zero3"."""
        import torch.distributed as dist

        if not (self._in_worker and getattr(self, "is_in_train", False) and dist.is_available()
                and dist.is_initialized()):
            return None
        from .strategies.build import sharded_kind

        return sharded_kind(self.args)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if model is None and getattr(self, "_sharded_build", None) is not None:
            return  # built shard by shard: the strategy loads the weights into the shards (its load_checkpoint)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _move_model_to_device(self, model, device):
        if is_skeleton(model):
            return  # a skeleton (see call_model_init): nothing to move
        super()._move_model_to_device(model, device)

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        # transformers pickled self.args (hub_token, an S3 filesystem's keys) into training_args.bin
        path = os.path.join(output_dir if output_dir is not None else self.args.output_dir, TRAINING_ARGS_NAME)
        if os.path.isfile(path):
            save_args_without_secrets(self.args, path)

    def _saves_through_hooks(self) -> bool:
        overridden = type(self)._save not in (transformers.Trainer._save, Trainer._save) or \
            type(self).save_model not in (transformers.Trainer.save_model, Trainer.save_model)
        return overridden or _is_peft_model(self.model)

    def _finish_saves(self, block: bool) -> None:
        """Fire on_save for every checkpoint whose folder is complete, in order; then rotate (or report to Ray).

        The loop calls this at each step with block=False (nothing waits for a background write) and at
        the end with block=True. A callback's on_save finds `checkpoint-<step>/` complete, and what it
        writes there is kept (and persisted to Ray's storage with the checkpoint).
        """
        while self._unfinished_saves:
            pending = self._unfinished_saves[0]
            if not pending.written.is_set():
                if not block:
                    self._checkpoint_writer.raise_pending()
                    return
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

    def _fire_on_save(self, pending: "PendingSave") -> None:
        if self.args.push_to_hub and os.path.isdir(pending.final_dir):  # as transformers' _save_checkpoint
            self._push_from_checkpoint(pending.final_dir)
        if pending.state is not None:  # None: _save_checkpoint called outside the loop, no on_save asked
            self.control = transformers.trainer_callback.CallbackHandler.on_save(
                self.callback_handler, self.args, pending.state, self.control)

    def log(self, logs, start_time=None):
        if self._nonfinite_steps_skipped and "loss" in logs:  # only when it happened: logs stay transformers'
            logs["nonfinite_steps_skipped"] = self._nonfinite_steps_skipped
        self._last_metrics = dict(logs)
        return super().log(logs, start_time)

    def _global_batch_size(self) -> int:
        _, world = world_info()
        return self._train_batch_size * world * self.args.gradient_accumulation_steps

    def _run_meta(self) -> dict:
        """raytrainer_run.pt: the world size and global batch of this run, and its data position in samples
        when raytrainer's sampler placed the data (a resume with another global batch starts there)."""
        _, world = world_info()
        meta = {"world_size": world, "global_batch_size": self._global_batch_size(), "fit_id": self._fit_id,
                # the run a checkpoint belongs to: the first fit's id, kept by every resume (retention's scope)
                "lineage": getattr(self, "_lineage", None) or self._fit_id}
        loader = getattr(self.callback_handler, "train_dataloader", None)
        # our sampler inside a DataLoader, or a Ray Data shard's loader itself (loop.build_train_dataloader)
        trained = getattr(getattr(loader, "batch_sampler", loader), "trained", None)
        if trained is not None:
            meta["data_position"] = dict(trained)
        return meta

    def _check_resume_batch(self, checkpoint_dir: str, sampler=None) -> dict | None:
        """None when the checkpoint's position in optimizer steps holds for this run (same global batch, or
        a checkpoint without RUN_META: transformers' rule). With another global batch: the checkpoint's
        data position in samples, where this run's sampler resumes (loop.py); when that position is
        unknown or this run's data cannot be placed at a sample, None too (transformers' global_step
        resume), with one warning that it is approximate."""
        meta = load_run_meta(checkpoint_dir)
        if meta is None:
            return None
        now = self._global_batch_size()
        if meta["global_batch_size"] == now:
            return None
        position = meta.get("data_position")
        order = position and position.get("order", "permutation")  # older checkpoints: the sampler's
        if position is None:
            why = ("it records no data position in samples (written by an older raytrainer, or its data came "
                   "from a custom sampler / dataloader)")
        elif getattr(sampler, "order", None) is None:
            why = ("this run's training data cannot be placed at a sample (a subclass's get_train_dataloader / "
                   "_get_train_sampler, or train_sampling_strategy='group_by_length')")
        elif order != sampler.order:
            why = _other_order(order, sampler.order, meta["world_size"])
        elif position["num_samples"] != sampler.num_samples:
            why = (f"its epochs had {position['num_samples']} samples, this train_dataset has "
                   f"{sampler.num_samples}")
        else:
            return position
        # transformers' behaviour, with one warning: global_step places the resume, batches are skipped
        _, world = world_info()
        if world_info()[0] == 0:
            logger.warning(
                "raytrainer: %s was trained with a global batch of %d (%d workers); this run's is %d, and the resume "
                "cannot continue at the checkpoint's sample: %s. Resuming by global_step as transformers does (it "
                "skips %d-sample batches of this run): the data position is approximate, some samples may be seen "
                "twice or skipped. Keep the global batch the same for an exact resume.",
                checkpoint_dir, meta["global_batch_size"], meta["world_size"], now, why, now)
        return None

    def wait_for_checkpoints(self) -> None:
        """Block until every checkpoint taken so far is on disk (they are written in the background)."""
        self._finish_saves(block=True)

    def _load_best_model(self):
        self._finish_saves(block=True)
        strategy = getattr(self, "_strategy", None)
        if strategy is not None and strategy.sharded:
            return self._load_best_sharded(strategy)
        if self._ray is None:
            return super()._load_best_model()
        rank, _ = world_info()
        if rank != 0:  # only rank 0's weights leave the worker group
            return None
        in_storage = self.state.best_model_checkpoint
        with self._best_checkpoint_here() as local:
            self.state.best_model_checkpoint = local
            try:
                return super()._load_best_model()
            finally:
                self.state.best_model_checkpoint = in_storage

    def _load_best_sharded(self, strategy):
        """fsdp / deepspeed: every rank joins; rank 0 reads the best checkpoint's consolidated model.safetensors
        and the strategy fills the shards (or partitions) from it."""
        rank, _ = world_info()
        if rank != 0:
            return strategy.load_best_weights(self, None)
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
        wait = not trainer._checkpoint_writer.background or self.on_save_observed(args)
        trainer._finish_saves(block=wait)
        return trainer.control

    def on_save_observed(self, args) -> bool:
        base = transformers.TrainerCallback.on_save
        return bool(args.push_to_hub) or any(type(cb).on_save is not base for cb in self.callbacks)


_CARD_ARGS = ("language", "license", "tags", "model_name", "finetuned_from", "tasks", "dataset_tags", "dataset",
              "dataset_args")


def load_run_meta(checkpoint: str, fs=None) -> dict | None:
    """A checkpoint's RUN_META (a local folder, or a path in a pyarrow filesystem), None when it has none."""
    if fs is None:
        path = os.path.join(checkpoint, RUN_META)
        return torch.load(path, weights_only=True) if os.path.isfile(path) else None
    import io

    import pyarrow.fs as pafs

    path = f"{checkpoint}/{RUN_META}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return torch.load(io.BytesIO(f.read()), weights_only=True)


def _other_order(saved: str, now: str, saved_world: int) -> str:
    """Why a data position in one epoch order means nothing in another (see data/sampling.py)."""
    if saved.startswith("ray_data_split_") and now.startswith("ray_data_split_"):
        return (f"its Ray Dataset was split over {saved_world} workers and this run's over "
                f"{now.rsplit('_', 1)[1]}: the split deals other rows to each worker, so no sample of one run is "
                f"a place in the other (keep num_workers={saved_world}; another per-device batch or accumulation "
                "is fine)")
    kinds = {"permutation": "a map-style dataset"}
    return (f"its data was {kinds.get(saved, 'a Ray Dataset stream')} and this run's is "
            f"{kinds.get(now, 'a Ray Dataset stream')}: their epochs order the samples differently")


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _copy_live_tensors(snap: Snapshot) -> None:
    snap.model_state = to_cpu(snap.model_state)
    for key, first in (snap.model_aliases or {}).items():
        snap.model_state[key] = snap.model_state[first]
    snap.optimizer_state = to_cpu(snap.optimizer_state)


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
