"""hyperparameter_search on Ray Tune: ASHA stops bad trials, optuna-style spaces, BestRun, errors first.

Trials run sequentially where the assertion depends on order (max_concurrent_trials): ASHA is
asynchronous, so a bad trial is stopped at a rung only once a better one has recorded its result there.
"""

from __future__ import annotations

import json
import os

import pytest
import transformers
from ray import tune

import raytrainer

try:
    from tests.helpers import lm_examples, tiny_gpt2
except ImportError:
    from helpers import lm_examples, tiny_gpt2

pytestmark = pytest.mark.ray

GOOD, BAD = [1e-2, 5e-3], [1e-7, 1e-8]


def model_init(trial=None):
    return tiny_gpt2(dropout=0.0)


def sweep_args(out, **kw):
    values = dict(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=12,
                  learning_rate=1e-3, eval_strategy="steps", eval_steps=2, save_steps=2, save_total_limit=1,
                  metric_for_best_model="eval_loss", logging_steps=2, report_to="none", disable_tqdm=True, seed=42)
    values.update(kw)
    return raytrainer.TrainingArguments(**values)


def sweep_trainer(out, **kw):
    return raytrainer.Trainer(model_init=model_init, args=sweep_args(out, **kw), train_dataset=lm_examples(48),
                              eval_dataset=lm_examples(16, seed=3))


def test_asha_stops_bad_trials_and_best_run_is_the_best(ray_cluster, tmp_path):
    trainer = sweep_trainer(tmp_path / "asha")
    best = trainer.hyperparameter_search(
        hp_space={"learning_rate": tune.grid_search(GOOD + BAD)}, n_trials=1, direction="minimize",
        scheduler="asha", max_concurrent_trials=1, name="asha")
    table = trainer.sweep_results.get_dataframe()
    iterations = dict(zip(table["config/learning_rate"], table["training_iteration"]))
    objectives = dict(zip(table["config/learning_rate"], table["objective"]))
    # the first (best) trial reports every evaluation (12 steps / eval every 2); the bad ones are stopped
    # early by ASHA (so may the second good one be: it is behind the first at the first rung)
    assert iterations[GOOD[0]] == 6 and all(iterations[lr] < 6 for lr in BAD), (iterations, objectives)
    winner = min(objectives, key=objectives.get)
    assert winner in GOOD and best.hyperparameters["learning_rate"] == winner
    assert best.objective == pytest.approx(objectives[winner])
    # trials' checkpoints are transformers' layout under <storage>/<sweep>/<trial>/; the best one loads
    # and gives the objective it reported
    assert os.path.basename(os.path.dirname(best.run_summary)).startswith("run_trial")
    assert os.path.isfile(os.path.join(best.run_summary, "model.safetensors"))
    model = type(tiny_gpt2()).from_pretrained(best.run_summary)
    check = raytrainer.Trainer(model=model, args=sweep_args(tmp_path / "check"), eval_dataset=lm_examples(16, seed=3))
    assert check.evaluate()["eval_loss"] == pytest.approx(best.objective, rel=1e-5)


def test_optuna_style_space_from_the_docs_minimize_and_maximize(ray_cluster, tmp_path):
    def hp_space(trial):  # as in the transformers docs (shared/seeds)
        return {
            "learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True),
            "weight_decay": trial.suggest_float("weight_decay", 0.0, 0.1),
        }

    runs = {}
    for direction in ("minimize", "maximize"):
        trainer = sweep_trainer(tmp_path / direction, max_steps=2, save_strategy="no")
        runs[direction] = trainer.hyperparameter_search(hp_space=hp_space, n_trials=3, direction=direction,
                                                        name=direction)
        table = trainer.sweep_results.get_dataframe()
        assert len(table) == 3 and table["config/learning_rate"].between(1e-5, 1e-3).all()
        expected = table["objective"].min() if direction == "minimize" else table["objective"].max()
        assert runs[direction].objective == pytest.approx(expected)
        assert set(runs[direction].hyperparameters) == {"learning_rate", "weight_decay"}


