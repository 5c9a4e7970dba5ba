"""A Ray Train run: driver side (preflight, RunSpec, TorchTrainer, results) and worker entry.

Driver                                         Worker (every rank, `worker_main`)
------                                         ----------------------------------
validate args, storage, data, capacity         rebuild the Trainer from the RunSpec
build one picklable RunSpec                    resume: Ray's latest checkpoint after a restart,
TorchTrainer(worker_main, RunSpec).fit()         else the RunSpec's resume path
download final_model/, load weights + state    run loop.py; each save -> ray.train.report(checkpoint)
                                               rank 0 uploads final_model/ to the run folder

The persisted run folder is `<storage_path>/<name>`; with no storage_path it is `output_dir`
itself, so checkpoints land where transformers puts them: `output_dir/checkpoint-<step>/`.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

import torch
import transformers

from . import storage
from .auto_batch import carry_to_workers, keep_found, report_found
from .shared_storage import check_shared_storage
from .checkpoint.layout import TRAINER_STATE, checkpoint_step
from .checkpoint.lease import RunLease
from .checkpoint.retention import checkpoints_to_delete, forget_earlier_fit
from .checkpoint.state_check import check_state_in_storage
from .checkpoint.upload import UPLOAD_WAIT_MARGIN_S
from .crossing import TrainerBlueprint, apply_final_state, final_state, restore_callback_states
from .data.checks import check_train_dataset
from .elastic import adapt_to_world, check_train as check_elastic, scaling_kwargs
from .data.ray_data import is_ray_dataset
from .event_stream import DriverStream, StreamToDriver
from .quiet import worker_logs
from .ray_files import remove_ray_files
from .redact import redact_text, state_without_secrets
from .strategies.build import is_skeleton

logger = logging.getLogger("raytrainer")
FINAL_MODEL = "final_model"


@dataclass
class RunSpec:
    """Everything that crosses from the driver to the workers (pickled once by Ray)."""

    blueprint: TrainerBlueprint  # the driver's Trainer as it stood when train()/evaluate()/predict() was called
    resume: str | None           # a checkpoint folder: local path, or a path inside the storage filesystem
    resume_in_storage: bool
    storage_filesystem: Any      # a pyarrow.fs.FileSystem
    run_dir: str                 # the run folder inside the storage filesystem
    name: str
    threads_per_worker: int
    dataset_rows: dict           # Ray Data datasets: rows per dataset (counted once on the driver)
    fit_id: str = ""             # tells this fit's checkpoints from an earlier fit's in the same run folder
    train_call: tuple = (None, None)  # train()'s own (trial, ignore_keys_for_eval)
    eval_call: tuple | None = None  # (method, dataset, ignore_keys, prefix) for run_eval_on_ray
    driver_state: Any = None     # the driver's TrainerState (evaluate/predict log at its step)
    events: Any = None           # the driver's EventBox actor: rank 0 streams callback events to it
    driver_cwd: str = ""         # relative paths resolve here on the driver's machine
    driver_host: str = ""
    submitted_at: float = 0.0    # driver's time.time() at fit(): workers log their start-up latency
    tracking_env: Any = None     # MLFLOW_* of the driver (its tracking URI, its active run): set on the workers


# ====================================================================== driver
def run_on_ray(trainer, resume, trial, ignore_keys_for_eval):
    """train() with num_workers >= 1."""
    args = trainer.args
    storage_path, name = storage_location(args)
    fs, base, run_dir = _storage_for(args, storage_path, name)
    datasets = {k: v for k, v in (("train", trainer.train_dataset),) if is_ray_dataset(v)}
    check_train_dataset(trainer)
    check_elastic(args, datasets)  # num_workers=(min, max): what a resize could not continue
    resume_in_storage = False
    if isinstance(resume, str) and "://" in resume:  # e.g. s3://bucket/run/checkpoint-8
        _, resume = storage.resolve_storage(resume, args.storage_filesystem)
        resume_in_storage = True
    if resume is None and trainer._resume_requested_latest:
        resume = latest_checkpoint_in(fs, run_dir)
        if resume is None:
            raise ValueError(
                f"No valid checkpoint found in output directory ({storage_path}/{name}): "
                f"resume_from_checkpoint=True found no complete checkpoint under {storage_path}/{name}; "
                "train without resuming first, or pass a checkpoint path."
            )
        resume_in_storage = True
    if resume_in_storage:  # a local resume path was checked by Trainer._resolve_resume
        check_state_in_storage(fs, resume)
    if resume is not None and datasets:
        check_stream_resume(fs if resume_in_storage else None, resume, args.num_workers)
    from .strategies import check_resume

    check_resume(args, resume, fs if resume_in_storage else None)  # e.g. ZeRO state of another worker count
    check_best_model_loadable(trainer)
    if resume is not None and args.restore_callback_states_from_checkpoint:
        restore_callback_states(trainer, _read_state(fs if resume_in_storage else None, resume))

    _ensure_ray()
    check_shared_storage(fs, run_dir)  # before the run lease writes into a folder the other nodes cannot see
    fit_id = uuid.uuid4().hex
    # one writer per run folder: refused here, before Ray starts a worker, while another live run writes it
    # a sweep's trial restarted by Tune (PBT) may find its old actor's process still exiting: a few seconds' grace
    with RunLease(fs, run_dir, fit_id, name, redact_text(f"{storage_path}/{name}"),
                  wait_for_local_exit_s=30.0 if trial is not None else 0.0):
        forget_earlier_fit(fs, run_dir)
        overrides = {"train_dataset": None} if datasets else {}
        if trainer.model_init is not None:
            overrides["model"] = None  # each worker calls model_init itself
        blueprint = _blueprint(trainer, **overrides)
        carry_to_workers(trainer, blueprint)  # auto_find_batch_size: the size a second train() starts from
        spec = _spec(trainer, blueprint, fs, run_dir, name, resume=resume, resume_in_storage=resume_in_storage,
                     dataset_rows=None, datasets=datasets)
        spec.fit_id = fit_id
        spec.train_call = (trial, ignore_keys_for_eval)
        with DriverStream(trainer) as stream:
            spec.events = stream.box
            _fit(args, worker_main, spec, name, base, fs, datasets)
        remove_ray_files(fs, run_dir)  # output_dir lists what transformers leaves (+ final_model/)
        if is_skeleton(trainer.model):
            # the driver held a skeleton while the workers trained (call_model_init): now the trained model
            trainer.model = transformers.Trainer.call_model_init(trainer, trial)
        output = load_results(trainer, fs, run_dir)
        if stream.final_state is not None:
            apply_final_state(trainer, stream.final_state)
        keep_found(trainer)  # auto_find_batch_size: the size that fitted, as transformers' Trainer keeps it
        return output


def run_eval_on_ray(trainer, method: str, dataset, ignore_keys, metric_key_prefix):
    """evaluate() / predict() with num_workers >= 1: sharded over the workers, gathered without duplicates.

    The workers get the driver's current weights; rank 0 writes the result to the run folder.
    """
    args = trainer.args
    storage_path, name = storage_location(args)
    name = f"{name}_{method}"  # its own Ray run: the training run's checkpoint state stays untouched
    fs, base, run_dir = _storage_for(args, storage_path, name)
    if is_skeleton(trainer.model):  # a skeleton (Trainer.call_model_init): workers build it
        blueprint = _blueprint(trainer, train_dataset=None, model=None)
    else:
        blueprint = _blueprint(trainer, train_dataset=None, model=trainer.model, model_init=None)
    spec = _spec(trainer, blueprint, fs, run_dir, name, resume=None, resume_in_storage=False,
                 dataset_rows=None, datasets={})
    spec.eval_call = (method, dataset, ignore_keys, metric_key_prefix)
    spec.driver_state = trainer.state
    with DriverStream(trainer, display=False) as stream:
        spec.events = stream.box
        _fit(args, eval_worker_main, spec, name, base, fs, {})
    if stream.final_state is not None:
        apply_final_state(trainer, stream.final_state)
    return stream.eval_result


def _read_state(fs, checkpoint: str) -> str:
    """A checkpoint's trainer_state.json (checked already: check_checkpoint_state / check_state_in_storage)."""
    if fs is None:
        with open(os.path.join(checkpoint, TRAINER_STATE), encoding="utf-8") as f:
            return f.read()
    with fs.open_input_stream(f"{checkpoint}/{TRAINER_STATE}") as f:
        return f.read().decode("utf-8")


