"""Upload a checkpoint folder to storage so that it survives a storage outage and is never seen half-done.

* Every storage call is retried with exponential backoff (1 s doubling to 10 s) for at most
  ``RAYTRAINER_STORAGE_RETRY_S`` seconds (default 1800); past that an ``OSError`` names the storage path.
* ``trainer_state.json`` (what a resume requires, `resume.latest_checkpoint_in`) lands last: rank 0 uploads it
  only once its own files and every other rank's are in storage (each rank > 0 leaves a marker file
  when its part is there; rank 0 removes the markers afterwards).
"""

from __future__ import annotations

import logging
import os
import time

import pyarrow.fs as pafs
import tenacity

from .layout import TRAINER_STATE

logger = logging.getLogger("raytrainer")
RETRY_ENV = "RAYTRAINER_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 1800.0
FIRST_WAIT_S, MAX_WAIT_S = 1.0, 10.0


def retry_bound_s() -> float:
    return float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S))


UPLOAD_WAIT_MARGIN_S = 300.0  # beyond the retries: a hung socket, a stalled upload thread


def upload_wait_bound_s() -> float:
    """How long a rank waits for its background uploads before it stops the run (wait_for_uploads)."""
    return retry_bound_s() + UPLOAD_WAIT_MARGIN_S


def with_retries(call, what: str, where: str, bound_s: float | None = None, first_wait_s: float = FIRST_WAIT_S,
                 warn_after_s: float = 0.0):
    """call() until it succeeds; OSError (pyarrow's S3 errors) is retried with backoff within bound_s
    (tenacity: waits first_wait_s doubling to MAX_WAIT_S, never sleeping past the bound).
    A failure within warn_after_s of the first call is expected (waiting for another rank): no warning."""
    bound_s = retry_bound_s() if bound_s is None else bound_s

    def warn(state):
        if state.seconds_since_start >= warn_after_s:
            logger.warning("raytrainer: storage %s: %s failed (%s); retrying in %.1f s", where, what,
                           state.outcome.exception(), state.upcoming_sleep)

    def give_up(state):
        error = state.outcome.exception()
        # "AWS error", not "AWS Error ...": Ray's report would retry the whole upload on those words
        last = str(error).replace("AWS Error", "AWS error")
        raise OSError(f"storage {where}: {what} still failing after {bound_s:g} s of retries "
                      f"({RETRY_ENV}); last error: {last}") from error

    retrying = tenacity.Retrying(
        # a missing local file is no outage
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, OSError) and not isinstance(e, FileNotFoundError)),
        wait=tenacity.wait_exponential(multiplier=first_wait_s, max=MAX_WAIT_S),
        stop=tenacity.stop_before_delay(bound_s), before_sleep=warn, retry_error_callback=give_up)
    return retrying(call)


def put_file(fs, local_path: str, dest: str) -> None:
    """One local file to `dest` in fs, streamed in 8 MiB chunks."""
    with open(local_path, "rb") as src, fs.open_output_stream(dest) as out:
        while chunk := src.read(8 << 20):
            out.write(chunk)


def _marker(dest: str, rank: int) -> str:
    return f"{dest}/.raytrainer-rank-{rank}-uploaded"


def upload_checkpoint(local_dir: str, fs, dest: str, rank: int, world_size: int, bound_s: float | None = None):
    """Copy local_dir to dest in fs; see the module docstring for the order and the retries."""
    deadline = time.monotonic() + (retry_bound_s() if bound_s is None else bound_s)

    def retried(call, what, **kw):
        return with_retries(call, what, dest, max(0.0, deadline - time.monotonic()), **kw)

    files, last = [], None
    for root, _, names in os.walk(local_dir):
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), local_dir).replace(os.sep, "/")
            if rel == TRAINER_STATE:
                last = rel
            else:
                files.append(rel)
    # folder markers as pyarrow's copy_files leaves them (storage.delete_dir removes them in order)
    for folder in sorted({os.path.dirname(f"{dest}/{rel}") for rel in files + [TRAINER_STATE]}):
        retried(lambda folder=folder: fs.create_dir(folder, recursive=True), f"creation of {folder}")
    for rel in files:
        retried(lambda rel=rel: put_file(fs, os.path.join(local_dir, rel), f"{dest}/{rel}"), f"upload of {rel}")
    if rank != 0:
        retried(lambda: fs.open_output_stream(_marker(dest, rank)).close(), "upload of the rank marker")
        return
    others = [_marker(dest, r) for r in range(1, world_size)]
    # the other ranks upload in their own processes: poll storage for their markers
    # polled briefly at first (the others are usually a moment behind); a warning only after a while
    retried(lambda: _require_files(fs, others), "waiting for the other ranks' files", first_wait_s=0.05,
            warn_after_s=MAX_WAIT_S)
    if last is not None:
        retried(lambda: put_file(fs, os.path.join(local_dir, last), f"{dest}/{last}"), f"upload of {last}")
    for path in others:
        retried(lambda path=path: fs.delete_file(path), "removal of a rank marker")


def _require_files(fs, paths: list[str]) -> None:
    missing = [p for p in paths if fs.get_file_info(p).type != pafs.FileType.File]
    if missing:
        raise OSError(f"not yet in storage: {missing}")
