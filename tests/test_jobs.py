"""The job (raytrainer/cli/, run by `raytrainer train|sweep` and jobs/finetune.py): config + command line
parsing, one-line errors before Ray, outputs, shipped configs."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "raytrainer", "configs")
SHIPPED = sorted(f for f in os.listdir(CONFIGS) if f.endswith(".yaml"))


def load_job():
    spec = importlib.util.spec_from_file_location("finetune", os.path.join(ROOT, "jobs", "finetune.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["finetune"] = module  # dataclasses and typing.get_type_hints look the module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def job():
    """The job's functions from the modules of raytrainer/cli/ that hold them."""
    from raytrainer.cli import arguments, config, data_files, inputs, job, models, search_space, summary

    names = {}
    for module in (arguments, config, data_files, models, inputs, search_space, summary, job):
        names.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    return types.SimpleNamespace(**names)


def test_finetune_py_is_a_thin_entry_to_the_same_job():
    module = load_job()
    from raytrainer.cli import job

    assert module.main is job.main and module.cli is job.cli
    assert len(open(os.path.join(ROOT, "jobs", "finetune.py")).read().splitlines()) < 150


@pytest.fixture
def ray_must_not_start(monkeypatch):
    """The job must finish before starting Ray (a Ray of an earlier test in this session may be up)."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("the job started Ray"))


def config(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_values_keep_yaml_1_1_words_as_strings(job):
    assert job.parse_value("no") == "no" and job.parse_value("off") == "off"
    assert job.parse_value("true") is True and job.parse_value("4") == 4 and job.parse_value("1e-3") == 1e-3


def test_shipped_configs_begin_with_the_command_that_runs_them():
    for name in SHIPPED:
        first = open(os.path.join(CONFIGS, name)).readline()
        command = "sweep" if "search:" in open(os.path.join(CONFIGS, name)).read() else "train"
        assert first.startswith(f"# Run:    raytrainer {command} --config {name[:-5]} "), name


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_dry_run(job, name, capsys, tmp_path, monkeypatch, ray_must_not_start):
    """--dry-run resolves every shipped config (data files, model) and prints resources and absolute outputs."""
    monkeypatch.chdir(tmp_path)  # relative outputs resolve against where the user runs
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert job.main(["--config", os.path.join(CONFIGS, name), "--dry-run"]) is None
    out = capsys.readouterr().out
    assert "resources: " in out
    assert f"output_dir: {tmp_path}/runs/" in out
    assert "plot: " + str(tmp_path) in out


def test_cli_overrides_yaml_with_transformers_types(job, tmp_path):
    cfg, _ = job.load_config(["--config", os.path.join(CONFIGS, "minilm_sentiment.yaml"), "--learning_rate", "1e-4",
                              "--num_workers", "1", "--eval_strategy", "steps", "--eval_steps", "5",
                              "--max_length", "16", "--output_dir", str(tmp_path / "o"), "--load_best_model_at_end", "false",
                              "--set", "save_strategy=no", "report_to=none"])
    args = cfg.training_args
    assert args.learning_rate == 1e-4 and isinstance(args.learning_rate, float)
    assert args.num_workers == 1 and args.eval_steps == 5
    assert str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "steps"
    assert str(getattr(args.save_strategy, "value", args.save_strategy)) == "no"
    assert args.weight_decay == 0.01  # from the YAML
    assert cfg.data.max_length == 16 and cfg.data.train_file == "data/sentiment_train.csv"
    assert args.output_dir == str(tmp_path / "o")


def test_dict_and_list_fields_from_yaml_and_cli(job, tmp_path):
    path = config(tmp_path, "model: tiny_gpt2\ntraining_args:\n  resources_per_worker: {CPU: 1}\n"
                            "  report_to: [none]\n  save_strategy: no\n")
    cfg, _ = job.load_config(["--config", path, "--output_dir", str(tmp_path)])
    assert cfg.training_args.resources_per_worker == {"CPU": 1}
    assert str(getattr(cfg.training_args.save_strategy, "value", cfg.training_args.save_strategy)) == "no"
    cfg, _ = job.load_config(["--config", path, "--resources_per_worker", '{"CPU": 2}'])
    assert cfg.training_args.resources_per_worker == {"CPU": 2}


BAD = [
    ("modle: tiny_gpt2\n", [], "unknown section 'modle' (did you mean 'model'?)"),
    ("model: tiny_gpt2\ntraining_args:\n  learning_rat: 1.0e-3\n", [],
     "training_args.learning_rat is not a known key (did you mean 'learning_rate'?)"),
    ("model: {model_name_or_path: tiny_gpt2, max_lenght: 8}\n", [], "model.max_lenght is not a known key"),
    ("model: tiny_gpt2\ndata:\n  max_lenght: 8\n", [], "data.max_lenght is not a known key (did you mean 'max_length'?)"),
    ("model: tiny_gpt2\ndata:\n  num_workers: 2\n", [], "data.num_workers is not a known key (it belongs in training_args:)"),
    ("model: tiny_gpt2\n", ["--learning_rat", "1e-4"], "unknown option --learning_rat (did you mean 'learning_rate'?)"),
    ("model: tiny_gpt2\n", ["--num_workers", "two"], "--num_workers"),
    ("model: tiny_gpt2\ntraining_args:\n  max_steps: 2.5\n", [], "training_args.max_steps: 2.5 is not a valid int"),
    ("model: tiny_gpt2\ntraining_args:\n  num_workers: true\n", [], "training_args.num_workers: True is not a valid int"),
    ("model: tiny_gpt2\ntraining_args:\n  eval_strategy: epochs\n", [], "(did you mean 'epoch'?)"),
    ("model: tiny_gpt2\ntraining_args:\n  learning_rate: -1\n", [], "Invalid learning rate: -1.0. learning_rate must be >= 0"),
    ("model: tiny_gpt2\ndata:\n  train_file: nowhere/train.csv\n", [], "data.train_file: nowhere/train.csv does not exist"),
    ("model: tiny_gpt2\ndata:\n  train_file: data.xlsx\n", [], "data.train_file: data.xlsx has no known extension"),
    ("model: /no/such/model\n", [], "model.model_name_or_path: /no/such/model does not exist"),
    ("model: minilm\ndata:\n  train_file: {csv}\n  text_column: txt\n", [],
     "data.text_column='txt' is not a column of"),
    ("model: tiny_gpt2\nsearch:\n  hp_space: {learning_rat: {type: uniform, low: 0, high: 1}}\n", [],
     "search.hp_space.learning_rat: not a TrainingArguments field (did you mean 'learning_rate'?)"),
    ("model: tiny_gpt2\nsearch:\n  hp_space: {learning_rate: {type: logunifrm, low: 1, high: 2}}\n", [],
     "(did you mean 'loguniform'?)"),
    ("model: tiny_gpt2\n", ["--n_trials", "3"], "--n_trials given but the config has no search: section"),
]


@pytest.mark.parametrize("text,argv,expected", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_config_is_one_line_before_ray(job, tmp_path, capsys, text, argv, expected, ray_must_not_start):
    text = text.replace("{csv}", os.path.join(CONFIGS, "data", "sentiment_train.csv"))
    assert job.cli(["--config", config(tmp_path, text), "--output_dir", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("raytrainer train: error: ") and expected in err, err
    assert not (tmp_path / "o").exists()


def test_storage_the_driver_cannot_use_is_an_error_line_not_a_traceback(job, tmp_path, capsys, ray_must_not_start):
    """Bad input that only the driver's preflight finds (here a storage_path below a file) ends the command
    with its message on stderr and exit status 2, before Ray starts; an error while training keeps its traceback."""
    (tmp_path / "afile").write_text("")
    argv = ["--config", os.path.join(CONFIGS, "tiny_gpt2.yaml"), "--output_dir", str(tmp_path / "o"),
            "--storage_path", str(tmp_path / "afile" / "runs"), "--max_steps", "2"]
    assert job.cli(argv, command="train") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raytrainer train: error: storage_path=") and "Traceback" not in err, err


def test_hub_id_offline_is_one_line(job, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert job.cli(["--config", config(tmp_path, "model: someone/not-cached-model\n"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'someone/not-cached-model'" in err and "HF_HUB_OFFLINE" in err


def test_relative_outputs_under_a_ray_job_go_to_the_runs_dir(job, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what `ray job submit` sets for the entrypoint
    monkeypatch.setenv("RAYTRAINER_RUNS_DIR", str(tmp_path / "runs_home"))
    cfg, _ = job.load_config(["--config", config(tmp_path, "model: tiny_gpt2\ntraining_args:\n  output_dir: out/x\n"
                                                            "  storage_path: ckpt\n  run_name: myrun\n")])
    assert cfg.training_args.output_dir == str(tmp_path / "runs_home" / "myrun")
    assert cfg.training_args.storage_path == str(tmp_path / "runs_home" / "ckpt")
    assert any("Ray job" in note and str(tmp_path / "runs_home" / "myrun") in note for note in cfg.notes)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    monkeypatch.chdir(tmp_path)
    cfg, _ = job.load_config(["--config", config(tmp_path, "model: tiny_gpt2\ntraining_args:\n  output_dir: out/x\n")])
    assert cfg.training_args.output_dir == str(tmp_path / "out" / "x") and not cfg.notes


def test_hp_space_translation(job):
    from ray.tune.search.sample import Categorical, Float, Integer

    space = job.tune_space({"learning_rate": {"type": "loguniform", "low": 1e-5, "high": 1e-2},
                            "weight_decay": {"type": "uniform", "low": 0.0, "high": 0.1},
                            "seed": {"type": "randint", "low": 0, "high": 4},
                            "warmup_steps": {"type": "choice", "values": [0, 0.1]}},
                           ["learning_rate", "weight_decay", "seed", "warmup_steps"])
    assert isinstance(space["learning_rate"], Float) and space["learning_rate"].lower == 1e-5
    assert isinstance(space["seed"], Integer) and isinstance(space["warmup_steps"], Categorical)
    with pytest.raises(job.ConfigError, match="loguniform needs low > 0"):
        job.tune_space({"learning_rate": {"type": "loguniform", "low": 0, "high": 1}}, ["learning_rate"])


@pytest.mark.parametrize("name", ["tiny_gpt2.yaml", "minilm_sentiment.yaml"])
def test_shipped_config_runs_in_process(job, name, tmp_path, capsys):
    summary = job.main(["--config", os.path.join(CONFIGS, name), "--num_workers", "0", "--max_steps", "2",
                        "--save_strategy", "no", "--eval_strategy", "no", "--load_best_model_at_end", "false",
                        "--output_dir", str(tmp_path)])
    assert summary["global_step"] == 2
    assert summary["eval_loss"] > 0
    assert os.path.isfile(tmp_path / "model.safetensors")  # save_model() at the end
    assert os.path.isfile(tmp_path / "training_plot.png") and summary["plot"] == str(tmp_path / "training_plot.png")
    captured = capsys.readouterr()
    out = captured.out
    assert f"final model: {tmp_path}" in out and "RAYTRAINER_RESULT {" in out
    # not a terminal: progress as plain lines, no tqdm redraws (the trainer's bar, HF's "Writing model shards")
    # (lines Ray forwards from other tests' workers in this session's shared cluster are not ours)
    ours = [line for line in (out + captured.err).split("\n") if not re.search(r"\(\w+ pid=\d+", line)]
    assert "[progress] step 2/2 (100%)" in out and not any("\r" in line for line in ours)


def test_minilm_reads_string_labels_from_csv(job, tmp_path):
    """labels positive/negative become ids 0/1, and the model knows their names."""
    cfg, _ = job.load_config(["--config", os.path.join(CONFIGS, "minilm_sentiment.yaml"), "--num_workers", "0",
                              "--output_dir", str(tmp_path)])
    found = job.check_inputs(cfg)
    prepared = job.prepare(cfg, found)
    labels = {int(row["labels"]) for row in prepared.train}
    assert labels == {0, 1} and len(prepared.train) == 256 and len(prepared.eval) == 128
    assert prepared.train[0]["input_ids"].shape[0] == cfg.data.max_length
    model = prepared.model_init()
    assert model.config.id2label == {0: "negative", 1: "positive"}


def test_causal_lm_from_a_text_file_in_blocks(job, tmp_path):
    cfg, _ = job.load_config(["--config", os.path.join(CONFIGS, "tiny_gpt2_text.yaml"), "--output_dir", str(tmp_path),
                              "--report_to", "none"])
    prepared = job.prepare(cfg, job.check_inputs(cfg))
    text = open(os.path.join(CONFIGS, "data", "tiny_corpus.txt"), "rb").read()
    block = prepared.train[0]["input_ids"]
    assert bytes(block.tolist()) == text[: cfg.data.max_length]  # the bytes of the file, in order
    assert len(prepared.train) == len(text) // cfg.data.max_length


def test_config_numbers_in_scientific_notation(job, tmp_path):
    path = config(tmp_path, "model: tiny_gpt2\ndata: {train_rows: 16, eval_rows: 8, max_length: 8}\ntraining_args:\n"
                            f"  output_dir: {tmp_path / 'out'}\n  learning_rate: 1e-3\n  max_steps: 1\n  report_to: []\n"
                            "  save_strategy: no\n  num_workers: 0\n")
    summary = job.main(["--config", path])
    assert summary["global_step"] == 1


@pytest.mark.ray
def test_two_workers_read_and_tokenise_with_ray_data(job, tmp_path, ray_cluster, capsys):
    """num_workers=2 with a data file: Ray Data reads the CSV, map_batches tokenises, Ray Train shards it."""
    import ray.data

    argv = ["--config", os.path.join(CONFIGS, "minilm_sentiment.yaml"), "--num_workers", "2", "--max_steps", "2",
            "--save_strategy", "no", "--eval_strategy", "no", "--load_best_model_at_end", "false",
            "--output_dir", str(tmp_path)]
    cfg, _ = job.load_config(argv)
    prepared = job.prepare(cfg, job.check_inputs(cfg))
    assert isinstance(prepared.train, ray.data.Dataset)
    rows = prepared.train.take_all()
    assert len(rows) == 256 and {int(r["labels"]) for r in rows} == {0, 1}
    assert all(len(r["input_ids"]) == cfg.data.max_length for r in rows)
    summary = job.main(argv)
    assert summary["global_step"] == 2 and summary["eval_loss"] > 0
    assert os.path.isfile(tmp_path / "model.safetensors") and os.path.isfile(tmp_path / "training_plot.png")


# ------------------------------------------------------------------------------ one clean log stream
RANK0_DDP = ("[rank0]:[W1124 07:22:54.635340958 reducer.cpp:1529] Warning: find_unused_parameters=True was specified "
             "in DDP constructor, but did not find any unused parameters in the forward pass.")
PIN = ("/x/torch/utils/data/dataloader.py:759: UserWarning: 'pin_memory' argument is set as true but no accelerator "
       "is found, then device pinned memory won't be used.")


def test_worker_warnings_reach_the_log_once():
    """raytrainer/log_filter.py on the driver: a warning any process prints shows once; other lines all show."""
    from raytrainer.log_filter import ShownOnce

    shown = ShownOnce()
    rank0 = [RANK0_DDP, PIN, "  super().__init__(loader)", "[transformers] \x1b[1mBert LOAD REPORT\x1b[0m from: m",
             "Key | Status", "w | MISSING", "b | MISSING", "raytrainer: worker 0 entered the train function"]
    assert shown.filter_lines(rank0) == rank0
    rank1 = [RANK0_DDP.replace("[rank0]", "[rank1]").replace("54.635", "54.630"), PIN, "  super().__init__(loader)",
             "[transformers] Bert LOAD REPORT from: m", "Key | Status", "b | MISSING", "w | MISSING", "{'step': 1}"]
    assert shown.filter_lines(rank1) == ["{'step': 1}"]  # the table's rows in another order are the same table
    other = PIN.replace("pin_memory", "other")
    assert shown.filter_lines([other, "  super().__init__(loader)", "  super().__init__(loader)"]) == [
        other, "  super().__init__(loader)", "  super().__init__(loader)"]
    controller = ("[2026-11-24 07:22:53,278 E 5872 5970] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
                  "and ID: 'a2498d69f62d1179136b52d701000000' has constructor arguments in the object store and "
                  "max_restarts > 0. If the arguments in the object store go out of scope or are lost, ...")
    # Ray's own deduplicator drops it, with the pattern the job's entries give it (before ray is imported)
    from ray._private.ray_logging import LogDeduplicator

    from raytrainer import log_filter as quiet

    env = os.environ.copy()
    try:
        os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = "user's own"
        quiet.skip_ray_noise()
        quiet.skip_ray_noise()  # once only
        pattern = os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"]
    finally:
        os.environ.clear()
        os.environ.update(env)
    assert pattern.startswith("(?:user's own)|") and pattern.count("PreemptionWatcher") == 1
    batch = {"ip": "10.0.0.1", "pid": 7, "lines": [controller, controller.replace("PreemptionWatcher", "MyActor"),
                                                    "a user's own line"]}
    printed = [line for out in LogDeduplicator(5, None, pattern).deduplicate(batch) for line in out["lines"]]
    assert printed == [controller.replace("PreemptionWatcher", "MyActor")]  # only Ray Train's own watcher


def test_driver_warnings_once_with_the_workers(monkeypatch):
    """The driver's own transformers warnings and Python warnings count too; errors always show."""
    import io
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    from raytrainer import log_filter as quiet

    monkeypatch.setattr(quiet, "shown", quiet.ShownOnce())
    monkeypatch.setattr(quiet, "_original_showwarning", None)
    hf_logging.get_logger()
    monkeypatch.setattr(logging.getLogger(quiet.TOKEN_LOGGER), "filters", [])
    out = io.StringIO()
    for h in logging.getLogger("transformers").handlers:
        monkeypatch.setattr(h, "filters", list(h.filters))
        monkeypatch.setattr(h, "stream", out)
    shown_warnings = []
    with warnings.catch_warnings():  # puts warnings.showwarning back at the end
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *a, **k: shown_warnings.append(str(message))
        quiet.job_logs()
        log = hf_logging.get_logger("transformers.modeling_utils")
        log.warning("`loss_type=None` was set in the config but it is unrecognized.")
        log.warning("`loss_type=None` was set in the config but it is unrecognized.")
        log.error("an error")
        log.error("an error")
        warnings.warn("once only", UserWarning)
        warnings.warn("once only", UserWarning)
    err = out.getvalue()
    assert err.count("loss_type=None") == 1 and err.count("an error") == 2, err
    assert shown_warnings == ["once only"]
    # a worker's copy of a warning the driver printed is dropped
    assert quiet.shown.filter_lines(["[transformers] `loss_type=None` was set in the config but it is unrecognized.",
                                     "x.py:1: UserWarning: once only", '  warnings.warn("once only", UserWarning)',
                                     "kept"]) == ["kept"]
    # Ray's own notice that it turned token auth on says nothing; its "disabled" warning stays
    token = logging.getLogger(quiet.TOKEN_LOGGER)
    record = token.makeRecord(token.name, logging.WARNING, __file__, 1, "Token authentication is enabled for this Ray "
                              "cluster. Set RAY_AUTH_MODE=disabled to opt out.", (), None)
    assert not token.filter(record)
    record.msg = "Token authentication is disabled for this Ray cluster. Anyone with network access ..."
    assert token.filter(record)


