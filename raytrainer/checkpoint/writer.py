"""Writes a checkpoint snapshot to `tmp-checkpoint-N` and renames it to `checkpoint-N`.

The loop takes a Snapshot of every state and hands it to the writer. With `background=True` one
thread writes snapshots in order; it first copies the live parameters and optimizer state (its
`copy_fn`), which the loop does not change before its next optimizer step, where it calls
`wait_copied()`. So the loop blocks for neither the copy nor the write. `wait()` joins
outstanding writes: the loop calls it before anything reads checkpoints (rotation, load best,
resume, end of training). A sharded strategy's shards go the same way (`sharded_state`, staged by the
copy, written by a collective on every rank's writer thread), also on Ray workers, whose other saves are
written in the foreground.

The temporary folder is named after its process (leftovers.py): a failed write removes it, and a later
run removes a dead run's. A complete folder is fsynced to the last directory entry and put in place
without deleting an older save of the same step first (durable.py). A full disk is one OSError(ENOSPC)
naming the folder and the space it needs.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from . import leftovers
from .durable import DiskFullError, disk_full_error, folder_bytes, fsync_tree, is_disk_full, put_in_place
from .layout import TMP_PREFIX, latest_checkpoint

OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
SCALER = "scaler.pt"
TRAINING_ARGS = "training_args.bin"
TRAINER_STATE = "trainer_state.json"


def to_cpu(tree):
    """Deep CPU copy of every tensor in a nested structure (a snapshot the loop may keep training on)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


@dataclass
class Snapshot:
    final_dir: str
    model_state: dict | None = None           # rank 0 only; None on other ranks
    model_aliases: dict | None = None         # {key: key it shares its tensor with} (tied weights)
    save_model_fn: Callable[[str, dict], None] | None = None  # writes weights + config (save_pretrained)
    optimizer_state: dict | None = None
    scheduler_state: dict | None = None
    scaler_state: dict | None = None
    rng_state: dict | None = None
    rng_file: str = "rng_state.pth"
    trainer_state_json: str | None = None
    training_args: Any = None
    extra_files: dict[str, Any] = field(default_factory=dict)  # name -> picklable object (torch.save)
    after: Callable[[str], None] | None = None  # called with final_dir once renamed
    tmp_dir: str | None = None  # already holds files (the trainer's own save_model wrote the weights there)
    # fills in copies of live tensors; run by the writer thread before anything is written
    copy_fn: Callable[["Snapshot"], None] | None = None
    copied: threading.Event = field(default_factory=threading.Event)
    # a sharded strategy's live state (strategy.sharded_state), staged by copy_fn, then written by this
    # collective function on every rank's writer thread
    sharded_state: dict | None = None
    write_sharded_fn: Callable[[dict, str], None] | None = None
    wait_fns: list = field(default_factory=list)  # block until an engine's own background write is complete
    background: bool | None = None  # None: the writer's setting


