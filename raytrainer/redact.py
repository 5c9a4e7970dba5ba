"""One redaction for every output: logs, job summaries, MLflow, saved arguments and states, plots.

`redact(value, name=None)` is the function every output goes through:
* a value whose field name holds a secret word (token, secret, password, key, credential, auth...,
  matched on any word of the name: `access_token_env`, `api_token_value`, `AWSAccessKeyId`) becomes
  "<redacted>" unless it is a number or a bool (`pad_token_id` = 0 is no secret); a name that only names
  or selects keys (`metric_key_prefix`, `label_key`, `key_name`) or a tokenizer's token (`pad_token`) is no secret;
* a string loses, in every URI of any scheme it contains (s3, postgresql, mysql, http...), the
  userinfo (`user:pass@`) and the values of secret-looking query parameters (`?secret_key=`,
  `X-Amz-Signature=`); `name=value` pairs with a secret name lose their value; the values of secret
  environment variables of this process (AWS_SECRET_ACCESS_KEY, HF_TOKEN...) are masked wherever they appear;
* mappings and lists are redacted item by item (a mapping's keys name their values).

transformers writes `torch.save(self.args)` (training_args.bin) into every checkpoint and final model:
the pickle holds `hub_token` and, for raytrainer, `storage_filesystem` (a pyarrow S3FileSystem pickles
its keys). `save_args_without_secrets` writes a copy with every secret field None and every string
field redacted; the live arguments keep them (push_to_hub needs the token).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote


REDACTED = "<redacted>"
CREDENTIAL_OBJECTS = ("storage_filesystem",)
SECRET_WORDS = frozenset({
    "token", "secret", "secrets", "password", "passwd", "pwd", "pass", "key", "apikey",
    "credential", "credentials", "auth", "authorization", "cookie", "signature", "sig", "sas",
})
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`\\]+")
_PAIR = re.compile(r"(?<![\w.\-])([A-Za-z_][\w.\-]*)(\s*=\s*)([^\s,;&'\"<>)\]}]+)")
_MIN_ENV_SECRET = 6  # shorter values (e.g. "1", "true") would mask innocent text


def _words(name: str) -> list[str]:
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name))  # camelCase: AWSAccessKeyId -> ..._Key_Id
    return [w for w in re.split(r"[_.\-\s]+", name.lower()) if w]


# A secret word that names or selects secrets' *names*, not a secret: `metric_key_prefix`, `key_name`,
# `token_type_ids` (the next word says so); `label_key`, `sort_key` (a key of a dict or a table);
# `pad_token`, `eos_token` (a tokenizer's special tokens, e.g. TRL's SFTConfig fields).
_NAMES_A_NAME = frozenset({"prefix", "suffix", "name", "names", "field", "fields", "column", "columns", "type",
                           "types", "index", "format"})
_SELECTS_A_KEY = frozenset({"metric", "metrics", "ignore", "sort", "dict", "label", "labels", "text", "input", "output",
                            "primary", "partition", "hash", "group", "lookup", "cache", "column", "feature", "prompt",
                            "completion", "chosen", "rejected", "image", "messages", "dataset", "data", "monitor"})
_SPECIAL_TOKENS = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask", "eot"})


def is_secret_name(name: str) -> bool:
    """True when a word of the name is a secret word (token, secret, password, key, credential, auth...), unless
    the words around it make it the name of a key or a tokenizer's token (metric_key_prefix, label_key, pad_token)."""
    words = _words(name)
    for i, word in enumerate(words):
        if word not in SECRET_WORDS:
            continue
        before = words[i - 1] if i > 0 else None
        after = words[i + 1] if i + 1 < len(words) else None
        if after in _NAMES_A_NAME or (word == "key" and before in _SELECTS_A_KEY) or \
                (word == "token" and before in _SPECIAL_TOKENS):
            continue
        return True
    return False


def _env_secrets() -> list[str]:
    # an ID (AWS_ACCESS_KEY_ID, *_CLIENT_ID) names an identity and is no secret: masking it hides innocent text
    values = {v for k, v in os.environ.items()
              if is_secret_name(k) and _words(k)[-1] != "id" and len(v) >= _MIN_ENV_SECRET}
    return sorted(values, key=len, reverse=True)


