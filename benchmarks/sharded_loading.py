"""Memory of loading a pretrained model under fsdp and ZeRO-3: each rank's slices (sharded loading) against
rank 0's whole model broadcast into the shards (the path before it, and the fallback).

A 58M-parameter GPT-2 (benchmarks/strategies.py's `--model 50m`: 8 layers, n_embd 768, vocab 2048, fp32,
233 MB of weights) saved with save_pretrained; 2 ranks (plain gloo processes, as Ray's workers run them)
each build it through raytrainer's fsdp path (`build_sharded` + `FSDPStrategy.prepare`) or its ZeRO-3 path
(`build_sharded`: zero.Init partitions, `deepspeed={"zero_optimization": {"stage": 3}}`) from a
`from_pretrained(folder)` model_init. Per rank: the RSS before the build (after the imports and the process
group: the libraries' baseline), the peak RSS during the load (VmRSS sampled every 2 ms, and ru_maxrss), the
bytes of its shard, the bytes it read from the files. Criterion (issue 23): peak - baseline <= 1.1 x shard.
The weights are checked bit for bit against from_pretrained's on rank 0 after the measurement.

    python benchmarks/sharded_loading.py                      # ~2 minutes on 2 cores
    python benchmarks/sharded_loading.py --strategies zero3   # one of fsdp, zero3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

MODES = ("sharded", "broadcast")
STRATEGIES = ("fsdp", "zero3")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024
    return 0.0


class PeakRSS:
    """VmRSS sampled in a thread: the peak between start and stop."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.peak, self._stop = every_s, 0.0, threading.Event()

    def __enter__(self):
        self.peak = rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.every_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


class FromPretrained:
    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.folder)


