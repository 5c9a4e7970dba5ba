"""Every field of `raytrainer.TrainingArguments`: honoured, or refused with the fix.

HONOURED[name]: how the field takes effect under raytrainer (one short line). Most take effect
through transformers' own code, which raytrainer reuses: `Trainer` subclasses `transformers.Trainer`,
its `train()` runs transformers' `train()` (in this process, or on each Ray worker) and only replaces
the inner loop (loop.py); evaluate/predict/log/save decisions and callbacks are transformers'.

REFUSED[name]: the fix, for a field the raytrainer loop does not honour. Setting it to a non-default
value is accepted by `TrainingArguments(...)` (a config shared with evaluation scripts keeps working);
`TrainingArguments.check_supported()`, run by `Trainer.train()`, raises a ValueError naming the field
and this fix. `accelerator_config` is refused only for the sub-options listed in
`REFUSED_ACCELERATOR_OPTIONS` set away from their defaults.

tests/test_fields.py checks that every dataclass field is in exactly one of the two dicts, and that
the README's table (scripts/fields_table.py) is generated from them.
"""

from __future__ import annotations

# descriptions shared by several fields (the README table groups fields with the same line)
_OPTIMIZER = "transformers' `create_optimizer` (every `optim` name; run by loop.py)"
_SCHEDULER = "transformers' `create_scheduler` (run by loop.py)"
_SAMPLER = "loop.py: raytrainer's resumable sharded sampler"
_LOOP = "loop.py, as transformers' inner loop"
_BEFORE_LOOP = "transformers' `train()`, before the loop (in-process and on each Ray worker)"
_COMPILE = "loop.py: `torch.compile(model, backend=..., mode=...)`"
_FLOW = "transformers' `DefaultFlowCallback` (the loop fires every callback event)"
_LOG_LEVEL = "transformers' `Trainer()`: log level per process (each Ray worker builds one)"
_CALLBACKS = "transformers' callbacks: progress bar and reporting integrations"
_EVAL = "transformers' evaluate/predict (`evaluation_loop`)"
_BEST = "transformers' best-metric tracking; checkpoint/save.py loads the best checkpoint (from Ray storage too)"
_HUB = "transformers' hub code (`init_hf_repo`, `_push_from_checkpoint`, `push_to_hub`)"
_DATALOADER = "loop.py: the training DataLoader (evaluation: transformers' own)"
_COLUMNS = "transformers' column removal and label handling (loop.py calls it)"
_DDP = "strategies/ddp.py: `DistributedDataParallel` arguments"
_TORCH_CONFIG = "Ray `TorchConfig(backend, timeout_s)`: the worker group's process group"
_SCRIPT = "for your script, as in transformers: `Trainer` reads none of them (Ray Train assigns ranks)"
_SCALING = "Ray `ScalingConfig`"
_STORAGE = "Ray `RunConfig(storage_path, storage_filesystem)`; storage.py checks them first"

