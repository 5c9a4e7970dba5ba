"""Where model_init's model is built: a skeleton on the driver, the real model (or this rank's shard) on workers.

Under fsdp / deepspeed with Ray workers the driver builds model_init's model on the meta device: a skeleton
(names, shapes, config) for its checks. On a worker that trains, transformers calls model_init twice (in
__init__ and again in train()): __init__'s call builds a skeleton (WORKER_TRAINS, set by the worker while it
builds the Trainer), and train()'s the real one, shard by shard under fsdp / ZeRO-3 (strategies/build.py).
"""

from __future__ import annotations

import contextvars
import functools
import logging

import torch.distributed as dist
import transformers

from .checkpoint.consolidate import load_dcp_weights, load_deepspeed_weights, only_dcp_weights
from .checkpoint.consolidate_ds import only_deepspeed_weights
from .strategies.build import build_sharded, is_skeleton, sharded_kind
from .strategies.pretrained import meta_build  # a from_pretrained model_init too: it reads headers only

logger = logging.getLogger("raytrainer")
# set while a Ray worker that will train builds its Trainer (worker.py): __init__'s model_init builds a skeleton
WORKER_TRAINS = contextvars.ContextVar("raytrainer_worker_trains", default=False)


class ModelInitHooks(transformers.Trainer):
    _in_worker = False  # a Trainer built by a Ray worker (worker.py)

    def call_model_init(self, trial=None):
        """Under fsdp / deepspeed with Ray workers the driver builds model_init's model on the meta device:
        a skeleton (names, shapes, config) for the driver's checks; each worker builds the real model.

        On a worker that trains, transformers' two calls (in __init__ and again in train()) make one real
        build: __init__'s is a skeleton. Under fsdp / ZeRO-3 train()'s builds only this rank's shard
        (strategies/build.py; rank 0 also builds the full model once, the source of every shard)."""
        self._sharded_build = None
        if self._skeleton_on_driver():
            return meta_build(functools.partial(super().call_model_init, trial))[0]
        if self._skeleton_on_worker():
            try:
                return meta_build(functools.partial(super().call_model_init, trial))[0]
            except Exception as e:  # noqa: BLE001 - a model_init that cannot build on meta: build it for real
                logger.debug("raytrainer: model_init on the meta device failed (%s: %s); building it", type(e).__name__, e)
                return super().call_model_init(trial)
        kind = self._sharded_build_kind()
        if kind is not None:
            return build_sharded(self, functools.partial(super().call_model_init, trial), kind)
        return super().call_model_init(trial)

    def _skeleton_on_driver(self) -> bool:
        args = self.args
        return args.num_workers > 0 and args.strategy in ("fsdp", "deepspeed") and not self._in_worker and \
            not (dist.is_available() and dist.is_initialized())

    def _skeleton_on_worker(self) -> bool:
        """In __init__ on a Ray worker that will train: train() calls model_init again (as transformers does)."""
        return WORKER_TRAINS.get() and not getattr(self, "is_in_train", False) and \
            dist.is_available() and dist.is_initialized()

    def _sharded_build_kind(self) -> str | None:
        """train()'s model_init on a Ray worker whose strategy shards the weights: "fsdp" / "zero3"."""
        if not (self._in_worker and getattr(self, "is_in_train", False) and dist.is_available()
                and dist.is_initialized()):
            return None
        return sharded_kind(self.args)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if model is None and getattr(self, "_sharded_build", None) is not None:
            return  # built shard by shard: the strategy loads the weights into the shards (its load_checkpoint)
        if only_dcp_weights(resume_from_checkpoint):  # fsdp's shards, no model.safetensors (transformers' need)
            if model is None and self.args.strategy == "fsdp":
                return  # the strategy reads its slices of them (FSDPStrategy.load_checkpoint)
            return load_dcp_weights(model if model is not None else self.model, resume_from_checkpoint)
        if only_deepspeed_weights(resume_from_checkpoint):  # ZeRO-3 state without its gathered weights
            if model is None and self.args.strategy == "deepspeed":
                return  # DeepSpeed's load_checkpoint restores them (DeepSpeedStrategy.load_checkpoint)
            return load_deepspeed_weights(model if model is not None else self.model, resume_from_checkpoint)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _move_model_to_device(self, model, device):
        if is_skeleton(model):
            return  # a skeleton (see call_model_init): nothing to move
        super()._move_model_to_device(model, device)
