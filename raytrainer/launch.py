"""The driver's side of a Ray run: preflight, one RunSpec, Ray Train's TorchTrainer, results poured back.

    driver (this module)                         workers (worker.py, every rank)
    validate args, storage, data, capacity       build the user's Trainer from the RunSpec
    plan the resume (checkpoint/resume.py)       resume: Ray's checkpoint after a restart, else the plan's
    take the run lease, build one RunSpec        run loop.py; each save -> ray.train.report(checkpoint)
    TorchTrainer(worker_main, spec).fit()        rank 0 uploads final_model/ to the run folder
    download final_model/, load weights + state  rank 0 sends its callbacks' state back (rank0_state.py)

The persisted run folder is `<storage_path>/<name>`; with no storage_path it is `output_dir` itself, so
checkpoints land where transformers puts them: `output_dir/checkpoint-<step>/`. Every check that can refuse a
run happens here, before Ray starts a worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
import uuid

import transformers

from . import storage
from .auto_batch import carry_to_workers, keep_found
from .checkpoint.consolidate import load_whole
from .checkpoint.layout import FINAL_MODEL, TRAINER_STATE
from .checkpoint.lease import RunLease
from .checkpoint.resume import plan_resume
from .checkpoint.retention import forget_earlier_fit
from .data.checks import check_train_dataset
from .data.ray_data import is_ray_dataset
from .elastic import check_train as check_elastic, scaling_kwargs
from .event_stream import DriverStream
from .rank0_state import apply_final_state, restore_callback_states
from .ray_files import remove_eval_run_folder, remove_ray_files
from .redact import redact_text
from .shared_storage import check_shared_storage
from .spec import RunSpec, TrainerBlueprint
from .strategies.base import is_peft_model
from .strategies.build import is_skeleton
from .worker import eval_worker_main, worker_main

logger = logging.getLogger("raytrainer")


@contextlib.contextmanager
def preflight():
    """A ValueError raised inside is bad input found on the driver before a worker started: marked
    (`found_on_driver`), so that `raytrainer train` prints it as one line instead of a traceback."""
    try:
        yield
    except ValueError as e:
        e.found_on_driver = True
        raise


def run_on_ray(trainer, resume_from_checkpoint, trial, ignore_keys_for_eval):
    """train() with num_workers >= 1."""
    args = trainer.args
    with preflight():
        storage_path, name = storage_location(args)
        fs, base, run_dir = _storage_for(args, storage_path, name)
        datasets = {k: v for k, v in (("train", trainer.train_dataset),) if is_ray_dataset(v)}
        check_train_dataset(trainer)
        check_elastic(args, datasets)  # num_workers=(min, max): what a resize could not continue
        plan = plan_resume(args, resume_from_checkpoint, fs=fs, run_dir=run_dir,
                           run_label=redact_text(f"{storage_path}/{name}"), ray_datasets=bool(datasets))
        check_best_model_loadable(trainer)
        if plan is not None and plan.trainer_state is not None and args.restore_callback_states_from_checkpoint:
            restore_callback_states(trainer, plan.trainer_state)

        ensure_ray()
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
        with preflight():
            blueprint = _blueprint(trainer, **overrides)
            carry_to_workers(trainer, blueprint)  # auto_find_batch_size: the size a second train() starts from
            spec = _spec(trainer, blueprint, fs, run_dir, name, resume=plan, datasets=datasets, fit_id=fit_id,
                         train_call=(trial, ignore_keys_for_eval))  # capacity checked before the event actor starts
        with _ray_files_removed(fs, run_dir), DriverStream(trainer) as stream:
            _fit(args, worker_main, dataclasses.replace(spec, events=stream.box), name, base, fs, datasets)
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
    spec = _spec(trainer, blueprint, fs, run_dir, name, resume=None, datasets={}, fit_id=uuid.uuid4().hex,
                 eval_call=(method, dataset, ignore_keys, metric_key_prefix), driver_state=trainer.state)
    with _ray_files_removed(fs, run_dir, remove_eval_run_folder), DriverStream(trainer, display=False) as stream:
        _fit(args, eval_worker_main, dataclasses.replace(spec, events=stream.box), name, base, fs, {})
    if stream.final_state is not None:
        apply_final_state(trainer, stream.final_state)
    return stream.eval_result


@contextlib.contextmanager
def _ray_files_removed(fs, run_dir, remove=remove_ray_files):
    """Ray's files go once the fit has ended (output_dir lists what transformers leaves, + final_model/); after
    a failed fit too, where an error removing them must not hide the fit's own (storage may be what failed)."""
    try:
        yield
    except BaseException:
        try:
            remove(fs, run_dir)
        except Exception as e:
            logger.debug("raytrainer: Ray's files stay in %s (%s)", run_dir, e)
        raise
    remove(fs, run_dir)


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


def _spec(trainer, blueprint, fs, run_dir, name, *, resume, datasets, **call) -> RunSpec:
    args = trainer.args
    ensure_ray()
    cpus = (args.resources_per_worker or {}).get("CPU", 1)
    check_capacity(args, cpus)
    check_shared_storage(fs, run_dir)  # a local folder on a multi-node cluster: refused here
    return RunSpec(
        blueprint=blueprint, resume=resume, storage_filesystem=fs, run_dir=run_dir, name=name,
        threads_per_worker=max(1, int(cpus)), dataset_rows={k: v.count() for k, v in datasets.items()},
        driver_cwd=os.getcwd(), driver_host=socket.gethostname(), submitted_at=time.time(),
        tracking_env=_tracking_env(args), **call,
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


def ensure_ray(**init_kwargs):
    """Join RAY_ADDRESS's cluster, or start a local one whose workers import what this process imports."""
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
    load_whole(model, load_file(os.path.join(folder, "model.safetensors")),
               "the workers' final model does not fit the driver's", error=RuntimeError)


def check_best_model_loadable(trainer) -> None:
    """load_best_model_at_end under fsdp / deepspeed loads consolidated weights, which a PEFT model's
    checkpoints do not hold (the adapter only): refused before the workers start."""
    args = trainer.args
    if args.load_best_model_at_end and args.strategy in ("fsdp", "deepspeed") and is_peft_model(trainer.model):
        raise ValueError(
            f"load_best_model_at_end=True with a PEFT model under strategy={args.strategy!r} is not supported: its "
            "checkpoints hold the adapter only. Set load_best_model_at_end=False and, after training, load the "
            "adapter of trainer.state.best_model_checkpoint (model.load_adapter(path, adapter_name=...)).")
