"""The one small interface the loop talks to; the loop never branches on the strategy.

Ray's TorchTrainer has already created the process group when a strategy is built.

Every hook has the single-process / DDP behaviour as its default; FSDP (fsdp.py) and DeepSpeed
(deepspeed.py) override the ones where the state lives in shards:

* `prepare(trainer, max_steps)`: build the optimizer and wrap the model, in the order the strategy
  needs (DDP: optimizer then wrap; FSDP: shard then optimizer; DeepSpeed: the engine takes both).
* `backward`, `no_sync`, `clip_grad_norm`, `grad_norm`, `optimizer_step`, `step_scheduler`,
  `zero_grad`: one optimizer step.
* `sharded`: True when weights or optimizer state are split over ranks. Then `full_state_dict`,
  `save_sharded` and `load_sharded` are collectives every rank must join (checkpoint/save.py calls them on
  every rank, in the foreground, into the temporary folder the checkpoint writer completes), and
  `write_sharded` is one the writer's thread joins on every rank, in checkpoint order, for a strategy whose
  `sharded_state` lets the loop go on while its shards are written.
"""

from __future__ import annotations

import contextlib
import os

import torch


class Strategy:
    """Single process: no wrapping, plain backward, torch's own clipping."""

    name = "local"
    # the loop may skip a step whose gradient norm is NaN/inf (args.nonfinite_steps); needs the norm before step
    can_skip_steps = True
    sharded = False  # weights / optimizer state split over ranks: saves and loads are collective

    def __init__(self, device: torch.device, mixed_precision: str = "no"):
        self.device = device
        # fp16 needs loss scaling; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(device.type) if mixed_precision == "fp16" else None

    # --- setup -------------------------------------------------------------
    def prepare(self, trainer, max_steps: int) -> torch.nn.Module:
        """Create trainer.optimizer (transformers' create_optimizer) and return the module the loop calls
        forward on. The loop then creates the scheduler on trainer.optimizer (unless set here)."""
        trainer.create_optimizer()
        return self.setup_model(trainer.model)

    def setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Return the module the loop calls forward on (DDP wraps it)."""
        return model

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return getattr(model, "module", model)

    # --- step ----------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def no_sync(self, model):
        """Skip gradient all-reduce on micro-steps that do not end an accumulation window."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, model, optimizer, max_norm: float) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)

    def grad_norm(self, model, optimizer) -> torch.Tensor:
        """The total gradient norm, nothing clipped (transformers logs grad_norm even with max_grad_norm=0)."""
        return self.clip_grad_norm(model, optimizer, float("inf"))

    def optimizer_step(self, optimizer) -> bool:
        """Step; return False when fp16 found inf/nan and skipped the update."""
        if is_lomo(optimizer):  # it stepped inside backward (fused_backward)
            optimizer._opt_called = True  # what torch's step wrapper records: the scheduler may step now
            return True
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale

    def step_scheduler(self, scheduler) -> None:
        """After a successful optimizer step (a strategy whose engine steps its own scheduler skips it)."""
        scheduler.step()

    def zero_grad(self, model) -> None:
        model.zero_grad(set_to_none=True)

    # --- checkpoint ------------------------------------------------------------
    def full_state_dict(self, model) -> dict | None:
        """The whole model's state dict on rank 0 (None on other ranks). Collective when `sharded`.

        Default: the bare module's live tensors (the caller copies them); sharded strategies gather
        CPU copies."""
        return self.unwrap(model).state_dict()

    def optimizer_state(self, optimizer) -> dict | None:
        """The optimizer state rank 0 writes as optimizer.pt; None when it is saved sharded instead."""
        return optimizer.state_dict()

    def full_weights_in_checkpoints(self) -> bool:
        """Whether each checkpoint also holds the consolidated model.safetensors (gathered on rank 0). A sharded
        strategy answers what the user asked for (fsdp_config's state_dict_type, ZeRO-3's gather flag)."""
        return True

    def sharded_state(self, model, optimizer) -> dict | None:
        """The live sharded state a background writer stages and then writes with `write_sharded` (the loop
        does not wait for the write); None: `save_sharded` writes it in the foreground. optimizer=None (in
        both): save_only_model, the weights' shards only."""
        return None

    def write_sharded(self, state: dict, folder: str) -> None:
        """Collective, on the checkpoint writer's thread: write a staged `sharded_state` into `folder`."""
        raise NotImplementedError

    def save_sharded(self, model, optimizer, folder: str, step: int):
        """Collective: every rank writes its shard of the weights and optimizer state into `folder`. May return
        a function that blocks until the files are complete (an engine that writes them in the background);
        the checkpoint writer calls it before it puts the folder in place."""

    def load_checkpoint(self, trainer, folder: str) -> None:
        """Resume: optimizer and scheduler state (the weights were loaded by transformers' train())."""
        trainer._load_optimizer_and_scheduler(folder)

    def best_read_by_every_rank(self) -> bool:
        """load_best_model_at_end: every rank reads the best checkpoint (its shards), not rank 0 alone."""
        return False

    def load_best_weights(self, trainer, folder: str | None) -> None:
        """load_best_model_at_end for a sharded strategy, a collective: `folder` is the local copy of the best
        checkpoint, on rank 0 only (None on the others) unless best_read_by_every_rank."""
        raise NotImplementedError(f"{type(self).__name__} loads the best model through transformers")

    def scaler_state(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_scaler_state(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def is_lomo(optimizer) -> bool:
    """LOMO / AdaLomo update parameters during backward; accelerate gives them the same special case."""
    return type(optimizer).__name__ in ("Lomo", "AdaLomo") and hasattr(optimizer, "fused_backward")


def load_scheduler(trainer, folder: str) -> None:
    """transformers' scheduler.pt (weights only), for the strategies whose engine does not own the scheduler."""
    from transformers.trainer import SCHEDULER_NAME

    path = os.path.join(folder, SCHEDULER_NAME)
    if os.path.isfile(path) and trainer.lr_scheduler is not None:
        trainer.lr_scheduler.load_state_dict(torch.load(path, weights_only=True))


def is_peft_model(model) -> bool:
    """A PEFT model saves (and checkpoints) its adapters only."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