def _storage_for(args, storage_path, name):
    storage.preflight_storage(storage_path, args.storage_filesystem)
    # Resolved once here: the filesystem object (credentials included) travels to Ray's controller and
    # workers, whose environments may lack the driver's AWS_* variables.
    fs, base = storage.resolve_storage(storage_path, args.storage_filesystem)
    return fs, base, storage.join_path(base, name)


def _blueprint(trainer, **overrides) -> TrainerBlueprint:
    if trainer._user_optimizers:
        raise ValueError(
            "optimizers=(optimizer, scheduler) holds objects bound to the driver's model and cannot move to Ray "
            "workers; pass optimizer_cls_and_kwargs=(torch.optim.AdamW, {...}) or override create_optimizer()."
        )
    blueprint = TrainerBlueprint.of(trainer, **overrides)
    check_picklable(blueprint.named_values())
    return blueprint


def _spec(trainer, blueprint, fs, run_dir, name, *, resume, resume_in_storage, dataset_rows, datasets):
    args = trainer.args
    _ensure_ray()
    cpus = (args.resources_per_worker or {}).get("CPU", 1)
    check_capacity(args, cpus)
    check_shared_storage(fs, run_dir)  # a local folder on a multi-node cluster: refused here
    return RunSpec(
        blueprint=blueprint, resume=resume, resume_in_storage=resume_in_storage,
        storage_filesystem=fs, run_dir=run_dir, name=name, threads_per_worker=max(1, int(cpus)),
        dataset_rows=dataset_rows or {k: v.count() for k, v in datasets.items()}, fit_id=uuid.uuid4().hex,
        driver_cwd=os.getcwd(), driver_host=socket.gethostname(), submitted_at=time.time(),
        tracking_env=_tracking_env(args),
    )


