"""The job's config: a YAML file (a shipped name or a path) plus command-line overrides, parsed by
transformers' HfArgumentParser into ModelArguments, DataArguments, SearchArguments and
raytrainer.TrainingArguments. Any problem is one ConfigError line naming the key (and the closest valid one).

HfArgumentParser's own parse_yaml_file / parse_dict are not used for the YAML: they read YAML 1.1
(`save_strategy: no` becomes False), hand values to the dataclasses unconverted and refuse an unknown
key without naming the section or the closest key. Instead each YAML value goes through the same
argparse action (type, choices) the command line's string goes through.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import typing
from typing import Any

import yaml

from .arguments import (DEFAULT_RUNS_DIR, RUNS_DIR_ENV, TRAINERS, ConfigError, DataArguments, JobConfig,
                        ModelArguments, SearchArguments, closest, first_line)
from .shipped import config_path as config_path_of

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


def _yaml_dict(text):
    value = parse_value(text) if isinstance(text, str) else text
    if value is not None and not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a mapping (give YAML/JSON like '{{\"CPU\": 2}}')")
    return value


def trainer_classes(name: str) -> tuple[type, type]:
    """(trainer class, config class) of a `trainer:` value; TRL is imported only here, only when asked for."""
    import importlib
    import importlib.util

    module, trainer, config = TRAINERS[name]
    if module == "raytrainer.trl" and importlib.util.find_spec("trl") is None:
        raise ConfigError(f'trainer: {name} needs TRL, which is not installed: pip install "raytrainer[trl]"')
    mod = importlib.import_module(module)
    return getattr(mod, trainer), getattr(mod, config)


def check_trainer(value, where: str) -> str:
    if not isinstance(value, str) or value not in TRAINERS:
        raise ConfigError(f"{where}: {value!r} is not a trainer; choices: {', '.join(TRAINERS)}"
                          f"{closest(str(value), TRAINERS)}")
    return value


def _without(cls: type, names: set) -> type:
    """A job section's dataclass minus the fields the trainer's config also has (TRL's max_length): the
    trainer's field wins, one key per name on the YAML and the command line."""
    drop = {f.name for f in dataclasses.fields(cls)} & names
    if not drop:
        return cls
    hints = typing.get_type_hints(cls)
    kept = [(f.name, hints[f.name], dataclasses.field(default=f.default, metadata=f.metadata))
            for f in dataclasses.fields(cls) if f.name not in drop]
    return dataclasses.make_dataclass(cls.__name__, kept)


class _Parser:
    """HfArgumentParser over the four dataclasses; converts YAML values and CLI strings alike."""

    def __init__(self, trainer: str = "trainer"):
        from transformers import HfArgumentParser

        self.trainer_cls, self.training_cls = trainer_classes(trainer)
        training_names = {f.name for f in dataclasses.fields(self.training_cls)}
        self.classes = {"model": _without(ModelArguments, training_names),
                        "data": _without(DataArguments, training_names), "search": SearchArguments,
                        "training_args": self.training_cls}

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
        self.hf.add_argument("--config", default="tiny_gpt2")
        self.hf.add_argument("--trainer", default=None)
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
                raise ConfigError(f"unknown option {item.split('=', 1)[0]}{closest(key, self.fields)}")
            raise ConfigError(f"unexpected argument {item!r} (options are --key value)")
        given = {k: v for k, v in vars(ns).items() if k in self.fields}
        for item in ns.set or []:
            key, sep, text = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r}: use key=value")
            if key not in self.fields:
                raise ConfigError(f"--set {key}: unknown key{closest(key, self.fields)}")
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
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}{closest(str(value), map(str, choices))}")
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


def full_help(argv=()) -> str:
    """Every option of every section, as HfArgumentParser lists them (`raytrainer train --help-all`; with
    `--trainer sft` or a config with `trainer: sft`, SFTConfig's fields)."""
    return _Parser(_trainer_of(argv)[0]).hf.format_help()


def _trainer_of(argv) -> tuple[str, str, dict]:
    """(trainer, config path, YAML) from --config / --trainer, read before the full parser is built: the
    trainer decides the class training_args is parsed into."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default="tiny_gpt2")
    pre.add_argument("--trainer", default=None)
    ns, _ = pre.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    config_path = os.path.abspath(config_path_of(ns.config))
    doc = load_yaml(config_path)
    if ns.trainer is not None:
        return check_trainer(ns.trainer, "--trainer"), config_path, doc
    return check_trainer(doc.get("trainer", "trainer"), f"{config_path}: trainer"), config_path, doc


def _trl_hint(key, trainer: str) -> str:
    """' (a field of SFTConfig: set trainer: sft)' for a TRL key under another trainer (the error path only)."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return ""
    for name in TRAINERS:
        if name not in ("trainer", trainer):
            config = trainer_classes(name)[1]
            if key in {f.name for f in dataclasses.fields(config)}:
                return f" (a field of TRL's {config.__name__}: set trainer: {name})"
    return ""


def load_config(argv=None) -> tuple[JobConfig, argparse.Namespace]:
    trainer, config_path, doc = _trainer_of(argv)
    parser = _Parser(trainer)
    ns, cli = parser.parse_cli(argv)
    valid = ["model", "data", "training_args", "search"]
    values: dict[str, dict] = {s: {} for s in valid}
    for section, body in doc.items():
        if section == "trainer":
            continue  # read by _trainer_of
        if section not in valid:
            raise ConfigError(f"{config_path}: unknown section {section!r}{closest(str(section), valid + ['trainer'])}; "
                              f"sections are trainer, {', '.join(valid)}")
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
                hint = f" (it belongs in {elsewhere}:)" if elsewhere else (
                    _trl_hint(key, trainer) if section == "training_args" else "") or closest(str(key), keys)
                raise ConfigError(f"{config_path}: {section}.{key} is not a known key{hint}")
            values[section][key] = parser.convert(key, value, f"{section}.{key}")
    for key, value in cli.items():
        values[parser.fields[key][0]][key] = value
    if "search" not in doc and values["search"]:
        raise ConfigError(f"--{next(iter(values['search']))} given but the config has no search: section")

    model = parser.classes["model"](**values["model"])  # minus fields the trainer's config has (TRL's max_length)
    data = parser.classes["data"](**values["data"])
    search = SearchArguments(**values["search"]) if "search" in doc else None
    job = JobConfig(model=model, data=data, training_args=None, search=search, config_path=config_path,
                    trainer=trainer)
    targs = values["training_args"]
    resolve_outputs(targs, job)
    job.given = list(targs)
    try:
        job.training_args = parser.training_cls(**targs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"training_args: {first_line(e)}") from None
    return job, ns


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

