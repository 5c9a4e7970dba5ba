"""Sharded loading (raytrainer/strategies/pretrained.py): a model_init's from_pretrained(folder) under fsdp,
each rank reading only its slices of the safetensors files, the weights bit for bit from_pretrained's."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
import transformers

try:
    from tests.helpers import run_gloo_ranks, tiny_gpt2, tiny_llama
except ImportError:
    from helpers import run_gloo_ranks, tiny_gpt2, tiny_llama

from raytrainer.strategies.pretrained import header_tensors, meta_build, sharded_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save(model, folder) -> str:
    model.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """save_pretrained folders: GPT-2 (tied LM head, Conv1D) and Llama (rotary inv_freq buffers, GQA)."""
    base = tmp_path_factory.mktemp("pretrained")
    split = base / "split"  # several files and model.safetensors.index.json
    tiny_gpt2(seed=5, dropout=0.0).save_pretrained(str(split), max_shard_size="40KB")
    return {"gpt2": save(tiny_gpt2(seed=3, dropout=0.0), base / "gpt2"),
            "llama": save(tiny_llama(seed=4), base / "llama"), "split": str(split)}


# ------------------------------------------------------------------ the skeleton (one process)
@pytest.mark.parametrize("name", ["gpt2", "llama", "split"])
def test_skeleton_is_from_pretrained_without_weights(folders, name):
    real = transformers.AutoModelForCausalLM.from_pretrained(folders[name])
    before = torch.get_rng_state()
    model, calls = meta_build(functools.partial(transformers.AutoModelForCausalLM.from_pretrained, folders[name]))
    assert torch.equal(torch.get_rng_state(), before)  # as from_pretrained: nothing drawn
    assert type(model) is type(real) and model.dtype == real.dtype
    assert all(p.is_meta for p in model.parameters())
    # non-persistent buffers (rotary inv_freq) are from_pretrained's, real
    assert {n: b for n, b in model.named_buffers()}.keys() == {n: b for n, b in real.named_buffers()}.keys()
    for n, b in real.named_buffers():
        assert torch.equal(dict(model.named_buffers())[n], b), n
    source, why = sharded_source(model, calls)
    assert why == "" and source.folder == os.path.abspath(folders[name])
    if name == "split":
        assert len(source.files) > 1 and os.path.isfile(os.path.join(source.folder, "model.safetensors.index.json"))
    else:
        assert source.files == [os.path.join(source.folder, "model.safetensors")]
    # the patch is gone: a plain from_pretrained loads weights again
    again = transformers.AutoModelForCausalLM.from_pretrained(folders[name])
    assert not any(p.is_meta for p in again.parameters())


def test_not_sharded_loadable_says_why(folders, tmp_path):
    cls = transformers.AutoModelForSequenceClassification
    model, calls = meta_build(functools.partial(cls.from_pretrained, folders["gpt2"], num_labels=2))
    assert "missing keys" in sharded_source(model, calls)[1]  # score.weight: from_pretrained initialises it

    model, calls = meta_build(lambda: tiny_gpt2())
    assert sharded_source(model, calls)[1] == "model_init does not call from_pretrained"

    def wrapped():
        inner = transformers.AutoModelForCausalLM.from_pretrained(folders["gpt2"])
        return torch.nn.Sequential(inner)

    model, calls = meta_build(wrapped)
    assert "returns another model" in sharded_source(model, calls)[1]

    extra = save(tiny_gpt2(seed=3, dropout=0.0), tmp_path / "extra")
    (tmp_path / "extra" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "extra" / "model.safetensors").read_bytes())
    model, calls = meta_build(functools.partial(transformers.AutoModelForCausalLM.from_pretrained, extra))
    assert "other .safetensors files" in sharded_source(model, calls)[1]


# ------------------------------------------------------------------ the load itself (2 gloo processes, no Ray)
def _rank_cases(folders: dict, out_dir: str):
    """A gloo rank's set-up (RANK / WORLD_SIZE / MASTER_* set): its raytrainer log file, the process group,
    and the model_init of each case: each folder's from_pretrained, plus one that is not sharded-loadable (the
    head is not in the files: rank 0 builds it, the shards come from that build)."""
    import logging

    import torch.distributed as dist

    logging.getLogger("raytrainer").addHandler(logging.FileHandler(os.path.join(out_dir, f"log{os.environ['RANK']}")))
    dist.init_process_group("gloo")
    cases = {name: functools.partial(transformers.AutoModelForCausalLM.from_pretrained, path)
             for name, path in folders.items()}
    cases["fallback"] = functools.partial(transformers.AutoModelForSequenceClassification.from_pretrained,
                                          folders["gpt2"], num_labels=2)
    return dist.get_rank(), {}, cases


def _rank(folders: dict, out_dir: str) -> None:
    """One rank of test_each_rank_reads_its_slices (RANK / WORLD_SIZE / MASTER_* set)."""

    import torch.distributed as dist
    from transformers import set_seed

    import raytrainer
    from raytrainer.strategies.build import build_sharded
    from raytrainer.strategies.fsdp import FSDPStrategy

    rank, result, cases = _rank_cases(folders, out_dir)
    for name, model_init in cases.items():
        args = raytrainer.TrainingArguments(output_dir=os.path.join(out_dir, name), report_to=[], fsdp=True)
        holder = type("T", (), {"args": args})()
        set_seed(42)
        model = build_sharded(holder, model_init, "fsdp")
        draw = torch.rand(4).tolist()  # what training draws next (dropout): an unsharded build's numbers
        source = holder._sharded_build.source
        strategy = FSDPStrategy(torch.device("cpu"), "no", fsdp_config=args.fsdp_config)
        holder.model, holder.create_optimizer = model, lambda: None
        model = strategy.prepare(holder, max_steps=1)
        held = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        full = strategy.full_state_dict(model)
        if name == "fallback":  # save_only_model in the foreground: the weights' shards, no optimizer state
            strategy.save_sharded(model, None, os.path.join(out_dir, "only_model"), step=1)
            result["only_model"] = sorted(os.listdir(os.path.join(out_dir, "only_model")))
        set_seed(42)
        reference = model_init() if rank == 0 else None  # the unsharded build, after the same seed
        result[name] = {
            "sharded": source is not None, "loaded": holder._sharded_build.loaded, "held": held, "draw": draw,
            "not_equal": None if full is None else sorted(k for k, v in reference.state_dict().items()
                                                          if not torch.equal(full[k], v)),
            "buffers_not_equal": None if reference is None else sorted(
                n for n, b in reference.named_buffers() if not torch.equal(dict(model.named_buffers())[n], b))}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_each_rank_reads_its_slices(folders, tmp_path):
    """2 ranks: each reads exactly its half of the files' bytes (a tensor's rows through get_slice), holds
    its half, and the gathered weights and buffers equal from_pretrained's bit for bit; a model_init that
    cannot be loaded that way (a new head) falls back to rank 0's build with one warning, same weights."""
    results = run_gloo_ranks("tests.test_sharded_loading", f"_rank({folders!r}, {str(tmp_path)!r})", tmp_path)
    with torch.random.fork_rng():
        torch.manual_seed(42)
        draw = torch.rand(4).tolist()  # from_pretrained of complete files draws nothing
    for name in ("gpt2", "llama", "split"):
        for rank, result in enumerate(results):
            mine = result[name]
            assert mine["sharded"], (name, rank)
            # this rank's half of every tensor, each byte of the files read by exactly one rank
            assert mine["loaded"]["bytes_read"] * 2 == mine["loaded"]["bytes_total"], (name, rank, mine["loaded"])
            assert mine["held"] * 2 == sum(p.numel() * p.element_size() for p in _model(name).parameters())
            assert mine["draw"] == draw, (name, rank)
        assert results[0][name]["not_equal"] == [], name
        assert results[0][name]["buffers_not_equal"] == [], name
    fallback = [r["fallback"] for r in results]
    assert not any(f["sharded"] for f in fallback)
    assert fallback[0]["not_equal"] == [] and fallback[0]["buffers_not_equal"] == []
    assert results[0]["only_model"] == ["model_dcp"]  # save_only_model: no optim_dcp/
    warning = (tmp_path / "log0").read_text()
    assert warning.count("no sharded loading: from_pretrained reports missing keys") == 1, warning
    assert "no sharded loading" not in (tmp_path / "log1").read_text()  # one warning, from rank 0