def _tracking_env(args) -> dict:
    """report_to="mlflow": the rank-0 worker logs where the driver would, into the driver's active run."""
    if "mlflow" not in (args.report_to or []):
        return {}
    from .tracking.mlflow import driver_env

    return driver_env(args.output_dir)


def _fit(args, entry, spec, name, base, fs, datasets):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    data_config = None
    if datasets:
        # preserve_order makes Ray's streaming_split deal blocks to the workers deterministically (in
        # order, to the worker with the fewest rows so far): the same rows go to the same rank in every
        # epoch and after a restart, so a resumed run sees what the uninterrupted one would have
        options = DataConfig.default_ingest_options()
        options.preserve_order = True
        data_config = DataConfig(execution_options=options)

    torch_trainer = TorchTrainer(
        entry,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(
            **scaling_kwargs(args), use_gpu=args.use_gpu, resources_per_worker=args.resources_per_worker
        ),
        run_config=RunConfig(
            name=name, storage_path=base, storage_filesystem=fs,
            # a node preemption (drain) restarts against its own budget, not max_failures
            failure_config=FailureConfig(max_failures=args.max_failures,
                                         max_preemption_failures=args.max_preemption_failures),
            # Ray keeps every checkpoint; rank 0 rotates them as transformers does (newest N plus the best)
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
        datasets=datasets or None,
        dataset_config=data_config,
        torch_config=TorchConfig(backend=args.ddp_backend, timeout_s=args.ddp_timeout),
    )
    try:
        torch_trainer.fit()
    except Exception as e:  # noqa: BLE001 - re-raised as the worker's own exception
        raise original_exception(e) from None


def storage_location(args) -> tuple[str, str]:
    """(storage_path, run name); with no storage_path the run folder is output_dir itself."""
    if args.storage_path:
        name = args.run_name or os.path.basename(os.path.normpath(args.output_dir))
        return args.storage_path.rstrip("/"), name
    out = os.path.abspath(args.output_dir)
    return os.path.dirname(out), os.path.basename(out)


def latest_checkpoint_in(fs, run_dir: str) -> str | None:
    steps = []
    for name in storage.list_dirs(fs, run_dir):
        path = f"{run_dir}/{name}"
        step = checkpoint_step(name)
        if step is not None and fs.get_file_info(f"{path}/{TRAINER_STATE}").type.name == "File":
            steps.append((step, path))
    return max(steps)[1] if steps else None


def _ensure_ray(**init_kwargs):
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address is None:
        # A local cluster: its workers import what this process imports (scripts, tests, notebooks'
        # folders), so callbacks and Trainer subclasses defined there unpickle on the workers.
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        init_kwargs.setdefault("runtime_env", {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}})
        # with the dashboard: Ray Train's PlacementGroupCleaner asks its state API whether a controller is
        # alive; without it a controller killed from outside (a trial stopped by ASHA) leaks its workers'
        # placement group, and the next trial's worker group waits for CPUs that never come back
        init_kwargs.setdefault("include_dashboard", True)
    ray.init(address=address, **init_kwargs)


