"""`Trainer.hyperparameter_search` on Ray Tune: the driver half.

Every check runs before a trial starts (space.py, validate.py, schedulers.py). The Trainer crosses
once as a TrainerBlueprint (model=None: each trial builds its own model with model_init(trial)),
through the object store with `tune.with_parameters`; `trial.run_trial` is what each trial runs.

Each trial is a full raytrainer run: with num_workers=0 the loop runs inside the trial itself (no
worker group: a small sweep costs what transformers' own Ray backend costs), with num_workers>=1
the trial starts its own Ray Train worker group. Its checkpoints are transformers' layout under
`<storage>/<sweep name>/<trial name>/checkpoint-<step>`. The objective (compute_objective of each
evaluation's metrics) is reported to Tune after every evaluation, so ASHA stops bad trials early.
"""

from __future__ import annotations

import logging
import math
import os
import warnings

from ..args import check_folder_name
from ..checkpoint.layout import latest_checkpoint, TRAINER_STATE
from ..checkpoint.state_check import checkpoint_in_run
from ..redact import redact
from ..spec import TrainerBlueprint
from .completion import all_recorded
from .dashboard import check_dashboard_for_stopping_scheduler
from .objective import best_run, direction_to_mode
from .pbt_board import start_board
from .pbt_scheduler import InPlacePBT, in_place_pbt
from .schedulers import build_scheduler, is_pbt
from .space import to_tune_space
from .validate import check_search

logger = logging.getLogger("raytrainer")
# Ray Train's controller of a multi-worker trial is itself an actor; a trial reserves room for it
TRIAL_CPUS_INPROCESS = 1
TRIAL_CPUS_DRIVER = 0.5
SCOPES = ("last", "all", "avg", "last-5-avg", "last-10-avg")


