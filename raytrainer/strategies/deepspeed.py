"""DeepSpeed ZeRO (stages 0-3, CPU offload included) over the process group Ray Train created:
`deepspeed.initialize(..., dist_init_required=False)`.

Why DeepSpeed's own API and not accelerate's DeepSpeedPlugin: accelerate's plugin runs
`deepspeed.initialize` inside `Accelerator.prepare`, which also wants to own the dataloader and the
gradient-accumulation counter, and steps the engine inside `accelerator.backward`. raytrainer's loop
owns the data (exact resume) and the step sequence (transformers' callback order), so we call the
engine directly: `engine.backward`, `engine.step`, `engine.save_checkpoint` / `load_checkpoint`.
The configuration is transformers' own: `HfTrainerDeepSpeedConfig.trainer_config_process` /
`trainer_config_finalize` fill the "auto" values from TrainingArguments and list the values that
contradict them (`deepspeed_config` below; the driver runs it too, so a contradiction is a
ValueError before any worker starts).

Beyond transformers' "auto" filling, values a config leaves out are set from TrainingArguments
(setdefault, so the config wins where it speaks): the batch sizes, `gradient_clipping` (=
max_grad_norm: transformers leaves clipping to the config; we honour max_grad_norm as DDP does), and,
when the config names no optimizer, `zero_allow_untested_optimizer` (as transformers) and with
optimizer offload `zero_force_ds_cpu_optimizer: false`: TrainingArguments' optimizer (torch AdamW)
then steps the fp32 partitions on the CPU (DeepSpeedCPUAdam needs a compiled op that
`DS_BUILD_OPS=0` leaves out).

Step sequence: the loop's no_sync marks micro-steps inside an accumulation window
(`set_gradient_accumulation_boundary(False)`), `backward` is `engine.backward(loss,
scale_wrt_gas=False)` (transformers' training_step has already divided the loss), `optimizer_step`
is `engine.step()` (clipping and the norm happen there; `clip_grad_norm` returns a tensor filled in
by that step, read when the step's logs are written). The scheduler is transformers' own, on the
optimizer DeepSpeed steps, unless the config has a "scheduler" (then the engine steps it).

Checkpoints: `engine.save_checkpoint(folder, tag="global_step<N>")` by every rank (each writes its
optimizer partitions), through a checkpoint engine that copies the state in a thread and writes it in
another (deepspeed_async.py, with save_in_background): the loop goes on, and the checkpoint writer waits for
the files before it puts the folder in place. The consolidated weights as `model.safetensors` (ZeRO-0/1/2:
rank 0's module) are in every checkpoint, except under ZeRO-3 where, as in transformers, they are gathered
(layer by layer on rank 0) only with `stage3_gather_16bit_weights_on_model_save: true`; otherwise resume and
load_best read the DeepSpeed state, and `consolidate_deepspeed` (checkpoint/consolidate_ds.py) rebuilds the
weights after the fact. A model with frozen parameters (PEFT/LoRA)
saves only its trainable ones in DeepSpeed's state (`exclude_frozen_parameters`): the frozen base
comes from the model itself on resume, and transformers' PEFT path writes the adapter files.

Another worker count: ZeRO-1/2/3 partition the optimizer state over the data-parallel ranks, one
`zero_pp_rank_<r>_..._optim_states.pt` per rank, and DeepSpeed cannot re-partition it on load
(`ZeRORuntimeException`) unless the checkpoint was converted to its universal format
(`deepspeed.checkpoint.ds_to_universal`, read with `"checkpoint": {"load_universal": true}`).
`check_checkpoint_world_size` says so on the driver, before any worker starts (and again on the
workers, for a checkpoint the driver could not see).
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist

from ..checkpoint.pickle_check import check_checkpoint_pickles, deepspeed_tag, safe_deepspeed_load
from ..redact import redact
from .base import load_scheduler, Strategy
from .build import load_full_weights_zero3, read_full_weights
from .deepspeed_async import install
from .deepspeed_config import check_checkpoint_world_size, deepspeed_config, gather_16bit_on_save, zero_stage

logger = logging.getLogger("raytrainer")


class DeepSpeedStrategy(Strategy):
    can_skip_steps = False  # DeepSpeed computes the norm inside engine.step(); its fp16 scaler skips overflows
    name = "deepspeed"
    sharded = True

    def __init__(self, device, mixed_precision="no", args=None):
        super().__init__(device, "no")  # DeepSpeed scales fp16 losses itself
        self.args = args
        self.engine = None
        self._staged = None  # the background checkpoint engine (deepspeed_async.py), once prepared
        self.stage = zero_stage(args) if args is not None else 0
        self.own_scheduler = False
        self._norm = None

    # --- setup -------------------------------------------------------------
    def prepare(self, trainer, max_steps):
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(max(logging.WARNING, self.args.get_process_log_level()))
        found = trainer._train_batch_size if self.args.auto_find_batch_size else None  # this attempt's size
        config = deepspeed_config(self.args, dist.get_world_size(), trainer.model, max_steps, batch_size=found)
        self.stage = int(config.get("zero_optimization", {}).get("stage", 0))
        model = trainer.model
        kwargs = {}
        if "optimizer" in config:  # DeepSpeed builds it from the config
            kwargs["model_parameters"] = [p for p in model.parameters() if p.requires_grad]
        else:
            trainer.create_optimizer()
            kwargs["optimizer"] = trainer.optimizer
        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, config=config, dist_init_required=False,
                                                               **kwargs)
        self.engine = engine
        if "optimizer" in config:
            trainer.optimizer = optimizer
        if scheduler is not None:  # the config's "scheduler": the engine steps it
            trainer.lr_scheduler = scheduler
            self.own_scheduler = True
        engine.set_gradient_accumulation_boundary(True)
        # checkpoints in the background (deepspeed_async.py); also on Ray workers, whose other saves are foreground
        self._staged = install(engine) if trainer.args.save_in_background else None
        return engine

    def unwrap(self, model):
        return getattr(model, "module", model)

    # --- step ----------------------------------------------------------------
    def backward(self, loss):
        self.engine.backward(loss, scale_wrt_gas=False)

    @contextlib.contextmanager
    def no_sync(self, model):
        self.engine.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.engine.set_gradient_accumulation_boundary(True)

    def clip_grad_norm(self, model, optimizer, max_norm):
        # DeepSpeed clips inside engine.step() (gradient_clipping = max_grad_norm); the norm is known there
        self._norm = torch.full((), float("nan"))
        return self._norm

    def grad_norm(self, model, optimizer):
        return self.clip_grad_norm(model, optimizer, 0.0)

    def optimizer_step(self, optimizer):
        if self._staged is not None:
            self._staged.wait_staged()  # a checkpoint's copy of the optimizer partitions, before step changes them
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if self._norm is not None and norm is not None:
            self._norm.fill_(float(norm))
        return not bool(getattr(self.engine.optimizer, "overflow", False))

    def step_scheduler(self, scheduler):
        if not self.own_scheduler:
            scheduler.step()

    def zero_grad(self, model):
        pass  # engine.step() zeroes the gradients (and the engine's zero_grad takes no set_to_none)

    # --- checkpoint ------------------------------------------------------------
    def full_state_dict(self, model):
        engine = self.engine
        if self.stage == 3:
            state = engine._zero3_consolidated_16bit_state_dict()
            return {k: v.clone() for k, v in state.items()} if state is not None else None
        if dist.get_rank() != 0:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in engine.module.state_dict().items()}

    def optimizer_state(self, optimizer):
        return None  # in global_step<N>/, one file per rank

    def full_weights_in_checkpoints(self):
        """As transformers: a ZeRO-3 checkpoint holds the gathered weights only with
        `stage3_gather_16bit_weights_on_model_save` (DeepSpeed's default: false); ZeRO-0/1/2 always (rank 0's
        module is whole, nothing to gather)."""
        return self.stage != 3 or gather_16bit_on_save(self.args)

    def best_read_by_every_rank(self):
        return not self.full_weights_in_checkpoints()

    def save_sharded(self, model, optimizer, folder, step):
        """DeepSpeed's save_checkpoint (collective). With the staged engine it returns once the state is handed
        over, and gives the function that waits for the files (the checkpoint writer calls it)."""
        # frozen weights (a PEFT model's base) are not state: the model rebuilds them on resume
        # DeepSpeed pickles its config into every state file (ds_config): the saved copy is redacted
        config = self.engine.config
        self.engine.config = redact(config) if isinstance(config, dict) else config
        try:
            self.engine.save_checkpoint(folder, tag=f"global_step{step}", exclude_frozen_parameters=self._frozen())
        finally:
            self.engine.config = config
        if self.engine.checkpoint_engine.is_decoupled():  # the user's decoupled writer: complete before the rename
            self.engine._commit_decoupled_checkpoint()
        return self._staged.take_wait() if self._staged is not None else None

    def _frozen(self) -> bool:
        return any(not p.requires_grad for p in self.engine.module.parameters())

    def load_checkpoint(self, trainer, folder):
        universal = bool(self.engine.load_universal_checkpoint())
        tag = deepspeed_tag(folder, universal)  # never `latest` followed by DeepSpeed itself
        if tag is None:
            logger.warning("raytrainer: %s has no DeepSpeed state (global_step*/): weights resumed, optimizer state "
                           "starts fresh", folder)
            if getattr(trainer, "_sharded_build", None) is not None:
                # built under zero.Init: transformers' train() skipped the weights; into the partitions here
                load_full_weights_zero3(self.engine.module, folder)
        else:
            # the driver checked a checkpoint it could see; a restart or a storage path is checked here
            check_checkpoint_world_size(self.args, folder, dist.get_world_size())
            if universal:  # the loop checked the plain tag's files; these are the universal tag's
                check_checkpoint_pickles(folder, universal=True)
            # DeepSpeed's own loader unpickles with weights_only=False: this one cannot build other objects
            self.engine.checkpoint_engine.load = safe_deepspeed_load
            path, _ = self.engine.load_checkpoint(folder, tag=tag, load_module_strict=not self._frozen(),
                                                  load_optimizer_states=True,
                                                  load_lr_scheduler_states=self.own_scheduler)
            if path is None:
                raise ValueError(f"DeepSpeed could not resume from {folder}")
        if not self.own_scheduler:
            load_scheduler(trainer, folder)

    def load_best_weights(self, trainer, folder):
        module = self.engine.module
        if self.best_read_by_every_rank():  # no model.safetensors: every rank reads its DeepSpeed state, as transformers
            tag = deepspeed_tag(folder)
            if tag is None:
                raise ValueError(f"load_best_model_at_end: {folder} has no DeepSpeed state (global_step*/) to load")
            self.engine.checkpoint_engine.load = safe_deepspeed_load  # weights-only, as in load_checkpoint
            path, _ = self.engine.load_checkpoint(folder, tag=tag, load_module_strict=not self._frozen(),
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
            if path is None:
                raise ValueError(f"DeepSpeed could not load the best checkpoint {folder}")
            return
        if self.stage == 3:  # partitioned parameters: gathered one at a time, rank 0's values kept
            load_full_weights_zero3(module, folder)
            return
        # ZeRO-0/1/2: every rank holds the whole module; rank 0 reads and broadcasts
        full = read_full_weights(folder) if dist.get_rank() == 0 else None
        with torch.no_grad():
            for name, p in module.named_parameters():
                if full is not None and name in full:
                    p.data.copy_(full[name].to(p.device, p.dtype))
                dist.broadcast(p.data, src=0)

