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
import sys

import numpy as np
import torch

from .sampling import DataPosition


class RayShard:
    """Stands in for a ray.data.Dataset inside a worker's Trainer (train_dataset=RayShard(...))."""

    def __init__(self, name: str, total_rows: int, world_size: int):
        self.name = name
        self.rows_per_shard = total_rows // world_size
        self.world_size = world_size

    def __len__(self) -> int:  # rows this worker trains on per epoch
        return self.rows_per_shard


class RayShardLoader(DataPosition):
    """A dataloader-like view of this worker's shard with a length, epochs and a start position."""

    def __init__(self, shard: RayShard, batch_size: int, columns: set[str] | None, drop_last: bool = False,
                 collate_fn=None):
        self.shard = shard
        self.batch_size = batch_size
        self.columns = columns  # the inputs the model takes; other columns are dropped like remove_unused_columns
        self.drop_last = drop_last
        # the Trainer's data_collator (padding, MLM masking...); None: the numpy columns become tensors as they are
        self.collate_fn = collate_fn
        self.start_batch = 0
        # a data position in samples, as ResumableBatchSampler keeps one: each rank streams the same rows in
        # the same order whatever its batch size, so a position holds for another per-device batch or
        # accumulation, but not for another worker count (the split deals other rows to each rank)
        self.world_size = shard.world_size
        self.order = f"ray_data_split_{shard.world_size}"

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def num_samples(self) -> int:
        return self.shard.rows_per_shard * self.world_size

    def __len__(self) -> int:
        n = self.shard.rows_per_shard
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        # the shard streams the same rows in the same order every epoch: only the start moves
        self.start_batch = start_batch
        self.mark_trained(epoch, start_batch)

    def __iter__(self):
        import ray.train

        it = ray.train.get_dataset_shard(self.shard.name)
        batches = it.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=self.drop_last)
        for index, batch in enumerate(batches):
            if index >= len(self):
                break  # never more steps than the other ranks
            if index < self.start_batch:
                continue  # a stream cannot seek: skipped batches are read, not trained on
            yield collate_numpy_batch(batch, self.columns, self.collate_fn)


def collate_numpy_batch(batch: dict, columns: set[str] | None = None, collate_fn=None) -> dict:
    """One Ray Data numpy batch (column -> array of rows) -> the model's inputs.

    Without a collator the columns are stacked into tensors. With one, the batch is cut into row dicts
    of plain Python values (what a `datasets.Dataset` yields) and the collator sees the same list of
    features transformers' DataLoader gives it, so variable-length rows are padded, MLM masks drawn...
    """
    batch = {k: v for k, v in batch.items() if columns is None or k in columns}
    if collate_fn is None:
        return {k: _to_tensor(v) for k, v in batch.items()}
    n = len(next(iter(batch.values()))) if batch else 0
    rows = [{k: _to_python(v[i]) for k, v in batch.items()} for i in range(n)]
    return collate_fn(rows)


def _to_python(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _to_tensor(values):
    if isinstance(values, np.ndarray) and values.dtype != object:
        return torch.from_numpy(np.ascontiguousarray(values))
    return torch.as_tensor(np.stack(list(values)))


def is_ray_dataset(obj) -> bool:
    """Is obj a ray.data.Dataset? Asked without importing Ray Data (~1 s): a Dataset exists only once it is."""
    data = sys.modules.get("ray.data")
    return data is not None and isinstance(obj, data.Dataset)
