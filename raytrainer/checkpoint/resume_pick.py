"""Which checkpoint `resume_from_checkpoint=True` continues: the newest checkpoint of the run that wrote last.

transformers takes the highest step in output_dir (`get_last_checkpoint`). A run folder may also hold an
earlier run's checkpoints: a fresh `train()` in the same folder starts another run (its own "lineage" in
raytrainer_run.pt, kept by every resume), and the earlier run's higher steps would win although the run
to continue is the one that wrote last. So:

* one run in the folder (or only checkpoints without a lineage: transformers', raytrainer's in-process
  ones): the highest step, exactly as transformers;
* several runs: the run whose newest checkpoint was completed last (its trainer_state.json, written last,
  has the newest modification time), then that run's highest step; one warning names the other runs'
  checkpoints, what transformers would have taken, and how to pick another.

Nothing here unpickles freely: raytrainer_run.pt is read weights-only, and a file that cannot be read
counts as a checkpoint without a lineage (the resume's own loaders refuse it, should it be chosen).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os

from .layout import TRAINER_STATE, checkpoint_step, complete_checkpoints
from .run_meta import RUN_META

logger = logging.getLogger("raytrainer")


@dataclasses.dataclass(frozen=True)
class Candidate:
    step: int
    path: str
    lineage: str | None  # None: no run file (transformers wrote it) or no lineage recorded (in-process)
    written: float | None  # trainer_state.json's modification time (seconds), None when unknown


def pick(candidates: list[Candidate], where: str) -> str | None:
    """The checkpoint to resume (see the module's docstring); `where` names the run folder in the warning."""
    if not candidates:
        return None
    runs: dict[str | None, list[Candidate]] = {}
    for c in candidates:
        runs.setdefault(c.lineage, []).append(c)
    highest = max(candidates, key=lambda c: c.step)
    if len(runs) == 1:
        return highest.path

    def last_written(run):  # ties and unknown times: the run with the highest step, as transformers
        times = [c.written for c in runs[run] if c.written is not None]
        return (max(times) if times else float("-inf"), max(c.step for c in runs[run]))

    chosen_run = max(runs, key=last_written)
    chosen = max(runs[chosen_run], key=lambda c: c.step)
    others = sorted((c for c in candidates if c.lineage != chosen_run), key=lambda c: c.step)
    logger.warning(
        "raytrainer: resume_from_checkpoint=True: %s holds checkpoints of %d runs; resuming %s, the newest checkpoint "
        "of the run that wrote last (run %s). Another run's checkpoints are left alone: %s%s. To resume one of them, "
        "pass its path as resume_from_checkpoint; give each run its own folder (run_name, output_dir).",
        where, len(runs), chosen.path, chosen_run or "without a lineage", ", ".join(os.path.basename(c.path)
                                                                                     for c in others),
        f" (transformers would take {os.path.basename(highest.path)}, the highest step)"
        if highest.path != chosen.path else "")
    return chosen.path


def _lineage(meta) -> str | None:
    if not isinstance(meta, dict):
        return None
    value = meta.get("lineage") or meta.get("fit_id")
    return value if isinstance(value, str) else None


def _read_meta(data: bytes):
    import torch

    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception:  # noqa: BLE001 - a crafted or partial file: no lineage; the resume's loader names it if chosen
        return None


def latest_in_folder(run_dir: str) -> str | None:
    """resume_from_checkpoint=True in a local folder (in-process runs; output_dir)."""
    found = []
    for path in complete_checkpoints(run_dir):
        meta_path = os.path.join(path, RUN_META)
        meta = None
        if os.path.isfile(meta_path):
            with open(meta_path, "rb") as f:
                meta = _read_meta(f.read())
        try:
            written = os.stat(os.path.join(path, TRAINER_STATE)).st_mtime
        except OSError:
            written = None
        found.append(Candidate(checkpoint_step(path), path, _lineage(meta), written))
    return pick(found, run_dir)


def latest_in_storage(fs, run_dir: str) -> str | None:
    """resume_from_checkpoint=True in a run folder of a pyarrow filesystem (Ray runs: local, S3): a checkpoint
    counts once its trainer_state.json, uploaded last, is there."""
    import pyarrow.fs as pafs

    from .. import storage

    found = []
    for name in storage.list_dirs(fs, run_dir):
        step = checkpoint_step(name)
        if step is None:
            continue
        path = f"{run_dir}/{name}"
        state, meta_info = fs.get_file_info([f"{path}/{TRAINER_STATE}", f"{path}/{RUN_META}"])
        if state.type != pafs.FileType.File:
            continue
        meta = None
        if meta_info.type == pafs.FileType.File:
            with fs.open_input_stream(meta_info.path) as f:
                meta = _read_meta(f.read())
        written = state.mtime.timestamp() if state.mtime is not None else None
        found.append(Candidate(step, path, _lineage(meta), written))
    return pick(found, run_dir)
