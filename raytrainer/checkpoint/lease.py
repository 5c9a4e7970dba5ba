"""One writer per run folder: a lease file that a live writer renews and a dead writer lets expire.

Two submissions of one config to one storage path share `<storage_path>/<run_name>`; without a
guard each run's retention deletes the other's checkpoints and a resume picks whichever is newest.
The driver of a train() holds `<run folder>/.raytrainer-writer.json` (fit id, host, pid, run name,
times) from before the workers start until train() returns, renewing it every TTL/4 seconds. A second
train() on that folder finds a live lease and is refused, naming the other run and the fix.

A lease is dead when it was not renewed for `RAYTRAINER_LEASE_TTL_S` seconds (default 60), or at once
when it names a process of this host that no longer exists (a killed driver, a Tune trial's process).
Taking a lease writes it and reads it back: on a local folder the first write is exclusive
(O_EXCL); on S3, which has no conditional put here, two drivers starting within the same second
could both read back their own write -- the next renewal sees the other's and reports it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import pyarrow.fs as pafs

logger = logging.getLogger("raytrainer")
LEASE_FILE = ".raytrainer-writer.json"
TTL_ENV = "RAYTRAINER_LEASE_TTL_S"
DEFAULT_TTL_S = 60.0


class RunFolderBusy(ValueError):
    """Another live run writes this run folder."""


def ttl_s() -> float:
    return float(os.environ.get(TTL_ENV, DEFAULT_TTL_S))


def _read(fs, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # a half-written or foreign file: not a lease anyone holds
        return None
    return data if isinstance(data, dict) else None


def _write(fs, path: str, lease: dict, exclusive: bool = False) -> bool:
    data = json.dumps(lease, sort_keys=True).encode()
    if exclusive and isinstance(fs, pafs.LocalFileSystem):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    tmp = f"{path}.{lease['fit_id']}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)  # a reader sees the old lease or the new one, never half of it
    return True


def is_alive(lease: dict, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if now - float(lease.get("renewed_at", 0)) > float(lease.get("ttl_s", ttl_s())):
        return False
    if lease.get("host") == socket.gethostname():
        try:
            os.kill(int(lease.get("pid", -1)), 0)
        except ProcessLookupError:
            return False  # its process is gone: no need to wait out the TTL
        except (PermissionError, ValueError, OverflowError):
            pass  # a process of another user (alive), or a pid we cannot test: trust the TTL
    return True


def describe(lease: dict) -> str:
    age = time.time() - float(lease.get("renewed_at", 0))
    return (f"run {lease.get('run_name')!r} (fit {lease.get('fit_id')}, pid {lease.get('pid')} on "
            f"{lease.get('host')}, started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(lease.get('started_at', 0)))}, "
            f"renewed {age:.0f} s ago)")


class RunLease:
    """`with RunLease(fs, run_dir, fit_id, run_name, shown):` holds the folder for the block."""

    def __init__(self, fs, run_dir: str, fit_id: str, run_name: str, shown: str, wait_for_local_exit_s: float = 0.0):
        self.fs, self.run_dir, self.path = fs, run_dir, f"{run_dir}/{LEASE_FILE}"
        self.shown = shown  # the folder as the user named it (redacted), for messages
        now = time.time()
        self.lease = {"fit_id": fit_id, "run_name": run_name, "host": socket.gethostname(), "pid": os.getpid(),
                      "started_at": now, "renewed_at": now, "ttl_s": ttl_s()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost_to: dict | None = None
        self.wait_for_local_exit_s = wait_for_local_exit_s

    def _refuse(self, other: dict) -> RunFolderBusy:
        return RunFolderBusy(
            f"storage_path: the run folder {self.shown} is being written by another live {describe(other)}. "
            f"Two runs in one folder delete each other's checkpoints. Give this run its own folder with "
            f"run_name=<another name> (or another output_dir when storage_path is unset), or wait until that run "
            f"ends; a writer that died frees the folder {self.lease['ttl_s']:g} s after its last renewal ({TTL_ENV}).")

    def acquire(self, wait_for_local_exit_s: float = 0.0) -> "RunLease":
        """`wait_for_local_exit_s`: a holder on this host may be a process on its way out (Tune stopped a trial's
        old actor just before restarting the trial in a new one): wait that long for it to exit."""
        self.fs.create_dir(self.run_dir, recursive=True)
        current = _read(self.fs, self.path)
        deadline = time.monotonic() + wait_for_local_exit_s
        while (current is not None and current.get("fit_id") != self.lease["fit_id"] and is_alive(current)
               and current.get("host") == socket.gethostname() and time.monotonic() < deadline):
            time.sleep(0.2)  # polling the holder's process
            current = _read(self.fs, self.path)
        if current is not None and current.get("fit_id") != self.lease["fit_id"] and is_alive(current):
            raise self._refuse(current)
        if current is not None:
            logger.info("raytrainer: run folder %s: taking over the expired lease of %s", self.shown, describe(current))
        if not _write(self.fs, self.path, self.lease, exclusive=current is None):
            other = _read(self.fs, self.path) or {}
            raise self._refuse(other)
        back = _read(self.fs, self.path)
        if back is None or back.get("fit_id") != self.lease["fit_id"]:
            raise self._refuse(back or {})
        self._thread = threading.Thread(target=self._renew_loop, name="raytrainer-run-lease", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        period = max(0.5, self.lease["ttl_s"] / 4)
        while not self._stop.wait(period):
            try:
                current = _read(self.fs, self.path)
                if current is not None and current.get("fit_id") != self.lease["fit_id"]:
                    self.lost_to = current
                    logger.error("raytrainer: run folder %s is now also written by %s; this run keeps going but "
                                 "the two may delete each other's checkpoints: give one another run_name.",
                                 self.shown, describe(current))
                    return
                self.lease["renewed_at"] = time.time()
                _write(self.fs, self.path, self.lease)
            except OSError as e:  # storage down for a moment: the next period tries again
                logger.warning("raytrainer: run folder %s: lease not renewed (%s)", self.shown, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            current = _read(self.fs, self.path)
            if current is not None and current.get("fit_id") == self.lease["fit_id"]:
                self.fs.delete_file(self.path)
        except OSError as e:  # it expires by itself
            logger.warning("raytrainer: run folder %s: lease not removed (%s); it expires in %g s",
                           self.shown, e, self.lease["ttl_s"])

    def __enter__(self) -> "RunLease":
        return self.acquire(self.wait_for_local_exit_s)

    def __exit__(self, *exc) -> None:
        self.release()
