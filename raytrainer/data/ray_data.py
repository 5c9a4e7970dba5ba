"""Ray Data on the workers: each worker streams its shard from `ray.train.get_dataset_shard`.

Ray Train splits a dataset given to TorchTrainer(datasets=...) with `streaming_split(equal=True)`:
every shard has rows // world_size rows. raytrainer runs it with `preserve_order=True`, under which
the split deals blocks in order to the worker with the fewest rows so far: each rank gets the same
rows in the same order every epoch (the data order is a function of the dataset alone), and a
resumed run skips exactly the batches the interrupted one had trained on. The driver counts the
rows once, so every worker knows its steps per epoch before streaming; all ranks run the same
number of steps and none hangs in a collective while another has ended its epoch. Epochs
therefore need no max_steps.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class RayShard:
    """Stands in for a ray.data.Dataset inside a worker's Trainer (train_dataset=RayShard(...))."""

    def __init__(self, name: str, total_rows: int, world_size: int):
        self.name = name
        self.rows_per_shard = total_rows // world_size

    def __len__(self) -> int:  # rows this worker trains on per epoch
        return self.rows_per_shard


class RayShardLoader:
    """A dataloader-like view of this worker's shard with a length, epochs and a start position."""

    def __init__(self, shard: RayShard, batch_size: int, columns: set[str] | None, drop_last: bool = False):
        self.shard = shard
        self.batch_size = batch_size
        self.columns = columns  # the inputs the model takes; other columns are dropped like remove_unused_columns
        self.drop_last = drop_last
        self.start_batch = 0

    def __len__(self) -> int:
        n = self.shard.rows_per_shard
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        # the shard streams the same rows in the same order every epoch: only the start moves
        self.start_batch = start_batch

    def __iter__(self):
        import ray.train

        it = ray.train.get_dataset_shard(self.shard.name)
        batches = it.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=self.drop_last)
        for index, batch in enumerate(batches):
            if index >= len(self):
                break  # never more steps than the other ranks
            if index < self.start_batch:
                continue  # a stream cannot seek: skipped batches are read, not trained on
            yield {k: _to_tensor(v) for k, v in batch.items() if self.columns is None or k in self.columns}


def _to_tensor(values):
    if isinstance(values, np.ndarray) and values.dtype != object:
        return torch.from_numpy(np.ascontiguousarray(values))
    return torch.as_tensor(np.stack(list(values)))
