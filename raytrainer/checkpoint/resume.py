"""`resume_from_checkpoint`, decided once on the driver: which checkpoint, and whether this run can load it.

`plan_resume` turns train()'s argument into a `spec.ResumePlan` (or None for a fresh start):

* `True`: the newest complete checkpoint of the run folder (output_dir in-process; the run's storage folder
  on Ray), else transformers' "No valid checkpoint found in output directory";
* a path: a local folder (transformers' "Can't find a valid checkpoint at" when it is none), or a storage URI
  such as `s3://bucket/run/checkpoint-8` (on Ray);
* then, in order: its trainer_state.json (each value against transformers' field; best_model_checkpoint
  inside its run), a Ray Dataset run's worker count, the strategy's sharded state (ZeRO partitions), and its
  run metadata read once.

The plan crosses to the workers in the RunSpec; a worker only downloads it and checks the bytes are the
ones checked here (`trainer_state`). The one decision a worker makes is Ray's own: after a worker died,
Ray hands back this fit's newest checkpoint, and that one wins (worker.py).
"""

from __future__ import annotations

import os
import posixpath

from ..spec import ResumePlan
from ..strategies import check_resume
from .layout import TRAINER_STATE
from .resume_pick import latest_in_folder, latest_in_storage
from .run_meta import load_run_meta, other_order
from .state_check import check_trainer_state_text


def plan_resume(args, resume_from_checkpoint, *, fs=None, run_dir=None, run_label=None,
                ray_datasets=False) -> ResumePlan | None:
    """The resume train() asked for. In-process: `fs` None. On Ray: the run's storage filesystem, its run
    folder and its label for messages (`<storage_path>/<name>`, redacted)."""
    from .. import storage
    resume = resume_from_checkpoint
    if resume is None or resume is False:
        return None
    in_storage = False
    if resume is True:
        if fs is None:
            resume = latest_in_folder(args.output_dir)  # the newest of the run that wrote last (resume_pick.py)
            where = args.output_dir
        else:
            resume, in_storage, where = latest_checkpoint_in(fs, run_dir), True, run_label
        if resume is None:
            # transformers' words first: scripts and tests match on them
            raise ValueError(
                f"No valid checkpoint found in output directory ({where}): resume_from_checkpoint=True found no "
                "complete checkpoint-<step> folder there; train without resuming first, or pass the path of a "
                "checkpoint-<step> folder.")
    elif fs is not None and "://" in resume:  # e.g. s3://bucket/run/checkpoint-8
        _, resume = storage.resolve_storage(resume, args.storage_filesystem)
        in_storage = True
    elif not os.path.isdir(resume):
        # transformers' own message (its _load_from_checkpoint), so code that matches on it keeps working
        raise ValueError(f"Can't find a valid checkpoint at {resume}")
    checked = []
    text = _read_state(fs if in_storage else None, resume)
    if text is not None:
        where = f"{resume}/{TRAINER_STATE}"
        if in_storage:
            import pyarrow.fs as pafs

            check_trainer_state_text(text, where, posixpath.dirname(resume.rstrip("/")),
                                     isinstance(fs, pafs.LocalFileSystem))
        else:
            check_trainer_state_text(text, where, os.path.dirname(os.path.abspath(resume)))
        checked.append("trainer_state")
    elif in_storage:
        raise ValueError(f"{resume}: no {TRAINER_STATE}, so not a complete checkpoint; resume from another one.")
    meta = load_run_meta(resume, fs if in_storage else None)
    if ray_datasets:
        check_stream_resume(resume, meta, args.num_workers)
        checked.append("ray_data_split")
    if fs is not None:
        check_resume(args, resume, fs if in_storage else None)  # e.g. ZeRO state of another worker count
        checked.append("sharded_state")
    return ResumePlan(checkpoint=resume, in_storage=in_storage, run_meta=meta, trainer_state=text,
                      checked=tuple(checked))


def check_download(plan: ResumePlan, local: str) -> None:
    """A worker's copy of the planned checkpoint holds the trainer_state.json the driver checked."""
    if _read_state(None, local) != plan.trainer_state:
        raise ValueError(f"{plan.checkpoint}: its {TRAINER_STATE} changed between the driver's check and this "
                         "worker's download (another writer in the run folder?); resume again.")


def latest_checkpoint_in(fs, run_dir: str) -> str | None:
    """The newest complete checkpoint-<step> folder of the run that wrote last, in a storage filesystem."""
    return latest_in_storage(fs, run_dir)


def check_stream_resume(checkpoint: str, meta: dict | None, num_workers: int) -> None:
    """A checkpoint of a Ray Dataset run resumes only on as many workers (run_meta.resume_position covers
    the other cases, on the workers)."""
    if meta is None:
        return
    saved = (meta.get("data_position") or {}).get("order", "")
    now = f"ray_data_split_{num_workers}"
    if saved.startswith("ray_data_split_") and saved != now:
        raise ValueError(f"{checkpoint} cannot resume with num_workers={num_workers}: "
                         + other_order(saved, now, meta["world_size"]) + ".")


def _read_state(fs, checkpoint: str) -> str | None:
    if fs is None:
        path = os.path.join(checkpoint, TRAINER_STATE)
        if not os.path.isfile(path):
            return None  # absent: transformers' own message when the loop loads it
        with open(path, encoding="utf-8") as f:
            return f.read()
    path = f"{checkpoint}/{TRAINER_STATE}"
    if fs.get_file_info(path).type.name != "File":
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8", errors="replace")
