"""What one Tune trial runs: a full raytrainer run with the trial's hyperparameters.

The trial builds the user's Trainer from the blueprint with the sampled TrainingArguments
overrides, then `train(trial=config)` (transformers passes the trial to model_init(trial)). After
every evaluation the objective goes to Tune (`tune.report`), which is where ASHA may stop the
trial. In-process trials (num_workers=0) report from the loop's own thread. Multi-worker trials
run the loop on their own Ray Train workers: their evaluations reach this process through
raytrainer's event stream, so training runs in a thread here and this thread reports to Tune. Under an
in-place PBT (pbt_scheduler.py) this thread also relays each of Tune's decisions to the workers (pbt_relay.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import threading

from transformers import TrainerCallback

from ..args import check_folder_name
from ..loop_trainer import rebuild
from .completion import config_key, record_done, recorded
from .objective import default_objective
from .pbt_relay import ExploitRelay
from .pbt_worker import FollowExploits
from .validate import split_params


class ReportObjective(TrainerCallback):
    """In-process trials: report each evaluation's objective to Tune as it happens.

    With with_checkpoint (PBT) the report waits for the checkpoint of that evaluation's step (on_save,
    fired once the folder is complete) and carries it: PBT exploits a trial's reported checkpoint.
    """

    def __init__(self, report, with_checkpoint=False):
        self.report = report
        self.with_checkpoint = with_checkpoint
        self.reported = 0
        self._evaluations: dict[int, dict] = {}  # step -> metrics, waiting for that step's checkpoint

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not (state.is_world_process_zero and metrics):
            return
        if self.with_checkpoint:
            self._evaluations[state.global_step] = dict(metrics)
            return
        self.report(metrics, state, None)
        self.reported += 1

    def on_save(self, args, state, control, **kwargs):
        metrics = self._evaluations.pop(state.global_step, None)
        if self.with_checkpoint and metrics is not None:
            self.report(metrics, state, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
            self.reported += 1


def run_trial(config, blueprint, compute_objective, storage_path, sweep, hp_name, report_checkpoints=False,
              mlflow_sweep=None, pbt_board=None):
    """One trial; with `mlflow_sweep` (the driver's parent run, report_to mlflow) inside its own child run.
    With `pbt_board` (an in-place PBT over multi-worker trials) exploits come through it (pbt_relay.py)."""
    from ray import tune

    from ..tracking.mlflow import trial_run

    context = tune.get_context()
    trial_name = hp_name(config) if hp_name is not None else context.get_trial_name()
    check_folder_name("hp_name(trial)", trial_name, "the trial's folder under the sweep's")
    _, model_params = split_params(config, blueprint.ctor["args"])
    restored = tune.get_checkpoint()
    with trial_run(mlflow_sweep, trial_name, context.get_trial_id(), model_params, resumed=restored is not None):
        _run_trial(dict(config), blueprint, compute_objective, storage_path, sweep, trial_name, report_checkpoints,
                   context, restored, pbt_board)


def _run_trial(config, blueprint, compute_objective, storage_path, sweep, trial_name, report_checkpoints, context,
               restored, pbt_board=None):
    from ray import tune

    overrides, _ = split_params(config, blueprint.ctor["args"])
    base_args = blueprint.ctor["args"]
    if recorded(storage_path, base_args.storage_filesystem, sweep, trial_name, context.get_trial_id(),
                config) is not None:
        return  # it finished before the driver died; its result is on record (completion.py): never run twice
    if "://" in storage_path:  # the trial stages in output_dir; its run folder is in the bucket
        run_dir = None
        placement = {"output_dir": os.path.join(base_args.output_dir, trial_name),
                     "storage_path": f"{storage_path}/{sweep}", "run_name": trial_name}
    else:  # <storage>/<sweep>/<trial>/checkpoint-<step>, in-process or persisted there by Ray Train
        run_dir = os.path.join(storage_path, sweep, trial_name)
        placement = {"output_dir": run_dir}
        if base_args.num_workers > 0:  # (num_workers is never searched: validate.PER_SEARCH_FIELDS)
            placement.update(storage_path=os.path.join(storage_path, sweep), run_name=trial_name)
    args = dataclasses.replace(base_args, **overrides, **placement)
    bp = dataclasses.replace(blueprint, ctor=dict(blueprint.ctor, args=args))
    trainer = rebuild(bp)
    objective = compute_objective or default_objective

    last: dict = {}  # the last metrics sent to Tune, and whether the completion is on record

    def metrics_for_tune(metrics, state, final=False):
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        tune_metrics = {**numbers, "objective": objective(dict(metrics)), "step": state.global_step,
                        "trial_id": context.get_trial_id(), "run_dir": run_dir or ""}
        last["metrics"] = tune_metrics
        if (final or state.global_step >= state.max_steps > 0) and not last.get("recorded"):
            # on record before Tune hears the final result: a driver killed after it cannot rerun the trial
            record_done(storage_path, base_args.storage_filesystem, sweep, trial_name,
                        {**tune_metrics, "config": config_key(config)})
            last["recorded"] = True
        return tune_metrics

    def record_if_ended_early():  # e.g. EarlyStoppingCallback ended training before max_steps
        if last.get("metrics") and not last.get("recorded"):
            record_done(storage_path, base_args.storage_filesystem, sweep, trial_name,
                        {**last["metrics"], "config": config_key(config)})

    if args.num_workers == 0:
        def report(metrics, state, folder):
            checkpoint = tune.Checkpoint.from_directory(folder) if folder else None
            tune.report(metrics_for_tune(metrics, state), checkpoint=checkpoint)

        reporter = ReportObjective(report, with_checkpoint=report_checkpoints)
        trainer.add_callback(reporter)
        # Tune restarted this trial: PBT exploited a better trial's checkpoint, or paused this one (its own)
        with restored_copy(restored) as resume:
            if resume is not None and _global_step(resume) >= args.max_steps > 0:
                return  # Tune paused this trial at its last report; the run is complete
            if resume is not None:
                prepare_exploit(trainer, resume)
            trainer.train(resume_from_checkpoint=resume, trial=config)
        if not reporter.reported:  # no evaluation during training: evaluate once at the end, as transformers does
            tune.report(metrics_for_tune(trainer.evaluate(), trainer.state, final=True))
        record_if_ended_early()
        return

    # multi-worker: checkpoints live in storage; Tune holds only a pointer to one (CheckpointPointer)
    pointers = CheckpointPointer(storage_path, base_args.storage_filesystem, trial_name)
    resume = None
    if restored is not None:
        resume, step = pointers.resume_from(restored)
        if step >= args.max_steps > 0:
            return  # Tune paused this trial at its last report; the run is complete
        trainer._hyperparameters_override_checkpoint = True
    relay = None
    if pbt_board is not None and report_checkpoints:  # PBT exploits in this trial's running worker group
        relay = ExploitRelay(pbt_board, context.get_trial_id(), trainer, pointers, config)
        trainer.add_callback(FollowExploits(pbt_board, context.get_trial_id()))

    def report(metrics, state, path_in_storage=None):
        if path_in_storage is None:
            tune.report(metrics_for_tune(metrics, state))
            return
        tune_metrics = metrics_for_tune(metrics, state)
        with pointers.to_tune(path_in_storage, state.global_step) as checkpoint:
            # Tune copies the pointer before returning
            tune.report(relay.numbered(tune_metrics) if relay else tune_metrics, checkpoint=checkpoint)
        if relay:
            relay.after_report(state)  # the scheduler's decision, handed to the waiting workers

    def final_report(metrics, state):  # the evaluation after training (no evaluation during it)
        tune.report(metrics_for_tune(metrics, state, final=True))

    _run_multi_worker(trainer, config, report, with_checkpoint=report_checkpoints, resume=resume,
                      final_report=final_report, unreported=relay.unreported if relay else None)
    record_if_ended_early()


@contextlib.contextmanager
def restored_copy(tune_checkpoint):
    """An in-process trial's restored Tune checkpoint as a folder of its own (we edit its trainer_state.json),
    removed when the trial's train() ends or fails (Checkpoint.to_directory() alone leaves it in /tmp)."""
    if tune_checkpoint is None:
        yield None
        return
    from ..checkpoint import leftovers

    folder = leftovers.temp_dir("exploit")
    try:
        yield tune_checkpoint.to_directory(os.path.join(folder, "checkpoint"))
    finally:
        leftovers.release(folder)


def prepare_exploit(trainer, checkpoint: str) -> None:
    """Resume `trainer` from a PBT donor's (copied) checkpoint: the donor's whole state (weights, optimizer,
    scheduler, RNG, data position), then this trial's mutated hyperparameters on top (loop.py:
    apply_hyperparameters_after_resume). The files are then read by the resume's own loaders (weights_only,
    safetensors, checkpoint/pickle_check.py), as any resume's."""
    import pyarrow.fs as pafs

    _forget_donor_best(pafs.LocalFileSystem(), checkpoint)
    trainer._hyperparameters_override_checkpoint = True


def _forget_donor_best(fs, checkpoint: str) -> None:
    """A PBT exploit resumes from our own copy of a donor's checkpoint; the donor's best_model_checkpoint names
    a folder of the donor's run, which this trial must neither load nor rotate (checkpoint/state_check.py
    refuses it): the copy forgets it, and the trial's own best is found again by its own evaluations."""
    import json

    path = f"{checkpoint}/trainer_state.json"
    try:
        with fs.open_input_stream(path) as f:
            state = json.loads(f.read().decode())
    except (FileNotFoundError, OSError, ValueError):
        return  # no state, or an unreadable one: the resume's own check names it
    if not isinstance(state, dict) or state.get("best_model_checkpoint") is None:
        return
    state["best_model_checkpoint"] = None
    with fs.open_output_stream(f"{path}.tmp") as f:
        f.write(json.dumps(state, indent=2, sort_keys=True).encode())
    fs.move(f"{path}.tmp", path)


def _global_step(checkpoint_dir: str) -> int:
    import json

    with open(os.path.join(checkpoint_dir, "trainer_state.json")) as f:
        return json.load(f).get("global_step", 0)


class CheckpointPointer:
    """A multi-worker trial's checkpoints stay where Ray Train persisted them; Tune gets a pointer.

    Tune copies every reported checkpoint into its own trial folder: for a multi-worker trial that
    would be a second copy of each checkpoint, through this process. Instead the reported checkpoint
    is a one-file folder naming the checkpoint in storage. When PBT exploits, the exploiting trial
    copies the donor's checkpoint into its own run folder inside the storage filesystem (on S3 a
    server-side copy: the bytes never leave the bucket), so the donor's retention cannot delete it
    under the resumed run; its workers then fetch it from storage.
    """

    FILE = "raytrainer_checkpoint.json"

    def __init__(self, storage_path: str, storage_filesystem, trial_name: str):
        from .. import storage

        self.fs, _ = storage.resolve_storage(storage_path, storage_filesystem)
        self.scheme = storage_path.split("://", 1)[0] + "://" if "://" in storage_path else ""
        self.trial_name = trial_name

    @contextlib.contextmanager
    def to_tune(self, path_in_storage: str, step: int):
        """`with pointers.to_tune(path, step) as checkpoint: tune.report(..., checkpoint=checkpoint)`: Tune copies
        the one-file folder into the trial's folder inside report(); the temporary folder goes afterwards."""
        import json

        from ray import tune

        from ..checkpoint import leftovers

        folder = leftovers.temp_dir("pointer")
        try:
            with open(os.path.join(folder, self.FILE), "w") as f:
                json.dump({"path": path_in_storage, "step": step, "trial": self.trial_name}, f)
            yield tune.Checkpoint.from_directory(folder)
        finally:
            leftovers.release(folder)

    def resume_from(self, tune_checkpoint) -> tuple[str, int]:
        """(what train(resume_from_checkpoint=) takes, the checkpoint's step) for a restored trial."""
        import json

        from .. import storage

        with tune_checkpoint.as_directory() as folder, open(os.path.join(folder, self.FILE)) as f:
            pointer = json.load(f)
        path, step = pointer["path"], pointer["step"]
        if pointer["trial"] != self.trial_name:  # PBT: a better trial's checkpoint
            own_run = path.rsplit("/", 2)[0] + "/" + self.trial_name
            copy = f"{own_run}/exploit-{os.path.basename(path)}-from-{pointer['trial']}"
            storage.delete_dir(self.fs, copy)
            try:
                storage.copy_dir(self.fs, path, copy)
            except FileNotFoundError:
                raise RuntimeError(
                    f"PBT exploit: the donor checkpoint {path} is gone (the donor's save_total_limit deleted it "
                    "before this trial restarted); use save_total_limit=None or a larger limit with scheduler='pbt'."
                ) from None
            _forget_donor_best(self.fs, copy)
            print(f"[hp-search] trial {self.trial_name} exploits {pointer['trial']}: copied "
                  f"{os.path.basename(path)} to {copy}", flush=True)
            path = copy
        return self.scheme + path, step


def _run_multi_worker(trainer, config, report, with_checkpoint, resume, final_report=None, unreported=None):
    """Train on Ray workers in a thread; forward each streamed evaluation to Tune from this thread.

    With with_checkpoint (PBT) an evaluation is reported once its step's checkpoint is in storage.
    """
    from ..event_stream import DriverStream

    events: queue.Queue = queue.Queue()
    DriverStream.listeners.append(events.put)
    error: list[BaseException] = []

    def train():
        try:
            trainer.train(resume_from_checkpoint=resume, trial=config)
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread
            error.append(e)
        finally:
            events.put(None)

    thread = threading.Thread(target=train, name="raytrainer-trial", daemon=True)
    thread.start()
    reported = 0
    waiting: dict[int, dict] = {}  # step -> metrics, waiting for that step's checkpoint
    try:
        while (item := events.get()) is not None:
            kind, payload, state = item
            if kind == "evaluate" and with_checkpoint:
                waiting[state.global_step] = payload
            elif kind == "evaluate":
                report(payload, state)
                reported += 1
            elif kind == "checkpoint" and state.global_step in waiting:
                report(waiting.pop(state.global_step), state, payload)
                reported += 1
            elif kind == "checkpoint" and unreported is not None:
                unreported(state)
    finally:
        DriverStream.listeners.remove(events.put)
    thread.join()
    if error:
        raise error[0]
    if not reported:
        (final_report or report)(trainer.evaluate(), trainer.state)
