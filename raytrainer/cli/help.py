"""`raytrainer train --help` and `raytrainer sweep --help`: a description and four groups (job, Ray,
training, data/model), each short enough for one screen, printed without importing torch or
transformers (the help of raytrainer's and transformers' TrainingArguments fields is read from their
source with ast). `--help-all` prints HfArgumentParser's full list of every field (slow: it imports them)."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import re
import shutil
import textwrap

from .arguments import DataArguments, ModelArguments, SearchArguments

DESCRIPTION = """\
Fine-tune a model with raytrainer (transformers.Trainer's loop on Ray Train workers) from a YAML config.
The YAML and the command line fill the same dataclasses: `--key value` overrides the config's key.
`raytrainer configs` lists the shipped configs; `raytrainer configs cp NAME DEST` copies one to edit."""

JOB = [
    ("--config NAME|PATH", "a shipped config's name (raytrainer configs) or a YAML file; default tiny_gpt2"),
    ("--trainer NAME", "trainer (raytrainer.Trainer, default) | sft | dpo | reward (raytrainer.trl: training_args "
                       "takes TRL's SFTConfig / DPOConfig / RewardConfig fields); overrides the config's trainer:"),
    ("--dry-run", "resolve the config, check model and data, print resources and outputs; start nothing"),
    ("--resume_from_checkpoint true|PATH", "true: continue from the last checkpoint of run_name in storage_path "
                                           "(a resubmitted job after a crash); PATH: that checkpoint"),
    ("--run_name NAME", "the run's folder under storage_path (default: the config's name)"),
    ("--output_dir DIR", "the final model, plot and logs (default runs/<run_name>; under `ray job submit` "
                         "~/raytrainer_runs/<run_name>, or $RAYTRAINER_RUNS_DIR)"),
    ("--set KEY=VALUE ...", "overrides written as YAML values, e.g. --set resources_per_worker='{CPU: 2}'"),
    ("--help-all", "every field of every group (all of transformers.TrainingArguments)"),
]
RAY = ["num_workers", "use_gpu", "resources_per_worker", "strategy", "storage_path", "max_failures",
       "max_preemption_failures", "save_in_background", "evaluate_on", "nonfinite_steps"]
TRAINING = ["learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
            "per_device_eval_batch_size", "gradient_accumulation_steps", "weight_decay", "warmup_steps",
            "lr_scheduler_type", "optim", "eval_strategy", "eval_steps", "save_strategy", "save_steps",
            "save_total_limit", "logging_steps", "load_best_model_at_end", "metric_for_best_model", "seed",
            "bf16", "gradient_checkpointing", "report_to"]


def field_help(path: str, class_name: str) -> dict[str, tuple[str, str]]:
    """name -> (default as written, help) of a dataclass's fields, read from its source file."""
    with open(path) as f:
        tree = ast.parse(f.read())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                    continue
                default, text = "", ""
                if isinstance(item.value, ast.Call):
                    for kw in item.value.keywords:
                        if kw.arg == "default":
                            default = ast.unparse(kw.value)
                        elif kw.arg == "metadata" and isinstance(kw.value, ast.Dict):
                            for k, v in zip(kw.value.keys, kw.value.values):
                                if isinstance(k, ast.Constant) and k.value == "help":
                                    try:
                                        text = str(ast.literal_eval(v))
                                    except ValueError:
                                        text = ""
                found[item.target.id] = (default, text)
    return found


def _first_sentence(text: str, limit: int = 150) -> str:
    text = " ".join(text.split())
    ends = [m.end() for m in re.finditer(r"[^.]{4}\. (?=[A-Z`])", text)]  # not "e.g. "
    text = text[: ends[0] - 1] if ends and ends[0] < limit else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _row(option: str, text: str, width: int) -> str:
    body = textwrap.wrap(text, width=max(40, width - 30)) or [""]
    lines = [f"  {option:<26}  {body[0]}" if len(option) <= 26 else f"  {option}\n{'':30}{body[0]}"]
    return "\n".join(lines + [f"{'':30}{line}" for line in body[1:]])


def _dataclass_rows(cls, width: int) -> list[str]:
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f.metadata.get("help", "") + (f" (default {default})" if default not in (None, "") else "")
        rows.append(_row(f"--{f.name}", _first_sentence(text, 200), width))
    return rows


def _source(package: str, file: str) -> str | None:
    """A file of an installed package, found without importing it (find_spec of a submodule would)."""
    spec = importlib.util.find_spec(package)
    path = os.path.join(os.path.dirname(spec.origin), file) if spec is not None and spec.origin else None
    return path if path and os.path.isfile(path) else None


def grouped_help(command: str) -> str:
    width = min(shutil.get_terminal_size((100, 24)).columns, 110)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ours = field_help(os.path.join(here, "args.py"), "TrainingArguments")
    hf_path = _source("transformers", "training_args.py")
    theirs = field_help(hf_path, "TrainingArguments") if hf_path else {}
    out = [f"usage: raytrainer {command} [--config NAME|PATH] [--dry-run] [--FIELD VALUE ...]", "", DESCRIPTION, ""]
    out += ["job:"] + [_row(o, t, width) for o, t in JOB] + [""]
    out += ["Ray (raytrainer.TrainingArguments):"]
    for name in RAY:
        default, text = ours.get(name, ("", ""))
        out.append(_row(f"--{name}", f"{_first_sentence(text)} (default {default})", width))
    out += ["", "training (transformers.TrainingArguments; every other field works too, see --help-all):"]
    for name in TRAINING:
        default, text = theirs.get(name, ("", ""))
        out.append(_row(f"--{name}", f"{_first_sentence(text, 110)} (default {default})" if text else "", width))
    out += ["", "data/model (data: and model: sections):"]
    out += _dataclass_rows(ModelArguments, width) + _dataclass_rows(DataArguments, width)
    if command == "sweep":
        out += ["", "search (search: section, raytrainer sweep):"] + _dataclass_rows(SearchArguments, width)
    return "\n".join(out) + "\n"
