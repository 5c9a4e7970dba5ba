"""The dependency versions raytrainer is tested with, and a one-time warning outside them.

SUPPORTED is the source of truth; pyproject.toml's [project] dependencies declare the same ranges
(tests/test_versions.py checks that they agree). Why each lower bound (see README "Tests"):

* transformers >=5.23: `TrainingArguments.activation_checkpointing` (first in 5.23.0; args.py mirrors
  gradient_checkpointing onto it). Also needed, from older releases: `Trainer.loss_is_scaled_for_ga`
  (5.19), `Trainer._init_training_state` / `_finalize_training` (5.3), `trainer_utils.rotate_checkpoints`
  (5.2), `warmup_steps < 1` as a ratio and `get_batch_samples(..., device)` returning num_items (5.0).
* accelerate >=1.3: transformers 5.23's own Trainer calls Accelerator.unwrap_model(keep_torch_compile=...),
  new in accelerate 1.3.0 (transformers declares >=1.1.0, but 1.1/1.2 fail); raytrainer does not import it.
* torch >=2.13: the release tested (2.6, transformers 5.23's own floor, has no CPU wheel here); <=2.14.1 caps it.
* ray >=2.60: the Ray Train V2 APIs used (ray.train.report(checkpoint_dir_name=...), get_checkpoint,
  DataConfig preserve_order, TorchTrainer) are only tested on 2.60.

This module must not import transformers (or torch, ray): raytrainer/__init__.py calls
check_versions() first, so a transformers 4.x install gets the warning before its ImportError.
"""

from __future__ import annotations

import warnings
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# distribution name -> (lower bound, upper bound), as in pyproject.toml
SUPPORTED: dict[str, tuple[str, str]] = {
    "torch": (">=2.13", "<=2.14.1"),
    "transformers": (">=5.23", "<6"),
    "accelerate": (">=1.3", "<2"),
    "ray": (">=2.60", "<3"),
}


class UnsupportedVersionWarning(UserWarning):
    """An installed dependency is outside the range raytrainer is tested with."""


_warned = False


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def out_of_range() -> list[str]:
    """One line per installed package outside its SUPPORTED range (a missing package is not reported)."""
    lines = []
    for name, bounds in SUPPORTED.items():
        found = _installed_version(name)
        if found is None:
            continue
        spec = ",".join(bounds)
        try:
            # local labels (2.13.0+cpu) compare by their public version; a pre-release inside the range is fine
            ok = Version(found) in SpecifierSet(spec, prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            lines.append(f"raytrainer is tested with {name} {spec}; found {found}: pip install '{name}{spec}'")
    return lines


def check_versions() -> list[str]:
    """Warn once per process (one UnsupportedVersionWarning, one line per package) when a version is outside."""
    global _warned
    if _warned:
        return []
    _warned = True
    lines = out_of_range()
    if lines:
        warnings.warn("\n".join(lines), UnsupportedVersionWarning, stacklevel=3)
    return lines