def _model(name):
    return {"llama": tiny_llama, "odd": odd_gpt2}.get(name, functools.partial(tiny_gpt2, dropout=0.0))()


def odd_gpt2():
    """A GPT-2 whose tensors split over 2 ranks mid-row (vocab 101 x 27) and with odd sizes (27)."""
    torch.manual_seed(6)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=101, n_positions=33, n_embd=27, n_layer=2, n_head=3, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))


# ------------------------------------------------------------------ under Ray: Trainer(model_init=from_pretrained)
class FromPretrained:
    """model_init with no argument (transformers passes `trial` to a model_init that takes one: a partial
    of from_pretrained would take it as a model argument)."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self):
        return transformers.AutoModelForCausalLM.from_pretrained(self.folder)


class InitialWeights(transformers.TrainerCallback):
    """At train begin (a collective on every rank): rank 0 compares the gathered weights with from_pretrained's."""

    def __init__(self, folder: str, path: str):
        self.folder, self.path = folder, path

    def on_train_begin(self, args, state, control, model=None, **kw):
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        held = sum(p.to_local().numel() for p in model.parameters())
        if dist.get_rank() == 0:
            reference = transformers.AutoModelForCausalLM.from_pretrained(self.folder).state_dict()
            with open(self.path, "w") as f:
                json.dump({"not_equal": sorted(k for k, v in reference.items() if not torch.equal(full[k], v)),
                           "keys": len(reference), "held": held,
                           "total": sum(p.numel() for p in _model("llama").parameters())}, f)


