"""Ray for the job: started (or joined under `ray job submit`) with the workers' environment, and a job
log of plain lines (no colour codes, no tqdm redraws), whatever Ray and Hugging Face would print."""

from __future__ import annotations

import json
import os
import re
import sys

from .arguments import JobConfig

def start_ray(job: JobConfig, prepared_needs_ray: bool, tracking_env: dict) -> None:
    """Start/join Ray with the environment for the workers (tracking, logs) before Ray Data reads."""
    args = job.training_args
    if args.num_workers == 0 and job.search is None and not prepared_needs_ray:
        return
    from raytrainer.launch import ensure_ray

    os.environ.update(tracking_env)  # a local Ray's workers inherit this process's environment
    kwargs = {}
    if os.environ.get("RAY_ADDRESS"):
        # under `ray job submit` Ray merges this with the job's runtime env and refuses a variable set in
        # both: leave out what the job already gives the workers, and let ours win where it differs
        job_vars = job_env_vars()
        env = {k: v for k, v in tracking_env.items() if job_vars.get(k) != v}
        if env:
            if set(env) & set(job_vars):
                os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
            kwargs["runtime_env"] = {"env_vars": env}
    else:
        # Ray Data's read and tokenise tasks need CPUs beside the training workers' ones
        per = (args.resources_per_worker or {}).get("CPU", 1)
        kwargs["num_cpus"] = max(os.cpu_count() or 1, int(args.num_workers * per) + (2 if prepared_needs_ray else 0))
    if not sys.stdout.isatty():
        no_colour()
        if prepared_needs_ray:
            # Ray Data logs plain progress lines on this process when stdout is no terminal, but its
            # SplitCoordinator (Ray Train's data sharding, an actor) would send tqdm bars here to redraw
            from ray.data import DataContext

            DataContext.get_current().use_ray_tqdm = False
    ensure_ray(**kwargs)
    from raytrainer.log_filter import filter_worker_lines

    filter_worker_lines()  # each warning once, whichever worker printed it (raytrainer/log_filter.py)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def no_colour() -> None:
    """A job log is a file: Ray colours some lines whatever the output is (its "View the dashboard at"
    log line, the "[repeated 3x across cluster]" of the worker lines it deduplicates); drop the codes."""
    import logging

    import ray  # noqa: F401 - its logger's handlers (holding the original stderr) are made on import

    # transformers' handler too: its LOAD REPORT title is bold whatever the output is
    for handler in logging.getLogger("ray").handlers + logging.getLogger("transformers").handlers:
        if not any(isinstance(f, _NoColour) for f in handler.filters):
            handler.addFilter(_NoColour())
    if not isinstance(sys.stdout, _PlainStream):
        sys.stdout = _PlainStream(sys.stdout)  # Ray prints the workers' lines to the current sys.stdout/err
    if not isinstance(sys.stderr, _PlainStream):
        sys.stderr = _PlainStream(sys.stderr)


class _NoColour:
    """A logging filter that drops terminal colour codes from a record's message."""

    def filter(self, record):
        message = record.getMessage()
        if "\x1b[" in message:
            record.msg, record.args = _ANSI.sub("", message), ()
        return True


class _PlainStream:
    """A text stream that drops terminal colour codes from what is written to it."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return self._stream.write(_ANSI.sub("", text) if "\x1b[" in text else text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def job_env_vars() -> dict:
    """The env_vars of the runtime env `ray job submit` gave this job (empty outside a job)."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return dict((config.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, TypeError, AttributeError):
        return {}


def plain_log_env() -> dict:
    """stdout is a job log or a pipe: no tqdm redraws from Hugging Face's load/save bars ("Writing model
    shards"), here and on the workers (whose output Ray forwards to this log). Returns the workers' env."""
    if sys.stdout.isatty():
        return {}
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # the "(RayTrainWorker pid=...)" prefixes, uncoloured
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
        return {}
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is imported (workers)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # this process imported it already
    return {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
