"""Tiny models and deterministic synthetic data for the in-process (no Ray) tests.

Everything here is built from configs (no download) and is a pure function of its seed, so two
calls give identical models and data: one copy for transformers.Trainer, one for raytrainer.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
import transformers

VOCAB = 128
SEQ = 8


# ---------------------------------------------------------------------------------------- models
def gpt2_config(dropout: float = 0.1) -> transformers.GPT2Config:
    return transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )


def tiny_gpt2(seed: int = 0, dropout: float = 0.1) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(gpt2_config(dropout))


def bert_config(num_labels: int = 2, dropout: float = 0.1) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=num_labels,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )


def tiny_bert(seed: int = 0, num_labels: int = 2, dropout: float = 0.1):
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(bert_config(num_labels, dropout))


def llama_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config())


def clone(model):
    return copy.deepcopy(model)


# ---------------------------------------------------------------------------------------- data
def lm_examples(n: int = 26, seq: int = SEQ, seed: int = 1) -> list[dict]:
    """Causal-LM examples: a learnable pattern (token t+1 = token t + 1 mod VOCAB) from random starts."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (n,), generator=g)
    out = []
    for s in starts.tolist():
        ids = (torch.arange(seq) + s) % VOCAB
        out.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": ids.clone()})
    return out


def cls_examples(n: int = 26, seq: int = SEQ, seed: int = 2) -> list[dict]:
    """Binary classification: label 1 iff the sequence contains tokens from the upper half of the vocab."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = i % 2
        low, high = (VOCAB // 2, VOCAB) if label else (1, VOCAB // 2)
        ids = torch.randint(low, high, (seq,), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long),
                    "labels": torch.tensor(label)})
    return out


def cls_hf_dataset(n: int = 26, seq: int = SEQ, seed: int = 2):
    """The same examples as cls_examples, as a `datasets.Dataset` of lists (torch format)."""
    import datasets

    rows = cls_examples(n, seq, seed)
    ds = datasets.Dataset.from_dict({
        "input_ids": [r["input_ids"].tolist() for r in rows],
        "attention_mask": [r["attention_mask"].tolist() for r in rows],
        "labels": [int(r["labels"]) for r in rows],
    })
    return ds


class CountingDataset(torch.utils.data.Dataset):
    """A map-style dataset that records every index fetched through __getitem__."""

    def __init__(self, rows):
        self.rows = rows
        self.fetched: list[int] = []

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        self.fetched.append(int(i))
        return self.rows[i]


# ---------------------------------------------------------------------------------------- metrics
def accuracy(eval_pred) -> dict:
    logits, labels = eval_pred
    if isinstance(logits, tuple):
        logits = logits[0]
    preds = np.asarray(logits).argmax(-1) if np.asarray(logits).ndim > np.asarray(labels).ndim else np.asarray(logits)
    return {"accuracy": float((preds == np.asarray(labels)).mean())}


# ---------------------------------------------------------------------------------------- args / logs
PARITY_ARGS = dict(
    per_device_train_batch_size=4,
    per_device_eval_batch_size=8,
    gradient_accumulation_steps=2,
    learning_rate=5e-3,
    lr_scheduler_type="cosine",
    warmup_steps=2,
    weight_decay=0.01,
    max_grad_norm=1.0,
    num_train_epochs=2,
    logging_steps=1,
    seed=42,
    report_to="none",
    save_strategy="no",
    disable_tqdm=True,
    use_cpu=True,
    dataloader_num_workers=0,
)


def make_args(cls, out_dir, **overrides):
    kw = dict(PARITY_ARGS)
    kw.update(overrides)
    return cls(output_dir=str(out_dir), **kw)


def train_logs(trainer, keys=("loss", "learning_rate", "grad_norm")) -> list[dict]:
    """The per-step training log entries (those with a 'loss'), restricted to `keys`."""
    return [{k: e[k] for k in keys if k in e} for e in trainer.state.log_history if "loss" in e]


def assert_logs_close(a: list[dict], b: list[dict], rtol: float = 1e-5, atol: float = 1e-7) -> None:
    assert len(a) == len(b) and len(a) > 0, (len(a), len(b))
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys(), (i, x, y)
        for k in x:
            assert np.isclose(x[k], y[k], rtol=rtol, atol=atol), f"step {i} {k}: {x[k]} != {y[k]}"


def state_dicts_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class StopAt(transformers.TrainerCallback):
    """Stops training at the end of `step` (after its save: a crash of the driver, in effect)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


# ---------------------------------------------------------------------------------------- processes
def run_gloo_ranks(module: str, call: str, out_dir, world: int = 2) -> list[dict]:
    """Run `from <module> import ...; <call>` in `world` fresh processes that form a torch.distributed group
    (env://); each rank writes rank<r>.json into out_dir, returned in rank order."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"import sys; sys.path.insert(0, {root!r}); from {module} import {call.split('(')[0]}; {call}"
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    return [json.loads(open(os.path.join(out_dir, f"rank{r}.json")).read()) for r in range(world)]


def tiny_checkpoint(out) -> str:
    """A real 2-step raytrainer run of the tiny GPT-2 in `out`; the path of its checkpoint-2."""
    import raytrainer

    args = raytrainer.TrainingArguments(output_dir=str(out), max_steps=2, save_steps=2, per_device_train_batch_size=4,
                                        report_to="none", disable_tqdm=True)
    raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8)).train()
    return os.path.join(str(out), "checkpoint-2")