def test_errors_before_any_trial_starts(ray_cluster, tmp_path):
    no_init = raytrainer.Trainer(model=tiny_gpt2(), args=sweep_args(tmp_path / "a"), train_dataset=lm_examples(8),
                                 eval_dataset=lm_examples(8))
    with pytest.raises(ValueError, match="model_init"):
        no_init.hyperparameter_search(hp_space={"learning_rate": tune.uniform(1e-5, 1e-3)}, n_trials=1)
    trainer = sweep_trainer(tmp_path / "b")
    with pytest.raises(ValueError, match="learnig_rate"):  # a typo: neither a field nor taken by model_init()
        raytrainer.Trainer(model_init=lambda: tiny_gpt2(), args=sweep_args(tmp_path / "c"),
                           train_dataset=lm_examples(8), eval_dataset=lm_examples(8)).hyperparameter_search(
            hp_space={"learnig_rate": tune.uniform(1e-5, 1e-3)}, n_trials=1)
    with pytest.raises(ValueError, match="empty|low|high"):
        trainer.hyperparameter_search(hp_space={"learning_rate": tune.uniform(1e-3, 1e-5)}, n_trials=1)
    too_big = sweep_trainer(tmp_path / "d", num_workers=8)
    with pytest.raises(ValueError, match="one trial needs"):
        too_big.hyperparameter_search(hp_space={"learning_rate": tune.uniform(1e-5, 1e-3)}, n_trials=1)
    assert not (tmp_path / "b-hp-search").exists() and not (tmp_path / "d-hp-search").exists()


def test_two_worker_trials(ray_cluster, tmp_path):
    """4 trials x 2 workers on the 4-CPU cluster, two at a time; evaluations stream to Tune while they train."""
    trainer = sweep_trainer(tmp_path / "multi", num_workers=2, per_device_train_batch_size=2, max_steps=6,
                            resources_per_worker={"CPU": 0.5})
    # the bad trials start once a good one has reported at ASHA's rung, and are stopped while their
    # workers run; the next trials must get those workers' CPUs back
    best = trainer.hyperparameter_search(hp_space={"learning_rate": tune.grid_search(GOOD + BAD)},
                                         n_trials=1, scheduler="asha", max_concurrent_trials=2, name="multi")
    table = trainer.sweep_results.get_dataframe()
    iterations = dict(zip(table["config/learning_rate"], table["training_iteration"]))
    objectives = dict(zip(table["config/learning_rate"], table["objective"]))
    winner = min(objectives, key=objectives.get)
    assert winner in GOOD and best.hyperparameters["learning_rate"] == winner
    assert iterations[winner] == 3 and all(iterations[lr] < 3 for lr in BAD), (iterations, objectives)
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(best.run_summary))
    # run_summary is the winner's best checkpoint (BestRun.objective is its last report, as transformers'
    # ray_scope="last"): it loads and gives the best objective the winner's 2-worker evaluations reported
    history = next(r for r in trainer.sweep_results if r.config["learning_rate"] == winner).metrics_dataframe
    model = type(tiny_gpt2()).from_pretrained(best.run_summary)
    check = raytrainer.Trainer(model=model, args=sweep_args(tmp_path / "check"), eval_dataset=lm_examples(16, seed=3))
    assert check.evaluate()["eval_loss"] == pytest.approx(history["objective"].min(), rel=1e-5)


