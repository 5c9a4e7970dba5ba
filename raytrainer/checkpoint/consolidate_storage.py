"""`raytrainer consolidate CHECKPOINT [--output DIR]`, also for a checkpoint in storage (s3://...).

The checkpoint's files are fetched into a temporary folder (its optimizer state, which consolidation does not
read, is left in storage), consolidated by consolidate.py, and the result goes where --output says: a local
folder, a URI (the whole model folder is uploaded), or by default back into the checkpoint (model.safetensors
only). Every key read from the bucket must stay inside the checkpoint's temporary copy.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import sys
import tempfile

import pyarrow.fs as pafs

from .. import storage
from ..redact import redact_text
from .consolidate import WEIGHTS, consolidate
from .upload import put_file

# fsdp's and transformers' optimizer files: not read by consolidation (ZeRO-3's global_step<N>/ is)
_NOT_FETCHED = ("optim_dcp", "optimizer.pt", "scheduler.pt", "scaler.pt")


def is_uri(path: str | None) -> bool:
    return bool(path) and "://" in path and not path.lower().startswith(("file://", "local://"))


def consolidate_anywhere(checkpoint: str, output: str | None = None) -> str:
    """consolidate() for a checkpoint and an output that may each be a URI; returns where the weights are."""
    if not is_uri(checkpoint) and not is_uri(output):
        return consolidate(checkpoint, output)
    with tempfile.TemporaryDirectory(prefix="raytrainer-consolidate-") as tmp:
        local = checkpoint
        if is_uri(checkpoint):
            local = os.path.join(tmp, "checkpoint")
            fs, path = storage.resolve_storage(checkpoint)
            _fetch(fs, path, local, checkpoint)
        target = output or checkpoint
        if not is_uri(target):
            return consolidate(local, target)
        built = os.path.join(tmp, "model")
        consolidate(local, built)
        fs, path = storage.resolve_storage(target)
        if output is None:  # back into the checkpoint: the weights file is all that is new
            fs.create_dir(path, recursive=True)
            put_file(fs, os.path.join(built, WEIGHTS), f"{path}/{WEIGHTS}")
        else:
            storage.upload_dir(built, fs, path)
        return f"{target.rstrip('/')}/{WEIGHTS}"


def _fetch(fs, path: str, local: str, label: str) -> None:
    root = os.path.abspath(local)
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    if not entries:
        raise ValueError(f"{label}: no such checkpoint in storage (nothing under it)")
    for entry in entries:
        if entry.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(entry.path, path.rstrip("/"))
        if rel.split("/", 1)[0] in _NOT_FETCHED:
            continue
        target = os.path.abspath(os.path.join(root, *rel.split("/")))
        if not target.startswith(root + os.sep):
            raise ValueError(f"{label}: the key {entry.path!r} points outside the checkpoint; refused")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with fs.open_input_stream(entry.path) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="raytrainer consolidate",
        description="Write model.safetensors (the full weights) for a checkpoint that holds only shards "
                    "(fsdp's model_dcp/, ZeRO-3's global_step<N>/), so that from_pretrained can load it.")
    parser.add_argument("checkpoint", help="a checkpoint-<step> folder: a local path or a URI such as "
                                           "s3://bucket/run/checkpoint-8 (credentials from the AWS_* variables)")
    parser.add_argument("--output", default=None, help="write the loadable model folder here, a local path or a "
                                                       "URI (default: into the checkpoint itself)")
    ns = parser.parse_args(argv)
    try:
        print(redact_text(consolidate_anywhere(ns.checkpoint, ns.output)))
    except (ValueError, OSError) as e:
        print(f"raytrainer consolidate: error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    return 0