def hyperparameter_search(trainer, hp_space=None, compute_objective=None, n_trials=20, direction="minimize",
                          backend=None, hp_name=None, **kwargs):
    import ray
    from ray import tune

    from ..launch import check_picklable, ensure_ray

    args = trainer.args
    if backend not in (None, "ray", "optuna") and str(getattr(backend, "value", backend)) not in ("ray", "optuna"):
        raise ValueError(f"backend={backend!r}: raytrainer runs every search on Ray Tune; use backend='ray' "
                         "(optuna-style hp_space functions are translated to a Tune search space).")
    scheduler = kwargs.pop("scheduler", None)
    search_alg = kwargs.pop("search_alg", None)
    resume = kwargs.pop("resume", False)
    name = kwargs.pop("name", None) or f"{args.run_name or os.path.basename(os.path.normpath(args.output_dir))}-hp-search"
    max_concurrent = kwargs.pop("max_concurrent_trials", None)
    perturbation_interval = kwargs.pop("perturbation_interval", None)
    if kwargs:
        raise TypeError(f"hyperparameter_search() got unexpected keyword arguments {sorted(kwargs)}")
    check_folder_name("name", name, "the sweep's folder under storage_path")
    if os.environ.get("RAY_SCOPE", "last") not in SCOPES:
        raise ValueError(f"RAY_SCOPE={os.environ['RAY_SCOPE']!r}: use one of {', '.join(SCOPES)} (Tune's "
                         "get_best_trial scopes; transformers reads the same variable).")
    space = to_tune_space(hp_space)
    check_search(args, space, trainer.model_init, n_trials=n_trials, direction=direction,
                 compute_objective=compute_objective, scheduler=scheduler)
    pbt = is_pbt(scheduler)
    if pbt:
        _check_pbt(args)
        perturbation_interval = perturbation_interval or 1
    mode = direction_to_mode(direction)
    # max_t one past the last evaluation: a trial that reaches max_t is stopped at once, before the save
    # that follows its last evaluation, and the run would lose its final checkpoint
    tune_scheduler = build_scheduler(scheduler, metric="objective", mode=mode, max_t=_max_reports(args) + 1,
                                     space=space, perturbation_interval=perturbation_interval)
    args.check_supported()

    storage_path = args.storage_path or os.path.dirname(os.path.abspath(args.output_dir))
    blueprint = TrainerBlueprint.of(trainer, model=None)
    check_picklable(blueprint.named_values())
    ensure_ray()
    check_dashboard_for_stopping_scheduler(args, scheduler)  # before the first trial (dashboard.py)
    resources = _trial_resources(args)
    max_concurrent = _max_concurrent(args, resources, max_concurrent)

    from ..tracking.mlflow import finish_sweep_run, start_sweep_run
    from .trial import run_trial

    path = os.path.join(storage_path, name) if "://" not in storage_path else f"{storage_path}/{name}"
    restoring = resume and tune.Tuner.can_restore(path, storage_filesystem=args.storage_filesystem)
    board = None
    if pbt and args.num_workers > 0 and not restoring:
        # multi-worker trials: exploits in their running worker groups (pbt_scheduler.py), when all train at once
        board = start_board()
        tune_scheduler = in_place_pbt(tune_scheduler, board, n_trials=n_trials, space=space,
                                      max_concurrent=max_concurrent, search_alg=search_alg)
        if not isinstance(tune_scheduler, InPlacePBT):
            ray.kill(board)
            board = None

    # report_to mlflow: one parent run for the sweep here, one child run per trial (in the trial)
    mlflow_sweep = start_sweep_run(args, name, {
        "n_trials": n_trials, "direction": direction, "scheduler": _describe(scheduler) or "fifo",
        **{f"hp.{k}": _describe(v) for k, v in space.items()}})
    try:
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, blueprint=blueprint, compute_objective=compute_objective,
                                 storage_path=storage_path, sweep=name, hp_name=hp_name, report_checkpoints=pbt,
                                 mlflow_sweep=mlflow_sweep, pbt_board=board),
            resources,
        )
        has_metric = getattr(tune_scheduler, "_metric", None) is not None
        if restoring:
            tuner = tune.Tuner.restore(path, trainable, resume_errored=True, storage_filesystem=args.storage_filesystem)
        else:
            tuner = tune.Tuner(
                trainable, param_space=space,
                # a scheduler that carries metric/mode itself gets none here: Tune refuses them twice
                tune_config=tune.TuneConfig(metric=None if has_metric else "objective",
                                            mode=None if has_metric else (mode if isinstance(mode, str) else mode[0]),
                                            num_samples=n_trials, scheduler=tune_scheduler, search_alg=search_alg,
                                            max_concurrent_trials=max_concurrent),
                run_config=tune.RunConfig(name=name, storage_path=storage_path, callbacks=[TrialLines(args.max_steps)],
                                          storage_filesystem=args.storage_filesystem, verbose=0),
            )
        with warnings.catch_warnings():
            # Tune's advice to implement reset_config is for class Trainables; a trial here is a function
            warnings.filterwarnings("ignore", message="Consider boosting PBT performance")
            results = tuner.fit()
        trainer.sweep_results = results  # the trials table: results.get_dataframe()
        rows = []
        scope = os.environ.get("RAY_SCOPE", "last")  # transformers' knob: which reports rank the trials
        done = all_recorded(storage_path, args.storage_filesystem, name)  # trials' own completion records
        for result in results:
            record = _recorded_metrics(result, done)
            # Tune's own result, unless the trial's record is newer (the driver died before Tune saved its end)
            metrics = record if record and (result.metrics or {}).get("step") != record.get("step") else result.metrics
            if metrics and "objective" in metrics:
                score = metrics["objective"] if metrics is not result.metrics else _scope_score(result, scope, mode)
                rows.append({"trial_id": metrics.get("trial_id"), "objective": metrics["objective"],
                             "score": score, "config": result.config, "run_dir": metrics.get("run_dir")})
        best = best_run(rows, direction, metric="objective" if scope == "last" or not isinstance(mode, str) else "score")
        row = next(r for r in rows if r["trial_id"] == best.run_id)
        # BestRun.objective is the winner's last report, as transformers' Ray backend returns it
        best = type(best)(best.run_id, row["objective"], best.hyperparameters, best_checkpoint_of(row["run_dir"]))
    except BaseException:
        finish_sweep_run(mlflow_sweep, failed=True)
        raise
    finally:
        if board is not None:
            ray.kill(board)
    finish_sweep_run(mlflow_sweep, results, best)
    trainer.sweep_mlflow_run_id = mlflow_sweep["run_id"] if mlflow_sweep else None  # the parent run
    return best


def _recorded_metrics(result, done: dict) -> dict | None:
    """A trial's final metrics from its completion record (its Tune state may predate its end: a killed driver)."""
    trial_id = (result.metrics or {}).get("trial_id")
    if trial_id in done:
        return done[trial_id]
    folder = os.path.basename(str(getattr(result, "path", "") or ""))
    return next((m for tid, m in done.items() if tid and tid in folder), None)


