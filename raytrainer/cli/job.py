"""The job: build the inputs, run train() (or hyperparameter_search() for a config with a search:
section) with raytrainer.Trainer, save the final model, plot, and print the summary.

`main(argv)` is what both `raytrainer train|sweep` and `python jobs/finetune.py` call."""

from __future__ import annotations

import dataclasses
import os
import sys

from ..redact import redact_text
from .arguments import BUILTIN_MODELS, ConfigError, JobConfig
from .config import load_config
from .inputs import check_inputs, prepare
from .ray_session import plain_log_env, start_ray
from .search_space import tune_space
from .summary import dry_run, in_storage, outputs, print_summary, print_trials, trial_rows, tracking_on, write_trials

TOP_TRIALS = 10  # rows of the sweep's trials table in the log (trials.csv has them all)


def run(job: JobConfig, found: dict) -> dict:
    import raytrainer
    from raytrainer.tracking.plots import plot_run

    args = job.training_args
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    mlflow_run = None
    tracking_env: dict = {}
    if tracking_on(args) and job.search is None:
        import mlflow

        from raytrainer.tracking import mlflow as tracking

        if not os.environ.get("MLFLOW_TRACKING_URI") and not mlflow.is_tracking_uri_set():
            tracking.use_local_store(out)
        elif os.environ.get("MLFLOW_EXPERIMENT_NAME"):
            mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
        mlflow_run = mlflow.start_run(run_name=args.run_name)
        if args.num_workers > 0:
            tracking_env = tracking.driver_env(out)  # the rank-0 worker logs into this run
    elif tracking_on(args):  # hyperparameter_search opens the sweep's parent run; each trial a child run
        from raytrainer.tracking import mlflow as tracking

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            tracking.use_local_store(out)
        tracking_env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME") if k in os.environ}

    needs_ray_data = args.num_workers > 0 and "train_file" in found["files"] and job.trainer == "trainer"
    if args.num_workers > 0 or job.search is not None:
        from raytrainer.log_filter import job_logs

        job_logs()  # one clean log: each warning once, from whichever process (raytrainer/log_filter.py)
    if args.num_workers > 0 or job.search is not None:
        check_storage(args)  # before Ray starts: a bucket it cannot write is an error line, no cluster taken
    start_ray(job, needs_ray_data, {**tracking_env, **plain_log_env()})
    prepared = prepare(job, found)
    if job.trainer == "trainer":
        trainer = raytrainer.Trainer(
            model_init=prepared.model_init, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
            processing_class=prepared.tokenizer, compute_metrics=prepared.compute_metrics,
        )
    else:
        trainer = trl_trainer(job, prepared)
    if tracking_on(args):
        from raytrainer.tracking.mlflow import use_safe_mlflow_callback

        use_safe_mlflow_callback(trainer)
    if not sys.stdout.isatty():  # a job log or a pipe: plain progress lines, not tqdm's redraws
        from raytrainer.tracking.progress import use_progress_lines

        use_progress_lines(trainer)

    if job.search is not None:
        return run_search(job, trainer, out)

    try:
        result = trainer.train(resume_from_checkpoint=resume_value(args.resume_from_checkpoint))
        metrics = trainer.evaluate() if prepared.eval is not None else {}
        trainer.save_model()
        plot = plot_run(trainer.state.log_history, os.path.join(out, "training_plot.png"), title=args.run_name)
        summary = {"global_step": result.global_step, "train_loss": result.training_loss, **metrics,
                   "output_dir": out, "final_model": out,
                   "best_checkpoint": trainer.state.best_model_checkpoint, "plot": os.path.abspath(plot),
                   **in_storage(args, trainer.state.best_model_checkpoint)}
        if mlflow_run is not None:
            from raytrainer.tracking.mlflow import log_final_artifacts, run_url

            run_id = mlflow_run.info.run_id
            log_final_artifacts(run_id, plot_path=plot, model_dir=out)
            summary["mlflow_run_id"] = run_id
            summary["mlflow_run"] = run_url(run_id)
    finally:
        if mlflow_run is not None:
            _end_run(mlflow_run.info.run_id)
    print_summary(summary, [("final model", "final_model"), ("final model URI", "final_model_uri"),
                            ("checkpoints", "checkpoints"), ("best checkpoint", "best_checkpoint"),
                            ("plot", "plot"), ("MLflow run", "mlflow_run")])
    return summary


def check_storage(args) -> None:
    """The run's storage probed (written and read back) as launch.run_on_ray probes it, but before start_ray."""
    from raytrainer import storage
    from raytrainer.launch import preflight, storage_location

    with preflight():
        storage.preflight_storage(storage_location(args)[0], args.storage_filesystem)


def trl_trainer(job: JobConfig, prepared):
    """TRL's constructor (through raytrainer.trl) with a model built here: TRL takes model=, not model_init=.
    DPO's reference model is built the same way from the same seed (the policy's starting point), so TRL
    does not reload it from the Hub by name."""
    from transformers import set_seed

    from .config import trainer_classes

    trainer_cls, _ = trainer_classes(job.trainer)
    args = job.training_args
    model_init, seed = prepared.model_init, args.seed  # what build() carries to a trial (not the datasets)

    def build():
        set_seed(seed)
        return model_init()

    kwargs = {"ref_model": build()} if job.trainer == "dpo" else {}
    trainer = trainer_cls(model=build(), args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                          processing_class=prepared.tokenizer, **kwargs)
    if job.search is not None:
        trainer.model_init = build  # hyperparameter_search: one fresh model per trial
    return trainer


