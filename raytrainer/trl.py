"""TRL's trainers and configs with raytrainer's Ray layer: `from raytrainer.trl import SFTTrainer, SFTConfig`.

Each class is TRL's own under `layer.on_ray` / `layer.ray_args` (see layer.py): TRL's constructor, its
dataset preparation, collators, reference model, metrics and messages, plus the Ray fields on the config
(`num_workers`, `storage_path`, `max_failures`, ...). Imported only here: trl is the optional extra
`raytrainer[trl]` (tested range TRL_SUPPORTED).

What holds (tests/test_trl.py, docs/trl.md): SFT, DPO and reward train on Ray workers with TRL's losses
and metrics, TRL's checkpoint layout, exact resume and worker-failure recovery. GRPO (transformers' generate)
on Ray workers matches TRL's own run on as many processes: each process samples with its own seed.
"""

from __future__ import annotations

import warnings
from importlib import metadata

from packaging.specifiers import SpecifierSet

try:
    import trl
except ImportError as e:  # pragma: no cover - the optional extra
    raise ImportError(f"{e}. raytrainer.trl needs TRL: pip install 'raytrainer[trl]' (or pip install 'trl>=1.16,<2').") from e

from .layer import on_ray, ray_args
from .trainer import Trainer

TRL_SUPPORTED = ">=1.16,<2"
if metadata.version("trl") not in SpecifierSet(TRL_SUPPORTED):  # pragma: no cover - depends on the install
    warnings.warn(f"raytrainer.trl is tested with trl{TRL_SUPPORTED}; trl {metadata.version('trl')} is installed.",
                  stacklevel=2)


def _named(cls: type, name: str) -> type:
    """Importable as raytrainer.trl.<name>: pickled by reference (Ray's spec, training_args.bin), not by value."""
    cls.__module__, cls.__qualname__ = __name__, name
    return cls


SFTConfig = _named(ray_args(trl.SFTConfig), "SFTConfig")
DPOConfig = _named(ray_args(trl.DPOConfig), "DPOConfig")
RewardConfig = _named(ray_args(trl.RewardConfig), "RewardConfig")
GRPOConfig = _named(ray_args(trl.GRPOConfig), "GRPOConfig")



class SFTTrainer(trl.SFTTrainer, Trainer):  # what on_ray(trl.SFTTrainer) builds, plus a method
    __doc__ = trl.SFTTrainer.__doc__

    def call_model_init(self, trial=None):
        """TRL's __init__ gives the model it was passed a fused LM head (compute_loss calls
        `model(..., fused_lm_head=True)`); a model built by model_init (hyperparameter_search: one per trial)
        gets the same head here."""
        from accelerate.utils import is_peft_model
        from trl.trainer.utils import add_fused_lm_head

        model = super().call_model_init(trial)
        base = model.get_base_model() if is_peft_model(model) else model
        if "forward" not in vars(base):  # not patched yet: the head replaces the instance's forward
            add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))
        return model




class DPOTrainer(trl.DPOTrainer, Trainer):  # what on_ray(trl.DPOTrainer) builds, plus a method
    __doc__ = trl.DPOTrainer.__doc__

    def _place_ref_model(self) -> None:
        """TRL's __init__ placed the reference model on the driver's device; on a worker (a GPU worker under a CPU
        driver) it goes where this worker's model is. Sharded strategies keep a full reference model per worker."""
        if self._in_worker and getattr(self, "ref_model", None) is not None:
            self.ref_model = self.ref_model.to(self.args.device)

    def train(self, *args, **kwargs):
        self._place_ref_model()
        return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        self._place_ref_model()
        return super().evaluate(*args, **kwargs)


RewardTrainer = _named(on_ray(trl.RewardTrainer), "RewardTrainer")

class GRPOTrainer(trl.GRPOTrainer, Trainer):  # what on_ray(trl.GRPOTrainer) builds, plus a method
    __doc__ = trl.GRPOTrainer.__doc__

    def _seed_this_process(self) -> None:
        """TRL's __init__ ends with `set_seed(seed, device_specific=True)`: each process its own seed (seed + rank),
        so that copies of a prompt that RepeatSampler puts on different processes (num_generations above
        per_device_train_batch_size) do not sample duplicate completions. __init__ ran on the driver only; a worker
        redoes that seeding before it trains (a resumed run then loads its rank's RNG state from the checkpoint, as
        transformers does). Measured without it: both workers held the same RNG state at every step, and the
        logged rewards left those of TRL's own 2-process run at step 2."""
        if self._in_worker and not getattr(self, "is_in_train", False):
            from accelerate.utils import set_seed

            set_seed(self.args.seed, device_specific=True)

    def train(self, *args, **kwargs):
        self._seed_this_process()
        return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        self._seed_this_process()  # evaluate() on the workers generates too; not mid-train (the RNG runs on)
        return super().evaluate(*args, **kwargs)


def eval_loss_objective(metrics: dict) -> float:
    """A sweep's objective for TRL's trainers: the evaluation loss. transformers' default objective sums the
    metrics other than the loss, which for TRL are eval_entropy, eval_mean_token_accuracy, eval_num_tokens (SFT),
    eval_rewards/* (DPO), eval_accuracy, eval_margin (reward): no objective."""
    return metrics["eval_loss"]


__all__ = ["SFTTrainer", "SFTConfig", "DPOTrainer", "DPOConfig", "RewardTrainer", "RewardConfig", "GRPOTrainer",
           "GRPOConfig", "eval_loss_objective", "on_ray", "ray_args"]
