"""TrainingArguments: transformers' fields, names and defaults, plus the Ray fields.

It subclasses `transformers.TrainingArguments`, so every name, type and default is the same
and `isinstance(args, transformers.TrainingArguments)` holds for existing callbacks. What we add:

* Ray fields (`num_workers`, `use_gpu`, `resources_per_worker`, `strategy`, `storage_path`,
  `storage_filesystem`, `max_failures`, `max_preemption_failures`, `save_in_background`).
* `validate()`: value checks, run at construction and again by `Trainer()` and `train()` (on the
  driver, before any Ray resource is taken); every error names the field and the fix.
* `check_supported()`: run by `train()`; a field the raytrainer loop does not honour (fields.py,
  REFUSED) set to a non-default value raises there, naming the fix, instead of being silently
  ignored. Construction accepts it, so one config can serve evaluation scripts too.
* transformers' own checks run unchanged, except the ones that describe the driver's hardware where
  the workers' is meant: bf16 (no bf16-capable GPU here), tf32 (no Ampere GPU here) and deepspeed
  (the package on the driver).
* Older names that the transformers docs still show (`logging_dir`, `warmup_ratio`,
  `evaluation_strategy`) are accepted and mapped onto the current fields.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

import transformers
from transformers.training_args import OptimizerNames
from transformers.utils import is_torch_tf32_available

from .elastic import normalise as normalise_workers
from .fields import REFUSED, REFUSED_ACCELERATOR_OPTIONS
from .added_checks import run_argument_checks
from .field_types import check_field_types
from .redact import redacted_errors

STRATEGIES = ("ddp", "fsdp", "deepspeed")
NONFINITE_STEPS = ("skip", "stop", "apply")
EVALUATE_ON = ("auto", "driver", "workers")
SCHEDULERS = tuple(s.value for s in transformers.SchedulerType)
OPTIMIZERS = tuple(o.value for o in OptimizerNames)


def _defaults_of(cls) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    # ---- older names still shown in the transformers docs ----
    logging_dir: str | None = field(default=None, metadata={"help": "TensorBoard log dir (older transformers name)."})
    warmup_ratio: float | None = field(default=None, metadata={"help": "Older name: warmup_steps as a ratio < 1."})
    evaluation_strategy: str | None = field(default=None, metadata={"help": "Older name of eval_strategy."})

    # ---- Ray fields ----
    num_workers: int = field(default=0, metadata={"help": "Ray Train workers; 0 runs the loop in this process; "
                                                          "(min, max): an elastic group (elastic.py)."})
    elastic_resize_monitor_interval_s: float = field(
        default=60.0, metadata={"help": "num_workers=(min, max): seconds between Ray's checks for a larger group."})
    use_gpu: bool = field(default=False, metadata={"help": "One GPU per Ray worker."})
    resources_per_worker: dict | None = field(default=None, metadata={"help": 'e.g. {"CPU": 2, "GPU": 1}'})
    strategy: str = field(default="ddp", metadata={"help": "ddp | fsdp | deepspeed"})
    storage_path: str | None = field(default=None, metadata={"help": "Local path or s3://bucket/prefix for checkpoints."})
    storage_filesystem: Any = field(default=None, metadata={"help": "An explicit pyarrow.fs.FileSystem."})
    max_failures: int = field(default=0, metadata={"help": "Worker-group restarts Ray may do; -1 for unlimited."})
    max_preemption_failures: int = field(
        default=-1, metadata={"help": "Restarts after a node preemption (a drained node: a spot instance's notice), "
                                      "counted apart from max_failures; -1 for unlimited (Ray's default)."}
    )
    save_in_background: bool = field(
        default=True, metadata={"help": "Write checkpoints in a background thread after an in-memory snapshot."}
    )
    nonfinite_steps: str = field(
        default="skip", metadata={"help": "A step whose gradient norm is NaN/inf: skip (no update, counted in the "
                                          "logs) | stop (FloatingPointError naming the step) | apply (transformers)."}
    )
    evaluate_on: str = field(
        default="auto", metadata={"help": "Where evaluate()/predict() run with num_workers >= 1: auto (this process "
                                          "after train() when it holds the trained model, else workers) | driver | "
                                          "workers (a worker group of num_workers shards the data)."}
    )

    def __post_init__(self):
        normalise_workers(self)  # num_workers=(min, max) -> an elastic WorkerRange
        check_field_types(self)  # a value of the wrong type or NaN is named here, not deep in transformers
        self._map_older_names()
        self._check_names()
        # The workers' hardware and packages decide these, not the driver's (which may be CPU-only):
        # tf32=True is hidden from the parent's "needs Ampere" check (the workers apply it), a
        # deepspeed config from the parent's processing: it would build transformers' DeepSpeed
        # plugin (accelerate's DeepSpeed state on the driver, `is_deepspeed_zero3_enabled()` turning
        # from_pretrained into zero.Init here) where strategies/deepspeed.py runs DeepSpeed on the
        # workers, with transformers' own config processing. bf16: see _validate_args.
        hidden = {}
        if self.tf32 and not is_torch_tf32_available():
            hidden["tf32"] = self.tf32
        if self.deepspeed:
            hidden["deepspeed"] = self.deepspeed
        for name in hidden:
            setattr(self, name, None)
        try:
            super().__post_init__()
        finally:
            for name, value in hidden.items():
                setattr(self, name, value)
        # transformers normalised fsdp / fsdp_config (fsdp="full_shard auto_wrap" -> fsdp=True and
        # fsdp_config["reshard_after_forward"]); its FSDP plugin arguments would make the driver's
        # Accelerator an FSDP one: strategies/fsdp.py reads fsdp_config on the workers instead
        self.fsdp_plugin_args = None
        self.validate()  # also sets mixed_precision from fp16/bf16

    def _validate_args(self):
        # transformers refuses bf16/bf16_full_eval unless *this* process has a bf16 GPU (or use_cpu):
        # the driver may be CPU-only while the workers have GPUs. Skip only that device check; every
        # other check of the parent (fp16 with bf16, fp16_full_eval with bf16_full_eval, ...) runs.
        use_cpu = self.use_cpu
        self.use_cpu = True
        try:
            super()._validate_args()
        finally:
            self.use_cpu = use_cpu

    # ------------------------------------------------------------------ helpers
    def _map_older_names(self) -> None:
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
            self.evaluation_strategy = None
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1); or set warmup_steps to a step count.")
            if self.warmup_ratio > 0:
                self.warmup_steps = self.warmup_ratio  # transformers >= 5 reads warmup_steps < 1 as a ratio
            self.warmup_ratio = None

    def _check_names(self) -> None:
        optim = str(_value(self.optim))
        if optim not in OPTIMIZERS:
            hint = difflib.get_close_matches(optim, OPTIMIZERS, n=1)
            raise ValueError(
                f"{optim} is not a valid OptimizerNames: optim={optim!r} is unknown; use one of {', '.join(OPTIMIZERS)}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + ", or pass optimizers=(optimizer, scheduler) / optimizer_cls_and_kwargs."
            )
        sched = str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type))
        if sched not in SCHEDULERS:
            hint = difflib.get_close_matches(sched, SCHEDULERS, n=1)
            raise ValueError(
                f"{sched} is not a valid SchedulerType: lr_scheduler_type={sched!r} is unknown; "
                f"use one of {', '.join(SCHEDULERS)}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        if self.nonfinite_steps not in NONFINITE_STEPS:
            raise ValueError(f"nonfinite_steps={self.nonfinite_steps!r} is unknown; use one of {', '.join(NONFINITE_STEPS)}.")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}.")
        if self.evaluate_on not in EVALUATE_ON:
            raise ValueError(f"evaluate_on={self.evaluate_on!r} is unknown; use one of {', '.join(EVALUATE_ON)}.")

    def _sync_after_mutation(self) -> None:
        # transformers 5 reads activation_checkpointing*; gradient_checkpointing* are its older mirrors
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            mirrored = self.__dict__.get(f"_mirrored_{old}", getattr(self, new))
            if getattr(self, old) != mirrored:  # the older name was set after construction
                object.__setattr__(self, new, getattr(self, old))
            object.__setattr__(self, f"_mirrored_{old}", getattr(self, new))
            object.__setattr__(self, old, getattr(self, new))
        self.mixed_precision = "fp16" if self.fp16 else "bf16" if self.bf16 else "no"

    # ------------------------------------------------------------------ validation
    @redacted_errors()  # a storage_path with key:secret@ is not echoed as is
    def validate(self) -> "TrainingArguments":
        """Check every value the loop relies on; raise ValueError naming the field and the fix.

        Also re-derives what __post_init__ derived, so fields changed after construction (the docs
        show `args.fp16 = True`, `args.gradient_checkpointing = True`) take effect.
        """
        normalise_workers(self)
        check_field_types(self)  # fields set after construction, e.g. from a YAML file
        self._sync_after_mutation()
        self._check_names()
        if self.storage_path and self.run_name is not None:
            check_folder_name("run_name", self.run_name, "the run's folder under storage_path")
        # transformers' fields: refused only where transformers fails too, else one warning (added_checks.py)
        run_argument_checks(self)
        # ---- Ray fields ----
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers!r} must be an int >= 0 (0 = run in this process).")
        if self.max_failures is None or self.max_failures < -1:
            raise ValueError(f"max_failures={self.max_failures!r} must be >= 0, or -1 for unlimited restarts.")
        if self.max_preemption_failures is None or self.max_preemption_failures < -1:
            raise ValueError(f"max_preemption_failures={self.max_preemption_failures!r} must be >= 0, or -1 for "
                             "unlimited restarts after a node preemption.")
        if self.resources_per_worker is not None:
            if not isinstance(self.resources_per_worker, dict) or any(
                not isinstance(v, (int, float)) or v < 0 for v in self.resources_per_worker.values()
            ):
                raise ValueError(
                    f"resources_per_worker={self.resources_per_worker!r} must be a dict of non-negative numbers, "
                    'e.g. {"CPU": 2, "GPU": 1}.'
                )
        self._check_strategy()
        if self.storage_path is not None and not isinstance(self.storage_path, str):
            raise ValueError(f"storage_path={self.storage_path!r} must be a string: a local path or s3://bucket/prefix.")
        if self.storage_path and "://" in self.storage_path and not self.storage_path.startswith(("s3://", "file://")) and self.storage_filesystem is None:
            raise ValueError(
                f"storage_path={self.storage_path!r}: only local paths and s3:// URIs are built in; pass "
                "storage_filesystem=<pyarrow.fs.FileSystem> for other schemes."
            )
        return self

    def _check_strategy(self) -> None:
        """transformers' fsdp= / deepspeed= fields select the strategy as transformers users write them."""
        if self.fsdp and self.deepspeed:
            raise ValueError("fsdp and deepspeed are both set: choose one (transformers refuses both too).")
        if self.fsdp:
            if self.strategy == "deepspeed":
                raise ValueError(f'strategy="deepspeed" with fsdp={self.fsdp!r}: set strategy="fsdp" or remove fsdp.')
            self.strategy = "fsdp"
        if self.deepspeed:
            if self.strategy == "fsdp":
                raise ValueError('strategy="fsdp" with deepspeed=...: set strategy="deepspeed" or remove deepspeed.')
            self.strategy = "deepspeed"
        if self.strategy == "deepspeed":
            if not self.deepspeed:
                raise ValueError('strategy="deepspeed" needs deepspeed= a ZeRO config dict or the path of a JSON file.')
            import importlib.util

            if importlib.util.find_spec("deepspeed") is None:
                raise ValueError('deepspeed=... needs the deepspeed package: DS_BUILD_OPS=0 pip install '
                                 '--no-build-isolation deepspeed (after torch), or pip install "raytrainer[deepspeed]".')
            from .strategies.deepspeed_config import deepspeed_config

            # "auto" filled as on the workers; a value contradicting these arguments raises here
            deepspeed_config(self, max(1, self.num_workers))
        if self.strategy == "fsdp":
            from .strategies.fsdp import check_wrap_policy

            check_wrap_policy(None, self.fsdp_config)

    # ------------------------------------------------------------------ refusals
    def check_supported(self) -> "TrainingArguments":
        """Raise a ValueError for each field the raytrainer loop does not honour that is set (fields.py).

        Run by `Trainer.train()`, not at construction: a config that sets such a field still serves
        `evaluate()`/`predict()`, which are transformers' own. Each line names the field and the fix.
        """
        problems = [
            f"{name}={_short_repr(value)} is not supported by raytrainer: {REFUSED[field_name]}."
            for field_name in REFUSED
            for name, value in self._refused_settings(field_name)
        ]
        if self.auto_find_batch_size and self.num_workers > 1:
            # an out-of-memory error on one rank would leave the others waiting in a collective
            problems.append(f"auto_find_batch_size=True with num_workers={self.num_workers} is not supported by "
                            "raytrainer: the workers cannot retry a smaller batch together; set "
                            "per_device_train_batch_size, or use num_workers <= 1.")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _refused_settings(self, name: str) -> list[tuple[str, Any]]:
        """[(shown name, value)] for a REFUSED field set away from its default; [] when it is not."""
        value = getattr(self, name, None)
        if name == "accelerator_config":
            if value is None:
                return []
            if isinstance(value, str):  # a JSON file, assigned after construction
                from transformers.trainer_pt_utils import AcceleratorConfig

                value = AcceleratorConfig.from_json_file(value)
            options = value if isinstance(value, dict) else vars(value)
            found = []
            for option, default in REFUSED_ACCELERATOR_OPTIONS.items():
                setting = options.get(option, default)
                if option == "gradient_accumulation_kwargs" and setting:
                    setting = {k: v for k, v in setting.items() if k != "num_steps"} or None
                if setting != default:
                    found.append((f"accelerator_config.{option}", setting))
            return found
        if name == "fsdp_config" and self._refused_settings("fsdp"):
            return []  # transformers filled it in from fsdp=..., which is named already
        default = _field_defaults().get(name)
        if default is None:
            unset = value is None or value is False or (isinstance(value, (str, list, dict)) and not value)
            return [] if unset else [(name, value)]
        return [] if value == default else [(name, value)]

    def __setattr__(self, name, value):
        # transformers' dataclass accepts any attribute silently; a typo such as
        # `args.datloader_pin_memory = True` would do nothing. Warn with the likely field.
        if not name.startswith("_") and name not in _KNOWN_NAMES and not hasattr(type(self), name) and \
                name not in type(self).__dataclass_fields__:  # a subclass's fields (ray_args(SFTConfig))
            import warnings

            hint = difflib.get_close_matches(name, _KNOWN_NAMES, n=1)
            warnings.warn(
                f"TrainingArguments has no field {name!r}; it is set but nothing reads it"
                + (f" (did you mean {hint[0]!r}?)" if hint else ""),
                stacklevel=2,
            )
        super().__setattr__(name, value)


_DEFAULTS: dict[str, Any] = {}


def _field_defaults() -> dict[str, Any]:
    if not _DEFAULTS:
        _DEFAULTS.update(_defaults_of(TrainingArguments))
    return _DEFAULTS


def _short_repr(value) -> str:
    text = repr(value)
    return text if "\n" not in text and len(text) <= 200 else f"{type(value).__name__}(...)"


def _value(x):
    return getattr(x, "value", x)


def check_folder_name(name: str, value, what: str) -> None:
    """A name that becomes one folder under a storage root must not lead out of it (`../x`, `a/b`, `/abs`)."""
    text = str(value)
    if not text.strip() or text in (".", "..") or any(sep in text for sep in ("/", "\\", "\x00")):
        raise ValueError(f"{name}={value!r} names {what}: use one folder name, without '/', '\\' or '..'.")


# Field names plus the attributes the parent's __post_init__ and properties set on itself.
_KNOWN_NAMES = {f.name for f in dataclasses.fields(TrainingArguments)} | {
    "mixed_precision", "distributed_state", "deepspeed_plugin", "hf_deepspeed_config", "fsdp_plugin_args",
    "_n_gpu", "_setup_devices",
}
