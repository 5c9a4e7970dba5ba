"""Checkpoints in transformers' folder layout, written atomically, optionally in the background."""

from .layout import TMP_PREFIX, checkpoint_step, complete_checkpoints, latest_checkpoint
from .writer import CheckpointWriter, Snapshot

__all__ = ["TMP_PREFIX", "checkpoint_step", "complete_checkpoints", "latest_checkpoint", "CheckpointWriter", "Snapshot"]
