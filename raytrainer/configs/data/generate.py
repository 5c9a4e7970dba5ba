"""Regenerate the small data files shipped in raytrainer/configs/data/ (deterministic: same files every run).

    python raytrainer/configs/data/generate.py

sentiment_train.csv / sentiment_eval.csv: `text,label` rows (label: positive | negative) for the
MiniLM classification config; tiny_corpus.txt: one short English sentence per line for the
causal-LM config (tiny GPT-2 reads it as UTF-8 bytes); sft_chat.jsonl: `messages` conversations (user asks
where an animal is, the assistant answers) for sft_tiny_llama; dpo_pairs.jsonl: `prompt`, `chosen` (the right
answer), `rejected` (a wrong one) for dpo_tiny_llama.
"""

from __future__ import annotations

import csv
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
POSITIVE = ["good", "great", "excellent", "wonderful", "lovely", "superb", "moving", "fantastic", "charming"]
NEGATIVE = ["bad", "awful", "terrible", "horrible", "poor", "dreadful", "dull", "boring", "clumsy"]
SUBJECTS = ["the movie", "the plot", "the acting", "the story", "the ending", "the music", "the film", "the cast"]
HEDGES = ["really", "quite", "truly", "rather", "very", "simply", "honestly"]


def review(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(["positive", "negative"])
    word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
    text = f"{rng.choice(SUBJECTS)} was {rng.choice(HEDGES)} {word}"
    if rng.random() < 0.5:
        text += f" and {rng.choice(SUBJECTS)} was {rng.choice(HEDGES)} {rng.choice(POSITIVE if label == 'positive' else NEGATIVE)}"
    return text, label


def write_csv(path: str, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(n):
            w.writerow(review(rng))


ANIMALS = ["cat", "dog", "bird", "fox", "horse", "mouse", "owl", "frog"]
PLACES = ["on the mat", "in the garden", "by the river", "under the tree", "near the house", "in the field"]
VERBS = ["sat", "slept", "ran", "played", "waited", "sang", "ate"]


def write_corpus(path: str, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(f"the {rng.choice(ANIMALS)} {rng.choice(VERBS)} {rng.choice(PLACES)}.\n")


def _fact(rng: random.Random) -> tuple[str, str, str]:
    animal, verb, place = rng.choice(ANIMALS), rng.choice(VERBS), rng.choice(PLACES)
    wrong = rng.choice([p for p in PLACES if p != place])
    return f"where {verb} the {animal}? it {verb} {place}.", f"the {animal} {verb} {place}.", \
        f"the {animal} {verb} {wrong}."


def write_chats(path: str, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            question, answer, _ = _fact(rng)
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")


def write_pairs(path: str, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            question, answer, wrong = _fact(rng)
            f.write(json.dumps({"prompt": question + " ", "chosen": answer, "rejected": wrong}) + "\n")


if __name__ == "__main__":
    write_csv(os.path.join(HERE, "sentiment_train.csv"), 256, seed=0)
    write_csv(os.path.join(HERE, "sentiment_eval.csv"), 128, seed=1)
    write_corpus(os.path.join(HERE, "tiny_corpus.txt"), 600, seed=2)
    write_corpus(os.path.join(HERE, "tiny_corpus_eval.txt"), 100, seed=3)
    write_chats(os.path.join(HERE, "sft_chat.jsonl"), 48, seed=4)
    write_pairs(os.path.join(HERE, "dpo_pairs.jsonl"), 48, seed=5)