def _redact_uri(uri: str) -> str:
    """Cut in place (urlunsplit would rewrite `sqlite:////abs` as `sqlite://abs`): userinfo, secret query values."""
    scheme, rest = uri.split("://", 1)
    authority_end = min([i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0], default=len(rest))
    authority, rest = rest[:authority_end], rest[authority_end:]
    if "@" in authority:
        authority = authority.rsplit("@", 1)[1]
    if "?" in rest:
        path, query = rest.split("?", 1)
        query, hash_, fragment = query.partition("#")
        pairs = [p.partition("=") for p in query.split("&")]
        query = "&".join(k + eq + (REDACTED if eq and is_secret_name(unquote(k)) else v) for k, eq, v in pairs)
        rest = f"{path}?{query}{hash_}{fragment}"
    return f"{scheme}://{authority}{rest}"


def redact_text(text: str) -> str:
    """A string as it may be shown or stored: URIs without credentials, secret pairs and env secrets masked."""
    if not text:
        return text
    text = _URI.sub(lambda m: _redact_uri(m.group(0)), text)
    text = _PAIR.sub(lambda m: m.group(1) + m.group(2) + REDACTED
                     if is_secret_name(m.group(1)) and m.group(3) != REDACTED else m.group(0), text)
    for secret in _env_secrets():
        text = text.replace(secret, REDACTED)
    return text


def redact(value: Any, name: str | None = None) -> Any:
    """The one redaction: see the module's docstring. Returns a new object; the input is untouched."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if name is not None and is_secret_name(name) and value != "" and not isinstance(value, (Mapping, list, tuple)):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value) if not hasattr(value, "_fields") else [redact(v) for v in value]
    return value


def redact_json(obj: Any, **kwargs) -> str:
    """json.dumps of the redacted object (non-JSON values as str(), then redacted)."""
    return json.dumps(redact(obj), default=lambda o: redact_text(str(o)), **kwargs)


@contextmanager
def redacted_errors():
    """Exceptions leaving the block carry redacted messages (a preflight error echoing `s3://key:secret@`)."""
    try:
        yield
    except BaseException as e:
        if e.args and any(isinstance(a, str) for a in e.args):
            try:
                e.args = tuple(redact_text(a) if isinstance(a, str) else a for a in e.args)
            except (AttributeError, TypeError):  # an exception type with read-only args
                pass
        raise


def args_without_secrets(args):
    clean = copy.copy(args)
    for f in dataclasses.fields(args):
        value = getattr(args, f.name, None)
        if f.name in CREDENTIAL_OBJECTS or (is_secret_name(f.name) and isinstance(value, str)):
            object.__setattr__(clean, f.name, None)
        elif isinstance(value, (str, Mapping)):
            object.__setattr__(clean, f.name, redact(value, f.name))
    return clean


def save_args_without_secrets(args, path: str) -> None:
    """Write (or overwrite) training_args.bin atomically with the redacted copy."""
    tmp = f"{path}.tmp-{os.getpid()}"
    import torch  # here, not at import: the command's --help imports this module without torch

    torch.save(args_without_secrets(args), tmp)
    os.replace(tmp, path)


def state_without_secrets(state):
    """A TrainerState copy for trainer_state.json: trial params, paths, logs and callback args redacted."""
    clean = copy.copy(state)
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        if isinstance(value, (str, Mapping, list)):
            setattr(clean, f.name, redact(value, f.name))
    return clean


def redact_file(path: str) -> None:
    """Rewrite a text file we wrote (a model card) redacted, atomically; absent or unchanged: untouched."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    clean = redact_text(text)
    if clean != text:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(clean)
        os.replace(tmp, path)


class RedactingFilter(logging.Filter):
    """Every record of raytrainer's loggers leaves redacted (its arguments formatted first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's to report
            return True
        record.msg, record.args = redact_text(message), None
        return True


def install_log_filter(name: str = "raytrainer") -> None:
    logger = logging.getLogger(name)
    if not any(isinstance(f, RedactingFilter) for f in logger.filters):
        logger.addFilter(RedactingFilter())


# raytrainer's modules log through logging.getLogger("raytrainer") (or a child, filtered where it logs)
install_log_filter()
