"""The job's data: data files (local or s3://) resolved, read in this process or by Ray Data, their columns
peeked without reading them whole, and the built-in synthetic data."""

from __future__ import annotations

import json
import os
import random

from .arguments import DATA_FORMATS, ConfigError, first_line

CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout's root

# ========================================================================================= data


def resolve_data_file(path: str, key: str, config_dir: str) -> str:
    """An absolute local path or an s3:// URI that exists; else one line naming it."""
    suffix = os.path.splitext(path.rstrip("/"))[1].lower()
    if suffix not in DATA_FORMATS:
        raise ConfigError(f"data.{key}: {path} has no known extension ({', '.join(DATA_FORMATS)})")
    if "://" in path:
        from raytrainer import storage

        try:
            fs, inner = storage.resolve_storage(path, None)
            info = fs.get_file_info(inner)
        except Exception as e:  # noqa: BLE001 - endpoint down, bad credentials, bad URI
            raise ConfigError(f"data.{key}: cannot open {path}: {first_line(e)}") from None
        if info.type.name == "NotFound":
            raise ConfigError(f"data.{key}: {path} does not exist")
        return path
    candidates = [os.path.abspath(os.path.expanduser(path))]
    if not os.path.isabs(os.path.expanduser(path)):
        candidates.append(os.path.join(config_dir, path))
        candidates.append(os.path.join(CHECKOUT, path))  # a checkout's root (jobs/data/...)
    for candidate in candidates:
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    raise ConfigError(f"data.{key}: {path} does not exist (looked in {', '.join(dict.fromkeys(candidates))})")


def _filesystem(path: str):
    if "://" in path:
        from raytrainer import storage

        return storage.resolve_storage(path, None)
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem(), path


def read_table(path: str):
    """The whole file as a pyarrow Table (in-process runs and evaluation data)."""
    import pyarrow as pa

    fmt = DATA_FORMATS[os.path.splitext(path)[1].lower()]
    fs, inner = _filesystem(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(inner, filesystem=fs)
    with fs.open_input_stream(inner) as f:
        raw = f.read()
    if fmt == "csv":
        import pyarrow.csv as pacsv

        return pacsv.read_csv(pa.BufferReader(raw))
    if fmt == "json":
        import pyarrow.json as pajson

        return pajson.read_json(pa.BufferReader(raw))
    lines = [line for line in raw.decode("utf-8").splitlines() if line.strip()]
    return pa.table({"text": lines})


def read_ray_dataset(path: str):
    """The file as a ray.data.Dataset (multi-worker runs: Ray Train shards it)."""
    import ray.data

    fmt = DATA_FORMATS[os.path.splitext(path)[1].lower()]
    fs, inner = _filesystem(path)
    read = {"parquet": ray.data.read_parquet, "json": ray.data.read_json, "csv": ray.data.read_csv,
            "text": ray.data.read_text}[fmt]
    return read(inner, filesystem=fs)


def peek_columns(path: str) -> list[str]:
    """Column names of a data file, from its first rows only."""
    import pyarrow as pa

    fmt = DATA_FORMATS[os.path.splitext(path)[1].lower()]
    if fmt == "text":
        return ["text"]
    fs, inner = _filesystem(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open_input_file(inner) as f:
            return list(pq.read_schema(f).names)
    with fs.open_input_stream(inner) as f:
        head = f.read(1 << 16)
    if fmt == "csv":
        first = head.decode("utf-8", errors="replace").splitlines()[0] if head else ""
        import csv

        return next(csv.reader([first]), [])
    line = head.decode("utf-8", errors="replace").splitlines()[0] if head else "{}"
    try:
        return list(json.loads(line))
    except json.JSONDecodeError:
        import pyarrow.json as pajson

        return list(pajson.read_json(pa.BufferReader(head)).schema.names)


# ============================================================================ built-in synthetic data

POSITIVE = ["good", "great", "excellent", "wonderful", "lovely", "superb", "happy", "fantastic"]
NEGATIVE = ["bad", "awful", "terrible", "horrible", "poor", "dreadful", "sad", "boring"]
FILLER = ["the", "movie", "was", "really", "quite", "plot", "actors", "and", "very", "story"]


def sentiment_sentences(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def counting_rows(n: int, seed: int, length: int) -> list[dict]:
    """tiny_gpt2's synthetic data: each sequence counts up from a random start (a learnable pattern)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 200, (n, 1), generator=g)
    ids = (starts + torch.arange(length)) % 256
    return [{"input_ids": x, "labels": x.clone()} for x in ids]
