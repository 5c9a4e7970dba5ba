"""The one small interface the loop talks to; the loop never branches on the strategy.

Ray's TorchTrainer has already created the process group when a strategy is built.
"""

from __future__ import annotations

import contextlib

import torch


class Strategy:
    """Single process: no wrapping, plain backward, torch's own clipping."""

    name = "local"

    def __init__(self, device: torch.device, mixed_precision: str = "no"):
        self.device = device
        # fp16 needs loss scaling; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(device.type) if mixed_precision == "fp16" else None

    # --- setup -------------------------------------------------------------
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

    # --- checkpoint ------------------------------------------------------------
    def scaler_state(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_scaler_state(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def is_lomo(optimizer) -> bool:
    """LOMO / AdaLomo update parameters during backward; accelerate gives them the same special case."""
    return type(optimizer).__name__ in ("Lomo", "AdaLomo") and hasattr(optimizer, "fused_backward")
