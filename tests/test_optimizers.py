"""Every transformers optim name builds in raytrainer exactly what it builds in transformers.

raytrainer refuses no optimizer name: `create_optimizer` is transformers' own. Where transformers
builds an optimizer, raytrainer builds the same class; where it raises (the package is missing, the
optimizer needs CUDA, XLA or NPU), raytrainer raises the same error. The `dev` extra installs the
optimizer packages that run on CPU (schedulefree, lomo-optim, grokadamw, torch-optimi); the others
(bitsandbytes, torchao, and galore-torch / apollo-torch, which need bitsandbytes) are not installed
here, and their names must fail exactly as in transformers.
"""

from __future__ import annotations

import importlib.util

import pytest
import transformers
from transformers.training_args import OptimizerNames

import raytrainer
from tests.helpers import cls_examples, make_args, tiny_bert, train_logs

NAMES = [o.value for o in OptimizerNames]

# transformers cannot build these on a CUDA-less torch, whatever is installed (or has a bug)
NEVER_ON_CPU = {
    "adamw_torch_xla": "torch_xla",
    "adamw_torch_npu_fused": "torch_npu",
    "adamw_anyprecision": "torchdistx",
    "adalomo": "CUDA",
    "galore_adafactor_layerwise": "transformers passes lr with relative_step=True",
}


def package_of(name: str) -> str | None:
    """The import name of the optional package an optim name needs (None: torch/transformers)."""
    if name.startswith("galore"):
        return "galore_torch"
    if name.startswith("apollo"):
        return "apollo_torch"
    if name in ("adamw_torch_4bit", "adamw_torch_8bit"):
        return "torchao"
    if "bnb" in name or "8bit" in name or "lion" in name or "paged" in name or "ademamix" in name:
        return "bitsandbytes"
    return {"lomo": "lomo_optim", "adalomo": "lomo_optim", "grokadamw": "grokadamw",
            "schedule_free_radam": "schedulefree", "schedule_free_adamw": "schedulefree",
            "schedule_free_sgd": "schedulefree", "stable_adamw": "optimi"}.get(name)


def importable(module: str | None) -> bool:
    if module is None:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def build(trainer_cls, args_cls, out_dir, name):
    """(optimizer class, None) or (None, the exception create_optimizer raised)."""
    extra = {"optim_target_modules": "all-linear"} if name.startswith(("galore", "apollo")) else {}
    args = args_cls(output_dir=str(out_dir), report_to="none", use_cpu=True, optim=name, **extra)
    trainer = trainer_cls(model=tiny_bert(), args=args)
    try:
        return type(trainer.create_optimizer()), None
    except Exception as e:  # noqa: BLE001 - compared with transformers' below
        return None, e


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_is_transformers_own(tmp_path, name):
    hf_cls, hf_error = build(transformers.Trainer, transformers.TrainingArguments, tmp_path / "hf", name)
    rt_cls, rt_error = build(raytrainer.Trainer, raytrainer.TrainingArguments, tmp_path / "rt", name)
    if hf_error is None:
        assert rt_error is None, f"transformers builds {hf_cls.__name__}; raytrainer raised {rt_error!r}"
        assert rt_cls is hf_cls
    else:
        assert rt_error is not None, f"transformers raised {hf_error!r}; raytrainer built {rt_cls}"
        assert type(rt_error) is type(hf_error) and str(rt_error) == str(hf_error)
    # and what transformers does here is what this machine's packages say it should do
    expected_to_build = name not in NEVER_ON_CPU and importable(package_of(name))
    assert (hf_error is None) == expected_to_build, (name, hf_error)


def test_dev_extra_optimizers_build():
    """The optimizer packages of the `dev` extra are installed, so their names build (not only fail alike)."""
    for module in ("schedulefree", "lomo_optim", "grokadamw", "optimi"):
        assert importable(module), f"{module} missing: pip install -e '.[dev]'"


# the optimizers of the `dev` extra, trained 3 steps in raytrainer's loop: the same losses as transformers'
TRAINED = ["schedule_free_adamw", "schedule_free_radam", "schedule_free_sgd", "grokadamw", "stable_adamw", "lomo"]


@pytest.mark.parametrize("name", TRAINED)
def test_dev_extra_optimizers_train_as_in_transformers(tmp_path, name):
    pytest.importorskip(package_of(name))
    losses = []
    for trainer_cls, args_cls in ((transformers.Trainer, transformers.TrainingArguments),
                                  (raytrainer.Trainer, raytrainer.TrainingArguments)):
        args = make_args(args_cls, tmp_path / trainer_cls.__module__, optim=name, max_steps=3)
        trainer = trainer_cls(model=tiny_bert(), args=args, train_dataset=cls_examples(32))
        trainer.train()
        losses.append([e["loss"] for e in train_logs(trainer)])
    assert len(losses[1]) == 3
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