class CheckpointWriter:
    def __init__(self, background: bool = True):
        self.background = background
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: tuple[BaseException, str] | None = None  # a background write's, with its checkpoint
        self.blocked_s = 0.0   # time the loop spent in save() (snapshot copy + any synchronous write)
        self.write_s = 0.0     # time spent writing files
        self.copy_s = 0.0      # time the writer's thread spent copying live tensors before writing
        self.written: list[str] = []
        self._last_copy: threading.Event | None = None
        self._tmp_count = 0
        self._prepared: list[tuple[str, str]] = []  # (final, tmp) made for the save the loop is preparing

    # ------------------------------------------------------------------ API
    def save(self, snap: Snapshot) -> None:
        self._raise_pending()
        self._prepared = []  # the snapshot owns its folders now (a failed write removes them)
        if not self.in_background(snap):
            self.wait()  # in order: a queued snapshot first
            self._write(snap)
            return
        self._last_copy = snap.copied
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="raytrainer-checkpoint-writer", daemon=True)
            self._thread.start()
        self._queue.put(snap)

    def in_background(self, snap: Snapshot) -> bool:
        return self.background if snap.background is None else snap.background

    def tmp_dir_for(self, final_dir: str) -> str:
        """A fresh, empty temporary folder next to final_dir (renamed to it once complete), for the save the
        loop is preparing: failed() removes it should that save break before it reaches save()."""
        tmp = self._new_tmp(final_dir)
        self._prepared.append((final_dir, tmp))
        return tmp

    def _new_tmp(self, final_dir: str) -> str:
        parent, name = os.path.split(os.path.normpath(final_dir))
        os.makedirs(parent, exist_ok=True)
        leftovers.remove_leftovers(parent, TMP_PREFIX + "-", once=True)  # a dead run's partial folders
        # unique per save: the same step may be saved twice (a save step that also ends an epoch)
        self._tmp_count += 1
        tmp = os.path.join(parent, f"{TMP_PREFIX}-{name.rsplit('-', 1)[-1]}-{leftovers.owner_tag()}-{self._tmp_count}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        return leftovers.hold(tmp)

    def failed(self, error: BaseException) -> BaseException:
        """The save being prepared on the loop's thread failed before it reached save(): remove the temporary
        folders tmp_dir_for gave it, and name a full disk. Returns the error to raise."""
        prepared, self._prepared = self._prepared, []
        if not prepared:
            return error
        final_dir = getattr(error, "checkpoint_dir", None) or prepared[-1][0]
        if self._thread is not None:
            self._queue.join()  # an earlier write still running may be what filled the disk: its error first
        if self._error is not None:  # an earlier background write failed first (this save then found the disk full)
            (first, final_dir), self._error = self._error, None
            error.__context__ = first
        # a background write's error is about the checkpoint that write was for
        return self._failed(final_dir, [tmp for _, tmp in prepared], error)

    def _failed(self, final_dir: str, tmps: list[str], error: BaseException, snap: "Snapshot | None" = None):
        parent = os.path.dirname(os.path.normpath(final_dir))
        free = _free_bytes(parent)  # before the partial folder goes: what the failed write left
        written = 0
        for tmp in tmps:
            written = max(written, folder_bytes(tmp))
            leftovers.release(tmp)
        if any(isinstance(err, DiskFullError) for err in _chain(error)):
            return error  # named already (a background write's, raised again at this save)
        previous = latest_checkpoint(parent)
        needed = max(folder_bytes(previous) if previous else 0, written + _snapshot_bytes(snap))
        # torch.save's C++ writer loses ENOSPC ("unexpected pos ..."): a disk left with less than a MiB, and
        # less than the save still needed, counts as full too
        if not (is_disk_full(error) or free < min(1 << 20, max(needed - written, 1))):
            return error
        return disk_full_error(final_dir, needed, error)

    def raise_pending(self) -> None:
        """Re-raise a background write's error now, without waiting."""
        self._raise_pending()

    def wait_copied(self) -> None:
        """Block until the latest snapshot holds its own copies (call before tensors change again)."""
        pending = self._last_copy
        if pending is not None and not pending.is_set():
            t0 = time.perf_counter()
            pending.wait()
            self.blocked_s += time.perf_counter() - t0  # the loop waited for the snapshot after all
        self._raise_pending()

    def wait(self) -> None:
        """Block until every queued checkpoint is on disk; re-raise a write error here."""
        if self._thread is not None:
            self._queue.join()
        self._raise_pending()

    def close(self) -> None:
        self.wait()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------------ internals
    def _raise_pending(self) -> None:
        if self._error is not None:
            (err, final_dir), self._error = self._error, None
            error = RuntimeError(f"writing a checkpoint failed: {err}")
            error.checkpoint_dir = final_dir
            raise error from err

    def _run(self) -> None:
        while True:
            snap = self._queue.get()
            try:
                if snap is None:
                    return
                self._write(snap)
            except BaseException as e:  # surfaced on the loop's next save() or wait()
                if self._error is None:  # the first: a later queued write failing too must not hide it
                    self._error = (e, snap.final_dir)
            finally:
                self._queue.task_done()

    def _write(self, snap: Snapshot) -> None:
        t0 = time.perf_counter()
        try:
            if snap.copy_fn is not None:
                snap.copy_fn(snap)
        finally:  # set even on error, so the loop never waits forever; the error surfaces in wait()/save()
            snap.copied.set()
            self.copy_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        tmp = snap.tmp_dir
        try:
            tmp = tmp or self._new_tmp(snap.final_dir)
            self._write_files(snap, tmp)
            fsync_tree(tmp)  # files in every subfolder, then the folders' entries
            put_in_place(tmp, snap.final_dir)  # never deletes an older checkpoint-N before this one is there
            leftovers.release(tmp, remove=False)
        except BaseException as e:
            error = self._failed(snap.final_dir, [tmp] if tmp else [], e, snap)
            if error is e:
                raise
            raise error from e
        self.write_s += time.perf_counter() - t0
        self.written.append(snap.final_dir)
        if snap.after is not None:
            snap.after(snap.final_dir)

    @staticmethod
    def _write_files(snap: Snapshot, tmp: str) -> None:
        if snap.sharded_state is not None:
            snap.write_sharded_fn(snap.sharded_state, tmp)
            snap.sharded_state = None  # the staged copy is written: its memory goes now
        for wait in snap.wait_fns:
            wait()
        if snap.model_state is not None:
            if snap.save_model_fn is not None:
                snap.save_model_fn(tmp, snap.model_state)
            else:
                save_file(snap.model_state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if snap.optimizer_state is not None:
            torch.save(snap.optimizer_state, os.path.join(tmp, OPTIMIZER))
        if snap.scheduler_state is not None:
            torch.save(snap.scheduler_state, os.path.join(tmp, SCHEDULER))
        if snap.scaler_state is not None:
            torch.save(snap.scaler_state, os.path.join(tmp, SCALER))
        if snap.rng_state is not None:
            torch.save(snap.rng_state, os.path.join(tmp, snap.rng_file))
        for fname, obj in snap.extra_files.items():
            torch.save(obj, os.path.join(tmp, fname))
        if snap.training_args is not None:
            torch.save(snap.training_args, os.path.join(tmp, TRAINING_ARGS))
        if snap.trainer_state_json is not None:  # last: its presence marks a complete folder
            with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
                f.write(snap.trainer_state_json)


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _free_bytes(folder: str) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 1 << 62


def _snapshot_bytes(snap: "Snapshot | None") -> int:
    """Bytes of the tensors a snapshot still had to write (the space a save needs, roughly)."""
    total = 0
    stack = [getattr(snap, name, None) for name in ("model_state", "optimizer_state")] if snap is not None else []
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def state_to_json(state) -> str:
    """TrainerState as transformers writes it (save_to_json's format)."""
    import dataclasses

    return json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n"
