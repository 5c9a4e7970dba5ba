"""The workers' side of a Ray run: build the user's Trainer from the RunSpec, run the loop, report.

How a worker builds the user's class without re-entering the driver's path (loop_trainer.rebuild, which
a Tune trial uses too): `cls.__new__(cls)`, the driver's user attributes set, then *our layer's*
`__init__` (loop_trainer.LoopTrainer: transformers' __init__ plus ours), never the subclass's own __init__
(its work, such as TRL's tokenisation or reference model, was done once on the driver and crossed in the
attributes), then the driver's callback list. The Trainer is marked `_in_worker`, so its train() runs the
loop only (trainer.py): the driver validated the arguments and planned the resume (spec.ResumePlan), and
this side downloads and loads it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import socket
import time

import torch

from . import storage
from .auto_batch import report_found
from .checkpoint.layout import FINAL_MODEL, TRAINER_STATE
from .checkpoint.ray_checkpoints import RayCheckpoints
from .checkpoint.resume import check_download
from .checkpoint.run_meta import load_run_meta
from .checkpoint.state_check import check_checkpoint_state
from .checkpoint.upload import with_retries
from .data.ray_data import RayShard
from .elastic import adapt_to_world
from .event_stream import StreamToDriver
from .log_filter import worker_logs
from .loop_trainer import rebuild
from .rank0_state import final_state
from .redact import state_without_secrets
from .spec import RunSpec
from .train_again import TrainAgain

logger = logging.getLogger("raytrainer")


# ====================================================================== worker
def worker_main(config):
    import torch.distributed as dist

    spec: RunSpec = config["spec"]
    worker_logs()  # one clean job log (log_filter.py)
    apply_tracking_env(spec.tracking_env)
    entered = time.time()
    trainer = build_worker_trainer(spec)
    rank = dist.get_rank()
    if rank == 0:
        logger.info("raytrainer: worker 0 entered the train function %.1f s after fit(); Trainer built in %.1f s",
                    entered - spec.submitted_at, time.time() - entered)
    trainer._fit_id = spec.fit_id
    try:  # every download and staging folder goes when the run ends or fails (leftovers.py)
        _train_on_worker(trainer, spec)
        trainer._ray.wait_for_uploads()  # this rank's background uploads still read its staging folder
    finally:
        trainer._ray.release_temp_dirs()
    dist.barrier()


def _train_on_worker(trainer, spec: RunSpec) -> None:
    import ray.train
    import torch.distributed as dist

    rank = dist.get_rank()
    resume = None
    restored = ray.train.get_checkpoint()
    if restored is not None and not trainer._ray.best_in_run(restored.path):
        # Ray's run state (a file in storage) named a folder outside this run: never downloaded or read
        logger.warning("raytrainer: Ray restored checkpoint %s, which is not a checkpoint-<step> folder directly "
                       "inside the run folder %s: ignored", restored.path, spec.run_dir)
        restored = None
    lineage = None
    if restored is not None:
        local = restored.to_directory(trainer._ray.temp_dir("restore", restored.path))
        # Ray also hands back an earlier fit's checkpoint from the same run folder; only a restart of
        # this fit (a worker died) resumes from it, as a fresh train() starts fresh in transformers.
        meta = load_run_meta(local)
        if meta is not None and meta.get("fit_id") == spec.fit_id:
            # this fit's own checkpoint, named by Ray's run state (a file in storage): checked as the driver
            # checks a plan, against its folder in storage
            check_checkpoint_state(local, **trainer._ray.resume_origin(local))
            resume, lineage = local, meta.get("lineage") or meta.get("fit_id")
    if resume is None and spec.resume is not None:  # the driver's plan: load it, nothing to decide
        plan = spec.resume
        resume = trainer._ray.fetch_resume(plan.checkpoint) if plan.in_storage else plan.checkpoint
        check_download(plan, resume)
        lineage = plan.lineage
    # a resume continues its checkpoint's run: retention then also rotates that run's earlier checkpoints.
    # A Tune trial is one run in its own folder, whatever it resumes from (a PBT donor's checkpoint too).
    trainer._lineage = (f"trial:{spec.name}" if spec.train_call[0] is not None else None) or lineage or spec.fit_id
    trainer._ray.lineage = trainer._lineage
    trial, ignore_keys_for_eval = spec.train_call
    while True:
        try:
            trainer.train(resume_from_checkpoint=resume, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval)
            break
        except TrainAgain as again:  # a PBT exploit in this worker group (tune/pbt_worker.py): same processes
            resume, trial = again.prepare(trainer)
    report_found(trainer)  # auto_find_batch_size: back to the driver with rank 0's final state

    final = os.path.join(trainer._ray.temp_dir("final"), FINAL_MODEL)
    # every rank: a sharded model (fsdp, deepspeed) gathers its full weights to rank 0, which writes them
    trainer.save_model(final)
    if rank != 0:
        shutil.rmtree(os.path.dirname(final), ignore_errors=True)
    if rank == 0:
        trainer._ray.after_training(trainer)
        state_without_secrets(trainer.state).save_to_json(os.path.join(final, TRAINER_STATE))
        _upload(spec, final, FINAL_MODEL)
        _send_final_state(spec, trainer)


def eval_worker_main(config):
    import torch.distributed as dist

    spec: RunSpec = config["spec"]
    worker_logs()  # one clean job log (log_filter.py)
    apply_tracking_env(spec.tracking_env)
    trainer = build_worker_trainer(spec)
    trainer.state = spec.driver_state
    method, dataset, ignore_keys, prefix = spec.eval_call
    if method == "evaluate":
        result = trainer.evaluate(eval_dataset=dataset, ignore_keys=ignore_keys, metric_key_prefix=prefix)
    else:
        result = trainer.predict(dataset, ignore_keys=ignore_keys, metric_key_prefix=prefix)
    if dist.get_rank() == 0:  # every rank holds the gathered result; one sends it
        import ray

        # through the object store, never through storage: nothing a bucket's writer could plant is unpickled
        ray.get(spec.events.put.remote(("eval_result", result, {})))
        _send_final_state(spec, trainer)
    dist.barrier()


def apply_tracking_env(env) -> None:
    if env:
        from .tracking.mlflow import apply_env

        apply_env(env)


def _send_final_state(spec: RunSpec, trainer) -> None:
    import ray

    if spec.events is not None:
        trainer.callback_handler.callbacks = [c for c in trainer.callback_handler.callbacks
                                              if not isinstance(c, StreamToDriver)]
        ray.get(spec.events.put.remote(("final_state", final_state(trainer), {})))


def _upload(spec: RunSpec, local_dir: str, name: str) -> None:
    import pyarrow.fs as pafs

    fs, dest = spec.storage_filesystem, f"{spec.run_dir}/{name}"
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(dest, recursive=True)
        storage.upload_dir(local_dir, fs, dest)
    else:  # remote storage may be down for a while: retried with backoff
        with_retries(lambda: storage.upload_dir(local_dir, fs, dest), f"upload of {name}", dest)
    shutil.rmtree(os.path.dirname(local_dir), ignore_errors=True)


def build_worker_trainer(spec: RunSpec):
    import torch.distributed as dist

    torch.set_num_threads(spec.threads_per_worker)  # Ray sets OMP_NUM_THREADS; give torch what we were allotted
    if socket.gethostname() == spec.driver_host and os.path.isdir(spec.driver_cwd):
        # relative paths (output_dir, logging_dir, a callback's files) mean what they mean on the driver
        os.chdir(spec.driver_cwd)
    blueprint = spec.blueprint
    args = copy.copy(blueprint.ctor["args"])
    adapt_to_world(args, dist.get_world_size())  # num_workers=(min, max): the same global batch on this count
    # the driver's cached device / accelerate state describe the driver, not this worker
    args.__dict__.pop("_setup_devices", None)
    args.distributed_state = None
    if not (args.use_gpu and torch.cuda.is_available()):
        args.use_cpu = True  # accelerate reports MULTI_CPU (and gathers) only when told it is on CPU
    args.device  # re-detect: accelerate sees the process group Ray made
    args.push_to_hub = False  # the driver pushes (save_model / push_to_hub); workers never touch the Hub
    ctor = dict(blueprint.ctor, args=args)
    if "train" in spec.dataset_rows:
        ctor["train_dataset"] = RayShard("train", spec.dataset_rows["train"], dist.get_world_size())
    blueprint = dataclasses.replace(blueprint, ctor=ctor)
    trainer = rebuild(blueprint)
    trainer._in_worker = True
    trainer._ray = RayCheckpoints(spec, args)
    # Ray's report is a barrier right after each save: the checkpoint must be on disk by then
    trainer._checkpoint_writer.background = False
    if dist.get_rank() == 0 and spec.events is not None:
        trainer.add_callback(StreamToDriver(spec.events))
    return trainer