class TrialRecorder(transformers.TrainerCallback):
    """Inside each trial: the weights it starts from and the learning rate its optimizer really uses."""

    def _write(self, args, row):
        if not self.is_rank0:  # a multi-worker trial runs this callback on every rank
            return
        with open(os.path.join(args.output_dir, "record.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.is_rank0 = state.is_world_process_zero
        self._write(args, {"begin": state.global_step, "digest": digest(model), "config_lr": args.learning_rate,
                           "pid": os.getpid()})  # rank 0's process: a new one is a new worker group

    def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self._write(args, {"step": state.global_step, "lr": optimizer.param_groups[0]["lr"],
                           "base_lr": lr_scheduler.base_lrs[0], "config_lr": args.learning_rate})


def digest(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def _trial_temp_folders() -> set:
    import glob
    import tempfile

    return {p for kind in ("pointer", "exploit") for p in glob.glob(f"{tempfile.gettempdir()}/raytrainer-{kind}-*")}


@pytest.mark.parametrize("workers", [0, 2])
def test_pbt_exploit_copies_the_donor_state_and_keeps_the_mutated_lr(ray_cluster, tmp_path, workers):
    """In-process trials and 2-worker trials (0.5 CPU a worker: both trials fit the 4-CPU cluster at once).

    2-worker trials: the whole population trains at once, so the exploit happens in the running worker group
    (tune/pbt_scheduler.py): each trial keeps the one worker group it started with (synch=True used to pause both
    trials at step 4, and each restart started a new group: 4 group starts, now 2)."""
    from ray.tune.schedulers import PopulationBasedTraining

    mutated = [3e-3, 4e-3]
    multi = dict(num_workers=2, per_device_train_batch_size=2, resources_per_worker={"CPU": 0.5}) if workers else {}
    trainer = sweep_trainer(tmp_path / "pbt", max_steps=6 if workers else 8, lr_scheduler_type="constant",
                            save_total_limit=None, **multi)
    trainer.add_callback(TrialRecorder())
    # 2-worker trials perturb once, at step 4 of 6: each restart is a worker-group start
    interval = dict(time_attr="step", perturbation_interval=4) if workers else \
        dict(time_attr="training_iteration", perturbation_interval=1)
    pbt = PopulationBasedTraining(metric="objective", mode="min", quantile_fraction=0.5, resample_probability=1.0,
                                  synch=True, hyperparam_mutations={"learning_rate": mutated}, **interval)
    before = _trial_temp_folders()
    trainer.hyperparameter_search(hp_space={"learning_rate": tune.grid_search([1e-2, 1e-7])}, n_trials=1,
                                  scheduler=pbt, name="pbt")
    assert _trial_temp_folders() <= before  # the trials' pointer folders and exploit copies are gone (issue 19)
    runs = {d: [json.loads(line) for line in open(tmp_path / "pbt" / d / "record.jsonl")]
            for d in os.listdir(tmp_path / "pbt") if (tmp_path / "pbt" / d / "record.jsonl").exists()}
    assert len(runs) == 2
    exploits = 0
    for name, rows in runs.items():
        others = [tmp_path / "pbt" / other for other in runs if other != name]
        current = None
        for row in rows:
            if "begin" in row:
                step = row["begin"]
                if step > 0:  # restored: from a better trial's checkpoint (an exploit) or its own (Tune paused it)
                    def digests(folders):
                        return [digest(type(tiny_gpt2()).from_pretrained(d / f"checkpoint-{step}")) for d in folders
                                if (d / f"checkpoint-{step}").is_dir()]

                    own, theirs = digests([tmp_path / "pbt" / name]), digests(others)
                    assert row["digest"] in own + theirs, (name, row, own, theirs)
                    if row["digest"] in theirs and row["digest"] not in own:  # the donor's weights, exactly
                        exploits += 1
                        assert row["config_lr"] in mutated  # with this trial's mutated lr, not the donor's
                        if workers:  # the donor's checkpoint was copied into this trial's run folder
                            assert list((tmp_path / "pbt" / name).glob(f"exploit-checkpoint-{step}-from-*"))
                current = row
            elif current["config_lr"] in mutated:  # every step after an exploit runs on the mutated lr
                assert row["lr"] == pytest.approx(current["config_lr"]), row
                assert row["base_lr"] == pytest.approx(current["config_lr"])
    assert exploits >= 1
    if workers:  # one worker group per trial: rank 0 is the same process at every train() begin
        assert {name: len({row["pid"] for row in rows if "begin" in row}) for name, rows in runs.items()} == \
            {name: 1 for name in runs}
        assert sum(1 for rows in runs.values() for row in rows if "begin" in row) == 2 + exploits


DRIVER = """
import sys
sys.path.insert(0, {repo!r})
from ray import tune
from tests.test_tune_search import sweep_trainer
trainer = sweep_trainer({out!r}, max_steps=4, save_strategy="no")
trainer.hyperparameter_search(hp_space={{"learning_rate": tune.grid_search([1e-2, 5e-3, 2e-3, 1e-3])}}, n_trials=1,
                              max_concurrent_trials=1, name="resumable")
"""


def finished_trials(sweep) -> dict:
    """{trial folder: its result.json text} for trials that reported both evaluations (4 steps, eval every 2)."""
    done = {}
    for d in sweep.glob("run_trial_*_*_learning_rate=*"):
        result = d / "result.json"
        lines = result.read_text().splitlines() if result.exists() else []
        if lines and lines[-1].endswith("}") and json.loads(lines[-1]).get("training_iteration") == 2:
            done[d.name] = result.read_text()
    return done


def test_a_sweep_survives_its_driver(ray_cluster, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(repo=repo, out=str(tmp_path / "resumable-out")))
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    driver = subprocess.Popen([sys.executable, str(script)], env=env, cwd=repo,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sweep = tmp_path / "resumable"
    deadline = time.monotonic() + 300
    try:
        while len(finished_trials(sweep)) < 2:  # poll the sweep's own files; the driver is killed after 2 trials
            assert driver.poll() is None, "the driver ended before it could be killed"
            assert time.monotonic() < deadline, "the first trials did not finish in 300 s"
            time.sleep(0.5)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    before = finished_trials(sweep)
    trainer = sweep_trainer(tmp_path / "resumable-out", max_steps=4, save_strategy="no")
    best = trainer.hyperparameter_search(hp_space={"learning_rate": tune.grid_search([1e-2, 5e-3, 2e-3, 1e-3])},
                                         n_trials=1, max_concurrent_trials=1, name="resumable", resume=True)
    after = finished_trials(sweep)
    assert len(after) == 4
    for name, text in before.items():  # the finished trials were not run again
        assert after[name] == text
    assert best.hyperparameters["learning_rate"] in (1e-2, 5e-3, 2e-3, 1e-3)
