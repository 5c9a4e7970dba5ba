"""The job's `trainer:` key (sft, dpo, reward): training_args parsed into raytrainer.trl's config classes,
TRL's fields on the YAML and the command line, one-line errors, and the two shipped TRL configs run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("trl")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "raytrainer", "configs")
SFT, DPO = os.path.join(CONFIGS, "sft_tiny_llama.yaml"), os.path.join(CONFIGS, "dpo_tiny_llama.yaml")


@pytest.fixture(scope="module")
def job():
    from raytrainer.cli import config, job

    return type("Job", (), {"main": staticmethod(job.main), "cli": staticmethod(job.cli),
                            "load_config": staticmethod(config.load_config)})


@pytest.fixture
def ray_must_not_start(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("the job started Ray"))


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("path,trainer,field", [(SFT, "sft", "packing: true"), (DPO, "dpo", "beta: 0.1")])
def test_dry_run_of_the_trl_configs(job, path, trainer, field, tmp_path, capsys, monkeypatch, ray_must_not_start):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert job.main(["--config", path, "--dry-run"]) is None
    out = capsys.readouterr().out
    assert f"trainer: {trainer}\n" in out and f"  {field}\n" in out
    assert "resources: 2 Ray Train workers" in out and f"output_dir: {tmp_path}/runs/" in out
    assert "max_length: 32" not in out  # the data section's max_length gives way to TRL's


def test_trl_fields_from_yaml_and_the_command_line(job):
    from raytrainer.trl import DPOConfig, SFTConfig

    cfg, _ = job.load_config(["--config", SFT, "--packing", "false", "--max_length", "64",
                              "--set", "assistant_only_loss=false"])
    args = cfg.training_args
    assert type(args) is SFTConfig and cfg.trainer == "sft"
    assert args.packing is False and args.max_length == 64 and args.assistant_only_loss is False
    assert args.num_workers == 2 and args.learning_rate == 3e-3  # a Ray field and a transformers field, from the YAML
    cfg, _ = job.load_config(["--config", DPO, "--beta", "0.5", "--loss_type", "ipo"])
    assert type(cfg.training_args) is DPOConfig and cfg.training_args.beta == 0.5
    assert list(cfg.training_args.loss_type) == ["ipo"]



def test_trainer_on_the_command_line_picks_the_config_class(job, tmp_path):
    plain = write(tmp_path, "model: tiny_llama\ndata:\n  train_file: data/sft_chat.jsonl\n")
    cfg, _ = job.load_config(["--config", plain])
    assert type(cfg.training_args).__name__ == "TrainingArguments" and cfg.trainer == "trainer"
    cfg, _ = job.load_config(["--config", plain, "--trainer", "sft", "--packing", "true"])
    assert type(cfg.training_args).__name__ == "SFTConfig" and cfg.training_args.packing is True
    with pytest.raises(Exception, match=r"training_args.assistant_only_loss is not a known key \(a field of TRL's SFTConfig: set trainer: sft\)"):
        job.load_config(["--config", SFT, "--trainer", "trainer"])  # TRL's keys need a TRL trainer


BAD = [
    ("trainer: sft\nmodel: tiny_llama\ntraining_args:\n  packng: true\n", [],
     "training_args.packng is not a known key (did you mean 'packing'?)"),
    ("trainer: sft\nmodel: tiny_llama\n", ["--assistant_only_los", "true"],
     "unknown option --assistant_only_los (did you mean 'assistant_only_loss'?)"),
    ("trainer: dpo\nmodel: tiny_llama\ndata:\n  max_length: 64\n", [],
     "data.max_length is not a known key (it belongs in training_args:)"),
    ("trainer: sfr\nmodel: tiny_llama\n", [], "trainer: 'sfr' is not a trainer; choices: trainer, sft, dpo, reward "
                                              "(did you mean 'sft'?)"),
    ("model: tiny_llama\n", ["--trainer", "ppo"], "--trainer: 'ppo' is not a trainer; choices: trainer, sft, dpo, reward"),
    ("trainer: [sft]\nmodel: tiny_llama\n", [], "trainer: ['sft'] is not a trainer"),
    ("trainer: dpo\nmodel: tiny_llama\ndata:\n  train_file: {chat}\n", [],
     "trainer: dpo needs prompt/chosen/rejected or chosen/rejected"),
    ("trainer: sft\nmodel: tiny_llama\n", [], "trainer: sft has no built-in data: set data.train_file"),
    ("trainer: sft\nmodel: tiny_gpt2\ndata:\n  train_file: {chat}\n", [], "use model.model_name_or_path: tiny_llama"),
]


@pytest.mark.parametrize("text,argv,expected", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_trl_config_is_one_line_before_ray(job, tmp_path, capsys, text, argv, expected, ray_must_not_start):
    text = text.replace("{chat}", os.path.join(CONFIGS, "data", "sft_chat.jsonl"))
    assert job.cli(["--config", write(tmp_path, text), "--output_dir", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("raytrainer train: error: ") and expected in err, err
    assert not (tmp_path / "o").exists()


def test_without_trl_the_error_names_the_extra(job, tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else find_spec(name, *a))
    assert job.cli(["--config", SFT, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert 'trainer: sft needs TRL, which is not installed: pip install "raytrainer[trl]"' in err


def test_help_stays_torch_and_trl_free():
    code = ("import json, runpy, sys; sys.argv = ['raytrainer', 'train', '--config', 'sft_tiny_llama', '--help']\n"
            "try:\n    runpy.run_module('raytrainer.cli.command', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(m for m in ('torch', 'trl', 'transformers') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    assert "--trainer" in out.stdout
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def _losses(tmp_path) -> list[float]:
    state = json.load(open(tmp_path / "checkpoint-2" / "trainer_state.json"))
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def test_sft_config_runs_in_process(job, tmp_path, capsys):
    summary = job.main(["--config", SFT, "--num_workers", "0", "--max_steps", "2", "--logging_steps", "1",
                        "--output_dir", str(tmp_path)])
    assert summary["global_step"] == 2 and math.isfinite(summary["train_loss"])
    assert os.path.isfile(tmp_path / "model.safetensors") and os.path.isfile(tmp_path / "chat_template.jinja")
    losses = _losses(tmp_path)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert "RAYTRAINER_RESULT {" in capsys.readouterr().out


def test_dpo_config_runs_in_process_against_a_reference_built_the_same_way(job, tmp_path):
    summary = job.main(["--config", DPO, "--num_workers", "0", "--max_steps", "2", "--logging_steps", "1",
                        "--output_dir", str(tmp_path)])
    assert summary["global_step"] == 2 and math.isfinite(summary["train_loss"])
    assert os.path.isfile(tmp_path / "model.safetensors")
    losses = _losses(tmp_path)
    # the reference model starts as the policy (same builder, same seed): the first DPO loss is log 2
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5) and losses[1] != losses[0]


def test_reward_trainer_scores_pairs_with_a_one_label_classifier(job, tmp_path):
    pairs = os.path.join(CONFIGS, "data", "dpo_pairs.jsonl")
    path = write(tmp_path, f"trainer: reward\nmodel: tiny_llama\ndata:\n  train_file: {pairs}\n  eval_file: {pairs}\n"
                           "training_args:\n  num_workers: 0\n  max_steps: 2\n  per_device_train_batch_size: 4\n"
                           "  bf16: false\n  gradient_checkpointing: false\n  report_to: []\n")
    summary = job.main(["--config", path, "--output_dir", str(tmp_path / "o")])
    assert summary["global_step"] == 2 and math.isfinite(summary["eval_loss"])
    saved = json.load(open(tmp_path / "o" / "config.json"))
    assert saved["architectures"] == ["LlamaForSequenceClassification"] and len(saved["id2label"]) == 1


@pytest.mark.ray
@pytest.mark.parametrize("path", [SFT, DPO], ids=["sft", "dpo"])
def test_trl_config_on_two_workers(job, path, tmp_path, ray_cluster):
    summary = job.main(["--config", path, "--num_workers", "2", "--max_steps", "2", "--save_strategy", "no",
                        "--output_dir", str(tmp_path)])
    assert summary["global_step"] == 2 and math.isfinite(summary["train_loss"])
    assert os.path.isfile(tmp_path / "model.safetensors")


SFT_SWEEP = """trainer: sft
model:
  model_name_or_path: tiny_llama
