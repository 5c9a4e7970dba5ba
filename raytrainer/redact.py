"""What a saved TrainingArguments keeps: everything but credentials.

transformers writes `torch.save(self.args)` (training_args.bin) into every checkpoint and final model:
the pickle holds `hub_token` and, for raytrainer, `storage_filesystem` (a pyarrow S3FileSystem pickles
its access and secret keys). Checkpoints are copied to buckets and shared; the saved copy has
those fields set to None. The live arguments keep them.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import torch

CREDENTIAL_OBJECTS = ("storage_filesystem",)


def args_without_secrets(args):
    from .tracking.mlflow import is_secret_name

    clean = copy.copy(args)
    for f in dataclasses.fields(args):
        if f.name in CREDENTIAL_OBJECTS or (is_secret_name(f.name) and isinstance(getattr(args, f.name), str)):
            object.__setattr__(clean, f.name, None)
    return clean


def save_args_without_secrets(args, path: str) -> None:
    """Write (or overwrite) training_args.bin atomically with the redacted copy."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(args_without_secrets(args), tmp)
    os.replace(tmp, path)
