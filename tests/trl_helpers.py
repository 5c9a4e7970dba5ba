"""Tiny, offline inputs for TRL's trainers: a word-level tokenizer trained on the fly (with a chat template
that marks the assistant's turns for assistant-only loss), a tiny Llama built from a config, and small text,
chat and preference datasets. Pure functions of their seeds: one copy for TRL, one for raytrainer.trl."""

from __future__ import annotations

import copy

import datasets
import torch
import transformers

WORDS = ("the cat dog sat ran on a mat log red blue big small fast slow and then it was happy sad "
         "hello hi how are you fine good bad yes no what is up").split()
# assistant turns inside {% generation %} ... {% endgeneration %}: TRL's assistant_only_loss reads that mask
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|> ' }}{% generation %}{{ message['content'] + ' <|end|>' }}{% endgeneration %}"
    "{% else %}{{ '<|user|> ' + message['content'] + ' <|end|> ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS plus special tokens (built, not downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<unk>", "<s>", "<|end|>", "<|user|>", "<|assistant|>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                               bos_token="<s>", eos_token="<|end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_reward_model(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, num_labels=1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    return transformers.LlamaForSequenceClassification(config)


def _sentence(g: torch.Generator, low: int = 3, high: int = 9) -> str:
    n = int(torch.randint(low, high, (1,), generator=g))
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))


def text_dataset(n: int = 32, seed: int = 1) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    return datasets.Dataset.from_dict({"text": [_sentence(g) for _ in range(n)]})


def chat_dataset(n: int = 32, seed: int = 2) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = [[{"role": "user", "content": _sentence(g)}, {"role": "assistant", "content": _sentence(g)}]
            for _ in range(n)]
    return datasets.Dataset.from_dict({"messages": rows})


def preference_dataset(n: int = 24, seed: int = 3) -> datasets.Dataset:
    """Explicit prompt, chosen and rejected texts (TRL's standard preference format)."""
    g = torch.Generator().manual_seed(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        rows["prompt"].append(_sentence(g, 2, 5) + " ")  # TRL joins prompt + completion: a word boundary
        rows["chosen"].append(_sentence(g, 2, 6))
        rows["rejected"].append(_sentence(g, 2, 6))
    return datasets.Dataset.from_dict(rows)


def clone(model):
    return copy.deepcopy(model)


TRL_ARGS = dict(
    per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3, max_steps=4,
    logging_steps=1, seed=42, report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
    bf16=False, gradient_checkpointing=False, dataloader_num_workers=0, lr_scheduler_type="linear",
)


def trl_logs(trainer, keys) -> list[dict]:
    return [{k: e[k] for k in keys if k in e} for e in trainer.state.log_history if "loss" in e]


# GRPO with transformers' generate: 2 completions per prompt, rewarded by their number of words
GRPO_ARGS = dict(
    per_device_train_batch_size=4, num_generations=2, max_completion_length=6, max_steps=4, logging_steps=1,
    learning_rate=1e-2, seed=42, report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, bf16=False,
    gradient_checkpointing=False,
)


def reward_words(completions, **kwargs) -> list[float]:
    return [float(len(c.split())) for c in completions]


def grpo_trainer(trainer_cls, config_cls, out, callbacks=(), **kw):
    tok = word_tokenizer()
    args = config_cls(output_dir=str(out), **{**GRPO_ARGS, **kw})
    prompts = text_dataset(16, seed=4).rename_column("text", "prompt")
    return trainer_cls(model=tiny_llama(tok), reward_funcs=reward_words, args=args, train_dataset=prompts,
                       processing_class=tok, callbacks=list(callbacks))


def trl_grpo_rank(out: str) -> None:
    """One rank of TRL's own GRPOTrainer on a 2-process gloo group (as `accelerate launch` runs it), global batch
    4: writes its log history to out/rank<r>.json (tests.helpers.run_gloo_ranks)."""
    import json
    import os

    import torch.distributed as dist
    import trl

    trainer = grpo_trainer(trl.GRPOTrainer, trl.GRPOConfig, out, per_device_train_batch_size=2)
    trainer.train()
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(trainer.state.log_history, f)