data:
  train_file: {chat}
  eval_file: {chat}
search:
  n_trials: 2
  scheduler: asha
  hp_space:
    learning_rate: {{type: loguniform, low: 1.0e-4, high: 3.0e-2}}
training_args:
  num_workers: 2
  resources_per_worker: {{CPU: 0.5}}
  max_steps: 2
  eval_strategy: steps
  eval_steps: 1
  save_strategy: steps
  save_steps: 2
  logging_steps: 1
  per_device_train_batch_size: 2
  per_device_eval_batch_size: 16
  max_length: 64
  bf16: false
  gradient_checkpointing: false
  report_to: []
"""


@pytest.mark.ray
def test_sft_sweep_from_a_search_section(job, tmp_path, ray_cluster):
    """`raytrainer sweep` with trainer: sft: 2 ASHA trials of TRL's SFTTrainer, 2 Ray workers each; the objective is
    the evaluation loss (transformers' default would sum TRL's eval_entropy, eval_mean_token_accuracy and
    eval_num_tokens)."""
    import csv

    path = write(tmp_path, SFT_SWEEP.format(chat=os.path.join(CONFIGS, "data", "sft_chat.jsonl")))
    summary = job.main(["--config", path, "--output_dir", str(tmp_path / "out"),
                        "--storage_path", str(tmp_path / "store")], command="sweep")
    with open(tmp_path / "out" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and len({r["learning_rate"] for r in rows}) == 2, rows
    with open(os.path.join(summary["best_checkpoint"], "trainer_state.json")) as f:
        evals = [e for e in json.load(f)["log_history"] if "eval_loss" in e]
    assert [e["step"] for e in evals] == [1, 2] and "eval_mean_token_accuracy" in evals[-1]  # TRL's eval metrics
    assert summary["objective"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-6)
    assert summary["objective"] == pytest.approx(min(float(r["objective"]) for r in rows), rel=1e-6)
