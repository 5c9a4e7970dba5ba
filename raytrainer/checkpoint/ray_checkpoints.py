"""Checkpoints inside a Ray worker: where they are written, how they reach the run folder, which are rotated.

The Trainer's checkpoint hooks (save.py) hand each complete folder to `RayCheckpoints.complete`: it is
reported to Ray (in the background to remote storage, retried through an outage), on_save fires, and rank 0
rotates the run's own checkpoints (its lineage, never another run's).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import threading

from .. import storage
from ..event_stream import StreamToDriver
from ..redact import redact_text
from . import leftovers
from .layout import checkpoint_step
from .retention import checkpoints_to_delete
from .run_meta import load_run_meta
from .state_check import checkpoint_in_run
from .upload import UPLOAD_WAIT_MARGIN_S, upload_checkpoint, upload_wait_bound_s, with_retries

logger = logging.getLogger("raytrainer")


class RayCheckpoints:
    """What a Trainer inside a Ray worker does differently: where checkpoints go and how.

    Rank 0 writes checkpoint-<step>/ where transformers users look for it, `output_dir`, so that
    on_save callbacks (MLflow's artifact upload, a user's extra file) find it complete; then it is
    reported to Ray, which copies it to the run folder in storage, and the local copy goes. When
    the run folder *is* output_dir (no storage_path), the checkpoint is staged in a temporary
    folder, reported first (Ray cannot copy a folder onto itself), and on_save finds the persisted one.
    """

    def __init__(self, spec, args):
        import pyarrow.fs as pafs

        self.spec = spec
        self.args = args
        self.output_dir = os.path.abspath(args.output_dir)
        self.same_folder = isinstance(spec.storage_filesystem, pafs.LocalFileSystem) and \
            os.path.abspath(spec.run_dir) == self.output_dir
        self._temp_dirs: dict[str, str | None] = {}  # local temp folder -> the storage folder it copies
        self._tmp_root = self.temp_dir("ckpt")
        # remote storage (S3): uploads run in Ray's upload thread (ASYNC), retried through an outage while
        # training goes on; local storage keeps the synchronous report
        self.in_background = not isinstance(spec.storage_filesystem, pafs.LocalFileSystem)
        self._pending = 0  # background uploads not finished yet
        self._drained = threading.Condition()
        self.lineage = spec.fit_id  # the run this fit continues (worker_main sets it after choosing the resume)
        self._lineage_of: dict[str, str | None] = {}  # checkpoint in storage -> its run (read once each)

    def temp_dir(self, kind: str, origin: str | None = None) -> str:
        """A temp folder removed by release_temp_dirs (and, should this process die, by the next run)."""
        path = leftovers.temp_dir(kind)
        self._temp_dirs[path] = origin
        return path

    def release_temp_dirs(self) -> None:
        for path in list(self._temp_dirs):
            leftovers.release(path)
        self._temp_dirs.clear()

    def fetch_resume(self, path_in_storage: str) -> str:
        return self._download(path_in_storage, self.temp_dir("resume", path_in_storage))

    def _download(self, path_in_storage: str, into: str) -> str:
        local = os.path.join(into, os.path.basename(path_in_storage))
        storage.download_dir(self.spec.storage_filesystem, path_in_storage, local)
        return local

    def resume_origin(self, local: str) -> dict:
        """check_checkpoint_state's run folder for a downloaded checkpoint: its folder in storage."""
        import pyarrow.fs as pafs

        local = os.path.abspath(local)  # a download is <temp>/checkpoint-N, a restored one the temp folder itself
        origin = self._temp_dirs.get(local) or self._temp_dirs.get(os.path.dirname(local))
        if origin is None:
            return {}
        local_fs = isinstance(self.spec.storage_filesystem, pafs.LocalFileSystem)
        return {"run_dir": origin.rsplit("/", 1)[0], "local": local_fs}

    def best_in_run(self, best: str | None) -> bool:
        """`best` (best_model_checkpoint, a restored checkpoint) names a checkpoint-<step> folder directly in this
        run's folder (never another run's or bucket's)."""
        import pyarrow.fs as pafs

        return checkpoint_in_run(best, self.spec.run_dir,
                                 local=isinstance(self.spec.storage_filesystem, pafs.LocalFileSystem))

    def staging_dir(self, rank: int) -> str:
        return self.output_dir if rank == 0 and not self.same_folder else self._tmp_root

    def checkpoint_path(self, step: int) -> str:
        """The persisted folder of checkpoint-<step> inside the storage filesystem."""
        return f"{self.spec.run_dir}/checkpoint-{step}"

    def complete(self, trainer, pending) -> None:
        """A checkpoint folder is written on this rank: report it, fire on_save, rotate (rank 0)."""
        import torch.distributed as dist

        after = self._after_persist(trainer, pending) if dist.get_rank() == 0 else (lambda: None)
        if self.same_folder:
            self._report(pending, lambda: None)
            trainer._fire_on_save(pending)
            after()
        else:
            trainer._fire_on_save(pending)
            self._report(pending, after)

    def _after_persist(self, trainer, pending):
        """Rank 0, once the checkpoint is in storage: tell the driver (PBT), rotate old checkpoints."""
        stream = next((c for c in trainer.callback_handler.callbacks if isinstance(c, StreamToDriver)), None)
        # a copy: with a background upload, training moves on before this runs
        state = copy.deepcopy(pending.state or trainer.state)
        best = trainer.state.best_model_checkpoint
        path = f"{self.spec.run_dir}/{os.path.basename(pending.final_dir)}"

        def after():
            if stream is not None:  # a PBT trial may hand it to Tune
                stream.checkpoint_persisted(state, path)
            if self.args.save_total_limit:
                if self.in_background:
                    with_retries(lambda: self._rotate(best), "rotation of old checkpoints", self.spec.run_dir)
                else:
                    self._rotate(best)
        return after

    def _report(self, pending, after) -> None:
        import ray.train

        local_dir = pending.final_dir
        name = os.path.basename(local_dir)
        # the values at the save: a background write is reported some steps later
        metrics = {k: v for k, v in pending.metrics.items() if isinstance(v, (int, float, str, bool))}
        checkpoint = ray.train.Checkpoint.from_directory(local_dir)
        # every rank reports the same number of times (Ray's report is a barrier)
        if not self.in_background:
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
            shutil.rmtree(local_dir, ignore_errors=True)
            after()
            return
        from ray.train import CheckpointUploadMode

        with self._drained:
            self._pending += 1
        # Ray registers the checkpoint once every rank's upload function returned, in report order
        # (one upload thread per worker)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                         checkpoint_upload_fn=self._upload_fn(after),
                         delete_local_checkpoint_after_upload=False)  # the upload function does

    def _upload_fn(self, after):
        import ray.train
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()

        def upload(checkpoint, dir_name):
            try:
                ctx = ray.train.get_context().get_storage()
                dest = ctx.build_checkpoint_path_from_name(dir_name)
                upload_checkpoint(checkpoint.path, ctx.storage_filesystem, dest, rank, world)
                shutil.rmtree(checkpoint.path, ignore_errors=True)
                after()
                return ray.train.Checkpoint(dest, filesystem=ctx.storage_filesystem)
            finally:
                with self._drained:
                    self._pending -= 1
                    self._drained.notify_all()
        return upload

    def wait_for_uploads(self) -> None:
        """Until every background upload is done; bounded: an upload hung past its retries stops the run."""
        bound = upload_wait_bound_s()
        with self._drained:
            if not self._drained.wait_for(lambda: self._pending == 0, timeout=bound):
                raise TimeoutError(
                    f"raytrainer: {self._pending} checkpoint upload(s) to {redact_text(self.spec.run_dir)} not finished "
                    f"after {bound:g} s (RAYTRAINER_STORAGE_RETRY_S + {UPLOAD_WAIT_MARGIN_S:g} s); the run stops here; "
                    "the newest checkpoint complete in storage resumes it (resume_from_checkpoint=True).")

    def _checkpoints_in_storage(self) -> dict[int, str]:
        """This run's checkpoints in the run folder: another run's (an earlier fresh train() there) are never
        rotated away; a checkpoint whose run file is not readable yet (being uploaded) is left alone."""
        steps = {}
        for name in storage.list_dirs(self.spec.storage_filesystem, self.spec.run_dir):
            step = checkpoint_step(name)
            path = f"{self.spec.run_dir}/{name}"
            if step is not None and self._run_of(path) == self.lineage:
                steps[step] = path
        return steps

    def _run_of(self, path: str) -> str | None:
        if path not in self._lineage_of:
            try:
                meta = load_run_meta(path, self.spec.storage_filesystem)
            except Exception:  # noqa: BLE001 - partial, foreign or crafted (weights-only refused): not ours to delete
                return None
            if meta is None:
                return None
            self._lineage_of[path] = meta.get("lineage") or meta.get("fit_id")
        return self._lineage_of[path]

    def _rotate(self, best_in_storage: str | None) -> None:
        for path in checkpoints_to_delete(self._checkpoints_in_storage(), self.args.save_total_limit, best_in_storage):
            storage.delete_dir(self.spec.storage_filesystem, path)

    def after_training(self, trainer) -> None:
        """transformers' end of train(): with save_total_limit=1 only the best checkpoint stays."""
        self.wait_for_uploads()  # every checkpoint in storage and rotated first
        best = trainer.state.best_model_checkpoint
        if self.args.save_total_limit == 1 and best is not None and not self.best_in_run(best):
            logger.warning("raytrainer: best_model_checkpoint=%r is not a checkpoint of this run's folder %s: "
                           "save_total_limit=1 deletes none of its checkpoints", best, self.spec.run_dir)
        elif self.args.save_total_limit == 1 and best is not None:
            for path in self._checkpoints_in_storage().values():
                if path != best:
                    storage.delete_dir(self.spec.storage_filesystem, path)

    def fetch(self, path_in_storage: str) -> str:
        """A checkpoint of this run (load_best_model_at_end) as a local copy; the caller removes its folder."""
        if not self.best_in_run(path_in_storage):
            raise ValueError(f"best_model_checkpoint={path_in_storage!r} is not a checkpoint-<step> folder directly "
                             f"inside this run's folder {self.spec.run_dir!r}: not loaded. Resume from a checkpoint "
                             "whose trainer_state.json names one of its own run's checkpoints.")
        self.wait_for_uploads()  # e.g. the best checkpoint at the end may still be on its way
        return self._download(path_in_storage, self.temp_dir("best", path_in_storage))
