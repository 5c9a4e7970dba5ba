"""raytrainer_run.pt: who wrote a checkpoint (world size, global batch, data position, fit and lineage).

Written with every checkpoint (`run_meta`), read weights-only: by the driver when it plans a resume
(checkpoint/resume.py), by retention to rotate only its own run's checkpoints, and by the loop to place a
resume with another global batch at the checkpoint's sample (`resume_position`).
"""

from __future__ import annotations

import io
import logging
import os

import torch

from ..world import world_info

logger = logging.getLogger("raytrainer")
RUN_META = "raytrainer_run.pt"


def load_run_meta(checkpoint: str, fs=None) -> dict | None:
    """A checkpoint's RUN_META (a local folder, or a path in a pyarrow filesystem), None when it has none."""
    if fs is None:
        path = os.path.join(checkpoint, RUN_META)
        return torch.load(path, weights_only=True) if os.path.isfile(path) else None
    import pyarrow.fs as pafs

    path = f"{checkpoint}/{RUN_META}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return torch.load(io.BytesIO(f.read()), weights_only=True)


def global_batch_size(trainer) -> int:
    _, world = world_info()
    return trainer._train_batch_size * world * trainer.args.gradient_accumulation_steps


def run_meta(trainer, fit_id: str | None, lineage: str | None) -> dict:
    """This run's RUN_META: its world size and global batch, and its data position in samples when
    raytrainer's sampler placed the data (a resume with another global batch starts there)."""
    _, world = world_info()
    # lineage: the run a checkpoint belongs to, the first fit's id, kept by every resume (retention's scope)
    meta = {"world_size": world, "global_batch_size": global_batch_size(trainer), "fit_id": fit_id,
            "lineage": lineage or fit_id}
    loader = getattr(trainer.callback_handler, "train_dataloader", None)
    # our sampler inside a DataLoader, or a Ray Data shard's loader itself (loop.build_train_dataloader)
    trained = getattr(getattr(loader, "batch_sampler", loader), "trained", None)
    if trained is not None:
        meta["data_position"] = dict(trained)
    return meta


def resume_position(trainer, checkpoint_dir: str, sampler=None) -> dict | None:
    """None when the checkpoint's position in optimizer steps holds for this run (same global batch, or
    a checkpoint without RUN_META: transformers' rule). With another global batch: the checkpoint's
    data position in samples, where this run's sampler resumes (loop.py); when that position is
    unknown or this run's data cannot be placed at a sample, None too (transformers' global_step
    resume), with one warning that it is approximate."""
    meta = load_run_meta(checkpoint_dir)
    if meta is None:
        return None
    now = global_batch_size(trainer)
    if meta["global_batch_size"] == now:
        return None
    position = meta.get("data_position")
    order = position and position.get("order", "permutation")  # older checkpoints: the sampler's
    if position is None:
        why = ("it records no data position in samples (written by an older raytrainer, or its data came "
               "from a custom sampler / dataloader)")
    elif getattr(sampler, "order", None) is None:
        why = ("this run's training data cannot be placed at a sample (a subclass's get_train_dataloader / "
               "_get_train_sampler, or train_sampling_strategy='group_by_length')")
    elif order != sampler.order:
        why = other_order(order, sampler.order, meta["world_size"])
    elif position["num_samples"] != sampler.num_samples:
        why = (f"its epochs had {position['num_samples']} samples, this train_dataset has "
               f"{sampler.num_samples}")
    else:
        return position
    # transformers' behaviour, with one warning: global_step places the resume, batches are skipped
    if world_info()[0] == 0:
        logger.warning(
            "raytrainer: %s was trained with a global batch of %d (%d workers); this run's is %d, and the resume "
            "cannot continue at the checkpoint's sample: %s. Resuming by global_step as transformers does (it "
            "skips %d-sample batches of this run): the data position is approximate, some samples may be seen "
            "twice or skipped. Keep the global batch the same for an exact resume.",
            checkpoint_dir, meta["global_batch_size"], meta["world_size"], now, why, now)
    return None


def other_order(saved: str, now: str, saved_world: int) -> str:
    """Why a data position in one epoch order means nothing in another (see data/sampling.py)."""
    if saved.startswith("ray_data_split_") and now.startswith("ray_data_split_"):
        return (f"its Ray Dataset was split over {saved_world} workers and this run's over "
                f"{now.rsplit('_', 1)[1]}: the split deals other rows to each worker, so no sample of one run is "
                f"a place in the other (keep num_workers={saved_world}; another per-device batch or accumulation "
                "is fine)")
    kinds = {"permutation": "a map-style dataset"}
    return (f"its data was {kinds.get(saved, 'a Ray Dataset stream')} and this run's is "
            f"{kinds.get(now, 'a Ray Dataset stream')}: their epochs order the samples differently")
