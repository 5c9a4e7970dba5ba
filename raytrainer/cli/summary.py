"""What the job tells its user: the dry run (resolved config, resources, where it writes) and the
summary at the end (final model, checkpoints, plot, MLflow run, Ray dashboard and job id; for a sweep a
table of the best trials and trials.csv), ending in one line `RAYTRAINER_RESULT {json}`."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os

import yaml

from ..redact import redact, redact_json, redact_text
from .arguments import JobConfig, SearchArguments

def resources_line(args, search: SearchArguments | None) -> str:
    cluster = f"the Ray cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']}" if os.environ.get("RAY_ADDRESS") \
        else "a local Ray started by this job"
    if args.num_workers == 0:
        one = "the loop in one process (num_workers=0)"
        per = dict(args.resources_per_worker or {"CPU": 1})
        if search is None:
            return f"{one}, in this process (no Ray)"
        return (f"{search.n_trials} trials x {one}, each trial a Ray Tune task asking {per}; "
                f"max_concurrent_trials={search.max_concurrent_trials or 'as many as fit'}; on {cluster}")
    per = dict(args.resources_per_worker or {"CPU": 1})
    if args.use_gpu:
        per.setdefault("GPU", 1)
    cpus = args.num_workers * per.get("CPU", 1)
    gpus = args.num_workers * per.get("GPU", 0)
    line = (f"{args.num_workers} Ray Train workers x {per} = {cpus:g} CPUs, {gpus:g} GPUs "
            f"(strategy={args.strategy}, max_failures={args.max_failures}); on {cluster}")
    if search is not None:
        line = f"{search.n_trials} trials, each {line}"
    return line


def outputs(job: JobConfig) -> dict:
    args = job.training_args
    out = os.path.abspath(args.output_dir)
    run_folder = (f"{args.storage_path.rstrip('/')}/{args.run_name}" if args.storage_path else out)
    where = {"output_dir": out, "final_model": out, "checkpoints": run_folder,
             "plot": os.path.join(out, "training_plot.png")}
    if job.search is not None:
        base = args.storage_path or os.path.dirname(out)
        name = job.search.sweep_name or f"{args.run_name}-hp-search"
        where = {"output_dir": out, "sweep": f"{base.rstrip('/')}/{name}", "plot": os.path.join(out, "sweep_plot.png")}
    if tracking_on(args):
        where["mlflow"] = os.environ.get("MLFLOW_TRACKING_URI") or _default_tracking(out)
    return where


def tracking_on(args) -> bool:
    return "mlflow" in (args.report_to or [])


def _default_tracking(output_dir: str) -> str:
    from raytrainer.tracking.mlflow import default_tracking_uri

    return default_tracking_uri(output_dir) + " (default: no MLFLOW_TRACKING_URI set)"


def _given_args(job: JobConfig) -> dict:
    """The training_args the config and the command line set, as resolved (no secret shown)."""
    from raytrainer.tracking.mlflow import REDACTED, safe_params

    shown = safe_params(job.training_args)
    out = {}
    for k in job.given:
        value = getattr(job.training_args, k, None)
        value = [getattr(v, "value", v) for v in value] if isinstance(value, list) else getattr(value, "value", value)
        out[k] = value if isinstance(value, list) and shown.get(k) != REDACTED else shown.get(k, value)
    return out


def dry_run(job: JobConfig, found: dict) -> None:
    resolved = {
        "config": job.config_path,
        "trainer": job.trainer,
        "model": {**dataclasses.asdict(job.model), "resolved": found["model"], "task": found["task"]},
        "data": {**dataclasses.asdict(job.data), **{k: v for k, v in found["files"].items()}},
        "training_args": _given_args(job),
    }
    if job.search is not None:
        resolved["search"] = dataclasses.asdict(job.search)
    print("# resolved config")
    print(yaml.safe_dump(redact(resolved), sort_keys=False, default_flow_style=False).rstrip())
    print("# resources")
    print(f"resources: {resources_line(job.training_args, job.search)}")
    print("# writes to")
    for key, value in outputs(job).items():
        print(f"{key}: {redact_text(str(value))}")


def in_storage(args, best_checkpoint: str | None) -> dict:
    """storage_path is a URI (s3://...): where the run's checkpoints and final_model/ are in it, as URIs
    (the summary's "final model" is this machine's copy). Empty for a local storage_path or no Ray run."""
    if args.num_workers < 1 or not args.storage_path or "://" not in args.storage_path:
        return {}
    from raytrainer.checkpoint.layout import FINAL_MODEL
    from raytrainer.launch import storage_location

    base, name = storage_location(args)
    scheme = base.split("://", 1)[0]
    run = f"{base}/{name}"
    found = {"final_model_uri": f"{run}/{FINAL_MODEL}", "checkpoints": f"{run}/"}
    if best_checkpoint and "://" not in best_checkpoint:  # a path inside the bucket's filesystem
        found["best_checkpoint"] = f"{scheme}://{best_checkpoint.lstrip('/')}"
    return found


def print_summary(summary: dict, rows) -> None:
    from raytrainer.log_filter import flush_worker_lines

    flush_worker_lines()  # what Ray still holds of the workers' lines goes before the summary, not after
    summary.update({k: v for k, v in ray_where().items() if v})
    print("\n=== raytrainer job summary ===", flush=True)
    for label, key in [*rows, ("Ray dashboard", "ray_dashboard"), ("Ray job", "ray_job_id")]:
        if summary.get(key) is not None:
            print(f"{label:>16}: {redact(summary[key], key)}")
    metrics = {k: v for k, v in summary.items() if k.startswith(("eval_", "train_loss", "global_step"))}
    if metrics:
        print(f"{'final metrics':>16}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in metrics.items()))
    print("RAYTRAINER_RESULT " + redact_json(summary), flush=True)



def ray_where() -> dict:
    """The Ray dashboard's URL (when this process is connected to Ray) and, under `ray job submit`, the
    job's submission id (`ray job logs <id>`)."""
    found = {}
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        found["ray_job_id"] = (config.get("metadata") or {}).get("job_submission_id")
    except (ValueError, AttributeError):
        pass
    try:
        import ray

        if ray.is_initialized():
            # Ray has no public getter; ray.init() returns it only to its first caller
            from ray._private.worker import get_dashboard_url

            url = get_dashboard_url()
            found["ray_dashboard"] = url if not url or "://" in url else f"http://{url}"
    except Exception:  # noqa: BLE001 - no dashboard (include_dashboard=False): nothing to show
        pass
    return found


def trial_rows(results, hp_names, direction: str) -> list[dict]:
    """One row per trial of a Tune ResultGrid, best objective first (failed trials last)."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        objective = metrics.get("objective")
        rows.append({"trial": os.path.basename(str(result.path or "")) or metrics.get("trial_id"),
                     "objective": objective, "step": metrics.get("step", metrics.get("training_iteration")),
                     **{name: (result.config or {}).get(name) for name in hp_names},
                     "error": None if result.error is None else type(result.error).__name__})
    sign = -1 if direction == "maximize" else 1

    def order(row):
        value = row["objective"]
        bad = not isinstance(value, (int, float)) or math.isnan(value)
        return (bad, 0.0 if bad else sign * value)

    return sorted(rows, key=order)


def write_trials(rows: list[dict], path: str) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial", "objective"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def print_trials(rows: list[dict], top: int) -> None:
    """The best `top` trials as an aligned table."""
    if not rows:
        return
    names = list(rows[0])
    cells = [[_cell(row[n]) for n in names] for row in rows[:top]]
    widths = [max(len(n), *(len(c[i]) for c in cells)) for i, n in enumerate(names)]
    print(f"\ntrials (best {min(top, len(rows))} of {len(rows)} by objective):")
    print("  ".join(n.ljust(w) for n, w in zip(names, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