def rank_main(mode: str, folder: str, out: str, strategy_name: str = "fsdp") -> None:
    import torch.distributed as dist
    from transformers import set_seed

    import raytrainer
    from raytrainer.strategies import build
    from raytrainer.strategies.build import build_sharded
    from raytrainer.strategies.fsdp import FSDPStrategy

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # the libraries the load uses, imported before the baseline (their code is not the model's memory)
    import safetensors.torch  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.checkpoint.state_dict  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import transformers.models.auto.modeling_auto  # noqa: F401
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401
    if strategy_name == "zero3":
        import deepspeed  # noqa: F401
        import deepspeed.runtime.zero.partition_parameters  # noqa: F401
    if mode == "broadcast":  # the path before sharded loading (and its fallback): rank 0 builds, then broadcasts
        build.sharded_source = lambda model, calls: (None, "benchmark: the broadcast path")
    at_fill = {}  # RSS when the weights start to arrive: the skeleton is built and sharded (fully_shard)

    def before(fn):
        def wrapped(*a, **k):
            at_fill["mb"] = rss_mb()
            return fn(*a, **k)
        return wrapped

    from raytrainer.strategies import fsdp  # the names the strategy calls

    fsdp.load_fsdp_shards = before(fsdp.load_fsdp_shards)
    fsdp.fill_fsdp = before(fsdp.fill_fsdp)
    if strategy_name == "zero3":  # zero.Init allocates the partitions as it builds: from the meta skeleton on
        build.sharded_source = before(build.sharded_source)
    if strategy_name == "zero3":
        args = raytrainer.TrainingArguments(output_dir=out, report_to=[], strategy="deepspeed",
                                            deepspeed={"zero_optimization": {"stage": 3}})
    else:
        args = raytrainer.TrainingArguments(output_dir=out, report_to=[], fsdp=True)
    holder = type("T", (), {"args": args})()
    holder.create_optimizer = lambda: None
    strategy = FSDPStrategy(torch.device("cpu"), "no", fsdp_config=args.fsdp_config)
    if strategy_name == "zero3":  # DeepSpeed's first zero.Init costs ~12 MB of its own (not the model's): before the baseline
        from transformers import GPT2Config, GPT2LMHeadModel

        tiny = os.path.join(out, "tiny-gpt2")
        if rank == 0:
            GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=8, n_embd=8, n_layer=1, n_head=2)).save_pretrained(tiny)
        dist.barrier()
        build_sharded(type("T", (), {"args": args})(), FromPretrained(tiny), "zero3")
    dist.barrier()
    baseline = rss_mb()
    t0 = time.time()
    with PeakRSS() as peak:
        set_seed(42)
        holder.model = build_sharded(holder, FromPretrained(folder), strategy_name)
        # ZeRO-3's partitions are filled by the build; fsdp's when the strategy shards the skeleton
        model = strategy.prepare(holder, max_steps=1) if strategy_name == "fsdp" else holder.model
        dist.barrier()
    seconds = time.time() - t0
    if strategy_name == "zero3":
        shard = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    else:
        shard = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    record = {"baseline_mb": baseline, "peak_mb": peak.peak, "at_fill_mb": at_fill["mb"],
              "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "shard_mb": shard / 2**20,
              "load_s": seconds, "read_mb": (holder._sharded_build.loaded or {}).get("bytes_read", 0) / 2**20}
    reference = FromPretrained(folder)().state_dict() if rank == 0 else None  # after the measurement
    if strategy_name == "zero3":
        import deepspeed

        equal = True
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                equal &= rank != 0 or torch.equal(param.data, reference[name])
    else:
        full = strategy.full_state_dict(model)
        equal = rank != 0 or all(torch.equal(full[k], v) for k, v in reference.items())
    if rank == 0:
        record["bit_equal"] = bool(equal)
    with open(os.path.join(out, f"{strategy_name}-{mode}-rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()
    if strategy_name == "zero3":  # a thread DeepSpeed's comm backend leaves behind can abort the teardown
        sys.stdout.flush()
        os._exit(0)


def run_mode(strategy_name: str, mode: str, folder: str, out: str, threshold: int) -> list[dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.sharded_loading import rank_main; " \
           f"rank_main({mode!r}, {folder!r}, {out!r}, {strategy_name!r})"
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_VERBOSITY="error")
        if threshold:  # as benchmarks/strategies.py: freed tensors go back to the OS, RSS follows live tensors
            env["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("\n".join(o[-3000:] for o in outputs))
    return [json.load(open(os.path.join(out, f"{strategy_name}-{mode}-rank{r}.json"))) for r in range(2)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mmap-threshold", type=int, default=1 << 20)
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "sharded_loading.json"))
    opts = parser.parse_args(argv)
    from transformers import GPT2Config, GPT2LMHeadModel

    work = tempfile.mkdtemp(prefix="rt-bench-sharded-load-")
    folder = os.path.join(work, "gpt2-58m")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_positions=128, n_embd=768, n_layer=8, n_head=12))
    params = sum(p.numel() for p in model.parameters())
    layer_mb = sum(p.numel() * p.element_size() for p in model.transformer.h[0].parameters()) / 2**20
    model.save_pretrained(folder)
    del model
    results = {name: {mode: run_mode(name, mode, folder, work, opts.mmap_threshold) for mode in MODES}
               for name in opts.strategies}
    ok = True
    for name, by_mode in results.items():
        print(f"\nGPT-2 {params / 1e6:.1f}M params, fp32, {name} on 2 ranks; MB per rank (rank 0 / rank 1)")
        print(f"{'load':<10} {'baseline':>11} {'peak-base':>11} {'skeleton':>11} {'peak-fill':>11} {'shard':>11} "
              f"{'read':>9} {'peak-base / shard':>18} {'peak-fill / shard':>18}  bit-equal")
        for mode, ranks in by_mode.items():
            for r in ranks:
                r["growth_mb"] = r["peak_mb"] - r["baseline_mb"]
                r["skeleton_mb"] = r["at_fill_mb"] - r["baseline_mb"]
                r["fill_growth_mb"] = r["peak_mb"] - r["at_fill_mb"]
                r["growth_over_shard"] = r["growth_mb"] / r["shard_mb"]
                r["fill_over_shard"] = r["fill_growth_mb"] / r["shard_mb"]

            def pair(key, fmt="{:.0f}"):
                return " / ".join(fmt.format(r[key]) for r in ranks)

            print(f"{mode:<10} {pair('baseline_mb'):>11} {pair('growth_mb'):>11} {pair('skeleton_mb'):>11} "
                  f"{pair('fill_growth_mb'):>11} {pair('shard_mb'):>11} {pair('read_mb'):>9} "
                  f"{pair('growth_over_shard', '{:.2f}'):>18} {pair('fill_over_shard', '{:.2f}'):>18}  "
                  f"{ranks[0]['bit_equal']}")
        if name == "fsdp":
            met = all(r["fill_over_shard"] <= 1.10 for r in by_mode["sharded"])
            rule = "the weights' growth <= 1.1 x shard"
        else:  # zero.Init holds one module whole while it partitions it; the reads hold one slice at a time
            met = all(r["growth_mb"] <= r["shard_mb"] + layer_mb for r in by_mode["sharded"])
            rule = f"peak-base <= shard + one layer ({layer_mb:.0f} MB)"
        met = met and by_mode["sharded"][0]["bit_equal"]
        print(f"criterion ({name} sharded: {rule} on every rank, weights bit-equal):", "met" if met else "NOT met")
        ok &= met
    print("baseline: RSS before model_init (imports, process group); skeleton: the meta skeleton (fsdp: and "
          "fully_shard), before any weight; peak-fill: the weights' own growth (ZeRO-3: zero.Init's partitions too)")
    os.makedirs(os.path.dirname(opts.json), exist_ok=True)
    with open(opts.json, "w") as f:
        json.dump({"parameters": params, "layer_mb": layer_mb, "malloc_mmap_threshold": opts.mmap_threshold,
                   "results": results, "criterion_met": ok}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
