"""Temporary folders named after the process that owns them, so that a later run can tell a dead run's
left-overs from a live one's and remove them.

* `tmp-checkpoint-<step>-<host>-<pid>-<n>` next to the checkpoints (the writer renames it when complete);
* `raytrainer-<kind>-<host>-<pid>-<random>` in the system temp folder (resume downloads, staging).

`remove_leftovers(folder, prefix)` deletes those of this host whose process is gone, and those of this
process that no live writer or download holds any more (a failed save, an earlier train() call). Names
without a host and pid (another tool's) are never touched.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
import threading

logger = logging.getLogger("raytrainer")
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
_IN_USE: set[str] = set()  # folders of this process that are being written or read now
_LOCK = threading.Lock()
_cleaned: set[str] = set()


def owner_tag() -> str:
    return f"{_HOST}-{os.getpid()}"


def hold(path: str) -> str:
    with _LOCK:
        _IN_USE.add(os.path.abspath(path))
    return path


def release(path: str, remove: bool = True) -> None:
    with _LOCK:
        _IN_USE.discard(os.path.abspath(path))
    if remove:
        shutil.rmtree(path, ignore_errors=True)


def held(prefix: str) -> list[str]:
    """This process's held folders whose path starts with prefix."""
    prefix = os.path.abspath(prefix)
    with _LOCK:
        return sorted(p for p in _IN_USE if p.startswith(prefix))


def temp_dir(kind: str) -> str:
    """A new folder in the system temp folder, held until release(); dead runs' ones removed first."""
    root = tempfile.gettempdir()
    remove_leftovers(root, f"raytrainer-{kind}-", once=True)
    return hold(tempfile.mkdtemp(prefix=f"raytrainer-{kind}-{owner_tag()}-", dir=root))


def _owner(name: str, prefix: str) -> tuple[str, int] | None:
    m = re.match(re.escape(prefix) + r"(?:\d+-)?([A-Za-z0-9._]+)-(\d+)-", name)
    return (m.group(1), int(m.group(2))) if m else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_leftovers(folder: str, prefix: str, once: bool = False) -> list[str]:
    """Delete `prefix*` folders in `folder` left by a dead process of this host (or unheld ones of this
    process). `once`: only the first call per folder and prefix in this process does the scan."""
    key = f"{os.path.abspath(folder)}\0{prefix}"
    if once:
        with _LOCK:
            if key in _cleaned:
                return []
            _cleaned.add(key)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        owner = _owner(name, prefix) if name.startswith(prefix) else None
        if owner is None or owner[0] != _HOST:
            continue
        path = os.path.abspath(os.path.join(folder, name))
        with _LOCK:
            held = path in _IN_USE
        if held or (owner[1] != os.getpid() and _alive(owner[1])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        logger.warning("raytrainer: removed %d left-over folder(s) of an earlier run that ended without cleaning "
                       "up: %s", len(removed), ", ".join(sorted(removed)[:5]))
    return removed
