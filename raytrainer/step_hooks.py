"""The training step's hooks, as the loop calls them (on a Ray worker, or in-process).

transformers' training_step with the backward through the strategy (DDP's no_sync, fp16 scaling, LOMO);
subclasses written for transformers < 4.46 (`compute_loss(model, inputs, return_outputs=False)`,
`training_step(model, inputs)`) keep working; autocast without accelerate's prepared model; flops counted
once; logs carry the count of skipped non-finite steps when there were any.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import transformers

from .strategies.base import is_lomo


def _accepts(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


class StepHooks(transformers.Trainer):
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

    def log(self, logs, start_time=None):
        if self._nonfinite_steps_skipped and "loss" in logs:  # only when it happened: logs stay transformers'
            logs["nonfinite_steps_skipped"] = self._nonfinite_steps_skipped
        self._last_metrics = dict(logs)
        return super().log(logs, start_time)
