"""Several GPUs in one process without a process group: torch.nn.DataParallel, as transformers.Trainer
does when args.n_gpu > 1 (a machine with several visible GPUs, no torchrun, num_workers=0)."""

from __future__ import annotations

import torch

from .base import Strategy


class DataParallelStrategy(Strategy):
    name = "dp"

    def setup_model(self, model):
        # transformers' _wrap_model: quantized (8/4-bit) models cannot be replicated
        if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
            return model
        if isinstance(model, torch.nn.DataParallel):
            return model
        return torch.nn.DataParallel(model)