def _end_run(run_id: str) -> None:
    """End the job's run: FINISHED, whoever (a worker's callback reattaching) touched it last."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run()  # sets FINISHED (and prints the run's URL once)
    else:
        mlflow.MlflowClient().set_terminated(run_id, "FINISHED")


def run_search(job: JobConfig, trainer, out: str) -> dict:
    from raytrainer.tracking.plots import plot_sweep

    search, args = job.search, job.training_args
    training_fields = [f.name for f in dataclasses.fields(type(args)) if f.init]
    space = tune_space(search.hp_space, training_fields)
    scheduler = None if (search.scheduler or "none").lower() == "none" else search.scheduler
    kwargs = {"scheduler": scheduler, "name": search.sweep_name, "max_concurrent_trials": search.max_concurrent_trials}
    if search.perturbation_interval:
        kwargs["perturbation_interval"] = search.perturbation_interval
    if search.resume:
        kwargs["resume"] = True  # continue the sweep of this name in storage (raytrainer.tune.search)
    if job.trainer != "trainer":  # TRL's eval metrics (entropy, token accuracy...) are no objective to sum
        from raytrainer.trl import eval_loss_objective

        kwargs["compute_objective"] = eval_loss_objective
    best = trainer.hyperparameter_search(hp_space=space, n_trials=search.n_trials, direction=search.direction,
                                         backend="ray", **{k: v for k, v in kwargs.items() if v is not None})
    plot = plot_sweep(trainer.sweep_results, os.path.join(out, "sweep_plot.png"), max_steps=args.max_steps,
                      title=f"{args.run_name}: {search.n_trials} trials, scheduler={scheduler}")
    hp_names = list(search.hp_space)
    rows = trial_rows(trainer.sweep_results, hp_names, search.direction)
    table = write_trials(rows, os.path.join(out, "trials.csv"))  # beside the plot
    print_trials(rows, TOP_TRIALS)
    summary = {"best_trial": best.run_id, "objective": best.objective, "hyperparameters": best.hyperparameters,
               "best_checkpoint": best.run_summary, "plot": os.path.abspath(plot),
               "sweep": outputs(job)["sweep"], "trials": len(trainer.sweep_results),
               "trials_csv": table}
    parent = getattr(trainer, "sweep_mlflow_run_id", None)  # report_to mlflow: the sweep's parent run
    if parent:
        from raytrainer.tracking.mlflow import log_final_artifacts, run_url

        log_final_artifacts(parent, plot_path=plot)
        summary["mlflow_run_id"] = parent
        summary["mlflow_run"] = run_url(parent)
    print_summary(summary, [("best trial", "best_trial"), ("objective", "objective"),
                            ("hyperparameters", "hyperparameters"), ("best checkpoint", "best_checkpoint"),
                            ("sweep folder", "sweep"), ("plot", "plot"), ("trials table", "trials_csv"), ("MLflow run", "mlflow_run")])
    return summary

def resume_value(value):
    """resume_from_checkpoint as train() takes it: true -> the last checkpoint (in storage_path for a
    Ray run), a path -> that checkpoint, false/none -> a fresh run."""
    if value is None or isinstance(value, bool):
        return value or None
    text = str(value).strip()
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0", "none", ""):
        return None
    return text


def main(argv=None, command: str | None = None) -> dict | None:
    """Run the job; raises ConfigError for a bad config (the command line prints it as one line).
    command "train" refuses a config with a search: section, "sweep" one without; None runs either."""
    job, ns = load_config(argv)
    name = os.path.basename(job.config_path)
    if command == "train" and job.search is not None:
        raise ConfigError(f"{name} has a search: section: run it with `raytrainer sweep --config ...`")
    if command == "sweep" and job.search is None:
        raise ConfigError(f"{name} has no search: section: add one (see sweep_asha), or run `raytrainer train`")
    if job.model.model_name_or_path in BUILTIN_MODELS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # built-in models never need the Hub
    found = check_inputs(job)
    if job.search is not None:
        tune_space(job.search.hp_space, [f.name for f in dataclasses.fields(type(job.training_args)) if f.init])
    if ns.dry_run:
        dry_run(job, found)
        return None
    for note in job.notes:
        print(f"[raytrainer] {redact_text(note)}", flush=True)
    return run(job, found)


def cli(argv=None, prog: str = "raytrainer train", command: str | None = None) -> int:
    """main() with a bad config, or bad input the driver found before Ray started a worker (launch.preflight),
    as one line on stderr and exit status 2."""
    try:
        main(argv, command)
    except (ConfigError, ValueError) as e:
        if not isinstance(e, ConfigError) and not getattr(e, "found_on_driver", False):
            raise  # an error while training: its traceback is what the user needs
        print(f"{prog}: error: {redact_text(str(e))}", file=sys.stderr, flush=True)
        return 2
    return 0
