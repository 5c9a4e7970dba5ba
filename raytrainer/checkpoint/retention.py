"""Which checkpoints to delete: transformers' rule (`rotate_checkpoints`), for any filesystem.

Keep the newest `save_total_limit` checkpoints, and never delete the most recent one or the best
one (so with a limit of 1 and an earlier best, two remain). transformers applies this to local
folders; raytrainer applies it in-process with transformers' own function and, under Ray, to the
run folder in storage (local or S3) with this one: Ray's own num_to_keep keeps the newest only.
tests/test_retention.py checks both agree.
"""

from __future__ import annotations


def checkpoints_to_delete(paths_by_step: dict[int, str], save_total_limit: int | None,
                          best_model_checkpoint: str | None) -> list[str]:
    if save_total_limit is None or save_total_limit <= 0 or len(paths_by_step) <= save_total_limit:
        return []
    ordered = [paths_by_step[s] for s in sorted(paths_by_step)]
    protected = {ordered[-1]}
    if best_model_checkpoint is not None:
        protected.add(best_model_checkpoint.rstrip("/"))
    keep = max(save_total_limit, len(protected))
    remaining = len(ordered)
    doomed = []
    for path in ordered:
        if remaining <= keep:
            break
        if path not in protected:
            doomed.append(path)
            remaining -= 1
    return doomed


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the run folder's checkpoints


def forget_earlier_fit(fs, run_dir: str) -> None:
    """Before a new fit in a run folder (its lease held): drop Ray's snapshot of the earlier fit.

    Ray Train refuses to start in a folder whose snapshot names a checkpoint that is gone
    (CheckpointManagerInitializationError), and our retention deletes checkpoints behind Ray's back.
    raytrainer resumes from its own checkpoints; Ray's restore only serves a restart inside one fit.
    """
    import pyarrow.fs as pafs

    path = f"{run_dir}/{RAY_SNAPSHOT}"
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)