def test_worker_keeps_ray_train_checkpoint_lines_of_rank_0_only(monkeypatch):
    import logging

    from raytrainer import log_filter as quiet

    storage = logging.getLogger("ray.train.v2._internal.execution.storage")
    monkeypatch.setattr(storage, "filters", [])
    line = "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/o/checkpoint-2)"

    def shows(message, level=logging.INFO):
        return bool(storage.filter(storage.makeRecord(storage.name, level, __file__, 1, message, (), None)))

    quiet.worker_logs(rank=0)
    assert shows(line)
    quiet.worker_logs(rank=1)
    assert not shows(line) and shows("something else") and shows(line, logging.ERROR)


def test_summary_names_the_bucket(job, tmp_path):
    cfg, _ = job.load_config(["--config", os.path.join(CONFIGS, "tiny_gpt2.yaml"), "--storage_path", "s3://bkt/runs",
                              "--output_dir", str(tmp_path / "tiny_gpt2")])
    found = job.in_storage(cfg.training_args, "bkt/runs/tiny_gpt2/checkpoint-4")
    assert found == {"final_model_uri": "s3://bkt/runs/tiny_gpt2/final_model", "checkpoints": "s3://bkt/runs/tiny_gpt2/",
                     "best_checkpoint": "s3://bkt/runs/tiny_gpt2/checkpoint-4"}
    cfg, _ = job.load_config(["--config", os.path.join(CONFIGS, "tiny_gpt2.yaml"), "--output_dir", str(tmp_path)])
    assert job.in_storage(cfg.training_args, None) == {}


