"""jobs/finetune.py: its config handling, and one short in-process run of each shipped config."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_job():
    spec = importlib.util.spec_from_file_location("finetune", os.path.join(ROOT, "jobs", "finetune.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_set_values_keep_yaml_1_1_words_as_strings():
    job = load_job()
    assert job.parse_value("no") == "no" and job.parse_value("off") == "off"
    assert job.parse_value("true") is True and job.parse_value("4") == 4 and job.parse_value("1e-3") == 1e-3


@pytest.mark.parametrize("config", ["tiny_gpt2.yaml", "minilm_sentiment.yaml"])
def test_shipped_config_runs_in_process(config, tmp_path):
    job = load_job()
    summary = job.main(["--config", os.path.join(ROOT, "jobs", "configs", config), "--set", "num_workers=0",
                        "max_steps=2", "save_strategy=no", "eval_strategy=no", f"output_dir={tmp_path}"])
    assert summary["global_step"] == 2
    assert summary["eval_loss"] > 0
    assert os.path.isfile(tmp_path / "model.safetensors")  # save_model() at the end


def test_config_numbers_in_scientific_notation(tmp_path):
    job = load_job()
    config = tmp_path / "c.yaml"
    config.write_text("model: tiny_gpt2\ndata: {train_rows: 16, eval_rows: 8, seq_len: 8}\ntraining_args:\n"
                      f"  output_dir: {tmp_path / 'out'}\n  learning_rate: 1e-3\n  max_steps: 1\n  report_to: []\n"
                      "  save_strategy: 'no'\n")
    summary = job.main(["--config", str(config)])
    assert summary["global_step"] == 1
