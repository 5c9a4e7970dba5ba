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
    """In-process trials: report each evaluation's objective to Tune as it happens."""

    def __init__(self, report):
        self.report = report
        self.reported = 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.is_world_process_zero and metrics:
            self.report(metrics, state)
            self.reported += 1


def run_trial(config, blueprint, compute_objective, storage_path, sweep, hp_name):
    from ray import tune

    context = tune.get_context()
    trial_name = hp_name(config) if hp_name is not None else context.get_trial_name()
    overrides, _ = split_params(config, blueprint.ctor["args"])
    base_args = blueprint.ctor["args"]
    run_dir = os.path.join(storage_path, sweep, trial_name) if "://" not in storage_path else None
    extra = {"output_dir": run_dir} if run_dir else {"output_dir": os.path.join(base_args.output_dir, trial_name),
                                                     "storage_path": f"{storage_path}/{sweep}", "run_name": trial_name}
    args = dataclasses.replace(base_args, **overrides, **extra)
    if args.num_workers > 0 and run_dir:
        args = dataclasses.replace(args, storage_path=os.path.join(storage_path, sweep), run_name=trial_name)
    bp = dataclasses.replace(blueprint, ctor=dict(blueprint.ctor, args=args))
    trainer = bp.build()
    objective = compute_objective or default_objective

    def metrics_for_tune(metrics, state):
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        return {**numbers, "objective": objective(dict(metrics)), "step": state.global_step,
                "trial_id": context.get_trial_id(), "run_dir": run_dir or ""}

    if args.num_workers == 0:
        reporter = ReportObjective(lambda m, s: tune.report(metrics_for_tune(m, s)))
        trainer.add_callback(reporter)
        trainer.train(trial=config)
        if not reporter.reported:  # no evaluation during training: evaluate once at the end, as transformers does
            tune.report(metrics_for_tune(trainer.evaluate(), trainer.state))
        return
    _run_multi_worker(trainer, config, metrics_for_tune, tune.report)


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