@pytest.mark.ray
def test_sweep_prints_a_trials_table_writes_trials_csv_and_resumes(job, tmp_path, ray_cluster, capsys):
    """raytrainer sweep: the top trials by objective as a table, every trial in trials.csv beside the plot;
    --resume restores the finished sweep from storage instead of running its trials again."""
    import csv

    argv = ["--config", "sweep_asha", "--n_trials", "2", "--max_steps", "2", "--eval_steps", "1",
            "--scheduler", "none", "--output_dir", str(tmp_path / "out"), "--storage_path", str(tmp_path / "store")]
    assert job.cli(argv, command="train") == 2 and "run it with `raytrainer sweep" in capsys.readouterr().err
    summary = job.main(argv, command="sweep")
    out = capsys.readouterr().out
    with open(tmp_path / "out" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert summary["trials_csv"] == str(tmp_path / "out" / "trials.csv") and len(rows) == 2
    assert {"trial", "objective", "learning_rate", "warmup_steps"} <= set(rows[0])
    objectives = [float(r["objective"]) for r in rows]
    assert objectives == sorted(objectives) and objectives[0] == pytest.approx(summary["objective"])
    assert "trials (best 2 of 2 by objective):" in out and rows[0]["trial"] in out
    assert (tmp_path / "out" / "sweep_plot.png").is_file()

    again = job.main([*argv, "--resume", "true"], command="sweep")
    with open(tmp_path / "out" / "trials.csv") as f:
        assert [r["trial"] for r in csv.DictReader(f)] == [r["trial"] for r in rows]  # the same trials, restored
    assert again["best_trial"] == summary["best_trial"]


def test_resume_from_checkpoint_reaches_train(job, tmp_path, capsys):
    """--resume_from_checkpoint (command line or YAML) becomes train()'s argument: true -> the last checkpoint."""
    path = config(tmp_path, "model: tiny_gpt2\ntraining_args:\n  resume_from_checkpoint: true\n")
    cfg, _ = job.load_config(["--config", path, "--output_dir", str(tmp_path)])
    assert job.resume_value(cfg.training_args.resume_from_checkpoint) is True
    cfg, _ = job.load_config(["--config", path, "--resume_from_checkpoint", "s3://b/run/checkpoint-2"])
    assert job.resume_value(cfg.training_args.resume_from_checkpoint) == "s3://b/run/checkpoint-2"
    cfg, _ = job.load_config(["--config", path, "--resume_from_checkpoint", "false"])
    assert job.resume_value(cfg.training_args.resume_from_checkpoint) is None
    # an in-process run of 2 steps, then resumed from its last checkpoint for a 3rd: only step 3 runs
    argv = ["--config", "tiny_gpt2", "--num_workers", "0", "--max_steps", "2", "--save_steps", "2",
            "--save_strategy", "steps", "--eval_strategy", "no", "--logging_steps", "1", "--output_dir",
            str(tmp_path / "run")]
    assert job.main(argv)["global_step"] == 2
    capsys.readouterr()
    summary = job.main([*argv, "--resume_from_checkpoint", "true", "--max_steps", "3"])
    out = capsys.readouterr().out
    assert summary["global_step"] == 3
    assert len([line for line in out.splitlines() if line.startswith("{'loss'")]) == 1  # step 3's only
    assert "[progress] step 3/3" in out and "[progress] step 1/3" not in out, out