ensure_ray = _ensure_ray


def check_capacity(args, cpus_per_worker) -> None:
    import ray

    total = ray.cluster_resources()
    need_cpu = args.num_workers * cpus_per_worker
    if need_cpu > total.get("CPU", 0):
        raise ValueError(
            f"num_workers={args.num_workers} x {cpus_per_worker} CPU each needs {need_cpu} CPUs but the Ray cluster "
            f"has {total.get('CPU', 0):g}: lower num_workers or resources_per_worker, or add nodes."
        )
    if args.use_gpu and args.num_workers > total.get("GPU", 0):
        raise ValueError(
            f"use_gpu=True with num_workers={args.num_workers} needs {args.num_workers} GPUs but the cluster has "
            f"{total.get('GPU', 0):g}: lower num_workers or set use_gpu=False."
        )


def check_picklable(kwargs: dict) -> None:
    import ray.cloudpickle as cloudpickle

    for key, value in kwargs.items():
        try:
            cloudpickle.dumps(value)
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"Trainer argument {key!r} cannot be sent to Ray workers ({type(e).__name__}: {e}). Pass a factory "
                "instead (model_init=..., a dataset built from files, a module-level function), or create the "
                "object inside the function."
            ) from e


def original_exception(error: BaseException) -> BaseException:
    """The worker's own exception (same type and message), carrying the worker's traceback text."""
    failures = getattr(error, "worker_failures", None)
    if not failures:
        return error
    rank, failure = sorted(failures.items())[0]
    cause = failure
    for _ in range(5):  # RayTaskError(...) wraps the user's exception
        inner = getattr(cause, "cause", None)
        if inner is None or inner is cause:
            break
        cause = inner
    text = "".join(traceback.format_exception(type(failure), failure, failure.__traceback__))
    try:
        cause.add_note(f"raised on Ray worker rank {rank}; worker traceback:\n{text}")
    except AttributeError:
        pass
    return cause


def load_results(trainer, fs, run_dir):
    """Make the driver's Trainer look as it does after transformers' train()."""
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    local = tempfile.mkdtemp(prefix="raytrainer-final-")
    try:
        storage.download_dir(fs, f"{run_dir}/{FINAL_MODEL}", local)
        trainer.state = TrainerState.load_from_json(os.path.join(local, TRAINER_STATE))
        _load_weights(trainer.model, local)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    trainer.model_wrapped = trainer.model
    last = trainer.state.log_history[-1] if trainer.state.log_history else {}
    metrics = {k: v for k, v in last.items() if k.startswith("train_") or k in ("total_flos", "epoch")}
    return TrainOutput(trainer.state.global_step, last.get("train_loss", 0.0), metrics)


