"""FSDP2 over the process group Ray Train created: `torch.distributed.fsdp.fully_shard` and
`torch.distributed.checkpoint` (DCP).

Why torch's API and not accelerate's FullyShardedDataParallelPlugin: the plugin is a front for these
same calls (accelerate's `fsdp2_prepare_model` calls `fully_shard`, its `save_fsdp_model` calls DCP),
but it comes with an `Accelerator` that owns the optimizer, the dataloader, gradient accumulation
and the process state. raytrainer's loop owns all of those (exact resume, Ray's process group), so
the plugin would be driven half-way through private functions. The torch calls are public, few,
and are what FSDP2 is. transformers' `fsdp` / `fsdp_config` fields are read as transformers reads
them (TrainingArguments normalises `fsdp="full_shard auto_wrap"` into fsdp_config).

What it does:
* wraps each module whose class is in `fsdp_config["transformer_layer_cls_to_wrap"]` (default: the
  model's `_no_split_modules`, as accelerate's TRANSFORMER_BASED_WRAP), then the root, with
  `reshard_after_forward` (full_shard: True, shard_grad_op: False), `cpu_offload` (CPUOffloadPolicy)
  and bf16 compute (MixedPrecisionPolicy) when bf16=True;
* `activation_checkpointing=True`: transformers' gradient checkpointing on the model (non-reentrant),
  which keeps parameter names clean;
* no_sync: `set_requires_gradient_sync(False)` on the micro-steps inside an accumulation window;
* clipping: `clip_grad_norm_` over the DTensor gradients (the norm is the global one);
* checkpoints: `model_dcp/` (model) and `optim_dcp/` (optimizer), sharded DCP written by every
  rank. The loop does not wait for them: the writer's thread stages a CPU copy of this rank's shards
  (the loop waits for that copy only before its next optimizer step) and writes it with `dcp.save` over
  a gloo group of its own, so its collectives never interleave with the training's. The consolidated
  `model.safetensors` (every rank gathering the full weights onto rank 0) is written only when asked:
  `fsdp_config["state_dict_type"] = "FULL_STATE_DICT"`, as accelerate's FSDP2 plugin (whose default is
  SHARDED_STATE_DICT). `save_model()`, `final_model/` and load_best_model_at_end still give a
  `model.safetensors`; `raytrainer consolidate` (checkpoint/consolidate.py) writes one after the fact,
  and a run resumed without fsdp reads the shards itself. Not accelerate's folder names
  (`pytorch_model_fsdp_0/`, `optimizer_0/`): transformers' resume code refuses the first unless its own
  FSDP plugin is on, and looks for optimizer.pt next to the second. DCP reshards on load, so a
  checkpoint resumes on another worker count (same global batch). A model with frozen parameters
  (PEFT/LoRA) keeps only its trainable ones in `model_dcp/` (`ignore_frozen_params`): the frozen base
  comes from the model itself, and transformers' PEFT path writes the adapter files.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from ..checkpoint.pickle_check import safe_dcp_load
from .base import Strategy, load_scheduler
from .build import fill_fsdp, is_skeleton, load_full_weights_fsdp
from .pretrained import load_fsdp_shards

MODEL_DIR = "model_dcp"
OPTIMIZER_DIR = "optim_dcp"


def layer_classes_to_wrap(model, fsdp_config: dict | None) -> tuple[list[str], set[str]]:
    """(class names asked for, class names found in the model)."""
    config = fsdp_config or {}
    names = config.get("transformer_layer_cls_to_wrap")
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        names = list(getattr(model, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    return list(names), present & set(names)


def check_wrap_policy(model, fsdp_config: dict | None) -> None:
    """Raise a ValueError when no module of the model would be sharded on its own (driver-side)."""
    config = fsdp_config or {}
    policy = str(config.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")).upper()
    if policy == "NO_WRAP":
        return
    if policy != "TRANSFORMER_BASED_WRAP":
        raise ValueError(
            f"fsdp_config auto_wrap_policy={policy!r} is not supported by raytrainer's FSDP2 strategy: use "
            '"TRANSFORMER_BASED_WRAP" (with transformer_layer_cls_to_wrap) or "NO_WRAP".'
        )
    if model is None:
        return
    names, found = layer_classes_to_wrap(model, config)
    if not names:
        raise ValueError(
            f"fsdp: {type(model).__name__} names no layer class to wrap (no _no_split_modules): set "
            'fsdp_config={"transformer_layer_cls_to_wrap": ["<DecoderLayerClass>"]}.'
        )
    if not found:
        classes = sorted({type(m).__name__ for m in model.modules() if len(list(m.children())) > 0})
        raise ValueError(
            f"fsdp_config transformer_layer_cls_to_wrap={names} matches no module of {type(model).__name__}; "
            f"its module classes include {classes[:12]}: set transformer_layer_cls_to_wrap to the class of "
            "its transformer blocks."
        )


class FSDPStrategy(Strategy):
    name = "fsdp"
    sharded = True

    def __init__(self, device, mixed_precision="no", fsdp_config: dict | None = None):
        super().__init__(device, mixed_precision)
        self.config = dict(fsdp_config or {})
        self.mixed_precision = mixed_precision
        self._writer_group = None  # the background checkpoint writer's process group (prepare)

    # --- setup -------------------------------------------------------------
    def prepare(self, trainer, max_steps):
        model = self.setup_model(trainer.model)
        build = getattr(trainer, "_sharded_build", None)
        if build is not None and build.kind == "fsdp" and is_skeleton(model):
            # model_init's model, built as a meta skeleton (strategies/build.py): allocate this rank's
            # shards only, read slice by slice from the pretrained files, or filled from rank 0's reference build
            offload = _true(self.config.get("cpu_offload")) or _true(self.config.get("offload_params"))
            device = torch.device("cpu") if offload else self.device
            if build.source is not None:
                build.loaded = load_fsdp_shards(model, build.source, device)
            else:
                fill_fsdp(model, build.reference, device)
            build.reference = None
        # after sharding: the optimizer must hold the sharded (DTensor) parameters
        trainer.create_optimizer()
        if trainer.args.save_in_background:  # also on Ray workers, whose other saves are written in the foreground
            # every rank, in the same order: the writer thread's DCP collectives get a gloo group of their own
            self._writer_group = dist.new_group(backend="gloo")
        return model

    def setup_model(self, model):
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        check_wrap_policy(model, self.config)
        if _true(self.config.get("activation_checkpointing")) and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        kwargs = {"reshard_after_forward": _true(self.config.get("reshard_after_forward", True))}
        if _true(self.config.get("cpu_offload")) or _true(self.config.get("offload_params")):
            kwargs["offload_policy"] = CPUOffloadPolicy()
        if self.mixed_precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if str(self.config.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")).upper() != "NO_WRAP":
            names, _ = layer_classes_to_wrap(model, self.config)
            for module in list(model.modules()):
                if type(module).__name__ in names:
                    fully_shard(module, **kwargs)
        fully_shard(model, **kwargs)
        return model

    def unwrap(self, model):
        return model  # fully_shard changes the module in place: it is the bare model too

    # --- step ----------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self, model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def clip_grad_norm(self, model, optimizer, max_norm):
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
        return _full(norm)

    # --- checkpoint ------------------------------------------------------------
    def full_state_dict(self, model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if dist.get_rank() == 0 else None

    def optimizer_state(self, optimizer):
        return None  # in optim_dcp/, sharded

    def full_weights_in_checkpoints(self):
        return "FULL" in str(self.config.get("state_dict_type", "SHARDED_STATE_DICT")).upper()

    def sharded_state(self, model, optimizer):
        return _live_state(model, optimizer) if self._writer_group is not None else None

    def write_sharded(self, state, folder, group=None):
        """DCP's collective save; the writer's thread uses its own group, the loop (save_sharded) the default one."""
        import torch.distributed.checkpoint as dcp

        group = group or self._writer_group
        dcp.save({"model": state["model"]}, checkpoint_id=os.path.join(folder, MODEL_DIR), process_group=group)
        if "optimizer" in state:  # not with save_only_model (optimizer=None)
            dcp.save({"optimizer": state["optimizer"]}, checkpoint_id=os.path.join(folder, OPTIMIZER_DIR),
                     process_group=group)

    def save_sharded(self, model, optimizer, folder, step):
        self.write_sharded(_live_state(model, optimizer), folder, group=dist.group.WORLD)

    def load_checkpoint(self, trainer, folder):
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model, optimizer = trainer.model_wrapped, trainer.optimizer
        if not os.path.isdir(os.path.join(folder, OPTIMIZER_DIR)):
            if os.path.isdir(os.path.join(folder, MODEL_DIR)):  # save_only_model: the weights' shards only
                self._load_model_shards(model, folder)
            # a checkpoint without sharded state (DDP's, transformers'): transformers' train() loaded the
            # weights, unless the model was built shard by shard (then they are loaded into the shards here)
            elif getattr(trainer, "_sharded_build", None) is not None:
                load_full_weights_fsdp(model, folder)
            return Strategy.load_checkpoint(self, trainer, folder)
        options = _options(model)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        # DCP reads each tensor's slices from whichever files hold them: any worker count loads it. Its own
        # reader and planner unpickle freely; these read only DCP's classes and weights-only byte items
        safe_dcp_load({"model": model_state}, os.path.join(folder, MODEL_DIR))
        safe_dcp_load({"optimizer": optim_state}, os.path.join(folder, OPTIMIZER_DIR))
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options)
        load_scheduler(trainer, folder)

    def best_read_by_every_rank(self):
        return not self.full_weights_in_checkpoints()

    def load_best_weights(self, trainer, folder):
        if self.best_read_by_every_rank():  # each rank reads its slices of the best checkpoint's shards
            self._load_model_shards(trainer.model_wrapped, folder)
        else:
            load_full_weights_fsdp(trainer.model_wrapped, folder)  # rank 0 reads, the shards are filled from it

    @staticmethod
    def _load_model_shards(model, folder):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        options = _options(model)
        model_state = get_model_state_dict(model, options=options)
        safe_dcp_load({"model": model_state}, os.path.join(folder, MODEL_DIR))
        set_model_state_dict(model, model_state, options=options)


def _live_state(model, optimizer) -> dict:
    """This rank's shards of the weights and the optimizer state (views of the live tensors)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:  # save_only_model
        return {"model": get_model_state_dict(model, options=_options(model))}
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(model))
    return {"model": model_state, "optimizer": optim_state}


def _options(model):
    """Frozen parameters (a PEFT model's base) are left out of the sharded state: the model rebuilds them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def _full(norm):
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _true(value) -> bool:
    return str(value).lower() in ("true", "1", "yes") if not isinstance(value, bool) else value
