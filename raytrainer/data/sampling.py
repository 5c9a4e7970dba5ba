"""Exact, O(1)-resumable, sharded batch sampling for map-style datasets.

The order of an epoch is a function of (seed, epoch) only: `torch.randperm(n)` from a generator
seeded with `seed + epoch`, which is the order accelerate's SeedableRandomSampler gives
transformers.Trainer. Each global batch of `batch_size * world_size` indices is cut into
contiguous per-rank slices, so N workers see exactly the samples one worker sees with an N times
larger batch. Resuming at batch k slices the permutation at k: nothing before it is iterated.

Because the order does not depend on the batch size, a position in samples ("the first s samples
of epoch e's order are trained") is a valid resume point for any batch size: checkpoints record it
(`trained`), and a resume with another global batch starts at that sample (loop.py).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(n, generator=generator)


class DataPosition:
    """A data position in samples, shared by ResumableBatchSampler and a Ray Data shard's loader (ray_data.py).

    The class provides global_batch_size, num_samples (per epoch, all ranks), __len__ (batches per
    epoch) and `order`, naming how an epoch's samples are ordered (a resume continues only in the same
    order); `trained` is the position a checkpoint records.
    """

    trained: dict | None = None

    def samples_before(self, batch: int) -> int:
        """How far into the epoch's order the global batches before `batch` reach."""
        return min(batch * self.global_batch_size, self.num_samples)

    def mark_trained(self, epoch: int, batches: int) -> None:
        """The loop has stepped the optimizer on the first `batches` batches of `epoch` (the DataLoader may
        have fetched more: prefetching), so a checkpoint taken now resumes after them."""
        if batches >= len(self):
            epoch, batches = epoch + 1, 0  # a finished epoch is the next one's start, whatever the batch
        self.trained = {"epoch": epoch, "samples": self.samples_before(batches), "num_samples": self.num_samples,
                        "order": self.order}


class ResumableBatchSampler(Sampler[list[int]], DataPosition):
    """Yields this rank's index batches for one epoch, starting at `start_batch`."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = False):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0
        self.order = "permutation"  # of (seed, epoch): the same for any batch size and worker count

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch
        self.mark_trained(epoch, start_batch)

    def __len__(self) -> int:
        """Batches per epoch: the same on every rank, so no rank waits on a collective alone."""
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return math.ceil(self.num_samples / self.global_batch_size)

    def __iter__(self):
        order = epoch_permutation(self.num_samples, self.seed, self.epoch, self.shuffle)
        g = self.global_batch_size
        for b in range(self.start_batch, len(self)):
            chunk = order[b * g:(b + 1) * g]
            if len(chunk) < self.world_size:
                # fewer samples than ranks: wrap around so every rank gets one (DistributedSampler's padding)
                chunk = torch.cat([chunk, order[: self.world_size - len(chunk)]])
            # a short last batch is split as evenly as possible; the loss is normalised by the global
            # item count, so uneven slices still give the one-worker gradient
            yield chunk.tensor_split(self.world_size)[self.rank].tolist()
