"""A faster and quieter first Trainer() in every process (driver, in-process runs, each Ray worker).

accelerate's `extract_model_from_parallel`, called by every transformers `Trainer()`, runs
`from deepspeed import DeepSpeedEngine` whenever DeepSpeed is installed: ~1.2 s, as DeepSpeed imports its
autotuner, which imports mlflow. A model can be a DeepSpeedEngine only once deepspeed has been imported,
so until then the check is skipped; strategy="deepspeed" imports it before any engine exists.

(Measured and dropped: importing torch/transformers in a thread from a Ray worker's first moment, via a
`worker_process_setup_hook`. On 2 cores the imports compete with Ray Train's own worker set-up and the
first step came no earlier.)
"""

from __future__ import annotations

import importlib.util
import os
import sys


def skip_unused_deepspeed_import() -> None:
    import accelerate.utils.other as other

    check = other.is_deepspeed_available
    if getattr(check, "_raytrainer", False):
        return

    def deepspeed_in_use() -> bool:
        return "deepspeed" in sys.modules and check()

    deepspeed_in_use._raytrainer = True
    other.is_deepspeed_available = deepspeed_in_use


def name_the_cpu_for_deepspeed() -> None:
    """accelerate imports DeepSpeed in every Trainer() when it is installed, and DeepSpeed then logs
    "Setting accelerator to CPU. If you have GPU ... we were unable to detect it." in every process
    (driver and each worker). On a machine with no accelerator, say so up front: no warning."""
    if "DS_ACCELERATOR" in os.environ or importlib.util.find_spec("deepspeed") is None:
        return
    import torch

    others = ("torch_npu", "intel_extension_for_pytorch", "habana_frameworks")
    if torch.cuda.is_available() or torch.backends.mps.is_available() or \
            (hasattr(torch, "xpu") and torch.xpu.is_available()) or \
            any(importlib.util.find_spec(name) is not None for name in others):
        return
    os.environ["DS_ACCELERATOR"] = "cpu"