def _describe(value) -> str | None:
    """A scheduler or a Tune domain as a short param value (`loguniform(1e-05, 0.01)`, `[1, 2]`)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    categories = getattr(value, "categories", None)
    if categories is not None:
        return str(list(categories))
    if hasattr(value, "lower") and hasattr(value, "upper"):
        sampler = type(getattr(value, "sampler", None) or object).__name__.lstrip("_").lower()
        return f"{type(value).__name__.lower()}[{value.lower}, {value.upper}]" + (
            f" {sampler}" if sampler not in ("object", "nonetype") else "")
    return type(value).__name__


def _scope_score(result, scope: str, mode):
    """A trial's score under Tune's get_best_trial scopes: last, all, avg, last-5-avg, last-10-avg."""
    if scope == "last" or not isinstance(mode, str):
        return result.metrics["objective"]
    history = list(result.metrics_dataframe["objective"]) if result.metrics_dataframe is not None else []
    if not history:
        return result.metrics["objective"]
    if scope == "all":
        return min(history) if mode == "min" else max(history)
    if scope in ("avg", "last-5-avg", "last-10-avg"):
        tail = history if scope == "avg" else history[-int(scope.split("-")[1]):]
        return sum(tail) / len(tail)
    raise ValueError(f"RAY_SCOPE={scope!r}: use one of {', '.join(SCOPES)}.")


def _trial_lines_class():
    from ray import tune

    class TrialLines(tune.Callback):
        """One plain line on the driver per trial event (Tune's own table is off: verbose=0)."""

        def __init__(self, max_steps):
            self.max_steps = max_steps
            self.started = set()

        def on_trial_start(self, iteration, trials, trial, **info):
            if trial.trial_id in self.started:  # PBT paused it, or exploited another trial's checkpoint
                step = (trial.last_result or {}).get("step")
                print(f"[hp-search] trial {trial.trial_id} restarted from a checkpoint (reported step {step}) with "
                      f"{_short(trial.config)}", flush=True)
                return
            self.started.add(trial.trial_id)
            print(f"[hp-search] trial {trial.trial_id} started: {_short(trial.config)}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            # Tune marks a trial the scheduler stopped as done too: the step tells an early stop
            last = trial.last_result or {}
            print(f"[hp-search] trial {trial.trial_id} ended at step {last.get('step')} "
                  f"(max_steps {self.max_steps}): objective {last.get('objective')}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[hp-search] trial {trial.trial_id} failed: see {trial.path}", flush=True)

    return TrialLines


def TrialLines(max_steps):  # noqa: N802 - a factory: ray.tune is imported only when a search runs
    return _trial_lines_class()(max_steps)


def _short(config: dict) -> str:
    config = redact(dict(config))  # a searched field may be a secret-named one
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


def best_checkpoint_of(run_dir: str | None) -> str | None:
    """The trial's best checkpoint as its last trainer_state.json names it, else its latest checkpoint.

    The file is read from storage like any checkpoint's (checkpoint/state_check.py): a best_model_checkpoint that
    is not a checkpoint-<step> folder directly inside the trial's run folder is never handed to the user."""
    import json

    latest = latest_checkpoint(run_dir) if run_dir else None
    if latest is None:
        return None
    try:
        with open(os.path.join(latest, TRAINER_STATE), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        state = None
    best = state.get("best_model_checkpoint") if isinstance(state, dict) else None
    if best is not None and not checkpoint_in_run(best, run_dir):
        logger.warning("raytrainer: %s names best_model_checkpoint=%r, which is not a checkpoint-<step> folder "
                       "directly inside the trial's run folder %s: BestRun.run_summary is its latest checkpoint instead",
                       os.path.join(latest, TRAINER_STATE), best, run_dir)
        return latest
    return best if best and os.path.isdir(best) else latest


def _check_pbt(args) -> None:
    """PBT exploits at a report; each report must carry the checkpoint of the evaluation it reports."""
    value = lambda x: str(getattr(x, "value", x))  # noqa: E731
    if value(args.eval_strategy) == "no" or value(args.save_strategy) != value(args.eval_strategy) or (
            value(args.eval_strategy) == "steps" and args.save_steps != args.eval_steps):
        raise ValueError(
            f"scheduler='pbt' needs a checkpoint at every evaluation: set save_strategy == eval_strategy and "
            f"save_steps == eval_steps (got save_strategy={value(args.save_strategy)!r}, save_steps={args.save_steps}, "
            f"eval_strategy={value(args.eval_strategy)!r}, eval_steps={args.eval_steps}); perturbation_interval "
            "counts evaluations."
        )


def _max_reports(args) -> int:
    """An upper bound on the evaluations one trial reports (ASHA's max_t)."""
    if str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "steps" and args.max_steps > 0:
        return max(1, math.ceil(args.max_steps / (args.eval_steps or args.logging_steps or 1)))
    return 100


def _trial_resources(args) -> dict:
    if args.num_workers == 0:
        cpus = (args.resources_per_worker or {}).get("CPU", TRIAL_CPUS_INPROCESS)
        gpus = 1 if args.use_gpu else 0
        return {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}
    # the trial itself only waits on its worker group, which reserves its own CPUs/GPUs
    return {"CPU": TRIAL_CPUS_DRIVER}


def _max_concurrent(args, resources, asked):
    """As many trials at once as the cluster holds; a clear error when not even one fits."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    per_worker = (args.resources_per_worker or {}).get("CPU", 1)
    need = resources["CPU"] + args.num_workers * per_worker
    if need > total:
        raise ValueError(
            f"one trial needs {need:g} CPUs (num_workers={args.num_workers} x {per_worker:g} + {resources['CPU']:g} "
            f"for the trial itself) but the Ray cluster has {total:g}: lower num_workers or resources_per_worker."
        )
    fits = max(1, int(total // need))
    return min(asked, fits) if asked else fits