@pytest.mark.ray
def test_fsdp_trains_from_a_pretrained_folder(ray_cluster, folders, tmp_path):
    import raytrainer

    try:
        from tests.helpers import lm_examples
    except ImportError:
        from helpers import lm_examples

    probe = str(tmp_path / "initial.json")
    args = raytrainer.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
        save_strategy="no", report_to=[], disable_tqdm=True, seed=42, num_workers=2, strategy="fsdp",
        fsdp="full_shard auto_wrap")
    trainer = raytrainer.Trainer(
        model_init=FromPretrained(folders["llama"]),
        args=args, train_dataset=lm_examples(8), callbacks=[InitialWeights(folders["llama"], probe)])
    trainer.train()
    initial = json.loads(open(probe).read())
    assert initial["not_equal"] == [] and initial["keys"] > 0
    assert initial["held"] * 2 == initial["total"]  # rank 0 held its half when training began
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_driver_holds_a_skeleton_of_a_pretrained_model_init(folders, tmp_path):
    """The driver of an fsdp run builds model_init's model on the meta device for its checks; a from_pretrained
    model_init builds there too (transformers refuses from_pretrained under a meta device context), reading
    only the headers. No Ray: Trainer() starts no worker."""
    import raytrainer

    args = raytrainer.TrainingArguments(output_dir=str(tmp_path), report_to=[], num_workers=2, strategy="fsdp",
                                        fsdp="full_shard auto_wrap")
    trainer = raytrainer.Trainer(model_init=FromPretrained(folders["llama"]), args=args)
    assert type(trainer.model).__name__ == "LlamaForCausalLM"
    assert all(p.is_meta for p in trainer.model.parameters())


# ------------------------------------------------------------------ ZeRO-3 (2 gloo processes, no Ray)
def _rank_zero3(folders: dict, out_dir: str) -> None:
    """One rank of test_zero3_each_rank_reads_its_partitions (RANK / WORLD_SIZE / MASTER_* set)."""
    import sys

    import deepspeed
    import torch.distributed as dist
    from transformers import set_seed

    import raytrainer
    from raytrainer.strategies.build import build_sharded

    rank, result, cases = _rank_cases(folders, out_dir)
    for name, model_init in cases.items():
        args = raytrainer.TrainingArguments(output_dir=os.path.join(out_dir, name), report_to=[],
                                            strategy="deepspeed", deepspeed={"zero_optimization": {"stage": 3}})
        holder = type("T", (), {"args": args})()
        set_seed(42)
        model = build_sharded(holder, model_init, "zero3")
        draw = torch.rand(4).tolist()
        params = list(model.parameters())
        held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
        with deepspeed.zero.GatheredParameters(params):
            full = {k: v.detach().clone() for k, v in model.state_dict().items()}
        set_seed(42)
        reference = model_init()  # the unsharded build, after the same seed
        result[name] = {
            "sharded": holder._sharded_build.source is not None, "loaded": holder._sharded_build.loaded,
            "held": held, "draw": draw, "dtype": str(next(iter(full.values())).dtype),
            "padding": sum(p.ds_tensor.numel() * 2 - p.ds_numel for p in params) * params[0].ds_tensor.element_size(),
            "rows": sum(p.ds_shape[-1] * 2 * p.ds_tensor.element_size() for p in params if len(p.ds_shape) > 1),
            "not_equal": sorted(k for k, v in reference.state_dict().items() if not torch.equal(full[k], v)),
            "buffers_not_equal": sorted(n for n, b in reference.named_buffers()
                                        if not torch.equal(dict(model.named_buffers())[n], b))}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # a thread DeepSpeed's comm backend leaves behind can abort the interpreter's teardown