def _load_weights(model, folder):
    from safetensors.torch import load_file

    adapter = os.path.join(folder, "adapter_model.safetensors")
    if os.path.isfile(adapter) and hasattr(model, "peft_config"):  # a PEFT model saves its adapters only
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter))
        if result.unexpected_keys:
            raise RuntimeError(f"the workers' final adapter does not fit the driver's model: {result.unexpected_keys[:5]}")
        return
    state = load_file(os.path.join(folder, "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied weights (e.g. GPT-2's lm_head) are saved once by save_pretrained and tied again below
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"the workers' final model does not fit the driver's: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()


# ====================================================================== worker
def worker_main(config):
    import torch.distributed as dist

    spec: RunSpec = config["spec"]
    worker_logs()  # one clean job log (quiet.py)
    apply_tracking_env(spec.tracking_env)
    entered = time.time()
    trainer = _build_worker_trainer(spec)
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
    if restored is not None:
        local = restored.to_directory(trainer._ray.temp_dir("restore", restored.path))
        # Ray also hands back an earlier fit's checkpoint from the same run folder; only a restart of
        # this fit (a worker died) resumes from it, as a fresh train() starts fresh in transformers.
        if _fit_id_of(local) == spec.fit_id:
            resume = local
    if resume is None and spec.resume is not None:
        resume = trainer._ray.fetch_resume(spec.resume) if spec.resume_in_storage else spec.resume
    resumed = _run_meta_of(resume) if resume is not None else None
    # a resume continues its checkpoint's run: retention then also rotates that run's earlier checkpoints.
    # A Tune trial is one run in its own folder, whatever it resumes from (a PBT donor's checkpoint too).
    trainer._lineage = (f"trial:{spec.name}" if spec.train_call[0] is not None else None) or \
        (resumed or {}).get("lineage") or (resumed or {}).get("fit_id") or spec.fit_id
    trainer._ray.lineage = trainer._lineage
    trial, ignore_keys_for_eval = spec.train_call
    trainer.train(resume_from_checkpoint=resume, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval)
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
    worker_logs()  # one clean job log (quiet.py)
    apply_tracking_env(spec.tracking_env)
    trainer = _build_worker_trainer(spec)
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

    from .checkpoint.upload import with_retries

    fs, dest = spec.storage_filesystem, f"{spec.run_dir}/{name}"
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(dest, recursive=True)
        storage.upload_dir(local_dir, fs, dest)
    else:  # remote storage may be down for a while: retried with backoff
        with_retries(lambda: storage.upload_dir(local_dir, fs, dest), f"upload of {name}", dest)
    shutil.rmtree(os.path.dirname(local_dir), ignore_errors=True)


def _build_worker_trainer(spec: RunSpec):
    import torch.distributed as dist

    torch.set_num_threads(spec.threads_per_worker)  # Ray sets OMP_NUM_THREADS; give torch what we were allotted
    if socket.gethostname() == spec.driver_host and os.path.isdir(spec.driver_cwd):
        # relative paths (output_dir, logging_dir, a callback's files) mean what they mean on the driver
        os.chdir(spec.driver_cwd)
    blueprint = copy.copy(spec.blueprint)
    args = copy.copy(blueprint.ctor["args"])
    adapt_to_world(args, dist.get_world_size())  # num_workers=(min, max): the same global batch on this count
    # the driver's cached device / accelerate state describe the driver, not this worker
    args.__dict__.pop("_setup_devices", None)
    args.distributed_state = None
    if not (args.use_gpu and torch.cuda.is_available()):
        args.use_cpu = True  # accelerate reports MULTI_CPU (and gathers) only when told it is on CPU
    args.device  # re-detect: accelerate sees the process group Ray made
    args.push_to_hub = False  # the driver pushes (save_model / push_to_hub); workers never touch the Hub
    blueprint.ctor = dict(blueprint.ctor, args=args)
    if "train" in spec.dataset_rows:
        from .data.ray_data import RayShard

        blueprint.ctor["train_dataset"] = RayShard("train", spec.dataset_rows["train"], dist.get_world_size())
    trainer = blueprint.build()
    trainer._in_worker = True
    trainer._ray = WorkerRun(spec, args)
    # Ray's report is a barrier right after each save: the checkpoint must be on disk by then
    trainer._checkpoint_writer.background = False
    if dist.get_rank() == 0 and spec.events is not None:
        trainer.add_callback(StreamToDriver(spec.events))
    return trainer


def check_best_model_loadable(trainer) -> None:
    """load_best_model_at_end under fsdp / deepspeed loads consolidated weights, which a PEFT model's
    checkpoints do not hold (the adapter only): refused before the workers start."""
    from .trainer import _is_peft_model

    args = trainer.args
    if args.load_best_model_at_end and args.strategy in ("fsdp", "deepspeed") and _is_peft_model(trainer.model):
        raise ValueError(
            f"load_best_model_at_end=True with a PEFT model under strategy={args.strategy!r} is not supported: its "
            "checkpoints hold the adapter only. Set load_best_model_at_end=False and, after training, load the "
            "adapter of trainer.state.best_model_checkpoint (model.load_adapter(path, adapter_name=...)).")


def check_stream_resume(fs, checkpoint: str, num_workers: int) -> None:
    """Driver-side: a checkpoint of a Ray Dataset run resumes only on as many workers (see
    Trainer._check_resume_batch, which the workers run for the other cases)."""
    from .trainer import _other_order, load_run_meta

    meta = load_run_meta(checkpoint, fs)
    if meta is None:
        return
    saved = (meta.get("data_position") or {}).get("order", "")
    now = f"ray_data_split_{num_workers}"
    if saved.startswith("ray_data_split_") and saved != now:
        raise ValueError(f"{checkpoint} cannot resume with num_workers={num_workers}: "
                         + _other_order(saved, now, meta["world_size"]) + ".")


def _run_meta_of(checkpoint_dir: str) -> dict | None:
    from .trainer import load_run_meta

    return load_run_meta(checkpoint_dir)


def _fit_id_of(checkpoint_dir: str) -> str | None:
    meta = _run_meta_of(checkpoint_dir)
    return None if meta is None else meta.get("fit_id")


def _fetch_checkpoint(spec: RunSpec, path_in_storage: str, into: str) -> str:
    local = os.path.join(into, os.path.basename(path_in_storage))
    storage.download_dir(spec.storage_filesystem, path_in_storage, local)
    return local


class WorkerRun:
    """What a Trainer inside a Ray worker does differently: where checkpoints go and how.

    Rank 0 writes checkpoint-<step>/ where transformers users look for it, `output_dir`, so that
    on_save callbacks (MLflow's artifact upload, a user's extra file) find it complete; then it is
    reported to Ray, which copies it to the run folder in storage, and the local copy goes. When
    the run folder *is* output_dir (no storage_path), the checkpoint is staged in a temporary
    folder, reported first (Ray cannot copy a folder onto itself), and on_save finds the persisted one.
    """

    def __init__(self, spec: RunSpec, args):
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
        from .checkpoint import leftovers

        path = leftovers.temp_dir(kind)
        self._temp_dirs[path] = origin
        return path

    def release_temp_dirs(self) -> None:
        from .checkpoint import leftovers

        for path in list(self._temp_dirs):
            leftovers.release(path)
        self._temp_dirs.clear()

    def fetch_resume(self, path_in_storage: str) -> str:
        return _fetch_checkpoint(self.spec, path_in_storage, self.temp_dir("resume", path_in_storage))

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

        from .checkpoint.state_check import checkpoint_in_run

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
            self._report(trainer, pending.final_dir, lambda: None)
            trainer._fire_on_save(pending)
            after()
        else:
            trainer._fire_on_save(pending)
            self._report(trainer, pending.final_dir, after)

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
                    from .checkpoint.upload import with_retries

                    with_retries(lambda: self._rotate(best), "rotation of old checkpoints", self.spec.run_dir)
                else:
                    self._rotate(best)
        return after

    def _report(self, trainer, local_dir: str, after) -> None:
        import ray.train

        name = os.path.basename(local_dir)
        metrics = {"step": trainer.state.global_step, **trainer._last_metrics}
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
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

        from .checkpoint.upload import upload_checkpoint

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
        from .checkpoint.upload import upload_wait_bound_s

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
            from .trainer import load_run_meta

            try:
                meta = load_run_meta(path, self.spec.storage_filesystem)
            except (OSError, ValueError, RuntimeError):  # partial or foreign: not ours to delete
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
        return _fetch_checkpoint(self.spec, path_in_storage, self.temp_dir("best", path_in_storage))


__all__ = ["RunSpec", "run_on_ray", "worker_main", "storage_location"]
