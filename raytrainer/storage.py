"""Where checkpoints live: a local folder or ``s3://bucket/prefix``, through pyarrow.fs.

Three jobs, kept small:

* ``resolve_storage``   turn ``storage_path`` (+ an optional filesystem) into (filesystem, path).
* ``preflight_storage`` prove on the driver, in seconds, that the location is reachable and
                        writable, and otherwise raise a ``ValueError`` that names ``storage_path``
                        and the fix -- before any Ray resources are taken.
* folder helpers        upload / download / list / delete checkpoint folders.

S3 settings come from the usual AWS environment variables, so the same job runs against AWS,
MinIO or SeaweedFS::

    AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL     e.g. http://127.0.0.1:8333 (http -> scheme="http")
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN
    AWS_REGION or AWS_DEFAULT_REGION
"""

from __future__ import annotations

import os
import posixpath
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pyarrow.fs as pafs

from .redact import redact_text

__all__ = [
    "resolve_storage",
    "preflight_storage",
    "upload_dir",
    "download_dir",
    "list_dirs",
    "delete_dir",
    "join_path",
]

_FIELD = "storage_path"  # the argument every error message names


# ------------------------------------------------------------------------------------ resolve


def _s3_filesystem(
    connect_timeout: float | None = None,
    request_timeout: float | None = None,
    max_attempts: int | None = None,
) -> pafs.S3FileSystem:
    """An S3FileSystem configured from the AWS_* environment variables.

    Explicit values are passed rather than relying on the AWS SDK's own lookup, so the endpoint
    variables work on every pyarrow version and the region never triggers a network lookup.
    """
    env = os.environ
    options: dict = {}

    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        options["scheme"] = parsed.scheme  # "http" for a local SeaweedFS / MinIO

    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        options["access_key"] = env["AWS_ACCESS_KEY_ID"]
        options["secret_key"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            options["session_token"] = env["AWS_SESSION_TOKEN"]
    # else: the SDK's default chain (~/.aws, instance profile, ...)

    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    elif endpoint:
        options["region"] = "us-east-1"  # custom endpoints ignore it; avoids a lookup

    if connect_timeout is not None:
        options["connect_timeout"] = connect_timeout
    if request_timeout is not None:
        options["request_timeout"] = request_timeout  # note: pyarrow honours it on Win/macOS only
    if max_attempts is not None:
        options["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts)
    return pafs.S3FileSystem(**options)


def _strip_scheme(path: str) -> str:
    return path.split("://", 1)[1] if "://" in path else path


def resolve_storage(
    storage_path: str, storage_filesystem: pafs.FileSystem | None = None
) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path inside it)`` for ``storage_path``.

    * a given ``storage_filesystem`` is used as is; a URI scheme in the path is dropped
    * ``s3://bucket/prefix``  -> S3FileSystem from the AWS_* env vars, ``"bucket/prefix"``
    * other URIs (``gs://``, ``hdfs://`` ...) -> ``pyarrow.fs.FileSystem.from_uri``
    * a local path or ``file://`` URI -> LocalFileSystem, absolute path
    """
    return _resolve(storage_path, storage_filesystem)


def _resolve(storage_path, storage_filesystem, **s3_options) -> tuple[pafs.FileSystem, str]:
    if not isinstance(storage_path, (str, os.PathLike)) or not str(storage_path).strip():
        raise ValueError(f"{_FIELD} must be a non-empty path or URI, got {storage_path!r}")
    storage_path = os.fspath(storage_path).strip()

    if storage_filesystem is not None:
        path = _strip_scheme(storage_path)
        if isinstance(storage_filesystem, pafs.LocalFileSystem):
            path = os.path.abspath(os.path.expanduser(path))
        return storage_filesystem, path.rstrip("/") or "/"

    scheme = storage_path.split("://", 1)[0].lower() if "://" in storage_path else ""
    if scheme in ("s3", "s3a"):
        path = _strip_scheme(storage_path).strip("/")
        if not path:
            raise ValueError(f"{_FIELD}={storage_path!r} names no bucket; use s3://bucket/prefix")
        if "@" in path.split("/", 1)[0]:  # s3://key:secret@bucket: pyarrow would echo it in its own error
            raise ValueError(f"{_FIELD}={redact_text(storage_path)!r}: credentials in an s3:// URI are not read; set "
                             "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or pass storage_filesystem=) instead")
        return _s3_filesystem(**s3_options), path
    if scheme in ("", "file", "local"):
        local = _strip_scheme(storage_path)
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local))
    try:
        return pafs.FileSystem.from_uri(storage_path)
    except Exception as exc:  # unsupported or malformed URI
        raise ValueError(
            f"{_FIELD}={storage_path!r}: pyarrow cannot open this URI ({exc}). "
            "Use a local path, s3://bucket/prefix, or pass storage_filesystem=."
        ) from exc


def join_path(base: str, *parts: str) -> str:
    """Join paths inside a pyarrow filesystem ('/' separators everywhere, also for S3)."""
    return posixpath.join(base, *parts)


# ---------------------------------------------------------------------------------- preflight


def preflight_storage(
    storage_path: str,
    storage_filesystem: pafs.FileSystem | None = None,
    timeout_s: float = 5,
) -> None:
    """Prove that ``storage_path`` is reachable and writable, or raise ``ValueError``.

    Writes and deletes one small probe object. S3 is checked with a short connect timeout and
    at most two attempts, and the whole check runs under a ``timeout_s`` deadline, so a missing
    bucket, a dead endpoint or bad credentials fail in seconds rather than after SDK retries.
    """
    short = dict(connect_timeout=min(2.0, timeout_s / 2), request_timeout=timeout_s, max_attempts=2)
    fs, path = _resolve(storage_path, storage_filesystem, **short)
    where = _describe(fs, given=storage_filesystem is not None)

    outcome: list[BaseException | None] = []
    worker = threading.Thread(
        target=lambda: outcome.append(_capture(_probe, fs, path)),
        name="raytrainer-storage-preflight",
        daemon=True,  # a hung SDK call must not keep the driver alive
    )
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise ValueError(
            f"{_FIELD}={storage_path!r}: no answer from {where} within {timeout_s:g}s. "
            "Check that the endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) is reachable "
            "from the driver, or raise the timeout."
        )
    error = outcome[0]
    if error is not None:
        raise ValueError(_explain(storage_path, fs, path, where, error)) from error


def _capture(fn, *args) -> BaseException | None:
    try:
        fn(*args)
    except BaseException as exc:  # handed back to the caller's thread
        return exc
    return None


def _probe(fs: pafs.FileSystem, path: str) -> None:
    """Check the location exists / can exist, then write and delete a probe object."""
    if isinstance(fs, pafs.S3FileSystem):
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:  # HeadBucket
            raise _MissingBucket(bucket)
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            raise NotADirectoryError(f"{path} is a file")
        fs.create_dir(path, recursive=True)
    probe = join_path(path, f".raytrainer-preflight-{uuid.uuid4().hex}")
    with fs.open_output_stream(probe) as out:
        out.write(b"raytrainer storage preflight\n")
    fs.delete_file(probe)


class _MissingBucket(Exception):
    def __init__(self, bucket: str):
        super().__init__(bucket)
        self.bucket = bucket


def _describe(fs: pafs.FileSystem, given: bool) -> str:
    """Where we tried to write, for error messages."""
    if given:
        return f"the given storage_filesystem ({fs.type_name})"
    if isinstance(fs, pafs.S3FileSystem):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return f"S3 endpoint {endpoint}" if endpoint else "AWS S3"
    return f"{fs.type_name} filesystem"


def _explain(storage_path, fs, path, where, error: BaseException) -> str:
    """One clear sentence per failure kind: what is wrong with storage_path, and the fix."""
    head = f"{_FIELD}={storage_path!r}:"
    text = str(error)
    lowered = text.lower()

    if isinstance(error, _MissingBucket):
        return (
            f"{head} bucket {error.bucket!r} does not exist at {where}. Create it first "
            f"(e.g. `aws s3 mb s3://{error.bucket}`) or point {_FIELD} at an existing bucket; "
            "if it does exist, check that the endpoint really is your S3 server."
        )
    if isinstance(fs, pafs.S3FileSystem):
        if any(k in lowered for k in ("curlcode: 7", "couldn't connect", "could not connect",
                                      "connection refused", "timed out", "timeout",
                                      "curlcode: 28", "resolve host", "curlcode: 6")):
            return (
                f"{head} cannot reach {where} ({_first_line(text)}). Check AWS_ENDPOINT_URL_S3 / "
                "AWS_ENDPOINT_URL (scheme, host and port) and that the S3 server is running."
            )
        if any(k in lowered for k in ("access_denied", "accessdenied", "invalidaccesskeyid",
                                      "signaturedoesnotmatch", "forbidden", "403",
                                      "credentials", "unauthorized", "401")):
            return (
                f"{head} access denied by {where} ({_first_line(text)}). Check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) and that "
                f"they may write to s3://{path}."
            )
        return f"{head} cannot write a probe object to {where} ({_first_line(text)})."
    if isinstance(fs, pafs.LocalFileSystem):
        return (
            f"{head} the local path {path!r} is not a writable directory ({_first_line(text)}). "
            "Choose a directory this user can create and write, or fix its permissions."
        )
    return (
        f"{head} cannot create or write {path!r} in {where} ({_first_line(text)}). "
        "Check the path and that these credentials may write there."
    )


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no detail"
    return line[:limit]


# ---------------------------------------------------------------------------- folder helpers


def upload_dir(local_dir: str | os.PathLike, fs: pafs.FileSystem, dest_path: str) -> None:
    """Copy a local folder (recursively) to ``dest_path`` in ``fs``."""
    local_dir = os.path.abspath(os.fspath(local_dir))
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(f"not a directory: {local_dir}")
    pafs.copy_files(
        local_dir, dest_path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def download_dir(fs: pafs.FileSystem, src_path: str, local_dir: str | os.PathLike) -> None:
    """Copy the folder ``src_path`` in ``fs`` (recursively) into ``local_dir``."""
    if fs.get_file_info(src_path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no such directory in {fs.type_name} storage: {src_path}")
    local_dir = os.path.abspath(os.fspath(local_dir))
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(
        src_path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
    )


def copy_dir(fs: pafs.FileSystem, src_path: str, dest_path: str) -> None:
    """Copy a folder to another place in the same filesystem, file by file with ``fs.copy_file``.

    On S3 that is a server-side CopyObject per file: the bytes stay in the bucket and never pass
    through this process (pyarrow's copy_files streams them through it). The folder is complete when
    this returns.
    """
    entries = fs.get_file_info(pafs.FileSelector(src_path, recursive=True, allow_not_found=True))
    if not entries and fs.get_file_info(src_path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no such directory in {fs.type_name} storage: {src_path}")
    fs.create_dir(dest_path, recursive=True)
    files = []
    for entry in entries:
        target = join_path(dest_path, posixpath.relpath(entry.path, src_path.rstrip("/")))
        if entry.type == pafs.FileType.Directory:
            fs.create_dir(target, recursive=True)
        elif entry.type == pafs.FileType.File:
            files.append((entry.path, target))
    with ThreadPoolExecutor(max_workers=8) as pool:  # one request per object; pyarrow drops the GIL
        list(pool.map(lambda pair: fs.copy_file(*pair), files))


def list_dirs(fs: pafs.FileSystem, path: str) -> list[str]:
    """Sorted names (not paths) of the sub-folders directly under ``path``; [] if it is absent."""
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)


def delete_dir(fs: pafs.FileSystem, path: str) -> None:
    """Delete a folder and everything below it; no error if it does not exist.

    On S3 a bare bucket name is emptied, never deleted, and the tree is removed files first,
    then folders deepest first: pyarrow's own recursive delete removes folder marker objects
    out of order, which SeaweedFS answers by keeping the folder as a phantom empty "directory"
    that list_dirs would still report.
    """
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return
    if not isinstance(fs, pafs.S3FileSystem):
        fs.delete_dir(path)
        return

    entries = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = [e.path for e in entries if e.type == pafs.FileType.File]
    folders = [e.path for e in entries if e.type == pafs.FileType.Directory]
    with ThreadPoolExecutor(max_workers=8) as pool:  # one request per object; pyarrow drops the GIL
        list(pool.map(fs.delete_file, files))
    for folder in sorted(folders, key=lambda p: p.count("/"), reverse=True):
        _delete_if_present(fs, folder)
    if "/" in path.strip("/"):  # not a bucket
        _delete_if_present(fs, path)


def _delete_if_present(fs: pafs.FileSystem, folder: str) -> None:
    try:
        fs.delete_dir(folder)
    except FileNotFoundError:  # had no marker object of its own
        pass
