"""A complete checkpoint folder made durable and put in place without ever losing the one it replaces.

* `fsync_tree`: every file in every subfolder (DCP's `model_dcp/`, DeepSpeed's `global_step<N>/`), then
  each folder itself, so that the directory entries survive a power cut too.
* `put_in_place(tmp, final)`: a rename, then an fsync of the parent. When `final` already exists (the
  same step saved twice, e.g. a save step that also ends an epoch), the two folders are swapped
  atomically (Linux `renameat2(RENAME_EXCHANGE)`) and only then is the old one deleted: at every instant
  a complete `checkpoint-<N>` is there. Where the exchange is not available, the old folder is renamed
  aside first (never deleted before the new one is in place).
* `disk_full_error`: a failed save because the disk is full becomes one OSError(ENOSPC) naming the path
  and the space needed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def fsync_tree(path: str) -> None:
    for root, dirs, names in os.walk(path, topdown=False):  # files, then the folders that list them
        for name in names:
            _fsync(os.path.join(root, name), os.O_RDONLY)
        _fsync(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    try:
        _fsync(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:  # some filesystems (and Windows) cannot fsync a folder
        if e.errno not in (errno.EINVAL, errno.EACCES, errno.EBADF):
            raise


def put_in_place(tmp: str, final: str) -> None:
    """Rename the complete folder `tmp` to `final`; see the module docstring."""
    parent = os.path.dirname(os.path.abspath(final))
    if not os.path.lexists(final):
        os.rename(tmp, final)
        fsync_dir(parent)
        return
    if _exchange(tmp, final):  # tmp now holds the older save
        fsync_dir(parent)
        shutil.rmtree(tmp)
        return
    aside = f"{tmp}-replaced"
    os.rename(final, aside)
    os.rename(tmp, final)
    fsync_dir(parent)
    shutil.rmtree(aside)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux >= 3.15); False where the platform or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC / EDQUOT, also as the text safetensors and DCP wrap it in (they raise their own types)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def folder_bytes(path: str) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class DiskFullError(OSError):
    """A checkpoint save that found the disk full (errno ENOSPC), with the folder and the space it needs."""


def disk_full_error(final: str, needed: int, error: BaseException) -> OSError:
    parent = os.path.dirname(os.path.abspath(final))
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        free = 0
    return DiskFullError(
        errno.ENOSPC,
        f"No space left on device: writing checkpoint {final} needs about {_mb(needed)} and {parent} has "
        f"{_mb(free)} free ({type(error).__name__}: {str(error)[:200]}). The partial folder was removed and the "
        "last complete checkpoint is intact. Free space there, point output_dir elsewhere, or lower "
        "save_total_limit; then resume_from_checkpoint=True.",
        final,
    )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