def test_zero3_each_rank_reads_its_partitions(folders, tmp_path):
    """ZeRO-3 on 2 ranks: each rank reads only the rows that hold its partition of every tensor (its half of the
    files' bytes, plus at most one partial row at each end), holds its half, and the gathered weights and
    buffers equal from_pretrained's bit for bit; a new head falls back to rank 0's build with one warning."""
    pytest.importorskip("deepspeed")
    # odd sizes: partitions end inside a row, and an odd numel pads the last rank's partition
    folders = dict(folders, odd=save(odd_gpt2(), tmp_path / "odd"))
    results = run_gloo_ranks("tests.test_sharded_loading", f"_rank_zero3({folders!r}, {str(tmp_path)!r})", tmp_path)
    with torch.random.fork_rng():
        torch.manual_seed(42)
        draw = torch.rand(4).tolist()
    for name in ("gpt2", "llama", "split", "odd"):
        reads = [r[name]["loaded"]["bytes_read"] for r in results]
        total = results[0][name]["loaded"]["bytes_total"]
        assert sum(reads) >= total, (name, reads, total)  # every byte read by some rank
        for rank, result in enumerate(results):
            mine = result[name]
            assert mine["sharded"], (name, rank)
            # its half, the partial rows at its partition's ends, and nothing more
            assert mine["loaded"]["bytes_read"] <= total / 2 + mine["rows"], (name, rank, mine["loaded"], mine["rows"])
            total_params = sum(p.numel() * p.element_size() for p in _model(name).parameters())
            assert mine["held"] * 2 == total_params + mine["padding"], (name, rank)
            assert mine["draw"] == draw, (name, rank)
            assert mine["not_equal"] == [] and mine["buffers_not_equal"] == [], (name, rank, mine)
    fallback = [r["fallback"] for r in results]
    assert not any(f["sharded"] for f in fallback)
    assert all(f["not_equal"] == [] and f["buffers_not_equal"] == [] for f in fallback), fallback
    warning = (tmp_path / "log0").read_text()
    assert warning.count("ZeRO-3: rank 0 reads the whole pretrained model") == 1, warning
    assert warning.count("no sharded loading: from_pretrained reports missing keys") == 1, warning
    assert "no sharded loading" not in (tmp_path / "log1").read_text()


class Zero3InitialWeights(transformers.TrainerCallback):
    """At train begin (a collective on every rank): the ZeRO-3 partitions, gathered one parameter at a time, against
    from_pretrained's weights on rank 0; and how many bytes of partitions this rank holds."""

    def __init__(self, folder: str, path: str):
        self.folder, self.path = folder, path

    def on_train_begin(self, args, state, control, model=None, **kw):
        import deepspeed
        import torch.distributed as dist

        model = getattr(model, "module", model)
        rank = dist.get_rank()
        reference = transformers.AutoModelForCausalLM.from_pretrained(self.folder) if rank == 0 else None
        not_equal = []
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                if rank == 0 and not torch.equal(param.data, reference.get_parameter(name)):
                    not_equal.append(name)
        if rank == 0:
            with open(self.path, "w") as f:
                json.dump({"not_equal": not_equal, "keys": len(list(model.named_parameters())),
                           "held": sum(p.ds_tensor.numel() for p in model.parameters()),
                           "total": sum(p.numel() for p in _model("llama").parameters())}, f)


@pytest.mark.ray
def test_zero3_trains_from_a_pretrained_folder(ray_cluster, folders, tmp_path):
    """Trainer(model_init=from_pretrained) under ZeRO-3 on 2 Ray workers: each built its partitions from its slices
    of the files, the gathered weights are from_pretrained's when training begins, and the run trains."""
    pytest.importorskip("deepspeed")
    import raytrainer

    try:
        from tests.helpers import lm_examples
    except ImportError:
        from helpers import lm_examples

    probe = str(tmp_path / "initial.json")
    args = raytrainer.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
        save_strategy="no", report_to=[], disable_tqdm=True, seed=42, num_workers=2, strategy="deepspeed",
        deepspeed={"zero_optimization": {"stage": 3}})
    trainer = raytrainer.Trainer(
        model_init=FromPretrained(folders["llama"]),
        args=args, train_dataset=lm_examples(8), callbacks=[Zero3InitialWeights(folders["llama"], probe)])
    trainer.train()
    initial = json.loads(open(probe).read())
    assert initial["not_equal"] == [] and initial["keys"] > 0
    assert initial["held"] * 2 == initial["total"]  # rank 0 held its half when training began
    assert trainer.state.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
