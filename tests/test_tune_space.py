"""raytrainer.tune: hp_space translation, search checks, objective / best run, schedulers.

Pure unit tests (no Ray started): Tune domains are built and sampled locally.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import transformers
from ray import tune
from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule, PopulationBasedTraining
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Quantized, Uniform
from transformers.trainer_utils import BestRun, default_compute_objective, default_hp_space_ray

from raytrainer import TrainingArguments
from raytrainer.tune import (
    HpSpaceError,
    RecordingTrial,
    best_run,
    build_scheduler,
    check_search,
    default_objective,
    direction_to_mode,
    split_params,
    to_tune_space,
)
from raytrainer.tune.schedulers import pbt_mutations


def values(domain, n=4000, seed=0):
    """Samples of a Tune domain (a list), as a trial would draw them."""
    out = domain.sample(size=n, random_state=np.random.default_rng(seed))
    return list(out)


def one(fn):
    """to_tune_space of an hp_space returning {"x": <one call>}: the translated value."""
    return to_tune_space(fn)["x"]


def is_roughly_uniform(samples, expected):
    counts = collections.Counter(samples)
    assert set(counts) == set(expected), (sorted(counts), sorted(expected))
    mean = len(samples) / len(expected)
    assert all(abs(c - mean) < 0.25 * mean for c in counts.values()), counts


# ------------------------------------------------------------------------ hp_space styles
def test_dict_of_domains_and_constants_passes_through():
    lr = tune.loguniform(1e-6, 1e-4)
    space = to_tune_space({"learning_rate": lr, "seed": 42, "lr_scheduler_kwargs": {"power": 2.0}})
    assert space["learning_rate"] is lr and space["seed"] == 42 and space["lr_scheduler_kwargs"] == {"power": 2.0}


def test_transformers_default_ray_space_called_with_a_trial():
    # transformers calls default_hp_space_ray(None); it ignores its argument
    space = to_tune_space(default_hp_space_ray)
    assert set(space) == {"learning_rate", "num_train_epochs", "seed", "per_device_train_batch_size"}
    assert isinstance(space["learning_rate"].get_sampler(), LogUniform)
    assert space["num_train_epochs"].categories == [1, 2, 3, 4, 5]
    assert to_tune_space(None).keys() == space.keys()  # None: transformers' Ray default


def test_ray_style_function_of_no_argument_and_one_needing_none():
    assert to_tune_space(lambda: {"x": tune.uniform(0, 1)})["x"].lower == 0

    def needs_none(trial):  # a Ray-style function written for transformers' hp_space(None) call
        assert trial is None
        return {"x": tune.choice([1, 2])}

    assert to_tune_space(needs_none)["x"].categories == [1, 2]
    probe = object()
    assert to_tune_space(lambda t: {"x": 1} if t is probe else t["x"], trial_probe=probe) == {"x": 1}


def test_transformers_docs_optuna_space():
    # the transformers docs' (hpo_train.md) Optuna example, verbatim
    def optuna_hp_space(trial):
        return {
            "learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
            "per_device_train_batch_size": trial.suggest_categorical("per_device_train_batch_size", [16, 32, 64, 128]),
        }

    space = to_tune_space(optuna_hp_space)
    lr = space["learning_rate"]
    assert isinstance(lr, Float) and isinstance(lr.get_sampler(), LogUniform) and (lr.lower, lr.upper) == (1e-6, 1e-4)
    assert isinstance(space["per_device_train_batch_size"], Categorical)
    assert space["per_device_train_batch_size"].categories == [16, 32, 64, 128]


def test_transformers_default_optuna_space(monkeypatch):
    # transformers' own default_hp_space_optuna, run on our recording trial (it only checks optuna is installed)
    monkeypatch.setattr(transformers.integrations, "is_optuna_available", lambda: True)
    space = to_tune_space(transformers.trainer_utils.default_hp_space_optuna)
    assert sorted(set(values(space["num_train_epochs"]))) == [1, 2, 3, 4, 5]  # high inclusive
    assert sorted(set(values(space["seed"]))) == list(range(1, 41))
    assert space["per_device_train_batch_size"].categories == [4, 8, 16, 32, 64]


def test_seed_docs_hp_space_verbatim():
    # ../shared/seeds/002 (a Chinese Trainer method index, its text double-encoded in the file), section
    # "### 4. 超参数搜索" (hyperparameter search): its only hp_space, verbatim; then its call's arguments
    def hp_space(trial):
        return {
            "learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True),
            "weight_decay": trial.suggest_float("weight_decay", 0.0, 0.1),
        }

    space = to_tune_space(hp_space)
    lr, wd = space["learning_rate"], space["weight_decay"]
    assert isinstance(lr.get_sampler(), LogUniform) and (lr.lower, lr.upper) == (1e-5, 1e-3)
    assert isinstance(wd.get_sampler(), Uniform) and (wd.lower, wd.upper) == (0.0, 0.1)
    ok = TrainingArguments(output_dir="unused", eval_strategy="epoch")
    check_search(ok, space, model_init=lambda: None, n_trials=10, direction="minimize")


# ------------------------------------------------------------------------ the translation table
def test_suggest_int_high_is_inclusive():
    x = one(lambda t: {"x": t.suggest_int("x", 1, 3)})
    assert isinstance(x, Integer) and (x.lower, x.upper) == (1, 4)  # randint's upper is exclusive
    is_roughly_uniform(values(x), [1, 2, 3])


def test_suggest_int_step_on_the_multiples_of_step():
    x = one(lambda t: {"x": t.suggest_int("x", 0, 100, step=25)})
    assert isinstance(x.get_sampler(), Quantized)  # qrandint: numeric for searchers
    is_roughly_uniform(values(x), [0, 25, 50, 75, 100])
    # Optuna drops a last step that overshoots high (its own adjustment)
    is_roughly_uniform(values(one(lambda t: {"x": t.suggest_int("x", 0, 110, step=25)})), [0, 25, 50, 75, 100])


def test_suggest_int_step_off_the_multiples_of_step():
    # Optuna's grid starts at low (1, 4, 7, 10); qrandint's would be the multiples of 3
    x = one(lambda t: {"x": t.suggest_int("x", 1, 10, step=3)})
    assert isinstance(x, Categorical) and x.categories == [1, 4, 7, 10]


def test_suggest_int_log():
    x = one(lambda t: {"x": t.suggest_int("x", 1, 8, log=True)})
    assert isinstance(x.get_sampler(), LogUniform) and (x.lower, x.upper) == (1, 9)
    drawn = collections.Counter(values(x, 20000))
    assert set(drawn) == set(range(1, 9))
    assert drawn[1] > drawn[8]  # log-uniform: the small values more often


def test_suggest_float_plain_log_and_old_names():
    u = one(lambda t: {"x": t.suggest_float("x", 0.1, 0.5)})
    assert isinstance(u.get_sampler(), Uniform) and (u.lower, u.upper) == (0.1, 0.5)
    lg = one(lambda t: {"x": t.suggest_float("x", 1e-6, 1e-2, log=True)})
    assert isinstance(lg.get_sampler(), LogUniform) and (lg.lower, lg.upper) == (1e-6, 1e-2)
    old_u = one(lambda t: {"x": t.suggest_uniform("x", 0.1, 0.5)})
    assert isinstance(old_u.get_sampler(), Uniform) and (old_u.lower, old_u.upper) == (0.1, 0.5)
    old_lg = one(lambda t: {"x": t.suggest_loguniform("x", 1e-6, 1e-2)})
    assert isinstance(old_lg.get_sampler(), LogUniform)


def test_suggest_float_step_is_the_grid_from_low_equally_likely():
    x = one(lambda t: {"x": t.suggest_float("x", 0.0, 0.3, step=0.1)})
    assert x.categories == [0.0, 0.1, 0.2, 0.3]  # exact decimals, every point as likely as in Optuna
    y = one(lambda t: {"x": t.suggest_discrete_uniform("x", 0.05, 0.3, 0.1)})
    assert y.categories == [0.05, 0.15, 0.25]  # off the multiples of q, high adjusted down as Optuna does


def test_suggest_float_step_large_grid():
    x = one(lambda t: {"x": t.suggest_float("x", 0.0, 1.0, step=1e-5)})
    assert isinstance(x.get_sampler(), Quantized) and (x.lower, x.upper) == (0.0, 1.0)
    with pytest.raises(HpSpaceError, match=r"hp_space\['x'\].*multiple"):
        to_tune_space(lambda t: {"x": t.suggest_float("x", 0.000005, 1.0, step=1e-5)})


def test_suggest_categorical_and_degenerate_ranges():
    c = one(lambda t: {"x": t.suggest_categorical("x", ("linear", "cosine"))})
    assert c.categories == ["linear", "cosine"]
    # Optuna returns low when low == high: a constant, not an empty Tune range
    assert one(lambda t: {"x": t.suggest_int("x", 3, 3)}) == 3
    assert one(lambda t: {"x": t.suggest_float("x", 0.1, 0.1)}) == 0.1
    assert one(lambda t: {"x": t.suggest_float("x", 0.1, 0.15, step=0.1)}) == 0.1


def test_constants_nested_values_and_mixed_domains():
    def hp(trial):
        return {
            "lr_scheduler_type": "cosine",
            "lr_scheduler_kwargs": {"power": trial.suggest_float("power", 1.0, 2.0)},
            "learning_rate": tune.loguniform(1e-5, 1e-3),
            "report_to": ["none"],
        }

    space = to_tune_space(hp)
    assert space["lr_scheduler_type"] == "cosine" and space["report_to"] == ["none"]
    assert isinstance(space["lr_scheduler_kwargs"]["power"], Float)
    assert isinstance(space["learning_rate"], Float)


def test_same_name_suggested_twice_is_one_value():
    def hp(trial):  # Optuna returns one value per name and trial
        first, again = trial.suggest_int("a", 1, 3), trial.suggest_int("a", 1, 3)
        assert first is again
        return {"x": again}

    assert isinstance(to_tune_space(hp)["x"], Integer)


def test_recording_trial_records():
    t = RecordingTrial()
    t.suggest_int("n", 1, 2)
    assert list(t.suggestions) == ["n"] and not hasattr(t, "study")


# ------------------------------------------------------------------------ what cannot be translated
@pytest.mark.parametrize(
    "hp, match",
    [
        (lambda t: {"a": (x := t.suggest_int("a", 1, 4)), "b": 2 * x},
         r"hp_space\['b'\] is computed from trial.suggest_int\('a', 1, 4\)"),
        (lambda t: {"a": t.suggest_float("a", 0.0, 1.0) + 1}, r"hp_space\['a'\] is computed"),
        (lambda t: {"a": np.float64(2.0) * t.suggest_float("a", 0.0, 1.0)}, r"hp_space\['a'\] is computed"),
        (lambda t: {"a": int(t.suggest_float("a", 0.0, 1.0))}, r"int\(\) on the value of trial.suggest_float"),
        (lambda t: {"a": 1 if t.suggest_int("a", 1, 4) > 2 else 0}, r"bool\(\)"),
        (lambda t: {"a": f"run-{t.suggest_int('a', 1, 4)}"}, r"string formatting"),
        (lambda t: {"a": (x := t.suggest_int("a", 1, 4)), "b": x}, r"hp_space\['a'\] and hp_space\['b'\] are both"),
        (lambda t: {"a": t.number}, r"trial.number"),
        (lambda t: {"a": t.suggest_float("a", 1e-3, 1.0, step=0.1, log=True)}, r"step and log=True"),
        (lambda t: {"a": t.suggest_int("a", 1, 8, step=2, log=True)}, r"step != 1 and log=True"),
        (lambda t: {"a": t.suggest_float("a", 0.0, 1.0, log=True)}, r"log=True needs low > 0"),
        (lambda t: {"a": t.suggest_int("a", 5, 1)}, r"low must be <= high"),
        (lambda t: {"a": t.suggest_int("a", 0.5, 3)}, r"low must be an integer"),
        (lambda t: {"a": t.suggest_categorical("a", [])}, r"choices is empty"),
        (lambda t: [{"name": "learning_rate", "type": "double"}], r"SigOpt"),
        (lambda t: {"method": "random", "metric": {"name": "objective"}, "parameters": {"learning_rate": {}}},
         r"Weights & Biases sweep"),
        ({1: tune.uniform(0, 1)}, r"keys must be strings"),
    ],
)
def test_untranslatable_spaces_raise_naming_the_problem(hp, match):
    with pytest.raises(HpSpaceError, match=match):  # a ValueError
        to_tune_space(hp)


# ------------------------------------------------------------------------ check_search
@pytest.fixture(scope="module")
def args():
    return TrainingArguments(output_dir="unused", eval_strategy="epoch", save_strategy="epoch")


def model_init_trial(trial):
    return None


def model_init_none():
    return None


def test_check_search_accepts_a_good_search(args):
    space = to_tune_space(default_hp_space_ray)
    check_search(args, space, model_init_trial, n_trials=4, direction="minimize")
    check_search(args, {**space, "dropout": tune.uniform(0, 0.3)}, model_init_trial, 4, "maximize",
                 scheduler="asha")
    check_search(args, space, model_init_none, 1, ["minimize", "maximize"], compute_objective=lambda m: (1, 2))


def test_missing_model_init(args):
    with pytest.raises(ValueError) as info:
        check_search(args, {}, None)
    assert str(info.value) == ("hyperparameter_search needs model_init=... (a function building a fresh model per "
                               "trial), as in transformers.")


def test_model_init_with_two_parameters(args):
    with pytest.raises(ValueError, match="0 or 1"):
        check_search(args, {}, lambda a, b: None)
    with pytest.raises(ValueError, match="positional"):
        check_search(args, {}, lambda **kw: None)


def test_unknown_key_with_zero_argument_model_init_names_the_closest_field(args):
    with pytest.raises(ValueError, match=r"'learning_rat'.*did you mean 'learning_rate'") as info:
        check_search(args, {"learning_rat": tune.uniform(1e-5, 1e-3)}, model_init_none)
    assert "model_init(trial)" in str(info.value)
    # model_init(trial) gets the whole trial dict: a non-field key may be read there
    check_search(args, {"learning_rat": tune.uniform(1e-5, 1e-3)}, model_init_trial)


def test_refused_and_per_search_fields(args):
    with pytest.raises(ValueError, match="'dataloader_in_order'.*not supported"):
        check_search(args, {"dataloader_in_order": tune.choice([True, False])}, model_init_trial)
    with pytest.raises(ValueError, match="'fsdp' cannot vary"):
        check_search(args, {"fsdp": tune.choice(["full_shard", ""])}, model_init_trial)
    with pytest.raises(ValueError, match="'num_workers' cannot vary"):
        check_search(args, {"num_workers": tune.choice([1, 2])}, model_init_trial)


@pytest.mark.parametrize(
    "domain, match",
    [
        (tune.uniform(0.1, 0.01), "lower=0.1 >= upper=0.01"),
        (tune.uniform(0.1, 0.1), "lower=0.1 >= upper=0.1"),
        (tune.randint(3, 3), "exclusive"),
        (tune.lograndint(4, 4), "exclusive"),
        (tune.choice([]), "no categories"),
        (tune.qrandint(1, 4, 5), "no multiple of q=5"),
        (tune.qrandint(2, 2, 1), "no multiple of q=1"),
        ({"grid_search": []}, "grid_search"),
        ({"power": tune.uniform(2, 1)}, r"hp_space\['x.power'\]"),
    ],
)
def test_empty_ranges(args, domain, match):
    with pytest.raises(ValueError, match=match):
        check_search(args, {"x": domain}, model_init_trial)


def test_non_empty_edge_ranges(args):
    space = {"a": tune.randint(3, 4), "b": tune.qrandint(5, 5, 5), "c": tune.quniform(0.0, 0.1, 0.1),
             "d": tune.randn(0, 1), "e": tune.sample_from(lambda config: 1), "f": {"grid_search": [1, 2]},
             "g": tune.choice(range(1, 6))}  # a range, as some scripts write it
    check_search(args, space, model_init_trial)
    with pytest.raises(ValueError, match="no categories"):
        check_search(args, {"g": tune.choice(range(0))}, model_init_trial)


@pytest.mark.parametrize(
    "space, match",
    [
        ({"per_device_train_batch_size": tune.choice([0, 16])}, r"can sample 0.*per_device_train_batch_size=0"),
        ({"lr_scheduler_type": tune.choice(["cosine", "cosin"])}, r"can sample 'cosin'.*did you mean 'cosine'"),
        ({"learning_rate": tune.uniform(-1e-3, 1e-3)}, r"can sample -0.001.*learning_rate"),
        ({"eval_strategy": tune.choice(["epoch", "steps"])}, r"can sample 'steps'.*save and eval strategy"),
        ({"eval_strategy": "no"}, r"can sample 'no'"),  # a constant too
    ],
)
def test_values_trainingarguments_refuses(space, match):
    # each value a trial can sample is tried on TrainingArguments first: the error here, not in a trial
    args = TrainingArguments(output_dir="unused", eval_strategy="epoch", save_strategy="epoch",
                             load_best_model_at_end=True)
    with pytest.raises(ValueError, match=match):
        check_search(args, space, model_init_trial)


def test_values_checked_together_with_the_spaces_constants():
    args = TrainingArguments(output_dir="unused", eval_strategy="epoch", save_strategy="epoch",
                             load_best_model_at_end=True)
    # every trial gets both "steps": valid, though either alone on args would not be
    check_search(args, {"eval_strategy": "steps", "save_strategy": tune.choice(["steps"]), "eval_steps": 10,
                        "seed": tune.uniform(1, 40), "warmup_steps": tune.uniform(0.0, 0.2)}, model_init_trial)


@pytest.mark.parametrize("direction", ["min", "Maximize", [], ["minimize", "up"], None])
def test_bad_direction(args, direction):
    with pytest.raises(ValueError, match="direction"):
        check_search(args, {}, model_init_trial, direction=direction)


@pytest.mark.parametrize("n_trials", [0, -1, 2.5, True])
def test_bad_n_trials(args, n_trials):
    with pytest.raises(ValueError, match="n_trials"):
        check_search(args, {}, model_init_trial, n_trials=n_trials)


def test_multi_objective_needs_compute_objective_and_no_scheduler(args):
    with pytest.raises(ValueError, match="compute_objective"):
        check_search(args, {}, model_init_trial, direction=["minimize", "maximize"])
    with pytest.raises(ValueError, match="multi-objective"):
        check_search(args, {"learning_rate": tune.uniform(1e-5, 1e-3)}, model_init_trial,
                     direction=["minimize", "maximize"], compute_objective=lambda m: (1, 2), scheduler="asha")


def test_scheduler_checks():
    no_eval = TrainingArguments(output_dir="unused")
    space = {"learning_rate": tune.uniform(1e-5, 1e-3)}
    for scheduler in ("asha", "pbt", MedianStoppingRule()):
        with pytest.raises(ValueError, match="eval_strategy"):
            check_search(no_eval, space, model_init_trial, scheduler=scheduler)
    check_search(no_eval, space, model_init_trial)  # no scheduler: evaluation at the end is enough
    no_save = TrainingArguments(output_dir="unused", eval_strategy="epoch", save_strategy="no")
    with pytest.raises(ValueError, match="save_strategy"):
        check_search(no_save, space, model_init_trial, scheduler="pbt")
    with pytest.raises(ValueError, match="'asha', 'pbt'"):
        check_search(no_save, space, model_init_trial, scheduler="hyperband")


def test_all_problems_reported_together(args):
    with pytest.raises(ValueError, match="3 problems") as info:
        check_search(args, {"learning_rat": tune.uniform(1, 0)}, model_init_none, n_trials=0)
    assert "learning_rat" in str(info.value) and "n_trials" in str(info.value)


# ------------------------------------------------------------------------ split_params
def test_split_params(args):
    overrides, rest = split_params({"learning_rate": 1e-4, "dropout": 0.1, "wandb": {}})
    assert overrides == {"learning_rate": 1e-4} and rest == {"dropout": 0.1}


def test_split_params_casts_as_transformers(args):
    overrides, _ = split_params({"seed": 23.7, "warmup_steps": 0.1, "lr_scheduler_type": "cosine",
                                 "num_train_epochs": 2, "fp16": False}, args)
    assert overrides["seed"] == 23 and isinstance(overrides["seed"], int)  # transformers: int(23.7)
    assert overrides["warmup_steps"] == 0.1  # a ratio stays one (transformers would make it int(0.1) == 0)
    assert overrides["lr_scheduler_type"] is transformers.SchedulerType.COSINE
    assert overrides["num_train_epochs"] == 2.0 and isinstance(overrides["num_train_epochs"], float)
    assert overrides["fp16"] is False


# ------------------------------------------------------------------------ objective
@pytest.mark.parametrize(
    "metrics",
    [
        {"eval_loss": 0.5, "epoch": 1.0, "eval_runtime": 3.0, "eval_samples_per_second": 10.0,
         "eval_steps_per_second": 2.0},
        {"eval_loss": 0.5, "eval_accuracy": 0.8, "eval_f1": 0.7, "epoch": 2.0, "eval_runtime": 1.0},
        {"eval_accuracy": 0.8},
        {"epoch": 1.0},
    ],
)
def test_default_objective_is_transformers(metrics):
    assert default_objective(metrics) == default_compute_objective(metrics)


def test_default_objective_is_eval_loss_beside_a_preparation_time():
    # transformers 5.23 would return the 0.01 s timing here; a timing is no objective
    assert default_objective({"eval_loss": 0.25, "eval_model_preparation_time": 0.01, "eval_runtime": 1.0}) == 0.25


def test_default_objective_ignores_the_reported_step():
    assert default_objective({"eval_loss": 0.5, "step": 40, "epoch": 1.0}) == 0.5


def test_direction_to_mode():
    assert direction_to_mode("minimize") == "min" and direction_to_mode("maximize") == "max"
    assert direction_to_mode(["minimize", "maximize"]) == ["min", "max"]
    for bad in ("min", [], ["minimize", "x"]):
        with pytest.raises(ValueError, match="direction"):
            direction_to_mode(bad)


ROWS = [
    {"trial_id": "a", "objective": 0.5, "config": {"learning_rate": 1e-4, "seed": 1}},
    {"trial_id": "b", "objective": 0.3, "config": {"learning_rate": 3e-4, "seed": 2}},
    {"trial_id": "c", "objective": float("nan"), "config": {"learning_rate": 9e-4, "seed": 3}},
    {"trial_id": "d", "objective": 0.3, "config": {"learning_rate": 5e-4, "seed": 4}},
    {"trial_id": "e", "config": {"learning_rate": 7e-4, "seed": 5}},  # failed before reporting
]


def test_best_run_minimize_and_maximize():
    best = best_run(ROWS, "minimize", run_summary="summary")
    assert isinstance(best, BestRun)
    assert best == BestRun("b", 0.3, {"learning_rate": 3e-4, "seed": 2}, "summary")  # ties: the first
    assert best_run(ROWS, "maximize").run_id == "a"
    assert best_run(ROWS, hp_keys=["learning_rate"]).hyperparameters == {"learning_rate": 3e-4}


def test_best_run_from_a_tune_dataframe():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame([
        {"trial_id": "a", "objective": 0.9, "config/learning_rate": 1e-4, "config/per_device_train_batch_size": 16,
         "config/lr_scheduler_kwargs/power": 2.0},
        {"trial_id": "b", "objective": 0.7, "config/learning_rate": 2e-4, "config/per_device_train_batch_size": 32,
         "config/lr_scheduler_kwargs/power": 1.0},
    ])
    best = best_run(frame, "minimize")
    assert best.run_id == "b" and best.objective == 0.7
    assert best.hyperparameters == {"learning_rate": 2e-4, "per_device_train_batch_size": 32,
                                    "lr_scheduler_kwargs": {"power": 1.0}}
    assert type(best.hyperparameters["per_device_train_batch_size"]) is int  # not numpy.int64


def test_best_run_multi_objective_is_the_pareto_front():
    rows = [
        {"trial_id": "a", "objective": [0.5, 0.9], "config": {}},
        {"trial_id": "b", "objective": [0.4, 0.8], "config": {}},
        {"trial_id": "c", "objective": [0.6, 0.8], "config": {}},  # dominated by a and b
        {"trial_id": "d", "objective": [0.3, 0.1], "config": {}},
    ]
    front = best_run(rows, ["minimize", "maximize"])
    assert [r.run_id for r in front] == ["a", "b", "d"]


def test_best_run_without_results():
    with pytest.raises(ValueError, match="no trial reported"):
        best_run([{"trial_id": "x", "config": {}}])


# ------------------------------------------------------------------------ schedulers
def test_build_asha_defaults_for_short_runs():
    asha = build_scheduler("asha", mode="max", max_t=8)
    assert isinstance(asha, ASHAScheduler)
    assert asha._metric == "objective" and asha._mode == "max" and asha._time_attr == "training_iteration"
    assert asha._max_t == 8 and asha._reduction_factor == 2
    assert [t for t, _ in asha._brackets[0]._rungs] == [8, 4, 2, 1]  # grace_period=1: first cut after 1 report
    assert build_scheduler("ASHA", time_attr="step", max_t=100, grace_period=10)._time_attr == "step"
    with pytest.raises(ValueError, match="max_t"):
        build_scheduler("asha")


def test_build_pbt_mutations_from_the_space():
    space = to_tune_space({"learning_rate": tune.loguniform(1e-5, 1e-3), "per_device_train_batch_size":
                           tune.choice([16, 32]), "seed": 1, "x": tune.sample_from(lambda c: 1),
                           "lr_scheduler_kwargs": {"power": tune.uniform(1, 2)}, "g": {"grid_search": [1, 2]}})
    mutations = pbt_mutations(space)
    assert mutations["per_device_train_batch_size"] == [16, 32]  # shifted between neighbours, not * 1.2
    assert mutations["learning_rate"] is space["learning_rate"] and mutations["g"] == [1, 2]
    assert set(mutations) == {"learning_rate", "per_device_train_batch_size", "lr_scheduler_kwargs", "g"}
    pbt = build_scheduler("pbt", space=space, perturbation_interval=2)
    assert isinstance(pbt, PopulationBasedTraining) and pbt._perturbation_interval == 2
    with pytest.raises(ValueError, match="perturbation_interval"):
        build_scheduler("pbt", space=space)
    with pytest.raises(ValueError, match="searches none"):
        build_scheduler("pbt", space={"seed": 1}, perturbation_interval=2)


def test_scheduler_pass_through_and_errors():
    mine = MedianStoppingRule()
    assert build_scheduler(mine) is mine and build_scheduler(None) is None
    with pytest.raises(ValueError, match=r"'asha', 'pbt'"):
        build_scheduler("hyperband")
    with pytest.raises(ValueError, match="instance"):
        build_scheduler(ASHAScheduler)
    with pytest.raises(ValueError, match="one metric"):
        build_scheduler("asha", mode=["min", "max"], max_t=4)


@pytest.mark.parametrize("scope, mode, expected", [
    ("last", "min", 3.0), ("all", "min", 1.0), ("all", "max", 5.0), ("avg", "min", 3.0),
    ("last-5-avg", "min", 3.0), ("last-10-avg", "max", 3.0),
])
def test_ray_scope_scores_a_trial_as_tune_does(scope, mode, expected):
    """RAY_SCOPE (transformers' variable) picks which of a trial's reports rank it."""
    import types

    import pandas as pd

    from raytrainer.tune.search import _scope_score

    history = [5.0, 1.0, 4.0, 2.0, 3.0]
    result = types.SimpleNamespace(metrics={"objective": history[-1]},
                                   metrics_dataframe=pd.DataFrame({"objective": history}))
    assert _scope_score(result, scope, mode) == expected
