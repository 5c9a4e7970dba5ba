"""Data for the per-worker loop: resumable sharded sampling of map-style datasets."""

from .sampling import ResumableBatchSampler, epoch_permutation

__all__ = ["ResumableBatchSampler", "epoch_permutation"]
