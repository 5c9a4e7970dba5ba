"""TRL SFT step throughput: trl.SFTTrainer in-process vs raytrainer.trl.SFTTrainer (in-process, 1 Ray worker).

Same model (a Llama, 2 layers, hidden 128, vocab 1024), same text data packed to 64 tokens, same SFTConfig;
the contenders run interleaved in this process (the order rotates every repetition). Steady-state samples/s excludes the
warmup steps (and so Ray's start-up); the table shows medians with the [min-max] spread and the ratio of
medians against TRL (goal for 1 Ray worker: >= 0.97).

    python benchmarks/trl_sft.py               # 3 reps, 20 measured steps after 3 warmup
    python benchmarks/trl_sft.py --quick       # 1 rep, 4 steps after 1 warmup
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

CONTENDERS = ["trl", "rt", "ray1"]
LABELS = {"trl": "trl.SFTTrainer in-process", "rt": "raytrainer.trl in-process", "ray1": "raytrainer.trl 1 Ray worker"}
VOCAB, SEQ, BATCH = 1024, 64, 8


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")


def model(tok, seed: int = C.SEED):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return transformers.LlamaForCausalLM(config)


def dataset(n: int, seed: int = 1):
    import datasets

    g = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        length = int(torch.randint(40, 200, (1,), generator=g))
        texts.append(" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 4, (length,), generator=g)))
    return datasets.Dataset.from_dict({"text": texts})


def run_contender(name: str, cfg, tok, data, work: str) -> dict:
    import trl

    import raytrainer.trl as rtrl

    total = cfg.warmup + cfg.steps
    out = C.tmpdir(work, name)
    timer = C.StepTimer(path=os.path.join(out, "timer.json"))
    values = dict(output_dir=out, per_device_train_batch_size=BATCH, max_steps=total, learning_rate=5e-4,
                  logging_steps=1, packing=True, max_length=SEQ, bf16=False, use_cpu=True, report_to="none",
                  save_strategy="no", disable_tqdm=True, gradient_checkpointing=False, seed=C.SEED,
                  dataloader_num_workers=0)
    if name == "trl":
        trainer_cls, args = trl.SFTTrainer, trl.SFTConfig(**values)
    else:
        extra = C.ray_worker_kwargs(1) if name == "ray1" else {}
        trainer_cls, args = rtrl.SFTTrainer, rtrl.SFTConfig(**values, **extra)
    trainer = trainer_cls(model=model(tok), args=args, train_dataset=data, processing_class=tok, callbacks=[timer])
    t_call = time.time()
    trainer.train()
    rec = C.read_record(timer)
    sec_per_step, measured = C.steady_rate(rec["ends"], cfg.warmup)
    return {"contender": name, "sec_per_step": sec_per_step, "steps_measured": measured,
            "samples_per_s": BATCH / sec_per_step, "train_call_s": time.time() - t_call, "threads": rec["threads"],
            "world_size": rec["world_size"], "final_loss": trainer.state.log_history[-2].get("loss")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma list of {CONTENDERS}")
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps per run (after warmup)")
    p.add_argument("--warmup", type=int, default=3, help="steps excluded from the measurement")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every contender (interleaved)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 rep, 4 steps after 1 warmup")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "trl_sft.json"))
    p.add_argument("--workdir", default=None, help="scratch folder for output_dirs (default: a temp dir)")
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.steps, cfg.warmup, cfg.reps = 4, 1, 1
    contenders = [c for c in cfg.contenders.split(",") if c]
    work = cfg.workdir or tempfile.mkdtemp(prefix="rt-bench-trl-")
    info = C.machine_info()
    info["loadavg_start"] = os.getloadavg()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads)")
    if "ray1" in contenders:
        print(f"ray.init: {C.start_ray():.1f}s (not measured)")
    tok = tokenizer()
    data = dataset(max(64, (cfg.warmup + cfg.steps) * BATCH * 2))
    results = []
    for rep in range(cfg.reps):
        order = contenders[rep % len(contenders):] + contenders[:rep % len(contenders)]
        for name in order:
            r = run_contender(name, cfg, tok, data, work)
            r["rep"] = rep
            results.append(r)
            print(f"  rep {rep} {name:5s} {r['samples_per_s']:7.2f} samples/s ({r['sec_per_step'] * 1000:.0f} ms/step, "
                  f"threads {r['threads']}, world {r['world_size']}, loss {r['final_loss']})", flush=True)
    summary = {}
    for name in contenders:
        rates = [r["samples_per_s"] for r in results if r["contender"] == name]
        summary[name] = C.summarize(rates)
    base = summary.get("trl", {}).get("median")
    print(f"\n{'contender':32s} samples/s median [min-max]   ratio vs TRL")
    for name in contenders:
        s = summary[name]
        ratio = s["median"] / base if base else float("nan")
        summary[name]["ratio_vs_trl"] = ratio
        print(f"{LABELS[name]:32s} {s['median']:8.2f} [{s['min']:.2f}-{s['max']:.2f}]   {ratio:.3f}")
    info["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(cfg.json), exist_ok=True)
    with open(cfg.json, "w") as f:
        json.dump({"machine": info, "config": vars(cfg), "runs": results, "summary": summary}, f, indent=1)
    print(f"wrote {cfg.json}")
    return summary


if __name__ == "__main__":
    main()
