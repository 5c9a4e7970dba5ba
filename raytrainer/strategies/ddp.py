"""DistributedDataParallel over the process group Ray Train created (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from .base import Strategy


class DDPStrategy(Strategy):
    name = "ddp"

    def __init__(self, device, mixed_precision="no", find_unused_parameters=None, bucket_cap_mb=None,
                 broadcast_buffers=None, static_graph=None):
        super().__init__(device, mixed_precision)
        self.ddp_kwargs = {
            k: v
            for k, v in dict(
                find_unused_parameters=find_unused_parameters,
                bucket_cap_mb=bucket_cap_mb,
                broadcast_buffers=broadcast_buffers,
                static_graph=static_graph,
            ).items()
            if v is not None
        }

    def setup_model(self, model):
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, **self.ddp_kwargs)

    def no_sync(self, model):
        return model.no_sync()
