"""What one Tune trial runs: a full raytrainer run with the trial's hyperparameters.

The trial builds the user's Trainer from the blueprint with the sampled TrainingArguments
overrides, then `train(trial=config)` (transformers passes the trial to model_init(trial)). After
every evaluation the objective goes to Tune (`tune.report`), which is where ASHA may stop the
trial. In-process trials (num_workers=0) report from the loop's own thread. Multi-worker trials
run the loop on their own Ray Train workers: their evaluations reach this process through
raytrainer's event stream, so training runs in a thread here and this thread reports to Tune.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading

from transformers import TrainerCallback

from .objective import default_objective
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


def run_trial(config, blueprint, compute_objective, storage_path, sweep, hp_name, report_checkpoints=False):
    from ray import tune

    context = tune.get_context()
    trial_name = hp_name(config) if hp_name is not None else context.get_trial_name()
    overrides, _ = split_params(config, blueprint.ctor["args"])
    base_args = blueprint.ctor["args"]
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
    trainer = bp.build()
    objective = compute_objective or default_objective

    def metrics_for_tune(metrics, state):
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        return {**numbers, "objective": objective(dict(metrics)), "step": state.global_step,
                "trial_id": context.get_trial_id(), "run_dir": run_dir or ""}

    if args.num_workers == 0:
        def report(metrics, state, folder):
            checkpoint = tune.Checkpoint.from_directory(folder) if folder else None
            tune.report(metrics_for_tune(metrics, state), checkpoint=checkpoint)

        reporter = ReportObjective(report, with_checkpoint=report_checkpoints)
        trainer.add_callback(reporter)
        resume = None
        # Tune restarted this trial: PBT exploited a better trial's checkpoint, or paused this one (its own)
        exploited = tune.get_checkpoint()
        if exploited is not None:
            resume = exploited.to_directory()
            if _global_step(resume) >= args.max_steps > 0:
                return  # Tune paused this trial at its last report; the run is complete
            # the donor's whole state (weights, optimizer, scheduler, RNG, data position), then this
            # trial's mutated hyperparameters on top (loop.py: apply_hyperparameters_after_resume)
            trainer._hyperparameters_override_checkpoint = True
        trainer.train(resume_from_checkpoint=resume, trial=config)
        if not reporter.reported:  # no evaluation during training: evaluate once at the end, as transformers does
            tune.report(metrics_for_tune(trainer.evaluate(), trainer.state))
        return
    _run_multi_worker(trainer, config, metrics_for_tune, tune.report)


def _global_step(checkpoint_dir: str) -> int:
    import json

    with open(os.path.join(checkpoint_dir, "trainer_state.json")) as f:
        return json.load(f).get("global_step", 0)


def _run_multi_worker(trainer, config, metrics_for_tune, report):
    """Train on Ray workers in a thread; forward each streamed evaluation to Tune from this thread."""
    from ..event_stream import DriverStream

    evaluations: queue.Queue = queue.Queue()
    DriverStream.listeners.append(evaluations.put)
    error: list[BaseException] = []

    def train():
        try:
            trainer.train(trial=config)
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread
            error.append(e)
        finally:
            evaluations.put(None)

    thread = threading.Thread(target=train, name="raytrainer-trial", daemon=True)
    thread.start()
    reported = 0
    try:
        while (item := evaluations.get()) is not None:
            metrics, state = item
            report(metrics_for_tune(metrics, state))
            reported += 1
    finally:
        DriverStream.listeners.remove(evaluations.put)
    thread.join()
    if error:
        raise error[0]
    if not reported:
        report(metrics_for_tune(trainer.evaluate(), trainer.state))
