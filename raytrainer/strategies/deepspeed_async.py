"""DeepSpeed checkpoints written in the background: a checkpoint engine that stages and writes in threads.

`engine.save_checkpoint` stays a collective in the foreground (DeepSpeed's barriers, tag check and folder
creation need every rank at once); what it hands its checkpoint engine (`save(state_dict, path)`: the module
states, and each rank's optimizer partition, live tensors) goes to two threads of this process instead of
`torch.save`:

* the stager copies every tensor to the CPU (non-tensors are deep-copied at once, in `save`). The optimizer
  partitions change only in `engine.step()`: DeepSpeedStrategy.optimizer_step calls `wait_staged()` first, so
  the loop goes on through the next forward/backward while the copy is made, as the writer's own copies do;
* the writer `torch.save`s the copies and fsyncs each file, in order. `take_wait()` gives the checkpoint
  writer a function that blocks until the files of the last save_checkpoint are durably written (it calls it
  before it puts the folder in place), and raises a write's error.

Why not DeepSpeed 0.19's own engines (docs/deepspeed-checkpoints.md has the measurements):
`DecoupledCheckpointEngine` ("checkpoint": {"writer": {"decoupled": true}}) writes from a spawned process
fed live tensors through a queue, and so commits (waits for the write, then a `dist.barrier`) at the next
`engine.step()`: a write longer than one forward/backward blocks the loop, its commit is a collective that a
background thread cannot join, and it needs the launcher's CROSS_RANK / CROSS_SIZE / LOCAL_SIZE variables,
which Ray does not set. The "fast" writer needs DeepNVMe's compiled async_io op, and DataStates an extra
package. A user config that names a writer or DataStates keeps it, written in the foreground.
"""

from __future__ import annotations

import copy
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class StagedCheckpointEngine:
    """DeepSpeed's CheckpointEngine interface (create / save / load / commit / makedirs), in the background."""

    def __init__(self, inner):
        self.inner = inner  # the engine's own (TorchCheckpointEngine): loading and folders stay its
        self.name = "raytrainer.StagedCheckpointEngine"
        self._stager = ThreadPoolExecutor(1, thread_name_prefix="raytrainer-ds-stage")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="raytrainer-ds-write")
        self._staged: list[Future] = []
        self._written: list[Future] = []
        self.stage_wait_s = 0.0  # the loop's time in wait_staged (benchmarks/sharded_checkpoint.py counts it)

    # --- DeepSpeed's interface -------------------------------------------------
    def create(self, info):
        return self.inner.create(info)

    def makedirs(self, path, exist_ok=False):
        return self.inner.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict, path: str):
        tensors = _tensors(state_dict)
        # the containers and other objects now (a config dict, counters), the tensors shared until staged
        shell = copy.deepcopy(state_dict, memo={id(t): t for t in tensors})
        staged = self._stager.submit(_stage, shell)
        self._staged.append(staged)
        self._written.append(self._writer.submit(_write, staged, path))

    def load(self, path: str, map_location=None):
        return self.inner.load(path, map_location=map_location)

    def commit(self, info):
        return True  # the files are complete when take_wait()'s function returns

    def is_data_parallel_writer(self, dp_rank):
        return self.inner.is_data_parallel_writer(dp_rank)

    def is_decoupled(self):
        return False  # DeepSpeed writes `latest` at once; the folder is not in place before the files are

    def preserves_storage_sharing(self):
        return self.inner.preserves_storage_sharing()

    def get_commit_info(self):
        return None

    def set_commit_info(self, info):
        pass

    def cleanup(self):
        self.wait_staged()
        for future in self._written:
            future.result()

    # --- raytrainer's ----------------------------------------------------------
    def wait_staged(self) -> None:
        """Block until every tensor handed to save() is copied (before anything changes them: engine.step)."""
        staged, self._staged = self._staged, []
        t0 = time.perf_counter()
        for future in staged:
            future.result()
        self.stage_wait_s += time.perf_counter() - t0

    def take_wait(self):
        """A function that blocks until the files of the saves since the last call are written and fsynced
        (None when there were none)."""
        written, self._written = self._written, []
        if not written:
            return None

        def wait():
            for future in written:
                future.result()
        return wait


def _tensors(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _stage(obj):
    """`obj` with every tensor replaced by a CPU copy (the same copy for a tensor met twice)."""
    copies: dict[int, torch.Tensor] = {}

    def walk(value):
        if isinstance(value, torch.Tensor):
            if id(value) not in copies:
                copies[id(value)] = value.detach().to("cpu", copy=True)
            return copies[id(value)]
        if isinstance(value, dict):
            out = type(value)() if type(value) is not dict else {}
            for k, v in value.items():
                out[k] = walk(v)
            return out
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(walk(v) for v in value)
        return value

    return walk(obj)


def _write(staged: Future, path: str) -> None:
    state = staged.result()
    torch.save(state, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # durable before the checkpoint writer renames the folder into place


def install(engine) -> StagedCheckpointEngine | None:
    """Swap the engine's checkpoint engine for the staged one; None (unchanged) when the user's config chose
    another (a writer or DataStates)."""
    inner = engine.checkpoint_engine
    if type(inner).__name__ != "TorchCheckpointEngine":
        return None
    staged = StagedCheckpointEngine(inner)
    engine.checkpoint_engine = staged
    return staged
