"""The job's inputs, checked on the driver before Ray starts and then built: the model (models.py) as a
picklable model_init, its tokenizer, and the datasets (data_files.py: data files read in this process or by
Ray Data, or the built-in synthetic data), tokenised here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .arguments import ConfigError, DataArguments, JobConfig, closest
from .data_files import counting_rows, peek_columns, read_ray_dataset, read_table, resolve_data_file, sentiment_sentences
from .models import ByteTokenizer, load_tokenizer, make_model_init, resolve_model

# ============================================================================ tokenising (batches)


def encode_classification(batch: dict, tokenizer, text_column, label_column, label_ids, max_length) -> dict:
    """A batch (column -> values) -> input_ids, attention_mask, labels (fixed length, numpy-friendly)."""
    import numpy as np

    texts = [str(t) for t in batch[text_column]]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length)
    out = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}
    labels = batch[label_column]
    out["labels"] = np.asarray([label_ids[_label_key(y)] for y in labels], dtype=np.int64)
    return out


def _label_key(value):
    if hasattr(value, "item"):
        value = value.item()
    return str(value)


def encode_causal(batch: dict, tokenizer, text_column, max_length) -> dict:
    """A batch of texts -> blocks of max_length tokens from their concatenation (HF's group_texts)."""
    import numpy as np

    stream: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for text in batch[text_column]:
        ids = tokenizer.encode(str(text)) if isinstance(tokenizer, ByteTokenizer) else \
            tokenizer(str(text), add_special_tokens=True)["input_ids"]
        stream.extend(ids)
        if eos is not None and not isinstance(tokenizer, ByteTokenizer):
            stream.append(eos)
    n = len(stream) // max_length
    blocks = np.asarray(stream[: n * max_length], dtype=np.int64).reshape(n, max_length)
    return {"input_ids": blocks, "labels": blocks.copy()}


def rows_of(columns: dict) -> list[dict]:
    import torch

    names = list(columns)
    n = len(columns[names[0]]) if names else 0
    return [{k: torch.as_tensor(columns[k][i]) for k in names} for i in range(n)]


# ======================================================================================= datasets


@dataclass
class Prepared:
    model_init: Any
    tokenizer: Any
    train: Any
    eval: Any
    task: str
    compute_metrics: Any
    description: dict


def accuracy(eval_pred):
    import numpy as np

    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def check_inputs(job: JobConfig) -> dict:
    """Everything about model and data that can fail, checked before Ray starts. Returns what was found."""
    if job.trainer != "trainer":
        return check_trl_inputs(job)
    where, task = resolve_model(job.model)
    data = job.data
    config_dir = os.path.dirname(job.config_path)
    files = {}
    for key in ("train_file", "eval_file"):
        path = getattr(data, key)
        if path:
            files[key] = resolve_data_file(path, key, config_dir)
            columns = peek_columns(files[key])
            needed = [data.text_column] + ([data.label_column] if task == "sequence_classification" else [])
            for column, what in zip(needed, ("text_column", "label_column")):
                if column not in columns:
                    raise ConfigError(f"data.{what}={column!r} is not a column of {files[key]} (it has "
                                      f"{columns}){closest(column, columns)}")
    if job.data.eval_file and not job.data.train_file:
        raise ConfigError("data.eval_file is set without data.train_file: give both, or neither (built-in data)")
    if where != "tiny_gpt2" and not files and task == "causal_lm":
        raise ConfigError(f"model {job.model.model_name_or_path} (causal_lm) has no built-in data: set data.train_file")
    if data.max_length < 2:
        raise ConfigError(f"data.max_length={data.max_length}: must be >= 2")
    return {"model": where, "task": task, "files": files}


# ============================================================================ TRL trainers (trainer: sft|dpo|reward)

# the columns of TRL's dataset formats, one of which each file needs (TRL's constructor reads the rest)
TRL_COLUMNS = {"sft": (("messages",), ("text",), ("prompt", "completion"), ("prompt",)),
               "dpo": (("prompt", "chosen", "rejected"), ("chosen", "rejected")),
               "reward": (("prompt", "chosen", "rejected"), ("chosen", "rejected"))}


def check_trl_inputs(job: JobConfig) -> dict:
    """A TRL trainer's model and data files, checked before Ray starts: TRL prepares the raw dataset itself."""
    if job.model.model_name_or_path == "tiny_gpt2":
        raise ConfigError(f"trainer: {job.trainer} needs a tokenizer with a chat template: use "
                          "model.model_name_or_path: tiny_llama (or a model folder / Hub id), not tiny_gpt2")
    if job.trainer == "reward" and job.model.task == "auto":
        job.model.task = "sequence_classification"  # TRL's reward model: one score per sequence
    where, task = resolve_model(job.model)
    if not job.data.train_file:
        raise ConfigError(f"trainer: {job.trainer} has no built-in data: set data.train_file")
    files = {}
    for key in ("train_file", "eval_file"):
        path = getattr(job.data, key)
        if path:
            files[key] = resolve_data_file(path, key, os.path.dirname(job.config_path))
            columns = peek_columns(files[key])
            if not any(all(c in columns for c in need) for need in TRL_COLUMNS[job.trainer]):
                formats = " or ".join("/".join(need) for need in TRL_COLUMNS[job.trainer])
                raise ConfigError(f"data.{key}: {files[key]} has columns {columns}; trainer: {job.trainer} needs "
                                  f"{formats} (TRL's dataset formats)")
    return {"model": where, "task": task, "files": files}


def prepare_trl(job: JobConfig, found: dict) -> Prepared:
    """The raw datasets (TRL tokenises, applies the chat template and packs them in its constructor), the
    tokenizer, and a model_init; num_labels=1 for a reward model."""
    import datasets

    files = found["files"]
    tokenizer = load_tokenizer(found["model"])
    train = datasets.Dataset(read_table(files["train_file"]))
    evaluation = datasets.Dataset(read_table(files["eval_file"])) if "eval_file" in files else None
    num_labels = 1 if found["task"] == "sequence_classification" else None
    max_length = getattr(job.training_args, "max_length", None) or 128
    model_init = make_model_init(found["model"], found["task"], num_labels, max_length)
    description = {"train": f"{files['train_file']} ({len(train)} rows, prepared by TRL)",
                   "eval": f"{files['eval_file']} ({len(evaluation)} rows)" if evaluation is not None else "none"}
    return Prepared(model_init, tokenizer, train, evaluation, found["task"], None, description)


def prepare(job: JobConfig, found: dict) -> Prepared:
    if job.trainer != "trainer":
        return prepare_trl(job, found)
    where, task, files = found["model"], found["task"], found["files"]
    data, args = job.data, job.training_args
    tokenizer = load_tokenizer(where)
    processing_class = None if isinstance(tokenizer, ByteTokenizer) else tokenizer
    num_labels, label_names = job.model.num_labels, None
    use_ray_data = args.num_workers > 0 and "train_file" in files

    if not files:  # built-in synthetic data
        if where == "tiny_gpt2":
            train = counting_rows(data.train_rows, 0, data.max_length)
            evaluation = counting_rows(data.eval_rows, 1, data.max_length)
        else:
            label_ids = {"0": 0, "1": 1}
            num_labels = num_labels or 2

            def encode(rows):
                batch = {"text": [t for t, _ in rows], "label": [y for _, y in rows]}
                return rows_of(encode_classification(batch, tokenizer, "text", "label", label_ids, data.max_length))

            train = encode(sentiment_sentences(data.train_rows, seed=0))
            evaluation = encode(sentiment_sentences(data.eval_rows, seed=1))
        description = {"train": f"built-in synthetic, {len(train)} rows", "eval": f"{len(evaluation)} rows"}
    else:
        eval_table = read_table(files["eval_file"]) if "eval_file" in files else None
        if task == "sequence_classification":
            train_table = None if use_ray_data else read_table(files["train_file"])
            if use_ray_data:
                ds = read_ray_dataset(files["train_file"])
                raw_labels = ds.unique(data.label_column)
            else:
                raw_labels = train_table.column(data.label_column).to_pylist()
            label_names = sorted({_label_key(y) for y in raw_labels}, key=_natural)
            label_ids = {name: i for i, name in enumerate(label_names)}
            num_labels = num_labels or len(label_names)
            if num_labels < len(label_names):
                raise ConfigError(f"model.num_labels={num_labels} but {files['train_file']} has {len(label_names)} "
                                  f"labels ({label_names[:8]})")
            encode = lambda b: encode_classification(b, tokenizer, data.text_column, data.label_column,  # noqa: E731
                                                     label_ids, data.max_length)
        else:
            train_table = None if use_ray_data else read_table(files["train_file"])
            encode = lambda b: encode_causal(b, tokenizer, data.text_column, data.max_length)  # noqa: E731
        if use_ray_data:
            train = ds if task == "sequence_classification" else read_ray_dataset(files["train_file"])
            train = train.select_columns([data.text_column] + (
                [data.label_column] if task == "sequence_classification" else []))
            train = train.map_batches(encode, batch_format="numpy", batch_size=256)
            description = {"train": f"{files['train_file']} (Ray Data, tokenised with map_batches on the cluster)"}
        else:
            train = rows_of(encode(_columns(train_table, data, task)))
            description = {"train": f"{files['train_file']} ({len(train)} examples)"}
        if eval_table is not None:
            evaluation = rows_of(encode(_columns(eval_table, data, task)))
            description["eval"] = f"{files['eval_file']} ({len(evaluation)} examples)"
        else:
            evaluation = None
            description["eval"] = "none"
        if evaluation is not None and len(evaluation) == 0:
            raise ConfigError(f"data.eval_file: {files['eval_file']} gives no example of max_length={data.max_length}")
    model_init = make_model_init(where, task, num_labels, data.max_length, label_names)
    metrics = accuracy if task == "sequence_classification" else None
    return Prepared(model_init, processing_class, train, evaluation, task, metrics, description)


def _columns(table, data: DataArguments, task: str) -> dict:
    names = [data.text_column] + ([data.label_column] if task == "sequence_classification" else [])
    return {n: table.column(n).to_pylist() for n in names}


def _natural(text: str):
    return (0, int(text)) if text.lstrip("-").isdigit() else (1, text)
