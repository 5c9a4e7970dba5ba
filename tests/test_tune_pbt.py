"""In-place PBT (tune/pbt_scheduler.py) is chosen only where it applies; elsewhere Tune's PBT, with one warning.

No Ray session: the choice is made from the scheduler, the search and the cluster's size. The in-place exploit
itself (one worker group per trial, the donor's weights, the mutated lr) is asserted on 2-worker trials in
tests/test_tune_search.py::test_pbt_exploit_copies_the_donor_state_and_keeps_the_mutated_lr.
"""

from __future__ import annotations

import pickle
import warnings

import pytest
from ray import tune
from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.schedulers.pb2 import PB2

from raytrainer.tune.pbt_scheduler import InPlacePBT, in_place_pbt

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
