"""Ray Train's own files in the run folder: removed once a fit has ended (issue 18).

With no storage_path the run folder is output_dir, and users and tools that list it expect what
transformers leaves there: the checkpoint-<step> folders. Ray Train adds a storage probe and its list of
reported checkpoints; the list only serves a restart inside the same fit (raytrainer drops it before the
next fit anyway: checkpoint/retention.forget_earlier_fit), so neither is of use after fit() returned.
"""

from __future__ import annotations

try:
    from ray.train.v2._internal.constants import (CHECKPOINT_MANAGER_SNAPSHOT_FILENAME,
                                                  VALIDATE_STORAGE_MARKER_FILENAME)
except ImportError:  # Ray moved its internals: the names Ray 2.60 writes
    CHECKPOINT_MANAGER_SNAPSHOT_FILENAME = "checkpoint_manager_snapshot.json"
    VALIDATE_STORAGE_MARKER_FILENAME = ".validate_storage_marker"

RAY_FILES = (VALIDATE_STORAGE_MARKER_FILENAME, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)


def remove_ray_files(fs, run_dir: str) -> None:
    """Delete Ray's files from the run folder (any pyarrow filesystem); a missing one is fine."""
    import pyarrow.fs as pafs

    for name in RAY_FILES:
        path = f"{run_dir}/{name}"
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)


def remove_eval_run_folder(fs, run_dir: str) -> None:
    """evaluate()/predict() on workers run as their own Ray run in <output_dir>_evaluate / _predict: once it
    has ended, Ray's files go and so does the folder if nothing else is in it (the result came back in memory)."""
    import pyarrow.fs as pafs

    remove_ray_files(fs, run_dir)
    if fs.get_file_info(run_dir).type == pafs.FileType.Directory and not fs.get_file_info(
            pafs.FileSelector(run_dir, recursive=True)):
        fs.delete_dir(run_dir)
