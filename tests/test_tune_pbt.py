"""In-place PBT (tune/pbt_scheduler.py) is chosen only where it applies; elsewhere Tune's PBT, with one warning.

No Ray session: the choice is made from the scheduler, the search and the cluster's size. The in-place exploit
itself (one worker group per trial, the donor's weights, the mutated lr) is asserted on 2-worker trials in
tests/test_tune_search.py::test_pbt_exploit_copies_the_donor_state_and_keeps_the_mutated_lr.
"""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
from ray import tune
from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.schedulers.pb2 import PB2

from raytrainer.tune.pbt_scheduler import InPlacePBT, in_place_pbt

try:
    from tests.helpers import lm_examples, tiny_gpt2
    from tests.reliability.test_crafted_paths import CRAFTED, _args as crafted_args, exploit_copy_of_a_crafted_donor
except ImportError:
    from helpers import lm_examples, tiny_gpt2
    from reliability.test_crafted_paths import CRAFTED, _args as crafted_args, exploit_copy_of_a_crafted_donor

BOARD = object()  # stands for the board actor's handle: only kept, never called here


def pbt(**kw):
    return PopulationBasedTraining(time_attr="step", metric="objective", mode="min", perturbation_interval=4,
                                   hyperparam_mutations={"learning_rate": [1e-3, 2e-3]}, **kw)


def test_a_population_that_trains_at_once_gets_in_place_exploits_with_the_users_settings():
    given = pbt(synch=True, quantile_fraction=0.5)
    space = {"learning_rate": tune.grid_search([1e-2, 1e-3]), "weight_decay": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler = in_place_pbt(given, BOARD, n_trials=1, space=space, max_concurrent=2, search_alg=None)
    assert isinstance(scheduler, InPlacePBT) and scheduler._board is BOARD
    assert (scheduler._synch, scheduler._quantile_fraction, scheduler._perturbation_interval) == (True, 0.5, 4)
    assert scheduler._hyperparam_mutations == {"learning_rate": [1e-3, 2e-3]}
    # the sweep's state file holds no actor handle: a restored sweep runs Tune's own PBT
    assert pickle.loads(pickle.dumps(scheduler))._board is None


@pytest.mark.parametrize("case, kwargs, words", [
    ("population", dict(n_trials=2, max_concurrent=2), "population \\(4 trials\\)"),
    ("search_alg", dict(n_trials=1, max_concurrent=2, search_alg=object()), "search_alg"),
])
def test_where_not_every_trial_runs_at_once_tunes_pbt_runs_with_one_warning(case, kwargs, words):
    given = pbt()
    space = {"learning_rate": tune.grid_search([1e-2, 1e-3])}
    with pytest.warns(UserWarning, match=f"restarts a multi-worker trial's worker group.*{words}"):
        scheduler = in_place_pbt(given, BOARD, space=space, **{"search_alg": None, **kwargs})
    assert scheduler is given


def test_a_pbt_subclass_keeps_its_own_pause_logic():
    pb2 = PB2(time_attr="step", metric="objective", mode="min", perturbation_interval=4,
              hyperparam_bounds={"learning_rate": [1e-4, 1e-2]})
    assert in_place_pbt(pb2, BOARD, n_trials=2, space={}, max_concurrent=4, search_alg=None) is pb2


# ------------------------------------------------------------------------------------------ a crafted donor
@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    import raytrainer

    out = tmp_path_factory.mktemp("genuine") / "run"
    raytrainer.Trainer(model=tiny_gpt2(), args=crafted_args(out), train_dataset=lm_examples(8)).train()
    return out / "checkpoint-2"


@pytest.mark.parametrize("name", ["optimizer.pt", "raytrainer_run.pt", "latest"])
def test_an_in_place_exploit_refuses_a_crafted_donor(genuine, tmp_path, name):
    """The in-place path: the trial copies the donor (CheckpointPointer.resume_from) and plans it (pbt_relay.plan_for,
    checkpoint/resume.plan_resume), a worker checks its copy against the plan and trains from it (ExploitInPlace,
    the loop's loaders): every crafted file is refused before its payload can run."""
    import raytrainer
    from raytrainer.tune.pbt_relay import plan_for
    from raytrainer.tune.pbt_worker import ExploitInPlace

    resume, _, marker = exploit_copy_of_a_crafted_donor(genuine, tmp_path, name)
    args = crafted_args(tmp_path / "me", max_steps=4, learning_rate=3e-3)
    trainer = raytrainer.Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_examples(8))
    with pytest.raises(CRAFTED[name][0], match=CRAFTED[name][1]):
        plan = plan_for(args, resume, trainer.train_dataset)
        local, _ = ExploitInPlace({"plan": plan, "overrides": {"learning_rate": 3e-3}, "config": {},
                                   "donor_trial": "donor"}).prepare(trainer)
        trainer.train(resume_from_checkpoint=local)
    assert not marker.exists()
    assert not (tmp_path / "me").exists() or not os.listdir(tmp_path / "me")  # no step trained, nothing saved
