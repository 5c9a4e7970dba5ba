"""One clean log stream for a Ray run: each warning once, no per-rank copies, no Ray-internal noise.

A job's log is the driver's output plus every line Ray forwards from its workers, so a warning that
each process gives (a transformers config check, torch's pin_memory notice, DDP's
find_unused_parameters hint) would show once per process. Two halves, both narrow:

* Driver (`job_logs`, then `filter_worker_lines` once Ray is up): a warning's text is shown the first
  time it reaches the log, from whichever process, and never again: the driver's own (transformers'
  log handler, `warnings.showwarning`) and the warning lines Ray forwards from workers (Python
  warnings, `[transformers] ...` lines, torch's C++ `[W...] Warning:` lines). Only exact repeats go;
  a warning with another text, and every error, still shows. A short list of lines from Ray's own
  machinery that tell a user nothing (`RAY_NOISE`) goes to Ray's own RAY_DEDUP_LOGS_SKIP_REGEX instead
  (`skip_ray_noise`, before ray is imported). Ray's deduplication cannot do the rest: it merges only
  identical lines within a few seconds (then prints "[repeated Nx]"), never a worker's copy of a
  warning the driver printed, nor a warning of several lines.
* Worker (`worker_logs`, at the start of each Ray Train worker): Ray Train's per-rank INFO lines
  about a reported checkpoint are kept from rank 0 only.

`flush_worker_lines()` prints what Ray's log deduplication still holds, so that the job's summary,
printed after it, is the last thing in the log.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import warnings
from collections import Counter

# ------------------------------------------------------------------------------------ lines dropped
# Lines Ray forwards that say nothing the user can act on (each pattern names its source). Ray's own
# log deduplicator drops them: RAY_DEDUP_LOGS_SKIP_REGEX, read when ray is imported (skip_ray_noise).
RAY_NOISE = (
    # Ray Train's controller starts its PreemptionWatcher with the worker actors' handles as
    # constructor arguments and max_restarts=-1; Ray core (core_worker.cc) logs this at ERROR level for
    # any such actor (ray-project/ray#53727). The handles live as long as the controller: nothing is lost.
    r"Actor with class name: 'PreemptionWatcher' and ID: '\w+' has constructor arguments in the "
    r"object store and max_restarts > 0",
)
SKIP_ENV = "RAY_DEDUP_LOGS_SKIP_REGEX"


def skip_ray_noise() -> bool:
    """Before ray is imported (the job's entries): RAY_NOISE joins the user's own RAY_DEDUP_LOGS_SKIP_REGEX.
    False when ray was imported already (the setting would come too late)."""
    pattern = "|".join(f"(?:{p})" for p in RAY_NOISE)
    theirs = os.environ.get(SKIP_ENV)
    if not theirs:
        os.environ[SKIP_ENV] = pattern
    elif pattern not in theirs:
        os.environ[SKIP_ENV] = f"(?:{theirs})|{pattern}"
    return "ray._private.ray_constants" not in sys.modules

# Ray's token notice when it turns token authentication on by itself (a local Ray the job starts, or a
# token found in ~/.ray): nothing to do. Its "disabled ... anyone with network access" warning stays.
TOKEN_ENABLED = re.compile(r"^Token authentication is enabled for this Ray cluster\. Set RAY_AUTH_MODE=disabled")
TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"

# Ray Train's own DataConfig.default_ingest_options() passes ExecutionOptions its deprecated
# exclude_resources; the warning points at Ray's code, not the user's.
RAY_INTERNAL_WARNINGS = (r"`ExecutionOptions\.exclude_resources` is deprecated",)
# Ray Data's tip when Dataset.take() runs, which its own Dataset.unique() calls (the job reads the labels so)
TAKE_TIP = ("ray.data.dataset", re.compile(r"^Tip: Use `take_batch\(\)` instead of `take\(\) / show\(\)`"))

# Ray Train logs these on every rank for the same checkpoint; rank 0's copy is kept.
PER_RANK_INFO = {
    "ray.train.v2._internal.execution.storage": re.compile(r"^Checkpoint successfully created at: "),
    "ray.train._internal.storage": re.compile(r"^Checkpoint successfully created at: "),
}
# ...and "Reporting training result <n>: TrainingReport(checkpoint=..., metrics={...})" from the worker's
# train context repeats the checkpoint line and the evaluation's log line: kept from rank 0 only too.
REPORT_LINE = re.compile(r"^Reporting training result \d+: ")

# ----------------------------------------------------------------------------- warning recognition
_PY_WARNING = re.compile(r"^(?P<where>\S.*?):(?P<line>\d+): (?P<category>[A-Za-z_][\w.]*(Warning|Deprecation\w*)): "
                         r"(?P<message>.*)$")
_LIB_LINE = re.compile(r"^\[(?P<lib>transformers|datasets|huggingface_hub|accelerate|peft|trl|deepspeed)\] "
                       r"(?P<message>.*)$")
# torch's C++ warnings: "[rank1]:[W1124 07:22:54.630715527 reducer.cpp:1529] Warning: <message>"
_CPP_WARNING = re.compile(r"^(\[rank\d+\]:)?\[W\d{4} [\d:.]+ (?P<where>[^\]]+)\] Warning: (?P<message>.*)$")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MAX_CONTINUATION = 64  # lines after a warning's first line that may belong to it (a table, a source line)


def warning_key(line: str):
    """The identity of a warning line, the same whichever process or rank printed it; None: not a warning."""
    line = _ANSI.sub("", line)
    m = _CPP_WARNING.match(line)
    if m:
        return ("c++", m["where"], m["message"])
    m = _LIB_LINE.match(line)
    if m:
        return ("lib", m["lib"], m["message"])
    m = _PY_WARNING.match(line)
    if m:
        return ("py", m["category"].rsplit(".", 1)[-1], m["message"])
    return None


class ShownOnce:
    """The warnings shown in this job's log so far: key -> the lines that followed the first line."""

    def __init__(self):
        self._seen: dict = {}
        self._lock = threading.Lock()

    def first(self, key, rest=()) -> bool:
        """True the first time `key` is seen (and remember `rest`, the lines that may continue it)."""
        with self._lock:
            if key in self._seen:
                return False
            continuation = []
            for line in rest:
                if len(continuation) >= MAX_CONTINUATION or warning_key(line) is not None:
                    break
                if key[0] == "py" and not line[:1].isspace():  # a Python warning: only its source line
                    break
                continuation.append(_ANSI.sub("", line))
            if key[0] == "c++":  # one line
                continuation = []
            self._seen[key] = continuation
            return True

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()

    def continuation(self, key) -> Counter:
        with self._lock:
            return Counter(self._seen.get(key, ()))

    def filter_lines(self, lines: list) -> list:
        """Drop repeated warnings (and the lines that continued their first copy)."""
        kept, i = [], 0
        while i < len(lines):
            line = lines[i]
            key = warning_key(line)
            if key is None or self.first(key, lines[i + 1:]):
                kept.append(line)
                i += 1
                continue
            # a repeat: skip it and the lines right after it that followed its first copy too (a Python
            # warning's source line, the rows of a multi-line transformers message, in any order)
            i += 1
            left = self.continuation(key)
            while i < len(lines) and left[_ANSI.sub("", lines[i])] > 0 and warning_key(lines[i]) is None:
                left[_ANSI.sub("", lines[i])] -= 1
                i += 1
        return kept


shown = ShownOnce()


# --------------------------------------------------------------------------------------- driver
class _OnceFilter(logging.Filter):
    """On a log handler of the driver: a record whose text is already in the log is not printed again."""

    def __init__(self, lib: str):
        super().__init__("")
        self.lib = lib

    def filter(self, record):
        if record.levelno >= logging.ERROR:
            return True
        lines = _ANSI.sub("", record.getMessage()).split("\n")
        return shown.first(("lib", self.lib, lines[0]), lines[1:])


class _DropMessages(logging.Filter):
    """On a logger: drop records at or below `up_to` (never an error) whose message matches a pattern."""

    def __init__(self, *patterns, up_to=logging.WARNING):
        super().__init__("")
        self.patterns, self.up_to = patterns, min(up_to, logging.WARNING)

    def filter(self, record):
        if record.levelno > self.up_to:
            return True
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def _add_filter(target, flt) -> None:
    if not any(type(f) is type(flt) for f in target.filters):
        target.addFilter(flt)


_original_showwarning = None


def _showwarning_once(message, category, filename, lineno, file=None, line=None):
    text = warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n").split("\n")
    if shown.first(warning_key(text[0]) or ("py", category.__name__, str(message)), text[1:]):
        _original_showwarning(message, category, filename, lineno, file, line)


def job_logs() -> None:
    """The job's driver, before Ray starts and before any model is built: see the module docstring."""
    global _original_showwarning
    shown.clear()  # a new job, a new log (tests run several jobs in one process)
    import ray.util.annotations  # noqa: F401 - it adds its RayDeprecationWarning filter on import: ours go first

    _add_filter(logging.getLogger(TOKEN_LOGGER), _DropMessages(TOKEN_ENABLED))
    _add_filter(logging.getLogger(TAKE_TIP[0]), _DropMessages(TAKE_TIP[1], up_to=logging.INFO))
    for message in RAY_INTERNAL_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger()  # makes transformers' handler
    for handler in logging.getLogger("transformers").handlers:
        _add_filter(handler, _OnceFilter("transformers"))
    if warnings.showwarning is not _showwarning_once:
        _original_showwarning = warnings.showwarning
        warnings.showwarning = _showwarning_once


def filter_worker_lines() -> bool:
    """Once Ray is up on the driver: the lines Ray forwards from workers go through `shown.filter_lines`.
    True when installed (Ray's printer found where Ray 2.x keeps it)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    handlers = getattr(dispatcher, "handlers", None)
    lock = getattr(dispatcher, "_lock", None)
    if handlers is None or lock is None:
        return False
    with lock:
        wrapped = []
        for name, handler in dispatcher.handlers:
            if name == "ray_print_logs" and not getattr(handler, "_raytrainer_once", False):
                handler = _FilteredPrinter(handler)
            wrapped.append((name, handler))
        dispatcher.handlers = wrapped
    return any(getattr(h, "_raytrainer_once", False) for _, h in wrapped)


class _FilteredPrinter:
    _raytrainer_once = True

    def __init__(self, printer):
        self.printer = printer

    def __call__(self, data):
        lines = data.get("lines")
        if isinstance(lines, list) and lines:
            kept = shown.filter_lines(lines)
            if not kept:
                return None
            if len(kept) != len(lines):
                data = dict(data, lines=kept)
        return self.printer(data)


def flush_worker_lines() -> None:
    """Print the worker lines Ray's log deduplication still holds ("[repeated 2x across cluster]"), now,
    instead of when Ray disconnects at exit (after the job's summary)."""
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import stderr_deduplicator, stdout_deduplicator
    except ImportError:
        return
    if not getattr(ray_worker.global_worker, "connected", False):
        return
    try:
        ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        for dedup, sink in ((stdout_deduplicator, sys.stdout), (stderr_deduplicator, sys.stderr)):
            for batch in dedup.flush():
                ray_worker.print_worker_logs(batch, sink, ignore_prefix)
    except (AttributeError, TypeError):  # another Ray: its own flush at exit still prints them
        return
    sys.stdout.flush()
    sys.stderr.flush()


# --------------------------------------------------------------------------------------- worker
def _rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # noqa: BLE001
        pass
    try:
        import ray.train

        return ray.train.get_context().get_world_rank()
    except Exception:  # noqa: BLE001
        return 0


def worker_logs(rank: int | None = None) -> None:
    """In a Ray Train worker, before the Trainer is built: Ray Train's per-rank checkpoint lines from rank 0 only."""
    rank = _rank() if rank is None else rank
    if rank == 0:
        return
    for name, pattern in PER_RANK_INFO.items():
        _add_filter(logging.getLogger(name), _DropMessages(pattern, up_to=logging.INFO))
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    _add_filter(train_context.logger, _DropMessages(REPORT_LINE, up_to=logging.INFO))