HONOURED: dict[str, str] = {
    # ---- duration, batch, optimizer, schedule ----
    "output_dir": "checkpoints and `save_model` (checkpoint/save.py); the Ray run folder when storage_path is unset",
    "per_device_train_batch_size": _SAMPLER,
    "num_train_epochs": _LOOP,
    "max_steps": _LOOP,
    "learning_rate": _OPTIMIZER,
    "lr_scheduler_type": _SCHEDULER,
    "lr_scheduler_kwargs": _SCHEDULER,
    "warmup_steps": _SCHEDULER,
    "optim": _OPTIMIZER,
    "optim_args": _OPTIMIZER,
    "weight_decay": _OPTIMIZER,
    "adam_beta1": _OPTIMIZER,
    "adam_beta2": _OPTIMIZER,
    "adam_epsilon": _OPTIMIZER,
    "optim_target_modules": _OPTIMIZER,
    "gradient_accumulation_steps": _LOOP,
    "average_tokens_across_devices": "transformers' `get_batch_samples` and `compute_loss`, over the Ray worker group",
    "max_grad_norm": _LOOP,
    "label_smoothing_factor": "transformers' `compute_loss` (label smoother)",
    # ---- precision, memory, compilation ----
    "bf16": "step_hooks.py: autocast in the training process (the driver's device is not checked)",
    "fp16": "step_hooks.py: autocast; strategies/: the GradScaler",
    "bf16_full_eval": _EVAL,
    "fp16_full_eval": _EVAL,
    "tf32": "loop.py: transformers' `enable_tf32` in the training process (the driver's GPU is not checked)",
    "activation_checkpointing": _BEFORE_LOOP,
    "activation_checkpointing_kwargs": _BEFORE_LOOP,
    "gradient_checkpointing": _BEFORE_LOOP,
    "gradient_checkpointing_kwargs": _BEFORE_LOOP,
    "torch_compile": _COMPILE,
    "torch_compile_backend": _COMPILE,
    "torch_compile_mode": _COMPILE,
    "use_liger_kernel": _BEFORE_LOOP,
    "liger_kernel_config": _BEFORE_LOOP,
    "use_cache": "transformers' `Trainer()`: `model.config.use_cache`",
    "neftune_noise_alpha": _BEFORE_LOOP,
    "torch_empty_cache_steps": "loop.py: empties the device cache every N steps, as transformers' `training_step`",
    "auto_find_batch_size": "transformers' `find_executable_batch_size` around the loop (num_workers <= 1)",
    # ---- logging ----
    "logging_strategy": _FLOW,
    "logging_steps": _FLOW,
    "logging_first_step": _FLOW,
    "log_on_each_node": _LOG_LEVEL,
    "logging_nan_inf_filter": _LOOP,
    "include_num_input_tokens_seen": "loop.py: transformers' `_track_num_input_tokens` on each batch",
    "log_level": _LOG_LEVEL,
    "log_level_replica": _LOG_LEVEL,
    "disable_tqdm": _CALLBACKS,
    "report_to": _CALLBACKS,
    "run_name": "reporting integrations; the run folder's name under storage_path",
    "project": _CALLBACKS,
    "trackio_space_id": _CALLBACKS,
    "trackio_bucket_id": _CALLBACKS,
    "trackio_static_space_id": _CALLBACKS,
    # ---- evaluation ----
    "eval_strategy": _FLOW,
    "eval_steps": _FLOW,
    "eval_delay": _FLOW,
    "per_device_eval_batch_size": _EVAL,
    "prediction_loss_only": _EVAL,
    "eval_on_start": _LOOP,
    "eval_do_concat_batches": _EVAL,
    "eval_use_gather_object": _EVAL,
    "eval_accumulation_steps": _EVAL,
    "include_for_metrics": _EVAL,
    "batch_eval_metrics": _EVAL,
    # ---- checkpoints ----
    "save_only_model": "checkpoint/save.py: checkpoints without optimizer, scheduler and RNG state",
    "save_strategy": _FLOW,
    "save_steps": _FLOW,
    "save_on_each_node": "transformers' `should_save`; on Ray every node reads checkpoints from storage_path",
    "save_total_limit": "checkpoint rotation with transformers' rule (checkpoint/save.py; on Ray, rank 0 in storage)",
    "push_to_hub": _HUB,
    "hub_token": _HUB,
    "hub_private_repo": _HUB,
    "hub_model_id": _HUB,
    "hub_strategy": _HUB,
    "hub_always_push": _HUB,
    "hub_revision": _HUB,
    "load_best_model_at_end": _BEST,
    "metric_for_best_model": _BEST,
    "greater_is_better": _BEST,
    "ignore_data_skip": _LOOP,
    "restore_callback_states_from_checkpoint": "transformers' `_init_training_state` (called by loop.py)",
    # ---- reproducibility, devices ----
    "full_determinism": "transformers' `enable_full_determinism` in `Trainer()` and `train()`, on each worker",
    "seed": "transformers' `set_seed` in `Trainer()` and `train()`; the sampler's order (loop.py)",
    "data_seed": _SAMPLER,
    "use_cpu": "transformers' device setup; Ray workers without a GPU run on CPU",
    # ---- data ----
    "dataloader_drop_last": _SAMPLER,
    "dataloader_num_workers": _DATALOADER,
    "dataloader_pin_memory": _DATALOADER,
    "dataloader_persistent_workers": _DATALOADER,
    "dataloader_prefetch_factor": _DATALOADER,
    "dataloader_multiprocessing_context": _DATALOADER,
    "remove_unused_columns": _COLUMNS,
    "label_names": _COLUMNS,
    "train_sampling_strategy": (
        "loop.py: random / sequential by raytrainer's sampler; group_by_length / batch_rebalance by transformers'"
    ),
    "length_column_name": "transformers' samplers for train_sampling_strategy group_by_length / batch_rebalance",
    # ---- distributed ----
    "ddp_find_unused_parameters": _DDP,
    "ddp_bucket_cap_mb": _DDP,
    "ddp_broadcast_buffers": _DDP,
    "ddp_static_graph": _DDP,
    "ddp_backend": _TORCH_CONFIG,
    "ddp_timeout": _TORCH_CONFIG,
    "fsdp": 'strategies/fsdp.py: FSDP2 (`fully_shard`) on the Ray workers; selects strategy="fsdp"',
    "fsdp_config": (
        "strategies/fsdp.py: transformer_layer_cls_to_wrap, reshard_after_forward, cpu_offload, "
        "activation_checkpointing, state_dict_type (SHARDED_STATE_DICT, the default: checkpoints hold DCP shards "
        "only; FULL_STATE_DICT: plus a consolidated model.safetensors)"
    ),
    "deepspeed": (
        'strategies/deepspeed.py: ZeRO 0-3 on the Ray workers, "auto" filled by transformers\' config processing; '
        'selects strategy="deepspeed"'
    ),
    # ---- debugging, metrics ----
    "debug": _BEFORE_LOOP,
    "skip_memory_metrics": "transformers' `TrainerMemoryTracker` in `train()` and `evaluate()`",
    # ---- read by scripts only ----
    "do_train": _SCRIPT,
    "do_eval": _SCRIPT,
    "do_predict": _SCRIPT,
    "resume_from_checkpoint": _SCRIPT,
    "local_rank": _SCRIPT,
    # ---- older names ----
    "logging_dir": "loop_trainer.py: the TensorBoard callback's folder (older transformers name)",
    "warmup_ratio": "args.py: mapped onto warmup_steps (older transformers name)",
    "evaluation_strategy": "args.py: mapped onto eval_strategy (older transformers name)",
    # ---- Ray fields ----
    "num_workers": "0: the loop runs in this process; >= 1: Ray `ScalingConfig(num_workers)`; (min, max): elastic.py",
    "elastic_resize_monitor_interval_s": "Ray `ScalingConfig(elastic_resize_monitor_interval_s)` (elastic.py)",
    "use_gpu": _SCALING,
    "resources_per_worker": _SCALING,
    "strategy": 'strategies/: "ddp", "fsdp" (FSDP2) or "deepspeed" (ZeRO); set by fsdp= / deepspeed= too',
    "storage_path": _STORAGE,
    "storage_filesystem": _STORAGE,
    "max_failures": "Ray `FailureConfig(max_failures)`: restarts resume from the latest checkpoint",
    "save_in_background": "checkpoint/writer.py: in-process checkpoints are written by a thread",
    "max_preemption_failures": "Ray `FailureConfig(max_preemption_failures)`: restarts after a node preemption",
    "enable_jit_checkpoint": ("in-process: transformers' SIGTERM handler saves checkpoint-<step> at the next step "
                              "boundary and stops; num_workers >= 1: Ray Train's preemption notice (a drained node, "
                              "`ray.train.get_preemption_info()`) saves checkpoint-<step> at the next optimizer step "
                              "and the restart resumes there (preemption.py)"),
    "evaluate_on": "trainer.py: evaluate/predict in this process after a Ray train() (auto), or on a worker group",
    "nonfinite_steps": "loop.py: a step with a NaN/inf gradient norm is skipped (counted), stops the run, or is applied",
}

# accelerator_config sub-options that raytrainer's own training sampler and loop replace: refused
# away from these defaults (transformers' AcceleratorConfig defaults). `num_steps` inside
# gradient_accumulation_kwargs is honoured (transformers maps it onto gradient_accumulation_steps);
# `use_configured_state` is consumed by transformers' device setup on the driver.
REFUSED_ACCELERATOR_OPTIONS: dict[str, object] = {
    "split_batches": False,
    "dispatch_batches": None,
    "even_batches": True,
    "use_seedable_sampler": True,
    "non_blocking": False,
    "gradient_accumulation_kwargs": None,
}

REFUSED: dict[str, str] = {
    "accelerator_config": (
        "raytrainer's sampler shards, orders and moves the training batches itself; keep split_batches, "
        "dispatch_batches, even_batches, use_seedable_sampler, non_blocking and gradient_accumulation_kwargs "
        "(other than num_steps) at their defaults"
    ),
    "parallelism_config": (
        'tensor/context/sequence parallelism is not in raytrainer yet: use strategy="ddp", "fsdp" or "deepspeed"'
    ),
    "dataloader_in_order": "training batches always come in order (exact resume relies on it); remove the setting",
}
