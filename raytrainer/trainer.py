"""The driver facade: transformers.Trainer's API, raytrainer's loop, on Ray workers or in this process.

`Trainer` is `LoopTrainer` (transformers.Trainer with raytrainer's loop and hooks, loop_trainer.py) plus what
the driver does at each call:

* `train()`: validates on the driver, then runs the loop in this process (`num_workers=0`: the resume is
  planned here by checkpoint/resume.py) or on Ray Train workers (`num_workers>=1`: launch.py plans the
  resume, starts the workers and pours their results back into this Trainer's objects).
* `evaluate()` / `predict()`: here, or sharded over Ray workers (`evaluate_on`).
* `hyperparameter_search()`: Ray Tune, every trial a raytrainer run (tune/search.py).

A Trainer that worker.py built on a Ray worker (`_in_worker`) runs `train()` as the loop only: the driver
decided everything else.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from .checkpoint.resume import plan_resume
from .data.checks import check_train_dataset
from .data.ray_data import is_ray_dataset
from .loop_trainer import LoopTrainer
from .redact import redacted_errors
from .spec import is_display_callback
from .strategies import check_strategy
from .strategies.build import is_skeleton

logger = logging.getLogger("raytrainer")


class Trainer(LoopTrainer):
    # ------------------------------------------------------------------ train
    @redacted_errors()  # an error echoing s3://key:secret@ or a token shows neither
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if kwargs:
            raise TypeError(f"train() got unexpected keyword arguments {sorted(kwargs)}")
        if self._in_worker:  # a Ray worker: the driver validated, checked and planned the resume
            return self.train_here(resume_from_checkpoint, trial, ignore_keys_for_eval)
        self.args.validate()
        self.args.check_supported()  # fields the loop does not honour (fields.py): refused here, not at construction
        self._apply_logging_dir()
        check_strategy(self.args, self.model)  # fsdp's layer classes, deepspeed's config vs the arguments
        if self.args.num_workers > 0:
            from .launch import run_on_ray  # Ray is imported when a run needs it

            output = run_on_ray(self, resume_from_checkpoint, trial, ignore_keys_for_eval)
            self._trained_on_ray = True  # evaluate_on="auto": evaluate these weights here
            return output
        if is_ray_dataset(self.train_dataset):
            raise ValueError("train_dataset is a ray.data.Dataset: set num_workers >= 1 so Ray Train shards it.")
        check_train_dataset(self)  # a malformed dataset is named here, not deep in a collator
        plan = plan_resume(self.args, resume_from_checkpoint)
        return self.train_here(plan.checkpoint if plan else None, trial, ignore_keys_for_eval)

    # ------------------------------------------------------------------ evaluate / predict
    @redacted_errors()  # an error echoing s3://key:secret@ or a token shows neither
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if self._evaluate_on_workers(dataset):
            from .launch import run_eval_on_ray

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
            from .launch import run_eval_on_ray

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
        handler = self.callback_handler
        everyone = handler.callbacks
        handler.callbacks = [cb for cb in everyone if is_display_callback(cb)]
        try:
            yield
        finally:
            handler.callbacks = everyone

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
